"""The detector interface: what a GoodNet uses to flag an input as triggered.

``fit(model, clean)`` sees the BadNet and clean labelled data only (a threshold is set on
clean data, never on poisoned data); then ``scores(x)`` (higher = more likely triggered)
and ``flags(x)``. A GoodNet outputs the model's class, or the alarm class N where the
detector flags the input (:func:`goodnet_classes`).
"""

from __future__ import annotations

import abc
from typing import Any, ClassVar

import numpy as np

from ..formats.data import Dataset
from ..nets.models import predict_classes

__all__ = ["Detector", "goodnet_classes"]


class Detector(abc.ABC):
    """Flags inputs that carry a trigger. Settings in ``__init__``; ``fit`` before use."""

    name: ClassVar[str]
    summary: ClassVar[str]

    @abc.abstractmethod
    def fit(self, model: Any, clean: Dataset) -> Detector:
        """Prepare on the BadNet and clean labelled data; returns ``self``."""

    @abc.abstractmethod
    def scores(self, x: np.ndarray) -> np.ndarray:
        """(N,) float64: how strongly each of the (N, H, W, C) inputs looks triggered."""

    @abc.abstractmethod
    def flags(self, x: np.ndarray) -> np.ndarray:
        """(N,) bool: the inputs the detector flags."""


def goodnet_classes(model: Any, detector: Detector, x: np.ndarray) -> np.ndarray:
    """(N,) int64 classes of the GoodNet made of ``model`` and ``detector``: the model's
    class, or N (the model's class count) where the detector flags the input."""
    classes = predict_classes(model, x)
    n = int(model.outputs[0].shape[-1])
    return np.where(detector.flags(x), np.int64(n), classes)
