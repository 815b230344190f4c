"""Fine-tuning and fine-pruning as :class:`~badnet_repair.defenses.Defense` classes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from ..defaults import FINE_TUNING, LAYER_HELP, TuningSettings, setting
from ..formats.data import Dataset
from .base import Defense, Repair, Repaired

if TYPE_CHECKING:
    from .tuning import FinePruneResult

# Fine-tuning (TensorFlow) is imported when a repair runs, so the command line can list these
# classes' settings without loading TensorFlow.

__all__ = ["FeatureShiftFinePruning", "FeatureShiftTuning", "FinePruning", "FineTuning", "FineTuningSAM"]


@dataclass(frozen=True)
class FineTuning(TuningSettings, Defense):
    """Fine-tuning on clean data (Liu et al., RAID 2018, Section 5), the epoch kept chosen on
    a held-out part of it (:func:`~badnet_repair.defenses.tuning.fine_tune`).

    Settings: those of :class:`~badnet_repair.defaults.TuningSettings` (epochs, learning
    rate, augmentation, distillation, members...), plus ``layer`` (only used to hold pruned
    channels at zero; default found from the graph) and ``seed`` (default 0).
    """

    name: ClassVar[str] = "fine-tuning"
    method: ClassVar[Literal["fine-pruning", "fine-tuning"]] = "fine-tuning"
    summary: ClassVar[str] = "fine-tune on augmented clean data, epoch chosen on a held-out part"

    layer: str | None = setting(None, LAYER_HELP)
    seed: int = setting(0, "split, shuffling and augmentation seed")

    def repair(self, model: Any, clean: Dataset, *, progress: bool = False) -> Repair:
        """The fine-tuned model (or the average of ``members`` of them)."""
        from .tuning import fine_prune

        return self._repair(fine_prune(model, clean, method=self.method, progress=progress, desc=self.name,
                                       **self.get_params()))

    def _repair(self, result: FinePruneResult) -> Repair:
        choices = {"layer": result.layer, "members": _member_choices(result)}
        history = [[dict(h) for h in m.history] for m in result.members]
        repaired = Repaired(label=self.name, model=result.model, channels_pruned=result.channels_pruned)
        return Repair(defense=self.name, models=(repaired,), record=self.make_record(choices, history))


def _member_choices(result: FinePruneResult) -> list[dict[str, Any]]:
    """What was chosen for each member of a fine-tuning or fine-pruning result (the record's choices)."""
    return [{"seed": m.seed, "channels_pruned": len(m.pruned_channels), "kept_epoch": m.kept_epoch,
             "base_holdout_accuracy": m.base_holdout_accuracy, "pruned_holdout_accuracy": m.pruned_holdout_accuracy,
             "holdout_accuracy": m.holdout_accuracy} for m in result.members]


@dataclass(frozen=True)
class FinePruning(FineTuning):
    """Fine-pruning (Liu et al., RAID 2018): prune until held-out clean accuracy falls
    ``accuracy_drop`` points (or prune ``prune_fraction`` of the channels), then fine-tune
    with the pruned channels held at zero (:func:`~badnet_repair.defenses.tuning.fine_prune`).

    Settings: those of :class:`FineTuning`, plus ``accuracy_drop`` (default 4 points),
    ``prune_fraction`` (default None: use the drop) and ``keep_pruned_start`` (default False,
    chosen on the tuning BadNets of benchmarks/removal_tuning.toml; docs/research/removal.md).
    """

    name: ClassVar[str] = "fine-pruning"
    method: ClassVar[Literal["fine-pruning", "fine-tuning"]] = "fine-pruning"
    summary: ClassVar[str] = "prune to a held-out accuracy drop, then fine-tune (Liu et al. 2018)"

    accuracy_drop: float | None = setting(FINE_TUNING["accuracy_drop"],
                                          "prune until held-out accuracy falls this many points")
    prune_fraction: float | None = setting(None, "prune this fraction of the channels instead")
    keep_pruned_start: bool = setting(FINE_TUNING["keep_pruned_start"],
                                      "keep the pruned, untuned network where no tuned epoch matches its "
                                      "held-out accuracy (default: always a tuned epoch)")


@dataclass(frozen=True)
class FineTuningSAM(FineTuning):
    """FT-SAM (Zhu, Wei, Shen, Fan and Wu, ICCV 2023): fine-tuning on clean data with
    sharpness-aware steps (:class:`~badnet_repair.nets.training.SharpnessAware`), the epoch
    kept chosen on a held-out part of it.

    Each step first moves the weights to the worst point within ``sam_rho`` (relative to each
    weight's size when ``sam_adaptive``, as the paper's adaptive form) and takes the gradient
    there. The paper's observation: the weights a backdoor uses are large, so the adaptive
    perturbation moves them most, and minimising the worst nearby loss on clean data pushes
    them out of the backdoor's narrow minimum, which plain fine-tuning with few clean images
    stays in. It needs no BatchNorm and no trigger.

    Settings: those of :class:`FineTuning`, plus ``sam_rho`` (default 0.2, chosen on the tuning
    BadNets of benchmarks/removal_tuning.toml; docs/research/removal.md) and ``sam_adaptive``
    (default True).
    """

    name: ClassVar[str] = "ft-sam"
    summary: ClassVar[str] = "fine-tune with sharpness-aware steps, epoch chosen on a held-out part (Zhu et al. 2023)"

    sam_rho: float = setting(0.2, "radius of the sharpness-aware weight perturbation")
    sam_adaptive: bool = setting(True, "radius relative to each weight's size (adaptive SAM)")


@dataclass(frozen=True)
class _FeatureShiftSettings:
    """FST's settings, shared by :class:`FeatureShiftTuning` and :class:`FeatureShiftFinePruning`
    (listed before a fine-tuning class among the bases, so that its defaults win)."""

    alpha: float = setting(2.0, "FST: weight of the penalty on the new head's inner product with the BadNet's, "
                                "per class")
    head: str | None = setting(None, "FST: the classifier's Dense layer (default: found from the graph)")
    head_epochs: int = setting(10, "FST: epochs training the new head alone before the whole network")
    # fine-tuning's aids, on by default here (chosen on the tuning BadNets): B's correct answers on
    # the clean images tell the new head what its one-hot labels cannot
    distill: float = setting(0.3, "weight of the BadNet's own correct predictions on the clean tuning images "
                                  "in the targets")
    weight_decay: float = setting(1.0, "decoupled weight decay (AdamW) while tuning")


@dataclass(frozen=True)
class FeatureShiftTuning(_FeatureShiftSettings, FineTuning):
    """FST, Feature Shift Tuning (Min, Qin, Shen and Cheng, NeurIPS 2023): fine-tuning on clean
    data with the classifier head drawn anew and pushed away from the BadNet's, the epoch
    kept chosen on a held-out part (:class:`~badnet_repair.nets.training.FeatureShift`).

    The paper's observation: where few poisoned images made the backdoor, its features are
    entangled with clean ones, and fine-tuning that leaves the features where they are (as a
    low rate and few clean images do) leaves the backdoor. Re-initialising the head and
    penalising its inner product with the BadNet's head at a fixed norm forces the features
    to shift. It needs no BatchNorm and no trigger, and takes about fine-tuning's time.

    Settings: those of :class:`FineTuning`, plus ``alpha`` (the penalty's weight per class,
    default 2.0, the authors' 0.2 on CIFAR-10's 10 classes; 0 = the head re-initialised only,
    BackdoorBench's FT-init), ``head`` (the classifier's Dense layer, default found from
    the graph) and ``head_epochs`` (epochs training the new head alone on the BadNet's
    features before the whole network is tuned, default 10; the paper has none: without them
    the random head's first steps wreck the features that ~10 clean images per class cannot
    rebuild), and fine-tuning's ``distill`` (default here 0.3) and ``weight_decay`` (default
    here 1.0). ``alpha``, ``head_epochs``, ``distill`` and ``weight_decay`` were chosen on the
    tuning BadNets of benchmarks/removal_tuning.toml (docs/research/removal.md).
    """

    name: ClassVar[str] = "fst"
    summary: ClassVar[str] = "fine-tune with the head drawn anew and pushed from the BadNet's (Min et al. 2023)"

    def repair(self, model: Any, clean: Dataset, *, progress: bool = False) -> Repair:
        """The fine-tuned model (or the average of ``members`` of them)."""
        from .tuning import fine_prune

        params = self.get_params()
        params["feature_shift"] = params.pop("alpha")
        return self._repair(fine_prune(model, clean, method=self.method, progress=progress, desc=self.name, **params))


#: The settings only feature shift tuning takes (the rest are fine-pruning's).
_SHIFT_ONLY = ("alpha", "head", "head_epochs")
#: The settings only pruning takes.
_PRUNE_ONLY = ("accuracy_drop", "prune_fraction", "keep_pruned_start")


@dataclass(frozen=True)
class FeatureShiftFinePruning(_FeatureShiftSettings, FinePruning):
    """FST's and fine-pruning's networks averaged together: ``members`` networks repaired by
    feature shift tuning (:class:`FeatureShiftTuning`; Min et al., NeurIPS 2023) and ``members``
    by fine-pruning (:class:`FinePruning`; Liu et al., RAID 2018), their probabilities combined
    by ``ensemble_mean`` (default geometric: the normalised product).

    The two fail in opposite ways when there are ~10 clean images per class: fine-pruning keeps
    the BadNet's clean knowledge and can leave part of the backdoor; FST removes the backdoor
    and loses clean accuracy the few images cannot rebuild. In a normalised product a class
    that FST's networks give almost no probability (the target, on a triggered image) stays
    low whatever the fine-pruned networks say, while on clean images the fine-pruned networks
    add what FST's lost. Member ``i`` of each method uses seed ``seed + 1000 i`` and the same
    split as the other method's member ``i``, so the parts are exactly what
    :class:`FeatureShiftTuning` and :class:`FinePruning` with these settings return.

    Settings: those of :class:`FinePruning` and of :class:`FeatureShiftTuning` (``alpha``,
    ``head``, ``head_epochs``), each method's defaults: ``members`` 3 of each,
    ``distill`` 0.3 and ``weight_decay`` 1.0 for both, a tuned epoch always kept. Chosen on the
    tuning BadNets of benchmarks/removal_tuning.toml (fifth round; docs/research/removal.md).
    Twice the three-member options' time: six networks.
    """

    name: ClassVar[str] = "fst-fp"
    summary: ClassVar[str] = "FST's and fine-pruning's networks, probabilities averaged geometrically"

    members: int = setting(3, "networks of each method (FST and fine-pruning)")

    def repair(self, model: Any, clean: Dataset, *, progress: bool = False) -> Repair:
        """The average of the FST networks and the fine-pruned ones; the two ensembles in
        :attr:`Repair.artifacts` (``"fst"``, ``"fine-pruning"``, each a FinePruneResult)."""
        from ..nets.models import average_models
        from .tuning import fine_prune

        params = self.get_params()
        shift = {k: v for k, v in params.items() if k not in _PRUNE_ONLY}
        shift["feature_shift"] = shift.pop("alpha")
        shifted = fine_prune(model, clean, method="fine-tuning", progress=progress, desc=f"{self.name} (fst)", **shift)
        pruned = fine_prune(model, clean, method="fine-pruning", progress=progress, desc=f"{self.name} (fine-pruning)",
                            **{k: v for k, v in params.items() if k not in _SHIFT_ONLY})
        networks = [m.model for m in shifted.members + pruned.members]
        combined = average_models(networks, name="fst_fp", mean=self.ensemble_mean)
        choices = {"layer": pruned.layer, "fst": _member_choices(shifted), "fine-pruning": _member_choices(pruned)}
        history = {"fst": [[dict(h) for h in m.history] for m in shifted.members],
                   "fine-pruning": [[dict(h) for h in m.history] for m in pruned.members]}
        repaired = Repaired(label=self.name, model=combined, channels_pruned=pruned.channels_pruned)
        return Repair(defense=self.name, models=(repaired,), record=self.make_record(choices, [history]),
                      artifacts={"fst": shifted, "fine-pruning": pruned})
