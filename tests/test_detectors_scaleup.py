"""SCALE-UP (detectors.scaleup): SPC and its per-class standardisation by hand on a model whose
class is one pixel's brightness, the threshold on clean data only, the Keras form (equal to
flags, saved and loaded), settings, and a small BadNet's trigger ranked above clean inputs."""

from __future__ import annotations

import keras
import numpy as np
import pytest

import badnet_repair as br
from badnet_repair.detectors.base import calibration_split
from badnet_repair.detectors.scaleup import DEFAULT_SCALES, ScaleUp
from badnet_repair.nets.layers import ScaleUpAlarm

from .conftest import random_faces

SIDE = 4


def brightness_model(scale: float = 1.0) -> keras.Model:
    """(4, 4, 1) pixels times ``scale`` -> 3 classes by the top-left pixel p (in file pixels):
    class 0 below 60, 1 from 60 to 200, 2 above 200 (logits 0, p - 60, 2 p - 260)."""
    inp = keras.Input((SIDE, SIDE, 1))
    logits = keras.layers.Dense(3, name="logits")(keras.layers.Flatten()(inp))
    model = keras.Model(inp, keras.layers.Softmax()(logits))
    w = np.zeros((SIDE * SIDE, 3), np.float32)
    w[0] = np.array([0.0, 1.0, 2.0]) / scale
    model.get_layer("logits").set_weights([w, np.array([0.0, -60.0, -260.0], np.float32)])
    return model


def rule_class(p: np.ndarray) -> np.ndarray:
    """The brightness model's class, in numpy."""
    return np.where(p < 60, 0, np.where(p < 200, 1, 2))


def rule_spc(p: np.ndarray, scales=DEFAULT_SCALES) -> np.ndarray:
    """The paper's SPC for the brightness model, in numpy: the share of scales n at which
    clip(n p, 0, 255) keeps the class of p."""
    return np.mean([rule_class(np.clip(n * p, 0, 255)) == rule_class(p) for n in scales], axis=0)


