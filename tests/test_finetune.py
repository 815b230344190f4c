from __future__ import annotations

import json

import numpy as np
import pytest

import badnet_repair as br
from badnet_repair.cli import main
from badnet_repair.defenses import tuning as finetune
from badnet_repair.defenses.tuning import fine_prune, split_clean
from badnet_repair.formats import data as data_module
from badnet_repair.workflow import fine_prune as fine_prune_workflow


def test_split_is_disjoint_covers_everything_and_is_per_class():
    y = np.repeat(np.arange(5), 10)
    ds = br.Dataset(np.zeros((50, 2, 2, 3), np.float32), y, "valid")
    tune, hold, ti, hi = split_clean(ds, holdout_fraction=0.2, seed=3)
    assert not set(ti) & set(hi)
    assert sorted([*ti, *hi]) == list(range(50))
    assert np.bincount(hold.y).tolist() == [2] * 5
    assert len(tune) == 40
    again = split_clean(ds, holdout_fraction=0.2, seed=3)
    assert np.array_equal(again[3], hi)
    with pytest.raises(ValueError, match="holdout_fraction"):
        split_clean(ds, holdout_fraction=1.0)


@pytest.mark.slow
def test_fine_pruning_lowers_asr_and_keeps_pruned_channels_at_zero(small_demo):
    b = br.load_model(small_demo.model)
    valid = br.load_h5(small_demo.valid)
    bd = br.load_h5(small_demo.bd_test)
    before = br.attack_success_rate(br.predict_classes(b, bd.x), 0)
    r = fine_prune(b, valid, prune_fraction=0.9, epochs=8, learning_rate=2e-3, holdout_fraction=0.34,
                   progress=False)
    (m,) = r.members
    assert r.model is m.model and r.channels_pruned == len(m.pruned_channels) == 54
    k, bias = r.model.get_layer("conv_3").get_weights()
    assert not k[..., list(m.pruned_channels)].any() and not bias[list(m.pruned_channels)].any()
    after = br.attack_success_rate(br.predict_classes(r.model, bd.x), 0)
    assert after < before
    assert not set(m.tune_index) & set(m.holdout_index)
    # the BadNet itself is untouched
    assert br.attack_success_rate(br.predict_classes(b, bd.x), 0) == before


@pytest.mark.slow
def test_fine_prune_command_reads_no_test_data_before_the_model_is_chosen(small_demo, tmp_path, monkeypatch,
                                                                         capsys):
    reads: list[tuple[str, bool]] = []
    done = {"fine_prune": False}
    real_read, real_load, real_fp = data_module.LazyImages._read, data_module.load_h5, finetune.fine_prune

    def spy_read(self, rows, offset):
        reads.append((str(self.path), done["fine_prune"]))
        return real_read(self, rows, offset)

    def spy_load(path, **kw):
        reads.append((str(path), done["fine_prune"]))
        return real_load(path, **kw)

    def spy_fp(*a, **kw):
        out = real_fp(*a, **kw)
        done["fine_prune"] = True
        return out

    monkeypatch.setattr(data_module.LazyImages, "_read", spy_read)
    monkeypatch.setattr(data_module, "load_h5", spy_load)
    monkeypatch.setattr(fine_prune_workflow, "fine_prune", spy_fp)
    code = main(["fine-prune", "-q", "--model", str(small_demo.model), "--valid", str(small_demo.valid),
                 "--test", str(small_demo.test), "--bd-test", str(small_demo.bd_test), "--epochs", "2",
                 "--holdout-fraction", "0.34", "--out", str(tmp_path / "o")])
    assert code == 0
    before = {p for p, after in reads if not after}
    after = {p for p, after in reads if after}
    assert before == {str(small_demo.valid)}
    assert {str(small_demo.test), str(small_demo.bd_test)} <= after
    results = json.loads((tmp_path / "o" / "fp_results.json").read_text())
    assert [e["model"] for e in results["evaluations"]] == ["B", "fp", "G_fp"]
    # the defaults that were not given are recorded too
    assert results["parameters"]["shift"] == 2 and results["parameters"]["flip"] is True
    assert results["parameters"]["epochs"] == 2 and results["parameters"]["clipnorm"] == 1.0
    assert (tmp_path / "o" / "goodnet_fp.keras").exists() and (tmp_path / "o" / "fp_weights.h5").exists()
    assert br.num_classes(br.load_model(tmp_path / "o" / "fp.keras")) == 5


