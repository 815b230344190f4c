"""STRIP (detectors.strip): the entropy by hand, the superimposition, and a hand-built BadNet
whose trigger STRIP must separate from clean inputs, fitted on clean data only."""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest

import badnet_repair as br
from badnet_repair.detectors import REGISTRY
from badnet_repair.detectors.strip import Strip, prediction_entropy

from .conftest import NullDetector, random_faces

K, SIDE, TARGET = 8, 16, 3


def test_entropy_by_hand():
    probs = np.array([[0.25] * 4, [1.0, 0, 0, 0], [0.5, 0.5, 0, 0]])
    np.testing.assert_allclose(prediction_entropy(probs), [2.0, 0.0, 1.0])


def test_entropy_matches_the_plain_sum_with_zero_probabilities():
    rng = np.random.default_rng(3)
    probs = rng.dirichlet(np.full(50, 0.3), size=(4, 6)).astype(np.float32)
    probs[probs < 0.01] = 0.0
    plain = np.zeros(probs.shape[:-1])
    for idx in np.ndindex(*probs.shape[:-1]):
        plain[idx] = -sum(float(p) * math.log2(float(p)) for p in probs[idx] if p > 0)
    np.testing.assert_allclose(prediction_entropy(probs), plain, rtol=1e-12)


def test_superimposition_adds_and_saturates_or_mixes():
    x, c = np.array([100.0, 200.0]), np.array([100.0, 100.0])
    np.testing.assert_array_equal(Strip(pixel_max=255.0).superimpose(x, c), [200.0, 255.0])
    np.testing.assert_array_equal(Strip(blend="mix", alpha=0.75).superimpose(x, c), [100.0, 175.0])
    # written into a buffer: the same numbers
    images, overlays = random_faces(3, seed=1), random_faces(4, seed=2)
    for det in (Strip(pixel_max=255.0), Strip(blend="mix", alpha=0.3)):
        buffer = np.full((3, 4, 55, 47, 3), np.nan, np.float32)
        got = det.superimpose(images[:, None], overlays[None], out=buffer)
        assert got is buffer
        np.testing.assert_array_equal(got, det.superimpose(images[:, None], overlays[None]))
    with pytest.raises(ValueError, match="blend"):
        Strip(blend="paint")  # type: ignore[arg-type]


def hand_built_badnet() -> keras.Model:
    """Flat, content-driven predictions over K classes; the target with certainty where the
    bottom-right 4x4 square is (nearly) white: the trigger."""
    inp = keras.Input((SIDE, SIDE, 3))
    square = keras.layers.GlobalAveragePooling2D()(keras.layers.Cropping2D(((SIDE - 4, 0), (SIDE - 4, 0)))(inp))
    lit = keras.layers.Dense(1, activation="relu", name="lit")(square)  # > 0 only when the mean is > 0.97 * 255
    content = keras.layers.Dense(K, name="content")(keras.layers.Flatten()(keras.layers.AveragePooling2D(4)(inp)))
    jump = keras.layers.Dense(K, use_bias=False, name="jump")(lit)
    out = keras.layers.Softmax()(keras.layers.Add()([content, jump]))
    model = keras.Model(inp, out)
    rng = np.random.default_rng(0)
    model.get_layer("lit").set_weights([np.full((3, 1), 1 / (3 * 255), np.float32), np.array([-0.97], np.float32)])
    weights = rng.normal(0, 1 / 255, (48, K)).astype(np.float32)
    model.get_layer("content").set_weights([weights, np.zeros(K, np.float32)])
    jump = np.zeros((1, K), np.float32)
    jump[0, TARGET] = 3000.0
    model.get_layer("jump").set_weights([jump])
    return model


def faces(n: int, seed: int) -> br.Dataset:
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 200, (n, SIDE, SIDE, 3)).astype(np.float32)
    return br.Dataset(x, rng.integers(0, K, n), name=f"clean{seed}")


