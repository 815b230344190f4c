"""The feature gate (defenses.feature_gate): the rule by hand, the repaired model against the plain
rule through a saved file, the fallback to B, a small demo BadNet, and no test or poisoned image read."""

from __future__ import annotations

import keras
import numpy as np
import pytest

import badnet_repair as br
from badnet_repair.defenses import REGISTRY, make_defense
from badnet_repair.defenses.feature_gate import FeatureGate, runner_up, walk_flag_shares
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


def test_a_gate_past_the_drop_gives_b_back_with_a_loud_line(small_deepid):
    clean = br.Dataset(random_faces(70, seed=5), np.arange(70) % 7, "valid")
    probs = predict_probabilities(small_deepid, clean.x)
    # labels B gets right where its class is kept: overruling a fifth of them costs accuracy
    repair = FeatureGate(quantiles=(0.2,), drop=0.0).repair(small_deepid, br.Dataset(clean.x, probs.argmax(axis=1)))
    assert repair.record["choices"]["tried"][0]["accuracy"] < 100.0
    assert repair.model is small_deepid and repair.record["choices"]["quantile"] is None
    assert len(repair.warnings) == 1 and "backdoor is NOT removed" in repair.warnings[0]


@pytest.mark.slow
def test_the_gate_lowers_attack_success_on_a_small_demo_badnet(small_demo):
    b = br.load_model(small_demo.model)
    valid, bd = (br.load_data_for(b, p) for p in (small_demo.valid, small_demo.bd_test))
    before = br.attack_success_rate(br.predict_classes(b, bd.x), bd.y)
    repair = FeatureGate().repair(b, valid)
    after = br.attack_success_rate(br.predict_classes(repair.model, bd.x), bd.y)
    assert repair.record["choices"]["quantile"] is not None
    assert after < before - 20.0, (before, after)


class _LoggedGate(LoggedRepair, FeatureGate):
    pass


def test_no_test_or_poisoned_image_is_read_while_the_feature_gate_repairs(small_deepid):
    assert_no_test_or_poisoned_image_is_read_while_repairing(small_deepid, [_LoggedGate(budget=None)])


def test_settings_are_checked_and_the_defense_is_registered():
    assert REGISTRY["feature-gate"] is FeatureGate
    gate = make_defense("feature-gate", quantiles=(0.01,), fold_correction=True)
    assert gate.quantiles == (0.01,) and gate.fold_correction is True  # type: ignore[attr-defined]
    params = FeatureGate().get_params()
    assert params["layers"] == ["head", "conv"] and params["folds"] == 5 and params["fold_correction"] is True
    for bad in ({"drop": -1.0}, {"quantiles": ()}, {"quantiles": (0.0,)}, {"quantiles": (1.0,)}, {"folds": 1},
                {"folds": 2.5}, {"budget": -1.0}, {"batch_size": 0}, {"layers": ()}):
        with pytest.raises(ValueError):
            FeatureGate(**bad)  # type: ignore[arg-type]
