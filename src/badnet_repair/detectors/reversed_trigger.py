"""The reversed-trigger detector: B follows a Neural Cleanse target, the unlearned model does not."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np

from ..formats.data import Dataset
from .disagreement import Disagreement
from .neural_cleanse import CleanseScan

__all__ = ["ReversedTriggerDetector"]

log = logging.getLogger(__name__)


class ReversedTriggerDetector(Disagreement):
    """Flag an input that B sends to a flagged target class and a repaired model does not.

    The reversed-trigger detector of this toolkit, after Neural Cleanse (Wang et al., IEEE
    S&P 2019): the scan names the target classes; a repaired model (by default B fine-tuned
    to unlearn the reversed triggers, :class:`~badnet_repair.defenses.NeuralCleanseUnlearning`)
    no longer follows the trigger, so a triggered input is one B puts in a flagged target and
    the repaired model puts elsewhere. It is the lab's disagreement rule restricted to the
    flagged classes: clean inputs B puts in a target class are flagged only where the
    repaired model disagrees with B on them.

    Args:
        repaired: the repaired model, with B's input and output shapes; with ``scan`` None (what
            a registry name gives), both come from Neural Cleanse unlearning run in ``fit``
            (or reused from a finished one, :meth:`reuse`).
        scan: a finished Neural Cleanse scan of B; its flagged classes are the targets.
        seed: Neural Cleanse unlearning's seed where ``fit`` runs it, default 0.
    """

    name: ClassVar[str] = "reversed-trigger"
    summary: ClassVar[str] = ("B puts the input in a Neural Cleanse target class and the unlearned model "
                              "does not (Wang et al. 2019)")

    def __init__(self, repaired: Any = None, scan: CleanseScan | None = None, *, seed: int = 0) -> None:
        if (repaired is None) != (scan is None):
            raise ValueError("give both the repaired model and the scan, or neither")
        super().__init__(repaired)
        self.scan = scan
        self.seed = int(seed)

    def reuse(self, repairs: Sequence[Any]) -> None:
        """Take the scan of a finished Neural Cleanse unlearning of B, where one is among
        ``repairs`` and this detector has none yet (saves running the scan twice), and its
        unlearned model unless the repair gave B back (it fell outside its clean-accuracy
        budget: ``fit`` then unlearns again without one)."""
        from ..defenses.cleanse import NeuralCleanseUnlearning

        done = next((r for r in repairs if r.defense == NeuralCleanseUnlearning.name), None)
        if done is not None and self.scan is None:
            self.scan = done.artifacts["scan"]
            if not done.warnings:
                self.repaired = done.model

    def fit(self, model: Any, clean: Dataset) -> ReversedTriggerDetector:
        """Keep B; scan it (unless a scan was given) and unlearn the reversed triggers (unless
        an unlearned model was given).

        The unlearning runs without the removal defenses' clean-accuracy budget: a model that
        fell outside it is no repair to hand back, but it is what tells a triggered input here
        (only inputs B puts in a flagged class are judged), while B itself, which the budget
        would return, flags nothing. Where the scan flags no class there is nothing to unlearn
        and nothing to flag: B stands in for the unlearned model."""
        if self.repaired is None:
            from ..defenses.cleanse import NeuralCleanseUnlearning

            unlearning = NeuralCleanseUnlearning(seed=self.seed, budget=None)
            if self.scan is None:
                self.scan = unlearning.scanner().scan(model, clean, progress=self.progress)
            if self.scan.flagged:
                self.repaired = unlearning.repair(model, clean, progress=self.progress, scan=self.scan).model
            else:
                log.info("reversed-trigger: Neural Cleanse flagged no class; nothing to unlearn, nothing flagged")
                self.repaired = model
        super().fit(model, clean)
        return self

    @property
    def targets(self) -> tuple[int, ...]:
        if self.scan is None:
            raise RuntimeError("call fit(model, clean) first")
        return self.scan.flagged

    def flagged_classes(self) -> list[int] | None:
        return list(self.targets)

    def flags(self, x: np.ndarray) -> np.ndarray:
        from ..nets.models import predict_classes

        if self.model is None:
            raise RuntimeError("call fit(model, clean) before flags()")
        b = predict_classes(self.model, x)
        in_target = np.isin(b, np.asarray(self.targets, np.int64))
        if not in_target.any():
            return in_target
        out = np.zeros(len(x), bool)
        out[in_target] = predict_classes(self.repaired, np.asarray(x)[in_target]) != b[in_target]
        return out
