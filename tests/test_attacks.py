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