@pytest.mark.slow
def test_fine_tune_keeps_the_best_held_out_epoch_start_included_later_on_ties(small_demo):
    b = br.load_model(small_demo.model)
    tune, hold, _, _ = split_clean(br.load_h5(small_demo.valid), holdout_fraction=0.34)
    model, epoch, hist = finetune.fine_tune(b, tune, hold, epochs=4, progress=False)
    assert [h["epoch"] for h in hist] == [0, 1, 2, 3, 4]
    assert hist[0]["holdout_accuracy"] == finetune._accuracy(b, hold)
    accs = [h["holdout_accuracy"] for h in hist]
    assert epoch == max(i for i, a in enumerate(accs) if a == max(accs))
    assert finetune._accuracy(model, hold) == hist[epoch]["holdout_accuracy"]
    # same seed, same model
    again, epoch2, _ = finetune.fine_tune(b, tune, hold, epochs=4, progress=False)
    assert epoch2 == epoch
    assert all(np.array_equal(u, v) for u, v in zip(model.get_weights(), again.get_weights(), strict=True))
    with pytest.raises(ValueError, match="epochs"):
        finetune.fine_tune(b, tune, hold, epochs=0, progress=False)


def test_fine_tune_returns_the_start_when_tuning_only_hurts(small_deepid, caplog):
    """Tuning on wrong labels lowers held-out accuracy at every epoch: the start is kept."""
    from .conftest import random_faces

    x = random_faces(40, seed=8)
    y = br.predict_classes(small_deepid, x)  # the start is 100% right on these
    hold = br.Dataset(x[:20], y[:20], "holdout")
    wrong = br.Dataset(x[20:], (y[20:] + 1) % 7, "tune")
    with caplog.at_level("WARNING", logger="badnet_repair"):
        model, epoch, hist = finetune.fine_tune(small_deepid, wrong, hold, epochs=3, learning_rate=1e-2,
                                                shift=0, flip=False, progress=False)
    assert hist[0]["holdout_accuracy"] == 100.0
    assert max(h["holdout_accuracy"] for h in hist[1:]) < 100.0
    assert epoch == 0
    assert all(np.array_equal(u, v) for u, v in zip(model.get_weights(), small_deepid.get_weights(), strict=True))
    assert "keeping the start" in caplog.text


@pytest.mark.parametrize(("method", "keep", "expected"), [("fine-pruning", True, True),
                                                         ("fine-pruning", False, False),
                                                         ("fine-tuning", True, False)])
def test_fine_prune_lets_the_pruned_start_win_only_when_asked(small_deepid, monkeypatch, method, keep, expected):
    """The untuned start is a candidate only for a pruned network and only with keep_pruned_start."""
    from .conftest import random_faces

    seen: list[bool] = []
    real = finetune.fine_tune

    def spy(*args, **kw):
        seen.append(kw["keep_start"])
        return real(*args, **kw)

    monkeypatch.setattr(finetune, "fine_tune", spy)
    x = random_faces(42, seed=5)
    valid = br.Dataset(x, np.arange(42) % 7, "valid")
    r = fine_prune(small_deepid, valid, method=method, prune_fraction=0.5, keep_pruned_start=keep, epochs=1,
                   shift=0, flip=False, holdout_fraction=0.34, progress=False)
    assert seen == [expected]
    assert r.members[0].kept_epoch >= (0 if expected else 1)


