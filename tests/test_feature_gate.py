"""The feature gate (defenses.feature_gate): the rule by hand, the repaired model against the plain
rule through a saved file, the fallback to B, a small demo BadNet, and no test or poisoned image read."""

from __future__ import annotations

import logging

import keras
import numpy as np
import pytest

import badnet_repair as br
from badnet_repair.defenses import REGISTRY, make_defense
from badnet_repair.defenses.feature_gate import FeatureGate, TwoGates, runner_up, walk_flag_shares
from badnet_repair.detectors.features import FeatureEnsemble
from badnet_repair.nets.models import predict_probabilities

from .conftest import LoggedRepair, assert_no_test_or_poisoned_image_is_read_while_repairing, random_faces


def test_the_runner_up_is_the_second_most_probable_class_the_first_of_ties():
    probs = np.array([[0.1, 0.6, 0.3], [0.5, 0.5, 0.0], [1.0, 0.0, 0.0], [0.2, 0.4, 0.4]], np.float32)
    # the top class is the first of ties; the runner-up the first of the rest
    assert runner_up(probs).tolist() == [2, 1, 1, 2]


def test_the_rule_keeps_the_share_before_the_accuracy_first_falls_more_than_drop():
    scores = np.arange(10.0)  # image i scores i; flags are score > threshold
    labels = np.zeros(10, np.int64)
    top = np.zeros(10, np.int64)
    top[9] = 1  # B is wrong on the highest-scoring image only ...
    second = np.ones(10, np.int64)
    second[9] = 0  # ... where its runner-up is right; elsewhere the runner-up is wrong
    # shares 0.1, 0.2, 0.3, 0.5 flag 0, 1, 2, 4 images (the threshold is a score, rounded up):
    # accuracy 90, 100, 90, 70 (B's: 90)
    tried, kept = walk_flag_shares(top, second, labels, scores, (0.1, 0.2, 0.3, 0.5), drop=10.0)
    assert [t["overruled"] for t in tried] == [0.0, 10.0, 20.0, 40.0]
    assert [t["accuracy"] for t in tried] == pytest.approx([90.0, 100.0, 90.0, 70.0])
    assert kept is not None and kept.shares == (0.3,) and kept.thresholds == (7.0,)
    np.testing.assert_array_equal(kept.right, np.arange(10) != 8)
    # allowed 25 points the last share is kept; none where even the first falls too far
    assert walk_flag_shares(top, second, labels, scores, (0.1, 0.2, 0.3, 0.5), drop=25.0)[1].shares == (0.5,)
    tried, kept = walk_flag_shares(top, second, labels, scores, (0.5, 0.2), drop=10.0)
    assert kept is None and len(tried) == 1  # the walk stops at the first fall
    # a share that flags no clean image is never kept: its cost cannot be measured on them
    tried, kept = walk_flag_shares(top, second, labels, scores, (0.01, 0.05), drop=10.0)
    assert [t["overruled"] for t in tried] == [0.0, 0.0] and kept is None


def test_too_few_clean_images_to_flag_any_give_b_back_with_a_loud_line(small_deepid):
    clean = br.Dataset(random_faces(3, seed=5), np.array([0, 1, 2]), "valid")
    repair = FeatureGate(budget=None).repair(small_deepid, clean)
    assert repair.model is small_deepid and repair.record["choices"]["quantile"] is None
    assert all(t["overruled"] == 0.0 for t in repair.record["choices"]["tried"])
    assert len(repair.warnings) == 1 and "too few to set its threshold" in repair.warnings[0]
    assert "NOT removed" in repair.warnings[0]


