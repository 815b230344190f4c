from __future__ import annotations

import json

import numpy as np
import pytest

import badnet_repair as br
from badnet_repair.cli import main
from badnet_repair.defenses.finetuning import Distillation, FineTuning, Member, fine_prune, greedy_soup
from badnet_repair.defenses.fst import FeatureShift
from badnet_repair.defenses.tuning import check_budget, drop_upper_bound, split_clean
from badnet_repair.errors import DataError
from badnet_repair.formats import data as data_module
from badnet_repair.nets.trainer import Trainer, Warmup


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
    real_read, real_load, real_fp = data_module.LazyImages._read, data_module.load_h5, FineTuning.tune

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
    monkeypatch.setattr(FineTuning, "tune", spy_fp)
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


@pytest.mark.parametrize(("method", "keep", "expected"), [("fine-pruning", True, True),
                                                         ("fine-pruning", False, False),
                                                         ("fine-tuning", True, False)])
def test_fine_prune_lets_the_pruned_start_win_only_when_asked(small_deepid, monkeypatch, method, keep, expected):
    """The untuned start is a candidate only for a pruned network and only with keep_pruned_start."""
    from .conftest import random_faces

    seen: list[bool] = []
    real = Trainer.train

    def spy(self, *args, **kw):
        seen.append(kw["keep_start"])
        return real(self, *args, **kw)

    monkeypatch.setattr(Trainer, "train", spy)
    x = random_faces(42, seed=5)
    valid = br.Dataset(x, np.arange(42) % 7, "valid")
    settings = {"prune_fraction": 0.5, "keep_pruned_start": keep} if method == "fine-pruning" else {}
    r = fine_prune(small_deepid, valid, method=method, epochs=1, shift=0, flip=False, holdout_fraction=0.34,
                   budget=None, progress=False, **settings)
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
    trainer, kw = Trainer(epochs=2), {"progress": False, "seed": 3, "keep_start": False}
    plain = trainer.train(b, tune, hold, **kw)
    # a teacher wrong on every image is never distilled: exactly plain fine-tuning
    ignored = trainer.train(b, tune, hold, parts=[Distillation(_FixedTeacher(wrong), 0.5)], **kw)
    assert [h["teacher_agreement"] for h in ignored.history[1:]] == [0.0, 0.0]
    assert "teacher_agreement" not in plain.history[1]
    assert all(np.array_equal(u, v) for u, v in zip(plain.model.get_weights(), ignored.model.get_weights(),
                                                    strict=True))
    # one right on every image changes the targets, and one right on half of them is half distilled
    used = trainer.train(b, tune, hold, parts=[Distillation(_FixedTeacher(right), 0.5)], **kw)
    assert used.history[1]["teacher_agreement"] == 100.0
    assert not all(np.array_equal(u, v) for u, v in zip(plain.model.get_weights(), used.model.get_weights(),
                                                        strict=True))
    half = np.where((np.arange(len(tune)) % 2 == 0)[:, None], right, wrong)
    got = trainer.train(b, tune, hold, parts=[Distillation(_FixedTeacher(half), 0.5)], **kw)
    assert got.history[1]["teacher_agreement"] == pytest.approx(100.0 * np.mean(np.arange(len(tune)) % 2 == 0))


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
                 "--budget", "none", "--out", str(out)]) == 0
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
    """FST's part: the kept network's head is neither the BadNet's nor a scaled copy of it, its
    kernel has the BadNet's norm, and the layers below are tuned from B."""
    from .conftest import random_faces

    x = random_faces(42, seed=6)
    y = br.predict_classes(small_deepid, x)
    tune, hold = br.Dataset(x[:28], y[:28], "tune"), br.Dataset(x[28:], y[28:], "holdout")
    k0 = small_deepid.get_layer("output").get_weights()[0]
    got = Trainer(epochs=2, shift=0, flip=False).train(small_deepid, tune, hold, parts=[FeatureShift("output", 2.0, 0)],
                                                         progress=False)
    k = got.model.get_layer("output").get_weights()[0]
    np.testing.assert_allclose(np.linalg.norm(k), np.linalg.norm(k0), rtol=1e-4)
    cosine = float(np.sum(k * k0) / np.linalg.norm(k) / np.linalg.norm(k0))
    assert abs(cosine) < 0.5  # drawn anew: nearly orthogonal to B's head, not B's head moved a little
    assert got.kept_epoch >= 1 and len(got.history) == 3
    np.testing.assert_array_equal(small_deepid.get_layer("output").get_weights()[0], k0)  # B untouched
    with pytest.raises(ValueError, match="alpha"):
        FeatureShift("output", -1.0, 0)