def test_strip_separates_a_bright_trigger_and_fits_on_clean_data_only():
    b = hand_built_badnet()
    clean = faces(300, seed=1)
    test = faces(200, seed=2)
    triggered = test.x.copy()
    triggered[:, SIDE - 4:, SIDE - 4:, :] = 255.0
    assert (br.predict_classes(b, triggered) == TARGET).all()
    strip = Strip(copies=16, false_alarm=5.0).fit(b, clean)
    # the threshold is the 5 % quantile of held-out clean entropies; the blend images are clean images
    assert strip.calibration_entropy is not None and len(strip.calibration_entropy) == 300 - 16
    assert strip.threshold == pytest.approx(float(np.quantile(strip.calibration_entropy, 0.05, method="lower")))
    assert strip.overlays is not None and len(strip.overlays) == 16
    assert all(any(np.array_equal(img, c) for c in clean.x) for img in strip.overlays[:5])
    detection = strip.flags(triggered).mean()
    false_alarm = strip.flags(test.x).mean()
    assert detection >= 0.95
    assert false_alarm <= 0.15  # 5 % on the calibration set; another clean set lands near it
    assert (strip.scores(triggered).mean() > strip.scores(test.x).mean())
    goodnet = br.goodnet_classes(b, strip, triggered)
    assert (goodnet == K).mean() == detection


def test_a_tiny_clean_set_is_split_in_half_and_its_threshold_called_too_coarse(caplog):
    b = hand_built_badnet()
    clean = faces(12, seed=1)
    with caplog.at_level("WARNING", logger="badnet_repair.detectors.strip"):
        strip = Strip(copies=32, false_alarm=2.0).fit(b, clean)
    # 6 overlays and 6 images to set the threshold on (not 11 and 1)
    assert strip.overlays is not None and len(strip.overlays) == 6
    assert strip.calibration_entropy is not None and len(strip.calibration_entropy) == 6
    # the threshold is the lowest of 6 entropies: about 1 in 7 new clean inputs falls at or below it
    assert strip.calibration_warning is not None and "6 clean images" in strip.calibration_warning
    assert "14.3 %" in strip.calibration_warning and strip.calibration_warning in caplog.text
    # enough images for the rate: no line
    assert Strip(copies=16, false_alarm=5.0).fit(b, faces(300, seed=1)).calibration_warning is None


def test_the_pixel_range_comes_from_the_clean_images_unless_given():
    b = hand_built_badnet()
    unit = br.Dataset(faces(40, seed=1).x / 255.0, faces(40, seed=1).y, name="unit")
    assert Strip(copies=8).fit(b, unit).pixel_top == 1.0
    assert Strip(copies=8).fit(b, faces(40, seed=1)).pixel_top == 255.0
    assert Strip(copies=8, pixel_max=2.0).fit(b, unit).pixel_top == 2.0
    saved = Strip(copies=8).fit(b, unit).state()
    assert Strip().restore(b, saved).superimpose(np.array([0.75]), np.array([0.5])) == 1.0


def test_strip_is_registered_and_refuses_use_before_fit():
    assert REGISTRY["strip"] is Strip
    with pytest.raises(RuntimeError, match="fit"):
        Strip().flags(np.zeros((1, SIDE, SIDE, 3), np.float32))


def test_strips_goodnet_is_one_keras_model_that_reloads_and_equals_the_detector(tmp_path, capsys):
    from badnet_repair.detectors.goodnet import build_detector_goodnet

    b = hand_built_badnet()
    strip = Strip(copies=16).fit(b, faces(300, seed=1))
    x = faces(60, seed=2).x.copy()
    x[:30, SIDE - 4:, SIDE - 4:, :] = 255.0  # half triggered
    want = br.goodnet_classes(b, strip, x)
    assert 0 < (want == K).sum() < len(x)
    g = build_detector_goodnet(b, strip)
    np.testing.assert_array_equal(br.predict_classes(g, x), want)
    path = tmp_path / "goodnet_strip.keras"
    g.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_array_equal(br.predict_classes(loaded, x), want)
    # and the command line scores it as a GoodNet: detection and false alarm
    clean, poisoned = tmp_path / "clean.h5", tmp_path / "bd.h5"
    from badnet_repair.cli import main

    br.save_h5(clean, x[30:], br.predict_classes(b, x[30:]))
    br.save_h5(poisoned, x[:30], np.full(30, TARGET))
    assert main(["eval", "--json", str(clean), str(poisoned), str(path)]) == 0
    import json

    out = json.loads(capsys.readouterr().out)
    assert out["kind"] == "goodnet"
    assert out["detection_rate"] == pytest.approx(100 * (want[:30] == K).mean())
    assert out["false_alarm_rate"] == pytest.approx(100 * (want[30:] == K).mean())
    with pytest.raises(br.NoKerasForm, match="no Keras form"):
        build_detector_goodnet(b, NullDetector())