def test_the_gated_model_is_the_plain_rule_and_survives_a_saved_file(tmp_path, small_deepid):
    x = random_faces(70, seed=5)
    clean = br.Dataset(x, np.arange(70) % 7, "valid")
    b = small_deepid
    weights = [w.copy() for w in b.get_weights()]
    # labels unrelated to a random B: any share falls far below B; drop 100 keeps the share asked
    repair = FeatureGate(quantiles=(0.2,), drop=100.0, budget=None).repair(b, clean)
    for before, after in zip(weights, b.get_weights(), strict=True):
        np.testing.assert_array_equal(before, after)  # the caller's model is not changed
    choices = repair.record["choices"]
    assert choices["quantile"] == 0.2 and choices["tried"][0]["overruled"] > 0
    # the plain rule: the feature ensemble fitted alike, thresholded where the rule said
    det = FeatureEnsemble(fold_correction=True).fit(b, clean)
    assert choices["threshold"] == pytest.approx(np.quantile(det.calibration_scores, 0.8, method="higher"))
    new = random_faces(40, seed=6)
    probs = predict_probabilities(b, new)
    flagged = det.scores(new) > choices["threshold"]
    want = np.where(flagged, runner_up(probs), probs.argmax(axis=1))
    assert flagged.any() and (~flagged).any()
    got = repair.model.predict(new, verbose=0)
    np.testing.assert_array_equal(got.argmax(axis=1), want)
    np.testing.assert_array_equal(got[~flagged], probs[~flagged])  # B's probabilities where not flagged
    path = tmp_path / "gated.keras"
    repair.model.save(path)
    np.testing.assert_array_equal(keras.models.load_model(path).predict(new, verbose=0), got)


def test_a_saved_sequential_badnet_is_gated_by_both_gates_as_the_plain_rule(tmp_path):
    # load_model rebuilds a Sequential file as a graph; the gates' model is cloned onto a new input,
    # which a graph built from a list of one input refused (a Keras error from the CLI's default)
    keras.utils.set_random_seed(4)
    seq = keras.Sequential([keras.Input((24, 20, 3)), keras.layers.Rescaling(1 / 255, name="scale"),
                            keras.layers.Conv2D(6, 3, activation="relu", name="c one"),
                            keras.layers.MaxPooling2D(name="p.1"),
                            keras.layers.Conv2D(8, 3, activation="relu", name="c2"),
                            keras.layers.GlobalAveragePooling2D(name="gap"),
                            keras.layers.Dense(5, activation="softmax", name="out")])
    seq.save(tmp_path / "seq.h5")
    b = br.load_model(tmp_path / "seq.h5")
    assert not isinstance(b.input, list)
    x = np.random.default_rng(1).uniform(0, 255, (50, 24, 20, 3)).astype(np.float32)
    clean = br.Dataset(x, np.arange(50) % 5, "valid")
    repair = TwoGates(quantiles=(0.2,), drop=100.0, first_drop=0.0, budget=None).repair(b, clean)
    choices = repair.record["choices"]
    assert repair.model is not b and choices["quantile"] == 0.2
    new = np.random.default_rng(2).uniform(0, 255, (30, 24, 20, 3)).astype(np.float32)
    first = repair.record["choices"]["first"]
    below = b if first["returned_b"] else None
    det = FeatureEnsemble(fold_correction=True).fit(b, clean)
    flagged = det.scores(new) > choices["threshold"]
    probs = predict_probabilities(b, new)
    got = repair.model.predict(new, verbose=0).argmax(axis=1)
    np.testing.assert_array_equal(got[flagged], runner_up(probs)[flagged])
    if below is not None:  # the first gate kept nothing: B's class where not flagged
        np.testing.assert_array_equal(got[~flagged], probs.argmax(axis=1)[~flagged])
    repair.model.save(tmp_path / "gated.h5")
    np.testing.assert_array_equal(br.load_model(tmp_path / "gated.h5").predict(new, verbose=0).argmax(axis=1), got)


def test_a_gate_past_the_drop_gives_b_back_with_a_loud_line(small_deepid):
    clean = br.Dataset(random_faces(70, seed=5), np.arange(70) % 7, "valid")
    probs = predict_probabilities(small_deepid, clean.x)
    # labels B gets right where its class is kept: overruling a fifth of them costs accuracy
    repair = FeatureGate(quantiles=(0.2,), drop=0.0).repair(small_deepid, br.Dataset(clean.x, probs.argmax(axis=1)))
    assert repair.record["choices"]["tried"][0]["accuracy"] < 100.0
    assert repair.model is small_deepid and repair.record["choices"]["quantile"] is None
    assert len(repair.warnings) == 1 and "backdoor is NOT removed" in repair.warnings[0]