def test_feature_shift_head_epochs_train_the_head_alone_first(small_deepid):
    """With a warm-up of the new head, it is fitted on B's features before the whole network is
    tuned: the start's held-out accuracy (history row 0) is far above a random head's."""
    from .conftest import random_faces

    x = random_faces(56, seed=7)
    y = br.predict_classes(small_deepid, x)  # B's own answers: linear in B's features
    tune, hold = br.Dataset(x[:42], y[:42], "tune"), br.Dataset(x[42:], y[42:], "holdout")
    starts = {}
    trainer = Trainer(epochs=1, learning_rate=1e-2, shift=0, flip=False)
    for head_epochs in (0, 20):
        got = trainer.train(small_deepid, tune, hold, parts=[FeatureShift("output", 0.0, 0)],
                            warmup=Warmup(head_epochs, ("output",)), progress=False)
        starts[head_epochs] = got.history[0]["holdout_accuracy"]
    assert starts[20] >= starts[0] + 40
    member = Member(badnet=small_deepid, tune=tune, holdout=hold, layer="conv_3", seed=0, index=0, pixel_scale=255.0)
    fst = br.make_defense("fst", head_epochs=3, epochs=1)
    assert fst.plan(member, small_deepid, ()).warmup == Warmup(3, ("output",))
    with pytest.raises(ValueError, match="head_epochs"):
        br.make_defense("fst", head_epochs=-1).plan(member, small_deepid, ())


def test_the_budget_rule_falls_back_in_order_and_says_so(caplog):
    within = check_budget("x", 96.0, 98.0, 3.0, [("pruned start", 90.0), ("B", 98.0)])
    assert within.fallback is None and within.warning is None and within.accuracy == 96.0
    with caplog.at_level("WARNING", logger="badnet_repair"):
        start = check_budget("fine-pruning", 80.0, 98.0, 3.0, [("pruned start", 95.5), ("B", 98.0)])
    assert start.fallback == "pruned start" and start.accuracy == 95.5
    assert "fine-pruning fell 18.0 points below the BadNet" in start.warning and start.warning in caplog.text
    b = check_budget("fst", 80.0, 98.0, 3.0, [("pruned start", 90.0), ("B", 98.0)])
    assert b.fallback == "B" and "the backdoor is NOT removed" in b.warning
    none = check_budget("fst", 80.0, 98.0, 3.0, [])
    assert none.fallback is None and "no candidate was within it" in none.warning and none.accuracy == 80.0
    off = check_budget("fst", 10.0, 98.0, None, [("B", 98.0)])
    assert off.fallback is None and off.warning is None
    with pytest.raises(ValueError, match="budget"):
        check_budget("fst", 10.0, 98.0, -1.0, [])


def test_the_drop_bound_by_hand():
    # 10 images: B right on all, the result wrong on 2 (b = 2, c = 0): mean 0.2, v = 3/10 - 0.04 = 0.26
    base, res = np.ones(10, bool), np.array([0, 0] + [1] * 8, bool)
    assert drop_upper_bound(base, res) == pytest.approx(100 * (0.2 + 1.645 * np.sqrt(0.26 / 10)))
    # agreeing everywhere: one discordant image's worth of variance, 1 / n
    for n in (5, 100, 10_000):
        same = np.ones(n, bool)
        assert drop_upper_bound(same, same) == pytest.approx(100 * 1.645 * np.sqrt(1 / n) / np.sqrt(n))
    assert drop_upper_bound(np.ones(5, bool), np.ones(5, bool)) == pytest.approx(32.9)
    # the result better than B: the bound can be below 0
    assert drop_upper_bound(np.zeros(400, bool), np.ones(400, bool)) < 0
    assert drop_upper_bound(np.zeros(0, bool), np.zeros(0, bool)) == np.inf
    with pytest.raises(ValueError, match="shapes"):
        drop_upper_bound(np.ones(3, bool), np.ones(4, bool))


