"""The detector registry and interface: a detector defined here, outside the package, is
registered, fitted by name through ``detect``'s workflow, and its GoodNet built, saved and reloaded
(as one Keras model where it has a Keras form, as B plus its file where it has none)."""

from __future__ import annotations

from typing import Any, ClassVar

import keras
import numpy as np
import pytest

import badnet_repair as br
from badnet_repair.detectors import REGISTRY, ThresholdDetector, calibration_split, threshold_at
from badnet_repair.detectors.goodnet import has_keras_form, load_split_goodnet
from badnet_repair.workflow.detect import fit_detectors, make_detectors, run_detection, write_detection

from .conftest import random_faces


class Brightness(ThresholdDetector):
    """A toy detector: the mean pixel of the bottom-right 4x4 corner (where a patch trigger sits)."""

    name: ClassVar[str] = "toy-brightness"
    summary: ClassVar[str] = "the bottom-right corner is bright (a test's toy)"

    def __init__(self, *, false_alarm: float = 5.0, size: int = 4) -> None:
        self.false_alarm, self.size = float(false_alarm), int(size)
        self.model: Any = None

    def fit(self, model: Any, clean: br.Dataset) -> Brightness:
        self.model = model
        self.calibrate(self.scores(clean.x))
        return self

    def scores(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(x, np.float64)[:, -self.size:, -self.size:, :].mean(axis=(1, 2, 3))

    def keras_flags(self, x: Any, *, prefix: str, scale: float = 1.0) -> Any:
        h, w, c = (int(d) for d in x.shape[1:])
        corner = keras.layers.Cropping2D(((h - self.size, 0), (w - self.size, 0)), name=f"{prefix}_corner")(x)
        per_channel = keras.layers.GlobalAveragePooling2D(name=f"{prefix}_mean")(corner)
        mean = keras.layers.Dense(1, use_bias=False, name=f"{prefix}_channels")
        # (mean - threshold * scale) * 1e6, clipped to 0..1: 1 above the threshold, 0 at or below it
        step = keras.layers.Dense(1, name=f"{prefix}_step")
        flag = keras.layers.ReLU(max_value=1.0, name=f"{prefix}_flag")(step(mean(per_channel)))
        mean.set_weights([np.full((c, 1), 1.0 / c, np.float32)])
        step.set_weights([np.full((1, 1), 1e6, np.float32), np.full(1, -1e6 * self.threshold * scale, np.float32)])
        return keras.layers.Reshape((), name=f"{prefix}_flags")(flag)

    def state(self) -> dict[str, np.ndarray]:
        return {"threshold": np.asarray(self.threshold)}

    def restore(self, model: Any, state: dict[str, np.ndarray]) -> Brightness:
        self.model, self.threshold = model, float(state["threshold"])
        return self


class FormlessBrightness(Brightness):
    """The same toy without a Keras form: its GoodNet is B plus its saved state."""

    name: ClassVar[str] = "toy-formless"
    keras_flags = br.Detector.keras_flags  # type: ignore[assignment]


@pytest.fixture()
def registered():
    for cls in (Brightness, FormlessBrightness):
        br.register_detector(cls)
    yield
    for cls in (Brightness, FormlessBrightness):
        REGISTRY.pop(cls.name, None)


def _with_corner(x: np.ndarray, value: float) -> np.ndarray:
    out = x.copy()
    out[:, -4:, -4:, :] = value
    return out


def test_a_detector_registered_from_outside_is_fitted_by_name_and_its_goodnet_reloads(
        registered, small_deepid, tmp_path):
    clean = br.Dataset(random_faces(80, seed=1), np.arange(80) % 7, "valid")
    parts, seconds, scan = fit_detectors(small_deepid, clean, ["toy-brightness"], false_alarm=10.0)
    det = parts["toy-brightness"]
    assert isinstance(det, Brightness) and det.false_alarm == 10.0 and scan is None and seconds["toy-brightness"] >= 0
    assert np.mean(det.calibration_scores > det.threshold) <= 0.10
    # fitted on clean data only; a bright corner is flagged, a dark one is not
    x = random_faces(12, seed=2)
    bright, dark = _with_corner(x, 255.0), _with_corner(x, 0.0)
    assert det.flags(bright).all() and not det.flags(dark).any()
    # its Keras form inside G: B's class, or the alarm class 7; saved and reloaded
    result = run_detection(small_deepid, clean, detectors=["toy-brightness"])
    assert result.goodnet is not None
    test = br.Dataset(dark, br.predict_classes(small_deepid, dark), "test")
    bd = br.Dataset(bright, np.zeros(12, np.int64), "bd_test")
    paths = write_detection(result, test, bd, tmp_path / "out")
    g = keras.models.load_model(paths["goodnet"])
    both = np.concatenate([bright, dark])
    want = br.goodnet_classes(small_deepid, result.detector, both)
    np.testing.assert_array_equal(np.argmax(g.predict(both, verbose=0), axis=1), want)
    assert (want[:12] == 7).all() and (want[12:] < 7).all()


def test_a_detector_without_a_keras_form_saves_beside_b_and_reloads(registered, small_deepid, tmp_path):
    clean = br.Dataset(random_faces(80, seed=1), np.arange(80) % 7, "valid")
    result = run_detection(small_deepid, clean, detectors=["toy-formless", "toy-brightness"])
    assert result.goodnet is None and not has_keras_form(result.detector)
    x = random_faces(10, seed=3)
    bright, dark = _with_corner(x, 255.0), _with_corner(x, 0.0)
    paths = write_detection(result, br.Dataset(dark, br.predict_classes(small_deepid, dark), "test"),
                            br.Dataset(bright, np.zeros(10, np.int64), "bd_test"), tmp_path / "out")
    assert {"goodnet", "goodnet_model", "goodnet_detectors"} <= set(paths)
    g = load_split_goodnet(tmp_path / "out", "goodnet_detect")
    both = np.concatenate([bright, dark])
    np.testing.assert_array_equal(g.predict_classes(both), br.goodnet_classes(small_deepid, result.detector, both))
    assert isinstance(g.detectors[0], FormlessBrightness) and g.detectors[0].threshold == result.parts[
        "toy-formless"].threshold
    # the settings travelled by name: unregistered, the file cannot be read, and says why
    REGISTRY.pop("toy-formless")
    with pytest.raises(br.ModelError, match="goodnet_detect.detectors.npz: unknown detector 'toy-formless'"):
        load_split_goodnet(tmp_path / "out", "goodnet_detect")


def test_registering_refuses_a_non_detector_and_a_taken_name(registered):
    with pytest.raises(ValueError, match="not a Detector"):
        br.register_detector(int)  # type: ignore[arg-type]

    class Other(Brightness):
        pass

    with pytest.raises(ValueError, match="registered already"):
        br.register_detector(Other)
    with pytest.raises(ValueError, match="unknown setting.*colour.*its settings: false_alarm, size"):
        br.make_detector("toy-brightness", colour=1)


def test_the_false_alarm_budget_is_split_equally_and_a_given_setting_wins(registered):
    made = make_detectors(["strip", "reversed-trigger", "toy-brightness"], false_alarm=6.0, seed=3)
    assert made["strip"].false_alarm == pytest.approx(2.0) and made["toy-brightness"].false_alarm == pytest.approx(2.0)
    assert made["strip"].seed == 3 and made["reversed-trigger"].seed == 3
    made = make_detectors(["strip", "toy-brightness"], false_alarm=6.0, settings={"strip": {"false_alarm": 1.0}})
    assert made["strip"].false_alarm == 1.0 and made["toy-brightness"].false_alarm == 3.0
    with pytest.raises(ValueError, match="settings given for disagreement"):
        make_detectors(["strip"], settings={"disagreement": {"accuracy_drop": 2.0}})


def test_every_registered_detector_is_made_from_its_keyword_settings_alone():
    for name, cls in REGISTRY.items():
        det = br.make_detector(name)
        assert det.get_params().keys() == cls.settings().keys()
        assert all(p.default is not p.empty for p in cls.settings().values()), name


def test_threshold_at_flags_at_most_the_rate_and_calibration_split_keeps_classes_apart():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=1000)
    for rate in (0.0, 1.0, 2.5, 5.0, 50.0):
        assert np.mean(scores > threshold_at(scores, rate)) <= rate / 100
    # ties: never more than the rate, even where many scores are equal
    tied = np.repeat([0.0, 1.0], [950, 50])
    assert np.mean(tied > threshold_at(tied, 10.0)) <= 0.10
    y = np.repeat(np.arange(5), [1, 2, 3, 10, 20])
    fit, calib = calibration_split(y, 0.3, seed=0)
    assert np.intersect1d(fit, calib).size == 0 and np.union1d(fit, calib).size == len(y)
    assert 0 in y[fit] and 0 not in y[calib]  # a class of one image only fits
    assert np.sum(y[calib] == 1) == 1 and np.sum(y[calib] == 4) == 6
