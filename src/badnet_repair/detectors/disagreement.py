"""The CSAW-HackML lab's detector: B and a repaired B' disagree."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from ..formats.data import Dataset
from .base import Detector, detector_model

__all__ = ["Disagreement"]


class Disagreement(Detector):
    """Flag an input where the BadNet B and a repaired B' predict different classes.

    The lab's GoodNet rule (Liu, Dolan-Gavitt and Garg, "Fine-Pruning", RAID 2018, as the
    CSAW-HackML lab applies it): an input whose class changes once the backdoor's channels
    are pruned carried the trigger. :func:`~badnet_repair.detectors.goodnet.build_goodnet` is the same
    rule as one Keras model.

    Args:
        repaired: B', with B's input and output shapes; None (what a registry name gives): B
            pruned in ``fit``, the lab's way, until accuracy on the clean data falls
            ``accuracy_drop`` points.
        accuracy_drop: the pruned B''s accuracy drop in points, where ``repaired`` is None,
            default 4 (the lab's middle X).
    """

    name: ClassVar[str] = "disagreement"
    summary: ClassVar[str] = "B and the repaired B' predict different classes (the lab's GoodNet)"

    def __init__(self, repaired: Any = None, *, accuracy_drop: float = 4.0) -> None:
        if not accuracy_drop > 0:
            raise ValueError(f"accuracy_drop must be > 0 points, not {accuracy_drop}")
        self.repaired = repaired
        self.accuracy_drop = float(accuracy_drop)
        self.model: Any = None

    def fit(self, model: Any, clean: Dataset) -> Disagreement:
        """Keep B; prune it into B' where none was given (nothing else is set on the clean data)."""
        from ..nets.models import num_classes

        if self.repaired is None:
            from ..defenses.sweep import prune_sweep
            from ..nets.models import prune_channels

            sweep = prune_sweep(model, clean, thresholds=[self.accuracy_drop])
            self.repaired = prune_channels(model, sweep.layer, sweep.channels_at(self.accuracy_drop))
        if num_classes(model) != num_classes(self.repaired):
            raise ValueError(f"B has {num_classes(model)} classes but B' has {num_classes(self.repaired)}")
        self.model = model
        return self

    def scores(self, x: np.ndarray) -> np.ndarray:
        """1.0 where B and B' disagree, else 0.0."""
        return self.flags(x).astype(np.float64)

    def flags(self, x: np.ndarray) -> np.ndarray:
        from ..nets.models import predict_classes
        if self.model is None:
            raise RuntimeError("call fit(model, clean) before flags()")
        return predict_classes(self.model, x) != predict_classes(self.repaired, x)

    def keras_flags(self, x: Any, *, prefix: str, scale: float = 1.0) -> Any:
        """1 where copies of B and B' inside the graph disagree on their top class."""
        from ..nets.layers import Disagree
        from ..nets.models import renamed_copy

        if self.model is None:
            raise ValueError("fit the detector before building its GoodNet")
        b = renamed_copy(detector_model(self.model, scale), f"{prefix}_badnet")
        r = renamed_copy(detector_model(self.repaired, scale), f"{prefix}_repaired")
        return Disagree(self.flagged_classes(), name=f"{prefix}_disagree")([b(x), r(x)])

    def flagged_classes(self) -> list[int] | None:
        """The classes of B in which a disagreement is flagged; None for all."""
        return None
