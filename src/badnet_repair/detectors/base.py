"""The detector interface: what a GoodNet uses to flag an input as triggered.

``fit(model, clean)`` sees the BadNet and clean labelled data only (a threshold is set on
clean data, never on poisoned data); then ``scores(x)`` (higher = more likely triggered)
and ``flags(x)``. A GoodNet outputs the model's class, or the alarm class N where the
detector flags the input (:func:`goodnet_classes`).

A detector's settings are the keyword arguments of its ``__init__``, each with its default
(:meth:`Detector.settings`); a detector made from a registry name takes nothing else, and
builds what it needs (a pruned B', a Neural Cleanse scan) in ``fit``. Its Keras form, for a
GoodNet saved as one model, is its own :meth:`Detector.keras_flags`; a detector without one
says so (:class:`NoKerasForm`) and saves its fitted state instead (:meth:`Detector.state`).
"""

from __future__ import annotations

import abc
import inspect
import logging
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np

from ..errors import ModelError
from ..formats.data import Dataset

__all__ = ["Detector", "NoKerasForm", "ThresholdDetector", "calibration_note", "calibration_split", "check_sampling",
           "checked_false_alarm", "detector_model", "goodnet_classes", "threshold_at"]

log = logging.getLogger(__name__)


class NoKerasForm(TypeError):
    """The detector has no Keras form: its GoodNet is saved as the model plus the detector's file."""


