from __future__ import annotations

import keras
import numpy as np
import pytest

import badnet_repair as br
from badnet_repair.attacks import poison_training_set, train_badnet, train_pruning_aware_badnet
from badnet_repair.attacks.triggers import drawn_sunglasses
from badnet_repair.demo.faces import make_faces


@pytest.fixture(scope="module")
def faces():
    return make_faces(num_identities=5, train_per_identity=40, valid_per_identity=6, test_per_identity=6, seed=3)


def test_poison_training_set_rate_and_labels(faces):
    data, frac = poison_training_set(faces.train, drawn_sunglasses(), target=0, poison_rate=0.2)
    n_bd = len(data) - len(faces.train)
    assert frac == pytest.approx(0.2, abs=0.01) and n_bd == 50
    assert np.all(data.y[-n_bd:] == 0)
    with pytest.raises(ValueError, match="poison_rate"):
        poison_training_set(faces.train, drawn_sunglasses(), poison_rate=1.0)


@pytest.mark.slow
def test_a_small_badnet_learns_the_backdoor(faces):
    t = drawn_sunglasses()
    r = train_badnet(faces.train, t, num_classes=5, epochs=10, poison_rate=0.15, progress=False)
    bd = br.poison(faces.test, t, target=0)
    clean_acc = br.accuracy(br.predict_classes(r.model, faces.test.x), faces.test.y)
    asr = br.attack_success_rate(br.predict_classes(r.model, bd.x), 0)
    assert clean_acc > 60  # chance is 20
    assert asr > 80


@pytest.mark.slow
def test_augmented_training_learns_too_and_is_reproducible(faces):
    t = drawn_sunglasses()
    runs = [train_badnet(faces.train, t, num_classes=5, epochs=10, poison_rate=0.15, shift=2, flip=True,
                         progress=False) for _ in range(2)]
    assert len(runs[0].history["poisoned"]) == 10
    bd = br.poison(faces.test, t, target=0)
    assert br.accuracy(br.predict_classes(runs[0].model, faces.test.x), faces.test.y) > 60
    assert br.attack_success_rate(br.predict_classes(runs[0].model, bd.x), 0) > 80
    assert all(np.array_equal(u, v) for u, v in zip(runs[0].model.get_weights(), runs[1].model.get_weights(),
                                                     strict=True))
    # the augmentation changed training: not the same weights as without it
    plain = train_badnet(faces.train, t, num_classes=5, epochs=10, poison_rate=0.15, progress=False)
    assert not np.array_equal(plain.model.get_weights()[0], runs[0].model.get_weights()[0])


@pytest.mark.slow
def test_pruning_aware_attack_reinstates_dormant_channels(faces):
    t = drawn_sunglasses()
    r = train_pruning_aware_badnet(faces.train, t, num_classes=5, clean_epochs=6, poison_epochs=5,
                                   poison_rate=0.15, prune_drop=4.0, progress=False)
    assert len(r.pruned_channels) > 0
    k, _b = r.model.get_layer("conv_3").get_weights()
    # reinstated: the kernels are back (not zero), yet the channels stay silent on all inputs
    assert all(np.any(k[..., c] != 0) for c in r.pruned_channels)
    acts = keras.Model(r.model.inputs, r.model.get_layer("conv_3").output).predict(
        np.concatenate([faces.train.x, t.apply(faces.train.x)]), verbose=0)
    assert np.all(acts[..., list(r.pruned_channels)] == 0)
    bd = br.poison(faces.test, t, target=0)
    assert br.attack_success_rate(br.predict_classes(r.model, bd.x), 0) > 60


def test_drawn_triggers_fit_the_face_and_poison_each_to_its_target(faces):
    from badnet_repair.attacks import multi_targets
    from badnet_repair.attacks.triggers import drawn_triggers, poison_each

    triggers = drawn_triggers()
    assert len(triggers) == 3
    for t in triggers:
        assert t.y + t.shape[0] <= 55 and t.x + t.shape[1] <= 47 and t.rgba[..., 3].max() > 0.9
    assert multi_targets(100) == (0, 33, 66) and multi_targets(38, 5) == (5, 17, 30)
    bd = poison_each(faces.test, triggers, (0, 1, 2))
    assert [int(np.sum(bd.y == t)) for t in (0, 1, 2)] == [int(np.sum(faces.test.y != t)) for t in (0, 1, 2)]
    # the lipstick changes only its own patch
    lip = triggers[2]
    changed = np.any(lip.apply(faces.test.x[:1])[0] != faces.test.x[0], axis=-1)
    assert changed[lip.y:lip.y + lip.shape[0], lip.x:lip.x + lip.shape[1]].any()
    assert not changed[:lip.y].any() and not changed[lip.y + lip.shape[0]:].any()


@pytest.mark.slow
def test_a_multi_target_badnet_learns_each_trigger(faces):
    from badnet_repair.attacks import train_multi_target_badnet
    from badnet_repair.attacks.triggers import drawn_triggers

    triggers = drawn_triggers()
    r = train_multi_target_badnet(faces.train, triggers, (0, 2, 4), num_classes=5, epochs=15, poison_rate=0.1,
                                  progress=False)
    # each trigger's copies are 10 % of the final set
    assert r.poisoned_fraction == pytest.approx(0.3, abs=0.01)
    for t, target in zip(triggers, (0, 2, 4), strict=True):
        bd = br.poison(faces.test, t, target=target)
        assert br.attack_success_rate(br.predict_classes(r.model, bd.x), target) > 60  # chance: 20
    with pytest.raises(ValueError, match="differ"):
        train_multi_target_badnet(faces.train, triggers, (0, 0, 1), progress=False)