def test_a_result_kept_on_too_few_images_carries_a_caution(caplog):
    few = (np.ones(20, bool), np.array([0] + [1] * 19, bool))  # 1 point in 20 images: 5 points down
    many = (np.ones(4000, bool), np.array([0] * 40 + [1] * 3960, bool))  # 1 point in 4,000 images
    with caplog.at_level("WARNING", logger="badnet_repair"):
        weak = check_budget("fine-tuning", 93.0, 96.0, 3.0, [("B", 96.0)], paired=(few[0], few[1]))
    assert weak.fallback is None and weak.warning is None and weak.drop_bound == pytest.approx(drop_upper_bound(*few))
    assert weak.drop_bound > 3.0 and weak.caution in caplog.text and weak.lines == (weak.caution,)
    assert "on the 20 clean images it held out" in weak.caution
    assert f"up to {weak.drop_bound:.1f} points" in weak.caution
    firm = check_budget("fine-tuning", 95.0, 96.0, 3.0, [("B", 96.0)], paired=many)
    assert firm.drop_bound < 3.0 and firm.caution is None and firm.lines == ()
    # a result beyond the budget falls back; the caution is for kept results only
    back = check_budget("fine-tuning", 80.0, 96.0, 3.0, [("B", 96.0)], paired=few)
    assert back.fallback == "B" and back.caution is None and back.drop_bound is None and back.lines == (back.warning,)
    assert check_budget("fine-tuning", 80.0, 96.0, None, [], paired=few).lines == ()  # no budget, no check
    # a result above B on too few images is said to be above it, not "-1.0 points below"
    b_right = np.array([0, 0] + [1] * 4, bool)
    above = check_budget("gate", 100.0, 66.7, 3.0, [("B", 66.7)], paired=(b_right, np.ones(6, bool)))
    assert above.caution is not None and "is 33.3 points above the BadNet on the 6 clean images" in above.caution
    level = check_budget("gate", 50.0, 50.0, 3.0, [("B", 50.0)], paired=(np.arange(4) < 2, np.arange(4) >= 2))
    assert level.caution is not None and "is level with the BadNet on the 4 clean images" in level.caution



def test_a_fallback_chosen_on_too_few_images_carries_a_caution(caplog):
    base = np.ones(20, bool)
    result = np.array([0] * 8 + [1] * 12, bool)  # 40 points down: beyond the budget
    start = np.array([0] + [1] * 19, bool)  # the fallback: 5 points down on the same 20 images
    start_acc = 100.0 * start.mean()
    with caplog.at_level("WARNING", logger="badnet_repair"):
        # budget 6: the start (5 points down) is within it, but 20 images allow far more
        weak = check_budget("subspace-ft", 60.0, 100.0, 6.0, [("projected start", start_acc, start), ("B", 100.0)],
                            paired=(base, result))
    assert weak.fallback == "projected start" and weak.accuracy == start_acc
    assert weak.drop_bound == pytest.approx(drop_upper_bound(base, start)) and weak.drop_bound > 6.0
    assert weak.lines == (weak.warning, weak.caution) and weak.caution in caplog.text
    assert "projected start that subspace-ft returned is 5.0 points below" in weak.caution
    assert f"up to {weak.drop_bound:.1f} points" in weak.caution
    # on 4,000 images the same 5-point drop is held by the bound: no caution
    many_base, many_start = np.ones(4000, bool), np.array([0] * 200 + [1] * 3800, bool)
    firm = check_budget("subspace-ft", 60.0, 100.0, 6.0, [("projected start", 95.0, many_start), ("B", 100.0)],
                        paired=(many_base, np.zeros(4000, bool)))
    assert firm.fallback == "projected start" and firm.drop_bound < 6.0 and firm.caution is None
    # B given back, or a fallback without its images: no bound
    b = check_budget("x", 60.0, 100.0, 3.0, [("projected start", start_acc, start), ("B", 100.0)],
                     paired=(base, result))
    assert b.fallback == "B" and b.drop_bound is None and b.caution is None
    bare = check_budget("x", 60.0, 100.0, 6.0, [("projected start", start_acc), ("B", 100.0)], paired=(base, result))
    assert bare.fallback == "projected start" and bare.drop_bound is None and bare.caution is None

