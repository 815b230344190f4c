"""Neural Cleanse's mitigations as defenses: unlearn the reversed triggers, or prune the
channels they excite."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from ..defaults import BUDGET_HELP, LAYER_HELP, setting
from ..formats.data import Dataset
from ..nets.trainer import Part
from .base import Defense, Repair, Repaired
from .finetuning import FineTuning

__all__ = ["NeuralCleansePruning", "NeuralCleanseUnlearning", "ScanSettings", "Stamp"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScanSettings:
    """The Neural Cleanse scan's settings a defense that scans takes, and the scanner they make."""

    scan_steps: int = setting(300, "Neural Cleanse: optimisation steps per fully optimised class")
    screen_steps: int = setting(60, "Neural Cleanse: steps of the screen of all classes")
    candidates: int = setting(10, "Neural Cleanse: classes the screen passes on to the full optimisation")
    anomaly_threshold: float = setting(2.0, "Neural Cleanse: anomaly index above which a class is flagged")
    seed: int = setting(0, "seed of the scan and of the repair after it (split, shuffling, stamping)")

    def scanner(self) -> Any:
        """The :class:`~badnet_repair.detectors.NeuralCleanse` this defense scans with."""
        from ..detectors.neural_cleanse import NeuralCleanse

        return NeuralCleanse(steps=self.scan_steps, screen_steps=self.screen_steps, candidates=self.candidates,
                             anomaly_threshold=self.anomaly_threshold, seed=self.seed)