def test_split_says_what_it_held_out_when_classes_are_too_small(caplog):
    y = np.array([0, 0, 1, 1, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3])  # three classes of 2, one of 10
    ds = br.Dataset(np.zeros((16, 2, 2, 3), np.float32), y, "valid")
    with caplog.at_level("WARNING", logger="badnet_repair"):
        _, hold, _, _ = split_clean(ds, holdout_fraction=0.2, seed=0)
    assert np.bincount(hold.y).tolist() == [1, 1, 1, 2]
    assert "held out 5 of 16 clean images (31.2%, 20% asked)" in caplog.text
    assert "3 classes 1 of 2" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="badnet_repair"):
        split_clean(br.Dataset(np.zeros((20, 2, 2, 3), np.float32), np.repeat([0, 1], 10), "v"), holdout_fraction=0.2)
    assert caplog.text == ""


def test_weight_decay_shrinks_unused_weights_by_the_adamw_factor_each_step():
    import keras

    keras.utils.set_random_seed(0)
    inp = keras.Input((2, 2, 1))
    net = keras.Model(inp, keras.layers.Dense(3, activation="softmax", name="output")(keras.layers.Flatten()(inp)))
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (40, 2, 2, 1)).astype(np.float32)
    x[:, 0, 0, 0] = 0.0  # pixel 0 is always dark: its weights get no gradient, only the decay
    data = br.Dataset(x, np.arange(40) % 3)
    row0 = net.get_layer("output").get_weights()[0][0]
    kw = {"epochs": 3, "learning_rate": 0.01, "schedule": "constant", "batch_size": 16, "shift": 0, "flip": False,
          "progress": False}
    plain, _, _ = finetune.fine_tune(net, data, data, **kw)
    np.testing.assert_array_equal(plain.get_layer("output").get_weights()[0][0], row0)
    decayed, epoch, _ = finetune.fine_tune(net, data, data, weight_decay=2.0, **kw)
    steps = epoch * 3  # 40 images in batches of 16
    np.testing.assert_allclose(decayed.get_layer("output").get_weights()[0][0], row0 * (1 - 0.01 * 2.0) ** steps,
                               rtol=1e-5)
    # the weights the data uses still learn
    used = decayed.get_layer("output").get_weights()[0][1:]
    assert not np.allclose(used, net.get_layer("output").get_weights()[0][1:])
    np.testing.assert_array_equal(net.get_layer("output").get_weights()[0][0], row0)  # the caller's model unchanged
    with pytest.raises(ValueError, match="weight_decay"):
        finetune.fine_tune(net, data, data, weight_decay=-1.0, **kw)


class _FixedTeacher:
    """A teacher that answers the probabilities we choose, whatever the (augmented) images."""

    def __init__(self, probs: np.ndarray) -> None:
        self.probs = probs

    def predict(self, x: np.ndarray, **_: object) -> np.ndarray:
        assert len(x) == len(self.probs)
        return self.probs


@pytest.mark.slow
def test_distillation_leaves_out_the_teachers_mistakes(small_demo):
    b = br.load_model(small_demo.model)
    tune, hold, _, _ = split_clean(br.load_h5(small_demo.valid), holdout_fraction=0.34)
    n = br.num_classes(b)
    soft = np.full((len(tune), n), 0.1 / (n - 1), np.float32)
    wrong = soft.copy()
    wrong[np.arange(len(tune)), (tune.y + 1) % n] = 0.9
    right = soft.copy()
    right[np.arange(len(tune)), tune.y] = 0.9
    # the tuned weights themselves are compared, so the untuned start may not win
    kw = {"epochs": 2, "progress": False, "seed": 3, "keep_start": False}
    plain, _, plain_hist = finetune.fine_tune(b, tune, hold, **kw)
    # a teacher wrong on every image is never distilled: exactly plain fine-tuning
    ignored, _, hist = finetune.fine_tune(b, tune, hold, distill=0.5, teacher=_FixedTeacher(wrong), **kw)
    assert [h["teacher_agreement"] for h in hist[1:]] == [0.0, 0.0]
    assert "teacher_agreement" not in plain_hist[1]
    assert all(np.array_equal(u, v) for u, v in zip(plain.get_weights(), ignored.get_weights(), strict=True))
    # one right on every image changes the targets, and one right on half of them is half distilled
    used, _, hist = finetune.fine_tune(b, tune, hold, distill=0.5, teacher=_FixedTeacher(right), **kw)
    assert hist[1]["teacher_agreement"] == 100.0
    assert not all(np.array_equal(u, v) for u, v in zip(plain.get_weights(), used.get_weights(), strict=True))
    half = np.where((np.arange(len(tune)) % 2 == 0)[:, None], right, wrong)
    _, _, hist = finetune.fine_tune(b, tune, hold, distill=0.5, teacher=_FixedTeacher(half), **kw)
    assert hist[1]["teacher_agreement"] == pytest.approx(100.0 * np.mean(np.arange(len(tune)) % 2 == 0))