@pytest.mark.slow
def test_every_training_defense_respects_the_budget_with_two_clean_images_per_class(small_demo):
    """Two clean images per class (one tuning, one held out): tuning from so little wrecks clean
    accuracy; each defense that trains returns a network within the budget on its held-out image
    per class, or B itself, and says so in :attr:`Repair.warnings`; none is silent."""
    b = br.load_model(small_demo.model)
    valid = br.load_h5(small_demo.valid)
    keep = np.concatenate([np.flatnonzero(valid.y == c)[:2] for c in np.unique(valid.y)])
    tiny = br.Dataset(np.asarray(valid.x)[keep], valid.y[keep], "tiny")
    fell = []
    for name in ("fine-tuning", "fine-pruning", "ft-sam", "fst"):
        defense = br.make_defense(name, epochs=3, learning_rate=5e-2, head_epochs=1) if name == "fst" else \
            br.make_defense(name, epochs=3, learning_rate=5e-2)
        result = defense.tune(b, tiny)
        (m,) = result.members
        assert m.base_holdout_accuracy - m.holdout_accuracy <= 3.0 or m.budget.warning, name
        assert m.budget is not None and m.budget.budget == 3.0
        if m.budget.fallback is not None:
            fell.append(name)
            assert m.budget.warning and result.warnings == (m.budget.warning,)
            if m.budget.fallback == "B":
                assert m.model is b
        else:  # kept on one held-out image per class: too few to hold the budget, and it says so
            assert m.budget.caution and result.warnings == m.budget.lines
        repair = defense.as_repair(result)
        assert repair.warnings == result.warnings
    assert fell  # the rate is high enough that some repair had to fall back
    # a soup: every member holds out one image of each class, none tunes on it, and the soup is held there
    soup = FineTuning(members=2, ensemble_mean="soup", epochs=3, learning_rate=5e-2).tune(b, tiny)
    shared = set(split_clean(tiny, holdout_fraction=0.1, seed=0)[3].tolist())
    assert sorted(tiny.y[sorted(shared)]) == sorted(np.unique(tiny.y))
    assert all(shared <= set(m.holdout_index) for m in soup.members)
    assert all(not set(m.tune_index) & shared for m in soup.members)
    assert soup.budget is not None and soup.budget.budget == 3.0
    if soup.budget.fallback == "B":
        assert soup.model is b and soup.warnings == (soup.budget.warning,)
    else:
        assert soup.budget.base_accuracy - soup.budget.accuracy <= 3.0
        assert soup.budget.caution and soup.warnings == (soup.budget.caution,)  # 5 shared images: too few


def test_budget_apart_chooses_on_one_half_and_checks_the_budget_on_the_other(small_deepid, monkeypatch, caplog):
    """With ``budget_apart`` the trainer (the epoch choice) sees one half of the held-out part and
    the budget compares B and the result on the other half only."""
    from badnet_repair.nets.trainer import accuracy

    from .conftest import random_faces

    seen: list[br.Dataset] = []
    real = Trainer.train

    def spy(self, start, tune, holdout, **kw):
        seen.append(holdout)
        return real(self, start, tune, holdout, **kw)

    monkeypatch.setattr(Trainer, "train", spy)
    valid = br.Dataset(random_faces(84, seed=5), np.arange(84) % 7, "valid")
    # the plain computation: the member's split, then its held-out part split per class, half and half
    _, holdout, _, _ = split_clean(valid, holdout_fraction=0.5, seed=0)
    choose, apart, _, _ = split_clean(holdout, holdout_fraction=0.5, seed=7)
    assert len(choose) and len(apart) and len(choose) + len(apart) == len(holdout)
    result = FineTuning(epochs=1, holdout_fraction=0.5, budget=None, budget_apart=True, shift=0,
                        flip=False).tune(small_deepid, valid)
    (m,) = result.members
    np.testing.assert_array_equal(seen[0].x, choose.x)  # the epoch is chosen on one half
    assert m.base_holdout_accuracy == pytest.approx(accuracy(small_deepid, apart))  # B on the other
    assert m.holdout_accuracy == pytest.approx(accuracy(m.model, apart))  # and the result there too
    # without it, all the held-out images do both
    seen.clear()
    plain = FineTuning(epochs=1, holdout_fraction=0.5, budget=None, shift=0, flip=False).tune(small_deepid, valid)
    np.testing.assert_array_equal(seen[0].x, holdout.x)
    assert plain.members[0].base_holdout_accuracy == pytest.approx(accuracy(small_deepid, holdout))
    # one held-out image cannot be split: checked where chosen, and said
    two = br.Dataset(random_faces(2, seed=6), np.array([0, 1]), "two")
    with caplog.at_level("WARNING", logger="badnet_repair"):
        FineTuning(epochs=1, budget=None, budget_apart=True, shift=0, flip=False).tune(small_deepid, two)
    assert "too few to split" in caplog.text
    with pytest.raises(ValueError, match="budget_apart"):
        FineTuning(members=2, ensemble_mean="soup", budget_apart=True)