class Detector(abc.ABC):
    """Flags inputs that carry a trigger. Settings in ``__init__``; ``fit`` before use.

    Subclasses set :attr:`name` (the registry name, used by the command line, ``compare`` and
    the notebook) and :attr:`summary` (one line for tables and ``--help``).
    """

    name: ClassVar[str]
    summary: ClassVar[str]
    #: progress bars on long work in ``fit`` (a scan, a repair), set by the caller
    progress: bool = False
    #: set by ``fit`` where the threshold rests on too few clean images for the false-alarm
    #: rate (:func:`calibration_note`): a line for the user, else None
    calibration_warning: str | None = None

    def note_calibration(self, images: int, at_or_beyond: int, false_alarm: float) -> None:
        """Set and log :attr:`calibration_warning` for a threshold set on ``images`` clean images
        for a ``false_alarm`` % rate, ``at_or_beyond`` of them at the threshold or on its flagged
        side (:func:`calibration_note`)."""
        self.calibration_warning = calibration_note(self.name, images, at_or_beyond, false_alarm)
        if self.calibration_warning:
            log.warning(self.calibration_warning)

    @abc.abstractmethod
    def fit(self, model: Any, clean: Dataset) -> Detector:
        """Prepare on the BadNet and clean labelled data; returns ``self``."""

    @abc.abstractmethod
    def scores(self, x: np.ndarray) -> np.ndarray:
        """(N,) float64: how strongly each of the (N, H, W, C) inputs looks triggered."""

    @abc.abstractmethod
    def flags(self, x: np.ndarray) -> np.ndarray:
        """(N,) bool: the inputs the detector flags."""

    def scores_and_flags(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(scores, flags) of the (N, H, W, C) inputs; detectors that derive one from the other
        compute them once."""
        return self.scores(x), self.flags(x)

    def reuse(self, repairs: Sequence[Any]) -> None:  # noqa: B027 (an optional hook: most detectors need nothing)
        """Take what this detector needs from finished repairs of the same B, before ``fit``
        (the reversed-trigger detector takes a Neural Cleanse unlearning's scan); by default
        nothing."""

    @classmethod
    def settings(cls) -> dict[str, inspect.Parameter]:
        """The settings a registry name takes: the keyword-only arguments of ``__init__`` (with
        their defaults), in order."""
        params = inspect.signature(cls.__init__).parameters.values()
        return {p.name: p for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}

    def get_params(self) -> dict[str, Any]:
        """The settings, by name, as this detector holds them (JSON-able values)."""
        out = {}
        for name in self.settings():
            v = getattr(self, name, None)
            out[name] = list(v) if isinstance(v, tuple) else v
        return out

    def keras_flags(self, x: Any, *, prefix: str, scale: float = 1.0) -> Any:
        """The (N,) 0/1 flags of this fitted detector on the Keras tensor ``x``, which holds file
        pixels times ``scale`` (the input scale of G's model), for a GoodNet saved as one model.
        Layer names start with ``prefix``.

        Raises:
            NoKerasForm: a detector without one (the default); its GoodNet is then saved as the
                model plus :meth:`state`.
        """
        raise NoKerasForm(f"no Keras form for the {type(self).__name__} detector")

    def state(self) -> dict[str, np.ndarray]:
        """The fitted state (arrays) that, with :meth:`get_params` and B, restores this detector
        (:meth:`restore`): for a GoodNet saved without a Keras form.

        Raises:
            NoKerasForm: a detector that cannot be saved this way (the default).
        """
        raise NoKerasForm(f"the {type(self).__name__} detector cannot save its fitted state")

    def restore(self, model: Any, state: dict[str, np.ndarray]) -> Detector:
        """This detector, fitted: B and the :meth:`state` saved from a fitted one; returns ``self``."""
        raise NoKerasForm(f"the {type(self).__name__} detector cannot restore a saved state")


def checked_false_alarm(false_alarm: float) -> float:
    """``false_alarm`` as a float, checked to be a percentage (ValueError otherwise)."""
    if not 0.0 <= false_alarm <= 100.0:
        raise ValueError(f"false_alarm is a percentage, not {false_alarm}")
    return float(false_alarm)


def check_sampling(calibration_images: int, batch_size: int, seed: int) -> None:
    """The settings a sampling detector shares: at least one calibration image and one image a
    batch, and a seed >= 0 (ValueError otherwise)."""
    if calibration_images < 1 or batch_size < 1:
        raise ValueError("calibration_images and batch_size must be at least 1")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, not {seed}")


def threshold_at(clean_scores: np.ndarray, false_alarm: float) -> float:
    """The threshold that flags at most ``false_alarm`` % of ``clean_scores`` (flags are
    ``score > threshold``): the (100 - false_alarm) % quantile, rounded up to a score.

    Raises:
        ValueError: for no scores or a rate outside 0..100.
    """
    s = np.asarray(clean_scores, np.float64)
    if s.size == 0:
        raise ValueError("no clean scores to set a threshold on")
    return float(np.quantile(s, 1.0 - checked_false_alarm(false_alarm) / 100.0, method="higher"))


def calibration_note(name: str, images: int, at_or_beyond: int, false_alarm: float) -> str | None:
    """A loud line where a threshold rests on too few clean images for its false-alarm rate.

    A threshold set at a clean score flags a new clean input (exchangeable with the calibration
    images) with probability ``at_or_beyond / (images + 1)``, where ``at_or_beyond`` counts the
    calibration scores at the threshold or beyond it (on the flagged side): with 20 images and a
    1 % rate the threshold is the most extreme score, and about 1 in 21 clean inputs goes past it.

    Args:
        name: the detector's name, for the line.
        images: clean calibration images.
        at_or_beyond: of them, those at or beyond the threshold.
        false_alarm: the rate asked for, in %.

    Returns:
        The line where that expected rate is more than twice ``false_alarm``, else None.
    """
    expected = 100.0 * at_or_beyond / (images + 1)
    if expected <= 2.0 * false_alarm:
        return None
    return (f"{name}: its threshold rests on {images} clean image{'s' if images != 1 else ''}, too few for a "
            f"{false_alarm:.3g} % false alarm: expect about {expected:.1f} % of clean inputs flagged "
            "(more clean images, or a larger false_alarm, would bring it down)")


def calibration_split(labels: np.ndarray, share: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split clean images per class into (fit, calibration) index arrays, sorted.

    About ``share`` of each class's images go to calibration (the threshold), at least one
    where the class has two or more images; a class with one image goes to fit. Detectors that
    learn from clean data (class means, per-class statistics) learn on the fit part and set
    their threshold on the other, so the threshold sees scores of images the statistics did not.
    """
    if not 0.0 < share < 1.0:
        raise ValueError(f"share must be between 0 and 1, not {share}")
    y = np.asarray(labels)
    rng = np.random.default_rng(seed)
    fit, calib = [], []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        k = 0 if len(idx) < 2 else min(len(idx) - 1, max(1, round(share * len(idx))))
        calib.append(idx[:k])
        fit.append(idx[k:])
    return np.sort(np.concatenate(fit)).astype(np.int64), np.sort(np.concatenate(calib)).astype(np.int64)


class ThresholdDetector(Detector):
    """A detector that flags ``scores(x) > threshold``, the threshold set on clean scores so
    that at most ``false_alarm`` % of them are flagged (:func:`threshold_at`).

    Subclasses compute ``scores`` and call :meth:`calibrate` at the end of ``fit``, with the
    scores of clean images their statistics were not fitted on.
    """

    false_alarm: float
    threshold: float | None = None
    calibration_scores: np.ndarray | None = None

    def calibrate(self, clean_scores: np.ndarray) -> None:
        """Set :attr:`threshold` from held-out clean scores; where they are too few for the
        rate, say so (:func:`calibration_note`, kept as :attr:`calibration_warning`)."""
        self.calibration_scores = np.asarray(clean_scores, np.float64)
        self.threshold = threshold_at(self.calibration_scores, self.false_alarm)
        self.note_calibration(self.calibration_scores.size, int(np.sum(self.calibration_scores >= self.threshold)),
                              self.false_alarm)

    def flags(self, x: np.ndarray) -> np.ndarray:
        """(N,) bool: score above the threshold set on clean data."""
        return self.scores_and_flags(x)[1]

    def scores_and_flags(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.threshold is None:
            raise RuntimeError(f"call fit(model, clean) before flags() ({type(self).__name__})")
        s = self.scores(x)
        return s, s > self.threshold


def detector_model(model: Any, scale: float) -> Any:
    """A detector's ``model`` without its input scale, checked to be G's ``scale``: what a
    detector's :meth:`Detector.keras_flags` runs on G's (already scaled) input."""
    from ..nets.models import input_scale_of, without_input_scale

    if input_scale_of(model) != scale:
        raise ModelError(f"the detector's model {model.name!r} takes input scale {input_scale_of(model):g}, "
                         f"but G's model takes {scale:g}; load them with the same input_scale")
    return without_input_scale(model)


def goodnet_classes(model: Any, detector: Detector, x: np.ndarray) -> np.ndarray:
    """(N,) int64 classes of the GoodNet made of ``model`` and ``detector``: the model's
    class, or N (the model's class count) where the detector flags the input."""
    from ..nets.models import predict_classes

    classes = predict_classes(model, x)
    n = int(model.outputs[0].shape[-1])
    return np.where(detector.flags(x), np.int64(n), classes)
