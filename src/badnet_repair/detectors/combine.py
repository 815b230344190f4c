"""Detectors combined: flag an input where any of them does."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np

from ..formats.data import Dataset
from .base import Detector

__all__ = ["AnyOf"]


class AnyOf(Detector):
    """Flag an input where any of the given detectors flags it.

    Each detector keeps its own threshold, so the false-alarm rates add up at most: two
    detectors set at 2.5 % each flag at most 5 % of clean inputs together.

    Args:
        detectors: the detectors, fitted or not (``fit`` fits them all on the same data).
    """

    name: ClassVar[str] = "any-of"
    summary: ClassVar[str] = "any of several detectors flags the input"

    def __init__(self, *detectors: Detector) -> None:
        if not detectors:
            raise ValueError("AnyOf needs at least one detector")
        self.detectors = tuple(detectors)

    def fit(self, model: Any, clean: Dataset) -> AnyOf:
        """Fit every detector on B and the clean data."""
        for d in self.detectors:
            d.fit(model, clean)
        return self

    def reuse(self, repairs: Sequence[Any]) -> None:
        for d in self.detectors:
            d.reuse(repairs)

    def scores(self, x: np.ndarray) -> np.ndarray:
        """(N,) how many of the detectors flag each input."""
        return np.sum([d.flags(x) for d in self.detectors], axis=0).astype(np.float64)

    def flags(self, x: np.ndarray) -> np.ndarray:
        return np.any([d.flags(x) for d in self.detectors], axis=0)

    def keras_flags(self, x: Any, *, prefix: str, scale: float = 1.0) -> Any:
        """The maximum of the parts' Keras flags (:class:`~badnet_repair.detectors.base.NoKerasForm`
        where any part has none)."""
        import keras

        parts = [d.keras_flags(x, prefix=f"{prefix}{i}", scale=scale) for i, d in enumerate(self.detectors)]
        return parts[0] if len(parts) == 1 else keras.layers.Maximum(name=f"{prefix}_any")(parts)