class Stamp(Part):
    """Neural Cleanse's unlearning part: a share of each epoch's training images stamped with
    one of the reversed triggers (picked at random), their labels kept, so the network learns to
    ignore the trigger (Wang et al., IEEE S&P 2019, Section VI.C).

    Args:
        triggers: the reversed triggers (each with ``apply(images) -> images``).
        share: the share of images stamped, in [0, 1].
    """

    def __init__(self, triggers: Sequence[Any], share: float) -> None:
        if not 0.0 <= share <= 1.0:
            raise ValueError(f"stamp_share must be in [0, 1], not {share}")
        self.triggers = tuple(triggers)
        self.share = float(share)

    def transform(self, x: np.ndarray, labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if not self.triggers:
            return x
        x = np.array(x, np.float32, copy=True)
        picked = np.flatnonzero(rng.random(len(x)) < self.share)
        which = rng.integers(len(self.triggers), size=len(picked))
        for i, t in enumerate(self.triggers):
            rows = picked[which == i]
            x[rows] = t.apply(x[rows])
        return x


@dataclass(frozen=True)
class NeuralCleanseUnlearning(ScanSettings, FineTuning):
    """Neural Cleanse unlearning (Wang et al., IEEE S&P 2019, Section VI.C): scan B for
    backdoor targets (:class:`~badnet_repair.detectors.NeuralCleanse`), then fine-tune on the
    clean data with ``stamp_share`` of each epoch's images stamped with a flagged class's
    reversed trigger and kept at their true labels (:class:`Stamp`), so the network learns to
    ignore the trigger. The epoch kept is chosen on a held-out part of the clean data.

    Where the scan flags no class, the model is fine-tuned on clean data alone (a warning
    says so). The scan is returned in :attr:`Repair.artifacts` as ``"scan"``.

    Settings: those of :class:`~badnet_repair.defenses.finetuning.FineTuning` (epochs, learning
    rate, augmentation, budget...) and :class:`ScanSettings`, plus ``stamp_share``.
    """

    name: ClassVar[str] = "nc-unlearning"
    summary: ClassVar[str] = ("fine-tune with Neural Cleanse's reversed triggers stamped on clean images, true "
                              "labels kept (Wang et al. 2019)")

    stamp_share: float = setting(0.2, "share of each epoch's tuning images stamped with a reversed trigger "
                                      "(the paper's 20 %)")

    def repair(self, model: Any, clean: Dataset, *, progress: bool = False, scan: Any = None) -> Repair:
        """Scan (unless a finished ``scan`` of ``model`` is given), then unlearn.

        Returns:
            Repair with the unlearned model; ``artifacts["scan"]`` the scan.
        """
        stamp = Stamp((), self.stamp_share)  # checks the share before the scan's minutes
        scan = scan if scan is not None else self.scanner().scan(model, clean, progress=progress)
        triggers = [scan.triggers[c] for c in scan.flagged]
        if not triggers:
            log.warning("Neural Cleanse flagged no class: fine-tuning on clean data alone")
        stamp = Stamp(triggers, self.stamp_share)
        result = self.tune(model, clean, progress=progress, parts=(stamp,))
        repair = self.as_repair(result)
        first = result.members[0]
        choices = {"flagged": list(scan.flagged), "kept_epoch": first.kept_epoch,
                   "holdout_accuracy": first.holdout_accuracy, "scan": scan.summary(),
                   "members": repair.record["choices"]["members"]}
        history = first.history if len(result.members) == 1 else repair.record["history"]
        return Repair(defense=self.name, models=repair.models, record=self.make_record(choices, history),
                      artifacts={"scan": scan}, warnings=repair.warnings)


@dataclass(frozen=True)
class NeuralCleansePruning(ScanSettings, Defense):
    """Neural Cleanse's other mitigation (Wang et al., IEEE S&P 2019, Section VI.B): prune the
    channels the reversed trigger excites most.

    Scan B (:class:`~badnet_repair.detectors.NeuralCleanse`); on a held-out part of the clean
    data, measure each channel of ``layer`` (after its pooling) on the clean images and on the
    same images stamped with the flagged classes' reversed triggers; prune the channels in
    descending order of that rise until the reversed triggers send at most ``stop_success`` %
    of the stamped held-out images (of other classes) to their targets, but never as far as
    the step where held-out clean accuracy has fallen ``max_drop`` points, nor more than
    ``budget`` points (the clean-accuracy budget, default 3; None = ``max_drop`` alone). Where the
    scan flags no class, B is returned unchanged. The scan is in :attr:`Repair.artifacts` as
    ``"scan"``.
    """

    name: ClassVar[str] = "nc-pruning"
    summary: ClassVar[str] = ("prune the channels Neural Cleanse's reversed trigger excites most "
                              "(Wang et al. 2019)")

    stop_success: float = setting(5.0, "stop once the reversed triggers' attack success on held-out images is "
                                       "at most this, %")
    max_drop: float = setting(10.0, "never prune past a held-out clean accuracy drop of this many points")
    layer: str | None = setting(None, LAYER_HELP)
    holdout_fraction: float = setting(0.2, "validation share held out to measure the channels and stop")
    budget: float | None = setting(3.0, BUDGET_HELP)

    def repair(self, model: Any, clean: Dataset, *, progress: bool = False, scan: Any = None) -> Repair:
        """Scan (unless ``scan`` is given), then prune by the reversed triggers' rise.

        Returns:
            Repair with the pruned model; ``artifacts["scan"]`` the scan.
        """
        from ..nets.models import prune_channels
        from .sweep import ChannelRanking, prune_sweep, rank_channels
        from .tuning import split_clean

        scan = scan if scan is not None else self.scanner().scan(model, clean, progress=progress)
        _, holdout, _, _ = split_clean(clean, holdout_fraction=self.holdout_fraction, seed=self.seed)
        triggers = [scan.triggers[c] for c in scan.flagged]
        if not triggers:
            log.warning("Neural Cleanse flagged no class: the model is returned unpruned")
            choices = {"flagged": [], "channels_pruned": 0, "scan": scan.summary()}
            return Repair(defense=self.name, models=(Repaired(label=self.name, model=model),),
                          record=self.make_record(choices), artifacts={"scan": scan})
        x, y = np.asarray(holdout.x, np.float32), np.asarray(holdout.y)
        # each held-out image of another class, stamped with each flagged trigger, labelled its target
        parts = [(t.apply(x[y != t.target]), np.full(int(np.sum(y != t.target)), t.target)) for t in triggers]
        stamped = Dataset(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
                          name="stamped")
        base = rank_channels(model, x, layer=self.layer)
        rise = rank_channels(model, stamped.x, layer=self.layer).mean_activation - base.mean_activation
        order = np.argsort(-rise, kind="stable")
        ranking = ChannelRanking(layer=base.layer, measured_at=base.measured_at, mean_activation=rise, order=order,
                                 descending=True)
        cap = self.max_drop if self.budget is None else min(self.max_drop, self.budget)
        sweep = prune_sweep(model, holdout, others={"stamped": stamped}, poisoned=["stamped"], ranking=ranking,
                            thresholds=[cap], progress=progress)
        accuracy, success = sweep.metric(sweep.valid_set), sweep.metric("stamped")
        # the last step before held-out accuracy has fallen max_drop (or the budget's) points
        too_far = np.flatnonzero(accuracy <= accuracy[0] - cap)
        limit = max(0, int(too_far[0]) - 1) if len(too_far) else len(order)
        done = np.flatnonzero(success[: limit + 1] <= self.stop_success)
        k = int(done[0]) if len(done) else limit
        repaired = prune_channels(model, base.layer, order[:k])
        choices = {"flagged": list(scan.flagged), "layer": base.layer, "order": [int(c) for c in order],
                   "rise": [float(v) for v in rise], "channels_pruned": k,
                   "stopped_by": "stop_success" if len(done) else ("max_drop" if cap == self.max_drop else "budget"),
                   "holdout_accuracy": float(accuracy[k]), "stamped_attack_success": float(success[k]),
                   "scan": scan.summary()}
        history = [{"channels_pruned": i, "holdout_accuracy": float(a), "stamped_attack_success": float(s)}
                   for i, (a, s) in enumerate(zip(accuracy, success, strict=True))]
        return Repair(defense=self.name, models=(Repaired(label=self.name, model=repaired, channels_pruned=k),),
                      record=self.make_record(choices, history), artifacts={"scan": scan})