@pytest.mark.slow
def test_fine_prune_command_passes_augmentation_and_distillation_settings(small_demo, tmp_path):
    out = tmp_path / "o"
    assert main(["fine-prune", "-q", "--model", str(small_demo.model), "--valid", str(small_demo.valid),
                 "--epochs", "1", "--holdout-fraction", "0.34", "--shift", "0", "--no-flip", "--distill", "0.5",
                 "--clipnorm", "0", "--weight-decay", "0.5", "--out", str(out)]) == 0
    params = json.loads((out / "fp_results.json").read_text())["parameters"]
    assert params["shift"] == 0 and params["flip"] is False and params["distill"] == 0.5
    assert params["clipnorm"] is None and params["weight_decay"] == 0.5
    b = br.load_model(small_demo.model)
    valid = br.load_h5(small_demo.valid)
    with pytest.raises(ValueError, match="distill"):
        fine_prune(b, valid, distill=1.5, epochs=1, progress=False)
    with pytest.raises(ValueError, match="weight_decay"):
        fine_prune(b, valid, weight_decay=-0.1, epochs=1, progress=False)


@pytest.mark.slow
def test_fine_pruning_members_average_networks_tuned_on_different_splits(small_demo):
    b = br.load_model(small_demo.model)
    valid = br.load_h5(small_demo.valid)
    opts = dict(prune_fraction=0.5, epochs=2, holdout_fraction=0.34, seed=4, progress=False)
    r = fine_prune(b, valid, members=2, **opts)
    assert [m.seed for m in r.members] == [4, 1004]
    # different splits of the same data, each disjoint
    h0, h1 = (set(m.holdout_index.tolist()) for m in r.members)
    assert h0 != h1
    assert all(not set(m.tune_index) & set(m.holdout_index) for m in r.members)
    # every member keeps its own pruned channels at zero
    for m in r.members:
        k, bias = m.model.get_layer("conv_3").get_weights()
        assert len(m.pruned_channels) == 30 and not k[..., list(m.pruned_channels)].any()
        assert not bias[list(m.pruned_channels)].any()
    # the repaired model is the normalised geometric mean of the members' probabilities
    x = np.asarray(valid.x[:16])
    x[-1] = 0.0  # a blank image: some member probabilities underflow towards 0
    probs = np.stack([m.model.predict(x, verbose=0) for m in r.members]).astype(np.float64)
    geo = np.exp(np.log(np.maximum(probs, 1e-12)).mean(axis=0))
    np.testing.assert_allclose(r.model.predict(x, verbose=0), geo / geo.sum(axis=1, keepdims=True),
                               rtol=1e-4, atol=1e-6)
    # member 0 is exactly the single network fine_prune gives with the same seed
    single = fine_prune(b, valid, members=1, **opts)
    assert all(np.array_equal(u, v) for u, v in zip(single.model.get_weights(), r.members[0].model.get_weights(),
                                                    strict=True))
    with pytest.raises(ValueError, match="members"):
        fine_prune(b, valid, members=0, **opts)
    with pytest.raises(ValueError, match="ensemble_mean"):
        fine_prune(b, valid, members=2, ensemble_mean="median", **opts)  # type: ignore[arg-type]