def test_split_with_one_image_per_class_holds_out_images_at_random(caplog):
    ds = br.Dataset(np.zeros((7, 2, 2, 3), np.float32), np.arange(7), "valid1.h5")
    with caplog.at_level("WARNING", logger="badnet_repair"):
        tune, hold, ti, hi = split_clean(ds, holdout_fraction=0.2, seed=0)
    assert len(hold) == 1 and len(tune) == 6 and sorted([*ti, *hi]) == list(range(7))
    assert "held out 1 of 7 clean images at random" in caplog.text
    with pytest.raises(DataError, match="valid1.h5: 1 clean image"):
        split_clean(br.Dataset(np.zeros((1, 2, 2, 3), np.float32), np.array([0]), "valid1.h5"))


@pytest.mark.slow
def test_a_soup_is_one_network_of_mean_weights_held_to_the_budget_on_a_part_every_member_held_out(small_demo):
    from badnet_repair.nets.trainer import accuracy

    b = br.load_model(small_demo.model)
    valid = br.load_h5(small_demo.valid)
    opts = dict(members=3, ensemble_mean="soup", epochs=2, holdout_fraction=0.34, seed=4)
    r = FineTuning(**opts, budget=None).tune(b, valid)  # type: ignore[arg-type]
    # one network of B's architecture whose weights are the members' mean
    assert [layer.name for layer in r.model.layers] == [layer.name for layer in b.layers]
    for got, *members in zip(r.model.get_weights(), *(m.model.get_weights() for m in r.members), strict=True):
        np.testing.assert_allclose(got, np.mean(members, axis=0), rtol=1e-6, atol=1e-7)
    # every member holds out the shared part (half the held-out share, drawn with the defense's seed)
    # and a part of its own; none tunes on the shared part, and each tunes on different images
    shared = split_clean(valid, holdout_fraction=0.17, seed=4)[3]
    assert np.array_equal(np.sort(shared), sorted(set.intersection(*(set(m.holdout_index) for m in r.members))))
    assert len(shared) == 5  # one image of each of the 5 identities
    for m in r.members:
        assert not set(m.tune_index) & set(m.holdout_index)
        assert sorted([*m.tune_index, *m.holdout_index]) == list(range(len(valid)))
        assert m.budget is not None and m.budget.budget is None  # not checked one by one
    assert len({tuple(m.tune_index) for m in r.members}) == 3
    # the soup itself is measured against B on the shared part
    part = valid.subset(shared)
    assert r.budget is not None and r.budget.budget is None and r.budget.fallback is None
    assert r.budget.base_accuracy == accuracy(b, part) and r.budget.accuracy == accuracy(r.model, part)
    # a soup wrecked by a rate far too high falls back to B, and says so
    wrecked = FineTuning(**{**opts, "learning_rate": 5.0, "clipnorm": None, "budget": 0.0}).tune(b, valid)  # type: ignore[arg-type]
    assert wrecked.model is b and wrecked.budget is not None and wrecked.budget.fallback == "B"
    (line,) = wrecked.warnings
    assert "fine-tuning (a soup of 3)" in line and "returned the BadNet unchanged" in line
    rep = FineTuning(**{**opts, "learning_rate": 5.0, "clipnorm": None, "budget": 0.0}).repair(b, valid)  # type: ignore[arg-type]
    assert rep.warnings == wrecked.warnings and rep.record["choices"]["soup"]["fallback"] == "B"


def _linear_net(w: float, b0: float):
    """A two-class softmax on two numbers: logits w * x + (b0, 0), worked out by hand below."""
    import keras

    x = keras.Input(shape=(1, 1, 2), name="input")
    y = keras.layers.Dense(2, activation="softmax", name="output")(keras.layers.Flatten(name="flatten")(x))
    m = keras.Model(x, y)
    m.get_layer("output").set_weights([w * np.eye(2, dtype=np.float32), np.array([b0, 0.0], np.float32)])
    return m


