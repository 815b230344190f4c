"""SCALE-UP: flag inputs whose predicted class survives amplifying their pixels."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np

from ..formats.data import Dataset, pixel_range
from .base import ThresholdDetector, calibration_split, check_sampling, checked_false_alarm, detector_model

__all__ = ["DEFAULT_SCALES", "ScaleUp"]

log = logging.getLogger(__name__)

#: The scaling set of the SCALE-UP authors' BackdoorBox implementation (``scale_set``).
DEFAULT_SCALES: tuple[float, ...] = (3.0, 5.0, 7.0, 9.0, 11.0)


class ScaleUp(ThresholdDetector):
    """SCALE-UP (Guo, Li, Chen, Guo, Sun and Liu, "SCALE-UP: An Efficient Black-box Input-level
    Backdoor Detection via Analyzing Scaled Prediction Consistency", ICLR 2023).

    A trigger keeps sending an input to the target class when its pixels are amplified, while
    a clean input's class drifts. The scaled prediction consistency of an input ``x`` is

        SPC(x) = mean over n in ``scales`` of 1[C(clip(n x, 0, pixel_max)) == C(x)]

    with ``C`` B's class and ``pixel_max`` the clean files' pixel range
    (:func:`~badnet_repair.formats.data.pixel_range`, 255 or 1, found in ``fit``).

    With ``data_limited`` (the paper's data-limited SCALE-UP, the default) the score is SPC
    standardised with benign statistics of B's class on ``x``: ``(SPC(x) - mean_c) / std_c``,
    where ``mean_c`` and ``std_c`` (sample standard deviation) are the SPC of the clean fit
    images that B classifies correctly as ``c``. Pooling rule: a class with fewer than
    ``min_class_images`` such images, or none, takes the pooled mean and standard deviation of
    all of them (with 1283 classes and a handful of images each a per-class estimate is
    noise). Every standard deviation is floored at half the SPC's step, ``0.5 / len(scales)``,
    so that a class whose few benign images share one SPC does not divide by zero. Without
    ``data_limited`` the score is SPC itself. The threshold is set on held-out clean images
    only (``false_alarm`` %).

    ``fit(model, clean)`` splits the clean data per class
    (:func:`~badnet_repair.detectors.base.calibration_split`, ``calibration_share``, ``seed``):
    the class statistics come from the fit part, the threshold from at most
    ``calibration_images`` of the other. Without ``data_limited`` nothing is learnt, and the
    threshold is set on up to ``calibration_images`` of all clean images.

    Args:
        scales: the amplification factors, each >= 1, default ``(3, 5, 7, 9, 11)`` (the
            authors' BackdoorBox implementation; their own script uses 1..11, the 1 adding
            the same constant to every SPC).
        data_limited: standardise SPC per B class with clean statistics, default True.
        min_class_images: correctly classified clean fit images a class needs for its own
            statistics, default 5 (fewer: pooled).
        calibration_share: share of each class's clean images held out for the threshold,
            default 0.2 (the lab's 9 images a class leave 7 for the class statistics).
        false_alarm: the share of held-out clean inputs flagged, in %, default 5.
        calibration_images: held-out clean images the threshold is set on, at most, default 1000.
        seed: the split and the draw of calibration images, default 0.
        batch_size: images per forward pass, default 1024.
    """

    name: ClassVar[str] = "scale-up"
    summary: ClassVar[str] = "B keeps its class when the input's pixels are amplified (Guo et al. 2023)"

    def __init__(self, *, scales: Sequence[float] = DEFAULT_SCALES, data_limited: bool = True,
                 min_class_images: int = 5, calibration_share: float = 0.2, false_alarm: float = 5.0,
                 calibration_images: int = 1000, seed: int = 0, batch_size: int = 1024) -> None:
        scales = tuple(float(s) for s in scales)
        if not scales:
            raise ValueError("scales must name at least one amplification factor")
        if not all(math.isfinite(s) and s >= 1.0 for s in scales):
            raise ValueError(f"each scale must be a finite number >= 1, not {list(scales)}")
        if min_class_images < 2:
            raise ValueError(f"min_class_images must be at least 2 (a standard deviation), not {min_class_images}")
        if not 0.0 < calibration_share < 1.0:
            raise ValueError(f"calibration_share must be between 0 and 1, not {calibration_share}")
        checked_false_alarm(false_alarm)
        check_sampling(calibration_images, batch_size, seed)
        self.scales = scales
        self.data_limited = bool(data_limited)
        self.min_class_images = int(min_class_images)
        self.calibration_share = float(calibration_share)
        self.false_alarm = float(false_alarm)
        self.calibration_images = int(calibration_images)
        self.seed, self.batch_size = int(seed), int(batch_size)
        self.model: Any = None
        self.pixel_max: float | None = None
        #: (K,) float64: the benign SPC mean and standard deviation that standardise each B class
        self.class_mean: np.ndarray | None = None
        self.class_std: np.ndarray | None = None
        #: (K,) bool: the classes with statistics of their own (the rest are pooled)
        self.own_statistics: np.ndarray | None = None

    @property
    def std_floor(self) -> float:
        """The least standard deviation SPC is divided by: half its step, ``0.5 / len(scales)``."""
        return 0.5 / len(self.scales)

    def fit(self, model: Any, clean: Dataset) -> ScaleUp:
        """Keep B and the pixel range; learn the benign SPC statistics per class (with
        ``data_limited``) and set the threshold on held-out clean images."""
        from ..nets.models import num_classes

        x, y = np.asarray(clean.x, np.float32), np.asarray(clean.y, np.int64)
        if len(x) == 0:
            raise ValueError("SCALE-UP needs clean images to set its threshold on")
        self.model = model
        self.pixel_max = float(pixel_range(x))
        k = num_classes(model)
        if self.data_limited:
            fit_idx, cal_idx = calibration_split(y, self.calibration_share, self.seed)
            self._learn_statistics(x[fit_idx], y[fit_idx], k)
            if len(cal_idx) == 0:
                # every class has one image: the threshold sees the images the statistics came from
                log.warning("SCALE-UP: no class has two clean images; the threshold is set on the images the "
                            "class statistics were learnt on")
                cal_idx = fit_idx
        else:
            self.class_mean, self.class_std = np.zeros(k), np.ones(k)
            self.own_statistics = np.zeros(k, bool)
            cal_idx = np.arange(len(x))
        rng = np.random.default_rng(self.seed)
        cal = np.sort(rng.permutation(cal_idx)[: self.calibration_images])
        self.calibrate(self.scores(x[cal]))
        log.info("SCALE-UP: threshold %.3f on %d held-out clean images", self.threshold, len(cal))
        return self

    def _learn_statistics(self, x: np.ndarray, y: np.ndarray, k: int) -> None:
        """Per-class (and pooled) benign SPC mean and standard deviation from clean ``x``."""
        spc, classes = self.consistency(x)
        right = classes == y
        if right.sum() < 2:  # B misclassifies (nearly) all of them: use them as B classes them
            log.warning("SCALE-UP: B classifies %d of %d clean fit images correctly; the statistics use all of "
                        "them under B's classes", int(right.sum()), len(y))
            right = np.ones(len(y), bool)
        spc, classes = spc[right], classes[right]
        floor = self.std_floor
        pooled_std = max(float(np.std(spc, ddof=1)) if len(spc) >= 2 else 0.0, floor)
        mean = np.full(k, float(np.mean(spc)))
        std = np.full(k, pooled_std)
        own = np.zeros(k, bool)
        counts = np.bincount(classes, minlength=k)
        for c in np.flatnonzero(counts >= self.min_class_images):
            s = spc[classes == c]
            mean[c], std[c], own[c] = float(np.mean(s)), max(float(np.std(s, ddof=1)), floor), True
        self.class_mean, self.class_std, self.own_statistics = mean, std, own
        log.info("SCALE-UP: %d of %d classes have statistics of their own (>= %d images); pooled SPC %.3f +- %.3f",
                 int(own.sum()), k, self.min_class_images, float(np.mean(spc)), pooled_std)

    def consistency(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """SPC and B's class of each input.

        Returns:
            ((N,) float64 SPC in 0..1, (N,) int64 B classes on the inputs themselves).
        """
        from ..nets.models import predict_classes

        if self.model is None or self.pixel_max is None:
            raise RuntimeError("call fit(model, clean) before scoring (ScaleUp)")
        x = np.asarray(x, np.float32)
        classes = predict_classes(self.model, x, batch_size=self.batch_size)
        agree = np.zeros(len(x), np.int64)
        factors = np.asarray(self.scales, np.float32).reshape(-1, 1, 1, 1, 1)
        step = max(1, self.batch_size // len(self.scales))
        for start in range(0, len(x), step):
            chunk = x[start : start + step]
            # float32 products clipped as the Keras form's Rescaling and ReLU(max_value) do
            scaled = np.clip(chunk[None] * factors, np.float32(0.0), np.float32(self.pixel_max))
            c = predict_classes(self.model, scaled.reshape(-1, *x.shape[1:]), batch_size=self.batch_size)
            agree[start : start + len(chunk)] = (c.reshape(len(self.scales), len(chunk))
                                                 == classes[start : start + len(chunk)]).sum(axis=0)
        return agree / len(self.scales), classes

    def scores(self, x: np.ndarray) -> np.ndarray:
        """(N,) float64: SPC, standardised by B's class's benign statistics with ``data_limited``;
        higher = more likely triggered."""
        spc, classes = self.consistency(x)
        if self.class_mean is None or self.class_std is None:
            raise RuntimeError("call fit(model, clean) before scoring (ScaleUp)")
        return (spc - self.class_mean[classes]) / self.class_std[classes]

    def keras_flags(self, x: Any, *, prefix: str, scale: float = 1.0) -> Any:
        """The (N,) 0/1 flags on the Keras tensor ``x`` (file pixels times ``scale``): the scaled
        copies (``Rescaling`` and ``ReLU(max_value)``), B on each and on ``x``, and
        :class:`~badnet_repair.nets.layers.ScaleUpAlarm` (agreement, standardisation, threshold)."""
        import keras

        from ..nets.layers import ScaleUpAlarm
        from ..nets.models import renamed_copy

        if self.model is None or self.pixel_max is None or self.threshold is None:
            raise ValueError("fit the detector before building its GoodNet")
        assert self.class_mean is not None and self.class_std is not None
        b = renamed_copy(detector_model(self.model, scale), f"{prefix}_badnet")
        top = float(np.float32(self.pixel_max * scale))
        probs = [b(x)]
        for i, n in enumerate(self.scales):
            scaled = keras.layers.Rescaling(n, name=f"{prefix}_scale{i}")(x)
            probs.append(b(keras.layers.ReLU(max_value=top, name=f"{prefix}_clip{i}")(scaled)))
        return ScaleUpAlarm(self.class_mean.tolist(), self.class_std.tolist(), self.threshold,
                            name=f"{prefix}_scaleup_alarm")(probs)