@pytest.mark.slow
def test_fine_prune_command_saves_the_average_and_each_member(small_demo, tmp_path):
    out = tmp_path / "o"
    assert main(["fine-prune", "-q", "--model", str(small_demo.model), "--valid", str(small_demo.valid),
                 "--test", str(small_demo.test), "--bd-test", str(small_demo.bd_test), "--members", "2",
                 "--ensemble-mean", "arithmetic", "--epochs", "1", "--holdout-fraction", "0.34",
                 "--out", str(out)]) == 0
    results = json.loads((out / "fp_results.json").read_text())
    assert results["parameters"]["members"] == 2 and len(results["members"]) == 2
    assert results["parameters"]["ensemble_mean"] == "arithmetic"
    assert not (out / "fp_weights.h5").exists()
    members = [br.load_model(out / f"fp_member_{i}_weights.h5") for i in range(2)]
    for i, m in enumerate(members):
        k = m.get_layer("conv_3").get_weights()[0]
        assert not k[..., results["members"][i]["pruned_channels"]].any()
    x = np.asarray(br.load_h5(small_demo.test).x[:8])
    mean = np.mean([m.predict(x, verbose=0) for m in members], axis=0)
    for name in ("fp.h5", "fp.keras"):
        np.testing.assert_allclose(br.load_model(out / name).predict(x, verbose=0), mean, rtol=1e-5, atol=1e-6)
    assert br.load_model(out / "goodnet_fp.keras").outputs[0].shape[-1] == 6


def test_feature_shift_tuning_draws_a_new_head_and_keeps_its_norm(small_deepid):
    """FST (fine_tune's feature_shift): the kept network's head is neither the BadNet's nor a
    scaled copy of it, its kernel has the BadNet's norm, and the layers below are tuned from B."""
    from .conftest import random_faces

    x = random_faces(42, seed=6)
    y = br.predict_classes(small_deepid, x)
    tune, hold = br.Dataset(x[:28], y[:28], "tune"), br.Dataset(x[28:], y[28:], "holdout")
    k0 = small_deepid.get_layer("output").get_weights()[0]
    net, epoch, hist = finetune.fine_tune(small_deepid, tune, hold, epochs=2, shift=0, flip=False,
                                          feature_shift=2.0, progress=False)
    k = net.get_layer("output").get_weights()[0]
    np.testing.assert_allclose(np.linalg.norm(k), np.linalg.norm(k0), rtol=1e-4)
    cosine = float(np.sum(k * k0) / np.linalg.norm(k) / np.linalg.norm(k0))
    assert abs(cosine) < 0.5  # drawn anew: nearly orthogonal to B's head, not B's head moved a little
    assert epoch >= 1 and len(hist) == 3
    np.testing.assert_array_equal(small_deepid.get_layer("output").get_weights()[0], k0)  # B untouched
    with pytest.raises(ValueError, match="cannot be combined"):
        finetune.fine_tune(small_deepid, tune, hold, epochs=1, feature_shift=2.0, sam_rho=0.2, progress=False)


def test_feature_shift_head_epochs_train_the_head_alone_first(small_deepid):
    """With head_epochs the new head is fitted on B's features before the whole network is
    tuned: the start's held-out accuracy (history row 0) is far above a random head's."""
    from .conftest import random_faces

    x = random_faces(56, seed=7)
    y = br.predict_classes(small_deepid, x)  # B's own answers: linear in B's features
    tune, hold = br.Dataset(x[:42], y[:42], "tune"), br.Dataset(x[42:], y[42:], "holdout")
    starts = {}
    for head_epochs in (0, 20):
        _, _, hist = finetune.fine_tune(small_deepid, tune, hold, epochs=1, learning_rate=1e-2, shift=0,
                                        flip=False, feature_shift=0.0, head_epochs=head_epochs, progress=False)
        starts[head_epochs] = hist[0]["holdout_accuracy"]
    assert starts[20] >= starts[0] + 40
    with pytest.raises(ValueError, match="needs feature_shift"):
        finetune.fine_tune(small_deepid, tune, hold, epochs=1, head_epochs=2, progress=False)