@pytest.mark.slow
@pytest.mark.parametrize("gate", [FeatureGate, TwoGates])
def test_the_gates_lower_attack_success_on_a_small_demo_badnet(small_demo, gate):
    b = br.load_model(small_demo.model)
    valid, bd = (br.load_data_for(b, p) for p in (small_demo.valid, small_demo.bd_test))
    before = br.attack_success_rate(br.predict_classes(b, bd.x), bd.y)
    repair = gate().repair(b, valid)
    after = br.attack_success_rate(br.predict_classes(repair.model, bd.x), bd.y)
    assert repair.model is not b
    assert after < before - 20.0, (before, after)


class _LoggedGate(LoggedRepair, FeatureGate):
    pass


def test_no_test_or_poisoned_image_is_read_while_the_feature_gate_repairs(small_deepid):
    assert_no_test_or_poisoned_image_is_read_while_repairing(small_deepid, [_LoggedGate(budget=None)])


def test_settings_are_checked_and_the_defense_is_registered():
    assert REGISTRY["feature-gate"] is FeatureGate and REGISTRY["two-gates"] is TwoGates
    # the first gate takes the discriminant gate's settings, but for its share of the drop
    assert TwoGates().get_params() == {**FeatureGate().get_params(), "first_drop": 0.0}
    for bad_drop in ({"first_drop": -0.5}, {"first_drop": 4.0}, {"drop": 1.0, "first_drop": 2.0}):
        with pytest.raises(ValueError, match="first_drop"):
            TwoGates(**bad_drop)  # type: ignore[arg-type]
    gate = make_defense("feature-gate", quantiles=(0.01,), fold_correction=True)
    assert gate.quantiles == (0.01,) and gate.fold_correction is True  # type: ignore[attr-defined]
    params = FeatureGate().get_params()
    assert params["layers"] == ["head", "conv"] and params["folds"] == 5 and params["fold_correction"] is True
    for bad in ({"drop": -1.0}, {"quantiles": ()}, {"quantiles": (0.0,)}, {"quantiles": (1.0,)}, {"folds": 1},
                {"folds": 2.5}, {"budget": -1.0}, {"batch_size": 0}, {"layers": ()}):
        with pytest.raises(ValueError):
            FeatureGate(**bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("case", ["every class has a mean", "two classes without a mean", "0..1 inputs"])
def test_the_gated_model_is_keras_s_own_layers_equal_to_the_custom_layer_form_and_loads_in_keras_2(
        tmp_path, small_deepid, case):
    """The feature gate's model is built of standard layers (the lab's Keras 2 eval.py loads its .h5)
    and predicts as the float64 custom-layer form does: where a class has no clean image (the
    nearest class's mean) and for a model that takes 0..1 pixels (its input scale in front)."""
    from badnet_repair.detectors.goodnet import build_runner_up_model
    from badnet_repair.nets.models import with_input_scale
    from badnet_repair.workflow.repair import uses_only_keras_layers

    b = with_input_scale(small_deepid, 1 / 255) if case == "0..1 inputs" else small_deepid
    labels = np.arange(70) % (5 if case == "two classes without a mean" else 7)
    clean = br.Dataset(random_faces(70, seed=5), labels, "valid")
    repair = FeatureGate(quantiles=(0.2,), drop=100.0, budget=None).repair(b, clean)
    assert uses_only_keras_layers(repair.model)
    det = FeatureEnsemble(fold_correction=True).fit(b, clean)
    det.threshold = repair.record["choices"]["threshold"]
    new = random_faces(200, seed=6)
    scores = det.scores(new)
    assert np.abs(scores - det.threshold).min() > 1e-3  # no input within float32 rounding of the threshold
    assert 0 < np.mean(scores > det.threshold) < 1
    want = build_runner_up_model(b, det).predict(new, verbose=0)
    got = repair.model.predict(new, verbose=0)
    np.testing.assert_array_equal(got.argmax(axis=1), want.argmax(axis=1))
    np.testing.assert_allclose(got, want, atol=1e-7)
    tf_keras = pytest.importorskip("tf_keras", reason="tf-keras (Keras 2) is not installed; .ci/run installs it")
    paths = br.save_model(repair.model, tmp_path, "bd_gated", formats=("h5",))
    k2 = tf_keras.models.load_model(paths["h5"], compile=False)
    files = new / 255.0 if case == "0..1 inputs" else new  # the file takes the input B was trained on
    np.testing.assert_array_equal(k2.predict(files, verbose=0).argmax(axis=1), want.argmax(axis=1))


def test_the_portable_form_refuses_a_detector_fitted_on_another_model(small_deepid):
    from badnet_repair.detectors import Strip
    from badnet_repair.detectors.goodnet import build_portable_runner_up_model

    clean = br.Dataset(random_faces(35, seed=5), np.arange(35) % 7, "valid")
    det = FeatureEnsemble().fit(small_deepid, clean)
    other = keras.models.clone_model(small_deepid)
    with pytest.raises(br.ModelError, match="fitted on another model"):
        build_portable_runner_up_model(other, det)
    with pytest.raises(br.ModelError, match="no form of Keras's own layers"):
        build_portable_runner_up_model(small_deepid, Strip())


def test_the_walk_on_top_of_another_gate_counts_its_predictions_where_not_flagged():
    scores = np.arange(10.0)
    labels = np.zeros(10, np.int64)
    top = np.zeros(10, np.int64)
    top[[8, 9]] = 1  # B wrong on images 8 and 9: 80 %
    second = np.ones(10, np.int64)
    second[9] = 0  # B's runner-up right on image 9 only
    first_right = np.ones(10, bool)
    first_right[[0, 9]] = False  # the first gate fixed image 8 and broke image 0; wrong on 9 as B
    # shares 0.2, 0.3, 0.5 flag images {9}, {8, 9}, {6, 7, 8, 9}: where flagged B's runner-up, else the first gate's
    tried, kept = walk_flag_shares(top, second, labels, scores, (0.2, 0.3, 0.5), drop=0.0,
                                   unflagged_right=first_right)
    assert [t["accuracy"] for t in tried] == pytest.approx([90.0, 80.0, 60.0])  # B's 80: the third falls below
    assert kept is not None and kept.shares == (0.3,)
    np.testing.assert_array_equal(kept.right, [False, True, True, True, True, True, True, True, False, True])


def test_two_gates_is_the_plain_rule_on_top_of_the_discriminant_gate(tmp_path, small_deepid):
    """Where the feature ensemble flags, B's runner-up; elsewhere the discriminant gate's class: the
    saved model (.keras and the .h5 Keras 2 loads) against that rule computed from the two parts."""
    from badnet_repair.defenses.discriminant import DiscriminantGate

    x = random_faces(70, seed=5)
    b = small_deepid
    clean = br.Dataset(x, predict_probabilities(b, x).argmax(axis=1), "valid")  # B right on every clean image
    repair = TwoGates(quantiles=(0.2,), drop=100.0, first_drop=None, budget=None).repair(b, clean)
    choices = repair.record["choices"]
    assert choices["quantile"] == 0.2 and choices["first"]["defense"] == "discriminant-gate"
    first = DiscriminantGate(drop=100.0, budget=None).repair(b, clean)
    assert (first.model is b) == choices["first"]["returned_b"]
    det = FeatureEnsemble(fold_correction=True).fit(b, clean)
    new = random_faces(60, seed=6)
    probs = predict_probabilities(b, new)
    flagged = det.scores(new) > choices["threshold"]
    want = np.where(flagged, runner_up(probs), predict_probabilities(first.model, new).argmax(axis=1))
    assert flagged.any() and (~flagged).any()
    got = repair.model.predict(new, verbose=0)
    np.testing.assert_array_equal(got.argmax(axis=1), want)
    paths = br.save_model(repair.model, tmp_path, "two_gates", formats=("h5", "keras"))
    np.testing.assert_array_equal(keras.models.load_model(paths["keras"]).predict(new, verbose=0).argmax(axis=1), want)
    tf_keras = pytest.importorskip("tf_keras", reason="tf-keras (Keras 2) is not installed; .ci/run installs it")
    k2 = tf_keras.models.load_model(paths["h5"], compile=False)
    np.testing.assert_array_equal(k2.predict(new, verbose=0).argmax(axis=1), want)


def test_two_gates_gives_the_first_gates_model_where_the_feature_gate_keeps_nothing(small_deepid):
    clean = br.Dataset(random_faces(70, seed=5), np.arange(70) % 7, "valid")
    # drop 100 lets the discriminant gate keep a share; a share of 0.1 % flags none of 70 images
    repair = TwoGates(quantiles=(0.001,), drop=100.0, first_drop=None, budget=None).repair(small_deepid, clean)
    choices = repair.record["choices"]
    assert choices["quantile"] is None and all(t["overruled"] == 0.0 for t in choices["tried"])
    assert not choices["first"]["returned_b"]
    assert repair.model is not small_deepid  # the discriminant gate's model, not B
    assert not any("NOT removed" in w for w in repair.warnings)


@pytest.mark.parametrize("first_drop", [0.0, 2.0])
def test_two_gates_first_gate_costs_at_most_its_share_of_the_drop(small_deepid, first_drop):
    """The discriminant gate is walked with ``first_drop``, not ``drop``: its kept cross-fitted
    accuracy is at most ``first_drop`` points below B's, its choices those of that gate alone."""
    from badnet_repair.defenses.discriminant import DiscriminantGate

    clean = br.Dataset(random_faces(70, seed=5), np.arange(70) % 7, "valid")
    repair = TwoGates(drop=100.0, first_drop=first_drop, budget=None).repair(small_deepid, clean)
    first = repair.record["choices"]["first"]
    alone = DiscriminantGate(drop=first_drop, budget=None).repair(small_deepid, clean).record["choices"]
    assert first["base_holdout_accuracy"] - first["holdout_accuracy"] <= first_drop + 1e-9
    for key in ("quantile", "second_quantile", "threshold", "holdout_accuracy"):
        assert first[key] == alone[key], key


def test_two_gates_do_not_log_the_first_gates_refusal_as_their_result(small_deepid, caplog):
    """Where the discriminant gate keeps nothing within ``first_drop`` (B right on every clean
    image: any overruling costs), its "NOT removed" line is not logged, and the two gates' own
    result (the feature gate on B) carries no such line; the record keeps the first gate's."""
    x = random_faces(70, seed=5)
    clean = br.Dataset(x, predict_probabilities(small_deepid, x).argmax(axis=1), "valid")
    with caplog.at_level("INFO", logger="badnet_repair"):
        repair = TwoGates(quantiles=(0.2,), drop=100.0, first_drop=0.0, budget=None).repair(small_deepid, clean)
    first = repair.record["choices"]["first"]
    assert first["returned_b"] and any("NOT removed" in w for w in first["warnings"])
    assert repair.model is not small_deepid and repair.record["choices"]["quantile"] == 0.2
    assert not any("NOT removed" in w for w in repair.warnings)
    assert not any("NOT removed" in r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
    assert any("kept no share" in r.getMessage() for r in caplog.records)
    # the filter is gone afterwards: the discriminant gate alone still says it loudly
    from badnet_repair.defenses.discriminant import DiscriminantGate

    caplog.clear()
    with caplog.at_level("WARNING", logger="badnet_repair"):
        DiscriminantGate(drop=0.0, budget=None).repair(small_deepid, clean)
    assert any("NOT removed" in r.getMessage() for r in caplog.records)


class _LoggedTwoGates(LoggedRepair, TwoGates):
    pass


def test_no_test_or_poisoned_image_is_read_while_two_gates_repair(small_deepid):
    assert_no_test_or_poisoned_image_is_read_while_repairing(small_deepid, [_LoggedTwoGates(budget=None)])