def test_greedy_soup_adds_members_best_first_only_where_the_held_out_accuracy_does_not_fall():
    # points labelled by their larger coordinate
    x = np.array([[1, 0], [0, 1], [0.1, 0.5], [0.5, 0.1]], np.float32).reshape(4, 1, 1, 2)
    holdout = br.Dataset(x, np.array([0, 1, 1, 0]), "held")
    # m0 = identity: 100 %; m1 = identity with +0.6 on class 0: (0.7, 0.5) for (0.1, 0.5) is wrong, 75 %;
    # m2 = -3 identity: 0 %
    m0, m1, m2 = _linear_net(1.0, 0.0), _linear_net(1.0, 0.6), _linear_net(-3.0, 0.0)
    kept, soup, acc = greedy_soup([m2, m1, m0], holdout)
    # ranked m0 (100), m1 (75), m2 (0); soup(m0, m1) = identity, bias 0.3: all four right, a tie, so m1
    # joins; with m2 the weights are -1/3 identity: accuracy falls, so m2 is left out
    assert kept == (2, 1) and acc == 100.0
    w, b = soup.get_layer("output").get_weights()
    np.testing.assert_allclose(w, np.eye(2), atol=1e-7)
    np.testing.assert_allclose(b, [0.3, 0.0], atol=1e-7)
    # a soup that only falls keeps the best member alone, the model itself
    kept, soup, acc = greedy_soup([m2, m0], holdout)
    assert kept == (1,) and soup is m0 and acc == 100.0
    with pytest.raises(ValueError, match="at least one"):
        greedy_soup([], holdout)


def test_greedy_soup_needs_a_soup():
    with pytest.raises(ValueError, match="greedy_soup needs ensemble_mean='soup' and members > 1"):
        FineTuning(members=3, greedy_soup=True)
    with pytest.raises(ValueError, match="greedy_soup needs"):
        FineTuning(members=1, ensemble_mean="soup", greedy_soup=True)


@pytest.mark.slow
def test_a_greedy_soup_holds_the_kept_members_mean_and_is_held_to_the_budget(small_demo):
    from badnet_repair.nets.trainer import accuracy

    b = br.load_model(small_demo.model)
    valid = br.load_h5(small_demo.valid)
    opts = dict(members=3, ensemble_mean="soup", greedy_soup=True, epochs=2, holdout_fraction=0.34, seed=4)
    r = FineTuning(**opts, budget=None).tune(b, valid)  # type: ignore[arg-type]
    shared = valid.subset(split_clean(valid, holdout_fraction=0.17, seed=4)[3])
    # the plain computation: rank by accuracy on the shared part, add where the soup does not fall
    alone = [accuracy(m.model, shared) for m in r.members]
    first = int(np.argmax(alone))
    assert r.soup_members[0] == first and len(set(r.soup_members)) == len(r.soup_members)
    kept = [r.members[i].model for i in r.soup_members]
    for got, *ws in zip(r.model.get_weights(), *(m.get_weights() for m in kept), strict=True):
        np.testing.assert_allclose(got, np.mean(ws, axis=0), rtol=1e-6, atol=1e-7)
    assert r.budget is not None and r.budget.accuracy == accuracy(r.model, shared) >= alone[first]
    rep = FineTuning(**opts, budget=None).as_repair(r)  # type: ignore[arg-type]
    assert rep.record["choices"]["soup"]["members"] == [i + 1 for i in r.soup_members]
    # wrecked members: the greedy soup falls back to B like any soup, and its line says so
    wrecked = FineTuning(**{**opts, "learning_rate": 5.0, "clipnorm": None, "budget": 0.0}).tune(b, valid)  # type: ignore[arg-type]
    assert wrecked.model is b and wrecked.budget is not None and wrecked.budget.fallback == "B"
    (line,) = wrecked.warnings
    assert "fine-tuning (a greedy soup of" in line and "returned the BadNet unchanged" in line


@pytest.mark.slow
def test_fine_prune_command_saves_a_soup_as_one_network(small_demo, tmp_path):
    out = tmp_path / "o"
    assert main(["fine-prune", "-q", "--method", "fine-tuning", "--model", str(small_demo.model),
                 "--valid", str(small_demo.valid), "--test", str(small_demo.test), "--bd-test",
                 str(small_demo.bd_test), "--members", "2", "--ensemble-mean", "soup", "--epochs", "1",
                 "--holdout-fraction", "0.34", "--budget", "none", "--out", str(out)]) == 0
    results = json.loads((out / "ft_results.json").read_text())
    assert results["parameters"]["ensemble_mean"] == "soup" and results["soup_budget"]["budget"] is None
    assert results["soup_budget"]["members"] == [1, 2]  # a uniform soup holds every member
    soup = br.load_model(out / "ft_weights.h5")  # the lab's weights-only layout: one DeepID
    members = [br.load_model(out / f"ft_member_{i}_weights.h5") for i in range(2)]
    for got, u, v in zip(soup.get_weights(), members[0].get_weights(), members[1].get_weights(), strict=True):
        np.testing.assert_allclose(got, (u + v) / 2, rtol=1e-6, atol=1e-7)