def images(pixels, seed: int = 0) -> np.ndarray:
    """(N, 4, 4, 1) images with the given top-left pixels, the rest random (ignored by the model)."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 255, (len(pixels), SIDE, SIDE, 1)).astype(np.float32)
    x[:, 0, 0, 0] = pixels
    return x


def test_spc_by_hand():
    b = brightness_model()
    det = ScaleUp(data_limited=False).fit(b, br.Dataset(images([5.0, 100.0, 250.0]), np.array([0, 1, 2])))
    assert det.pixel_max == 255.0
    p = np.array([0.0, 10.0, 15.0, 100.0, 250.0, 6.0])
    spc, classes = det.consistency(images(p, seed=1))
    # 10 -> 30, 50 | 70, 90, 110: two of five scales keep class 0; 15 -> 45 | 75 ...: one;
    # 100 -> 255 (class 2) at every scale: none; 250 and 0 keep theirs everywhere; 6 -> 18..54 | 66: four
    np.testing.assert_allclose(spc, [1.0, 0.4, 0.2, 0.0, 1.0, 0.8])
    np.testing.assert_allclose(spc, rule_spc(p))
    np.testing.assert_array_equal(classes, [0, 0, 0, 1, 2, 0])
    # without the data-limited standardisation the score is SPC itself
    np.testing.assert_array_equal(det.scores(images(p, seed=1)), spc)


def test_data_limited_statistics_and_scores_match_the_formula():
    rng = np.random.default_rng(3)
    p = np.concatenate([rng.uniform(0, 59, 12), rng.uniform(61, 199, 12), rng.uniform(201, 255, 3), [100.0]])
    y = np.concatenate([np.zeros(12), np.ones(12), np.full(3, 2), [0]]).astype(np.int64)  # the last: B errs
    clean = br.Dataset(images(p, seed=4), y)
    det = ScaleUp(min_class_images=5, calibration_share=0.2, seed=7).fit(brightness_model(), clean)
    fit_idx, cal_idx = calibration_split(y, 0.2, 7)
    pf, yf = p[fit_idx], y[fit_idx]
    right = rule_class(pf) == yf
    spc = rule_spc(pf[right])
    cls = yf[right]
    floor = 0.5 / len(DEFAULT_SCALES)
    pooled_mean, pooled_std = spc.mean(), max(spc.std(ddof=1), floor)
    assert det.own_statistics is not None and det.class_mean is not None and det.class_std is not None
    np.testing.assert_array_equal(det.own_statistics, [True, True, False])  # class 2 has 2 fit images: pooled
    for c in (0, 1):
        assert det.class_mean[c] == pytest.approx(spc[cls == c].mean())
        assert det.class_std[c] == pytest.approx(max(spc[cls == c].std(ddof=1), floor))
    assert det.class_mean[2] == pytest.approx(pooled_mean)
    assert det.class_std[2] == pytest.approx(pooled_std)
    q = np.array([10.0, 15.0, 100.0, 250.0, 65.0])
    want = (rule_spc(q) - det.class_mean[rule_class(q)]) / det.class_std[rule_class(q)]
    np.testing.assert_allclose(det.scores(images(q)), want)
    # the threshold comes from the held-out clean images only, at most false_alarm % of them above it
    assert det.calibration_scores is not None and len(det.calibration_scores) == len(cal_idx)
    np.testing.assert_allclose(det.calibration_scores, det.scores(clean.x[cal_idx]))
    assert 100 * np.mean(det.calibration_scores > det.threshold) <= det.false_alarm


def test_threshold_false_alarm_on_calibration_is_at_most_the_setting(small_deepid):
    x = random_faces(120, seed=5)
    clean = br.Dataset(x, br.predict_classes(small_deepid, x))
    for rate in (0.0, 5.0, 20.0):
        det = ScaleUp(false_alarm=rate, calibration_share=0.5).fit(small_deepid, clean)
        assert det.calibration_scores is not None and len(det.calibration_scores) > 0
        assert 100 * np.mean(det.calibration_scores > det.threshold) <= rate


def test_tiny_clean_sets_degrade_gracefully(caplog):
    b = brightness_model()
    one_each = br.Dataset(images([10.0, 100.0, 250.0]), np.array([0, 1, 2]))
    det = ScaleUp().fit(b, one_each)  # no class has two images: the threshold sees the fit images
    assert det.own_statistics is not None and not det.own_statistics.any()
    assert det.calibration_scores is not None and len(det.calibration_scores) == 3
    assert "no class has two clean images" in caplog.text
    two_each = br.Dataset(images([10.0, 30.0, 100.0, 150.0]), np.array([0, 0, 1, 1]))
    det = ScaleUp().fit(b, two_each)
    assert det.calibration_scores is not None and len(det.calibration_scores) == 2
    assert np.isfinite(det.scores(images([5.0, 250.0]))).all()
    with pytest.raises(ValueError, match="clean images"):
        ScaleUp().fit(b, br.Dataset(np.zeros((0, SIDE, SIDE, 1), np.float32), np.zeros(0, np.int64)))


@pytest.mark.parametrize("scale", [1.0, 1 / 255])
def test_keras_form_equals_flags_and_survives_save_and_load(tmp_path, scale):
    rng = np.random.default_rng(11)
    p = rng.uniform(0, 255, 80)
    clean = br.Dataset(images(p, seed=12), rule_class(p))
    # the detector's B takes file pixels; G's tensor holds file pixels times the input scale
    b = br.with_input_scale(brightness_model(scale), scale) if scale != 1.0 else brightness_model()
    det = ScaleUp(min_class_images=5, calibration_share=0.3, false_alarm=20.0).fit(b, clean)
    x_in = keras.Input((SIDE, SIDE, 1))
    g = keras.Model(x_in, det.keras_flags(x_in, prefix="d", scale=scale))
    x = images(rng.uniform(0, 255, 300), seed=13)
    want = det.flags(x)
    assert 0 < want.sum() < len(x)
    got = keras.ops.convert_to_numpy(g(x * np.float32(scale)))
    np.testing.assert_array_equal(got, want.astype(np.float32))
    path = tmp_path / "g.keras"
    g.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(loaded(x * np.float32(scale))), want.astype(np.float32))
    assert any(isinstance(layer, ScaleUpAlarm) for layer in loaded.layers)


def test_keras_form_of_a_deepid_equals_flags(small_deepid, tmp_path):
    x = random_faces(60, seed=21)
    det = ScaleUp(calibration_share=0.5, false_alarm=30.0, min_class_images=3)
    det.fit(small_deepid, br.Dataset(x, br.predict_classes(small_deepid, x)))
    x_in = keras.Input(x.shape[1:])
    g = keras.Model(x_in, det.keras_flags(x_in, prefix="su"))
    test = random_faces(40, seed=22)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(g(test)), det.flags(test).astype(np.float32))
    g.save(tmp_path / "g.keras")
    loaded = keras.models.load_model(tmp_path / "g.keras")
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(loaded(test)), det.flags(test).astype(np.float32))


def test_settings_are_validated_and_round_trip():
    for bad in ({"scales": ()}, {"scales": (0.5, 3)}, {"scales": (3, float("inf"))}, {"min_class_images": 1},
                {"calibration_share": 0.0}, {"calibration_share": 1.0}, {"false_alarm": -1.0},
                {"false_alarm": 101.0}, {"calibration_images": 0}, {"batch_size": 0}, {"seed": -1}):
        with pytest.raises(ValueError):
            ScaleUp(**bad)
    det = ScaleUp(scales=[2, 4], data_limited=False, seed=3)
    params = det.get_params()
    assert params["scales"] == [2.0, 4.0] and params["data_limited"] is False
    assert ScaleUp(**params).get_params() == params
    assert set(ScaleUp.settings()) == set(params)
    assert ScaleUp.name == "scale-up"
    with pytest.raises(RuntimeError, match="fit"):
        ScaleUp().flags(np.zeros((1, SIDE, SIDE, 1), np.float32))
    with pytest.raises(ValueError, match="fit"):
        ScaleUp().keras_flags(keras.Input((SIDE, SIDE, 1)), prefix="d")


def auroc(positive: np.ndarray, negative: np.ndarray) -> float:
    """The probability that a positive outscores a negative (ties count half)."""
    diff = np.asarray(positive)[:, None] - np.asarray(negative)[None, :]
    return float(np.mean((diff > 0) + 0.5 * (diff == 0)))


@pytest.mark.slow
def test_scaleup_ranks_the_demo_trigger_above_clean_inputs(small_demo):
    b = br.load_model(small_demo.model)
    valid, test, bd = br.load_h5(small_demo.valid), br.load_h5(small_demo.test), br.load_h5(small_demo.bd_test)
    det = ScaleUp().fit(b, valid)
    assert det.calibration_scores is not None
    assert 100 * np.mean(det.calibration_scores > det.threshold) <= det.false_alarm
    # the fixture's BadNet answers the trigger with the target class on most inputs; an amplified
    # trigger keeps doing so while an amplified clean face drifts. 30 inputs each: only "more often
    # than not" is asserted (observed AUROC in the detectors' report)
    assert auroc(det.scores(bd.x), det.scores(test.x)) > 0.5