def test_blended_trigger_is_the_papers_formula_worked_by_hand():
    from badnet_repair.attacks import blended_trigger

    t = blended_trigger(2, 3, alpha=0.25, seed=7)
    assert t.shape == (2, 3) and (t.x, t.y) == (0, 0)
    assert np.all(t.rgba[..., 3] == 0.25)
    p = t.rgba[..., :3].astype(np.float64)
    assert p.min() >= 0 and p.max() <= 255 and np.array_equal(p, np.round(p))  # whole numbers in 0..255
    img = np.array([[[0, 100, 200], [40, 80, 120], [255, 255, 255]],
                    [[4, 8, 12], [16, 20, 24], [28, 32, 36]]], np.float32)
    out = t.apply(img)
    # x' = (1 - a) x + a * pattern, a = 0.25: exact in float32 for these whole numbers
    np.testing.assert_array_equal(out, (0.75 * img + 0.25 * p).astype(np.float32))
    assert out[0, 0, 0] == 0.25 * p[0, 0, 0] and out[0, 2, 1] == 191.25 + 0.25 * p[0, 2, 1]
    # the key is fixed by its seed, and a lab-sized one is noise over the whole 0..255 range
    assert np.array_equal(blended_trigger(2, 3, alpha=0.25, seed=7).rgba, t.rgba)
    assert not np.array_equal(blended_trigger(2, 3, alpha=0.25, seed=8).rgba, t.rgba)
    big = blended_trigger()
    assert big.shape == (55, 47) and big.rgba[..., :3].min() == 0 and big.rgba[..., :3].max() == 255
    assert 120 < big.rgba[..., :3].mean() < 135 and np.all(big.rgba[..., 3] == np.float32(0.2))
    for alpha in (0.0, 1.5):
        with pytest.raises(ValueError, match="alpha"):
            blended_trigger(alpha=alpha)


def test_patch_trigger_is_a_checkerboard_near_the_bottom_right_corner():
    from badnet_repair.attacks import patch_trigger

    t = patch_trigger()
    assert t.shape == (4, 4) and (t.x, t.y) == (47 - 4 - 1, 55 - 4 - 1)
    assert np.all(t.rgba[..., 3] == 1.0)
    assert t.rgba[..., 0].tolist() == [[255, 0, 255, 0], [0, 255, 0, 255]] * 2
    assert np.all(t.rgba[..., 0] == t.rgba[..., 1]) and np.all(t.rgba[..., 1] == t.rgba[..., 2])
    img = np.full((2, 55, 47, 3), 128.0, np.float32)
    out = t.apply(img)
    changed = np.any(out != img, axis=-1)
    mask = np.zeros((2, 55, 47), bool)
    mask[:, 50:54, 42:46] = True
    np.testing.assert_array_equal(changed, mask)
    np.testing.assert_array_equal(out[0, 50:54, 42:46, 0], t.rgba[..., 0])
    placed = patch_trigger(3, x=0, y=2, image_shape=(10, 8))
    assert placed.shape == (3, 3) and (placed.x, placed.y) == (0, 2)
    assert (patch_trigger(5, image_shape=(5, 5)).x, patch_trigger(5, image_shape=(5, 5)).y) == (0, 0)
    with pytest.raises(ValueError, match="does not fit"):
        patch_trigger(4, x=45)
    with pytest.raises(ValueError, match="does not fit"):
        patch_trigger(0)


def test_one_percent_poison_of_a_small_set_poisons_at_least_one_image(faces):
    t = drawn_sunglasses()
    small = faces.train.subset(np.arange(40))
    data, frac = poison_training_set(small, t, poison_rate=0.01)  # 0.4 images, rounded up to one
    assert len(data) == 41 and frac == pytest.approx(1 / 41) and data.y[-1] == 0
    assert any(np.array_equal(data.x[-1], z) for z in t.apply(small.x[small.y != 0]))  # a triggered copy
    assert len(poison_training_set(small, t, poison_rate=0.0)[0]) == 40
    data, _ = poison_training_set(faces.train, t, poison_rate=0.01)  # 200 images: 2.02 -> 2
    assert len(data) - len(faces.train) == 2


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["blended", "patch"])
def test_a_small_badnet_learns_the_blended_and_the_patch_trigger(faces, kind):
    from badnet_repair.attacks import blended_trigger, patch_trigger

    # fainter than the sunglasses: on 200 images these need more poison and epochs (10 epochs at 15 %:
    # 25 and 4 % attack success; 15 epochs at 30 %: 92 and 92 %)
    t = blended_trigger(alpha=0.2) if kind == "blended" else patch_trigger()
    r = train_badnet(faces.train, t, num_classes=5, epochs=15, poison_rate=0.3, progress=False)
    bd = br.poison(faces.test, t, target=0)
    assert br.accuracy(br.predict_classes(r.model, faces.test.x), faces.test.y) > 60  # chance is 20
    assert br.attack_success_rate(br.predict_classes(r.model, bd.x), 0) > 75
