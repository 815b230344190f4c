"""The CSAW-HackML lab's detector: B and a repaired B' disagree."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from ..formats.data import Dataset
from ..nets.models import num_classes, predict_classes
from .base import Detector

__all__ = ["Disagreement"]


class Disagreement(Detector):
    """Flag an input where the BadNet B and a repaired B' predict different classes.

    The lab's GoodNet rule (Liu, Dolan-Gavitt and Garg, "Fine-Pruning", RAID 2018, as the
    CSAW-HackML lab applies it): an input whose class changes once the backdoor's channels
    are pruned carried the trigger. :func:`~badnet_repair.detectors.goodnet.build_goodnet` is the same
    rule as one Keras model.

    Args:
        repaired: B', with B's input and output shapes.
    """

    name: ClassVar[str] = "disagreement"
    summary: ClassVar[str] = "B and the repaired B' predict different classes (the lab's GoodNet)"

    def __init__(self, repaired: Any) -> None:
        self.repaired = repaired
        self.model: Any = None

    def fit(self, model: Any, clean: Dataset) -> Disagreement:
        """Keep B; there is nothing to set on the clean data."""
        if num_classes(model) != num_classes(self.repaired):
            raise ValueError(f"B has {num_classes(model)} classes but B' has {num_classes(self.repaired)}")
        self.model = model
        return self

    def scores(self, x: np.ndarray) -> np.ndarray:
        """1.0 where B and B' disagree, else 0.0."""
        return self.flags(x).astype(np.float64)

    def flags(self, x: np.ndarray) -> np.ndarray:
        if self.model is None:
            raise RuntimeError("call fit(model, clean) before flags()")
        return predict_classes(self.model, x) != predict_classes(self.repaired, x)
