"""FST, Feature Shift Tuning (Min, Qin, Shen and Cheng, "Towards Stable Backdoor Purification
through Feature Shift Tuning", NeurIPS 2023), and FST's networks averaged with fine-pruning's."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from ..defaults import setting
from ..formats.data import Dataset
from ..nets.trainer import Part, Warmup
from .base import Repair, Repaired
from .finetuning import FinePruning, FineTuning, Member, TrainingPlan, member_choices

__all__ = ["FeatureShift", "FeatureShiftFinePruning", "FeatureShiftTuning"]

log = logging.getLogger(__name__)


class FeatureShift(Part):
    """FST's part: the classifier head drawn anew, and a penalty on its inner product with the
    BadNet's.

    Before training the head is re-initialised
    (:func:`~badnet_repair.nets.models.reinitialize_head`); every step's loss adds
    ``alpha / C * <K, K0>`` (the head's kernel with the BadNet's, ``C`` classes), and after every
    step ``K`` is rescaled to the norm of ``K0``. Under that constraint the penalty pushes the new
    head away from the old one, so the features under it must shift to stay correct on clean
    data, and the backdoor's features, entangled with clean ones when few poisoned images were
    used, shift with them. The paper sums over the classes; dividing by ``C`` keeps the penalty's
    pull on each class's weights against the task loss's (whose gradient on a class falls as 1/C)
    the same for 38 classes or 1283, so one ``alpha`` fits both: the paper's alpha on CIFAR-10 is
    this one divided by 10. TensorFlow backend.

    Args:
        head: the name of the classifier's Dense layer.
        alpha: the penalty's weight per class, >= 0 (0: the head re-initialised only).
        seed: the new head's seed.
    """

    def __init__(self, head: str, alpha: float, seed: int) -> None:
        if not alpha >= 0:
            raise ValueError(f"alpha must be >= 0, not {alpha}")
        self.head = head
        self.alpha = float(alpha)
        self.seed = int(seed)
        self.kernel: Any = None
        self.original: np.ndarray | None = None

    def begin(self, network: Any) -> None:
        from ..nets.models import reinitialize_head

        name, original = reinitialize_head(network, self.head, seed=self.seed)
        self.kernel = network.get_layer(name).kernel
        self.original = np.asarray(original, dtype=np.float32)
        self.weight = self.alpha / self.original.shape[-1]
        self.norm = float(np.linalg.norm(self.original))
        # the penalty's range is alpha |K0|^2 / C (times the cosine): say it, as it sets alpha's meaning
        log.info("feature shift: head %s re-initialised; penalty %g x |K0|^2 / C = %.3g", name, self.alpha,
                 self.alpha * float(np.mean(np.sum(original.astype(np.float64) ** 2, axis=0))))

    def penalty(self, network: Any) -> Any:
        import tensorflow as tf

        return self.weight * tf.reduce_sum(self.kernel * tf.constant(self.original))

    def after_step(self, network: Any) -> None:
        import tensorflow as tf

        self.kernel.assign(self.kernel * (self.norm / (tf.norm(self.kernel) + 1e-12)))


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

    def shift_plan(self, base: TrainingPlan, model: Any, seed: int) -> TrainingPlan:
        """``base``'s parts with FST's new head and penalty, and the head's warm-up."""
        from ..nets.models import classifier_head

        if self.head_epochs < 0:
            raise ValueError(f"head_epochs must be >= 0, not {self.head_epochs}")
        head = str(classifier_head(model, self.head).name)
        warmup = Warmup(self.head_epochs, (head,)) if self.head_epochs else None
        return TrainingPlan(parts=(FeatureShift(head, self.alpha, seed), *base.parts), step=base.step, warmup=warmup)


@dataclass(frozen=True)
class FeatureShiftTuning(_FeatureShiftSettings, FineTuning):
    """FST, Feature Shift Tuning (Min, Qin, Shen and Cheng, NeurIPS 2023): fine-tuning on clean
    data with the classifier head drawn anew and pushed away from the BadNet's
    (:class:`FeatureShift`), the epoch kept chosen on a held-out part.

    The paper's observation: where few poisoned images made the backdoor, its features are
    entangled with clean ones, and fine-tuning that leaves the features where they are (as a
    low rate and few clean images do) leaves the backdoor. It needs no BatchNorm and no
    trigger, and takes about fine-tuning's time.

    Settings: those of :class:`~badnet_repair.defenses.finetuning.FineTuning`, plus ``alpha``
    (the penalty's weight per class, default 2.0, the authors' 0.2 on CIFAR-10's 10 classes; 0 =
    the head re-initialised only, BackdoorBench's FT-init), ``head`` (the classifier's Dense
    layer, default found from the graph) and ``head_epochs`` (epochs training the new head alone
    on the BadNet's features before the whole network is tuned, default 10; the paper has none:
    without them the random head's first steps wreck the features that ~10 clean images per
    class cannot rebuild), and fine-tuning's ``distill`` (default here 0.3) and ``weight_decay``
    (default here 1.0). ``alpha``, ``head_epochs``, ``distill`` and ``weight_decay`` were chosen
    on the tuning BadNets of benchmarks/removal_tuning.toml (docs/research/removal.md).
    """

    name: ClassVar[str] = "fst"
    summary: ClassVar[str] = "fine-tune with the head drawn anew and pushed from the BadNet's (Min et al. 2023)"

    def plan(self, member: Member, start: Any, pruned: tuple[int, ...]) -> TrainingPlan:
        """Fine-tuning's parts, with FST's head and penalty first."""
        return self.shift_plan(super().plan(member, start, pruned), member.badnet, member.seed)


#: The settings only feature shift tuning takes (the rest are fine-pruning's).
_SHIFT_ONLY = ("alpha", "head", "head_epochs")
#: The settings only pruning takes.
_PRUNE_ONLY = ("accuracy_drop", "prune_fraction", "keep_pruned_start")


@dataclass(frozen=True)
class FeatureShiftFinePruning(_FeatureShiftSettings, FinePruning):
    """FST's and fine-pruning's networks averaged together: ``members`` networks repaired by
    feature shift tuning (:class:`FeatureShiftTuning`; Min et al., NeurIPS 2023) and ``members``
    by fine-pruning (:class:`~badnet_repair.defenses.finetuning.FinePruning`; Liu et al., RAID
    2018), their probabilities combined by ``ensemble_mean`` (default geometric: the normalised
    product).

    The two fail in opposite ways when there are ~10 clean images per class: fine-pruning keeps
    the BadNet's clean knowledge and can leave part of the backdoor; FST removes the backdoor
    and loses clean accuracy the few images cannot rebuild. In a normalised product a class
    that FST's networks give almost no probability (the target, on a triggered image) stays
    low whatever the fine-pruned networks say, while on clean images the fine-pruned networks
    add what FST's lost. Member ``i`` of each method uses seed ``seed + 1000 i`` and the same
    split as the other method's member ``i``, so the parts are exactly what
    :class:`FeatureShiftTuning` and :class:`FinePruning` with these settings return.

    Settings: those of :class:`FinePruning` and of :class:`FeatureShiftTuning` (``alpha``,
    ``head``, ``head_epochs``), each method's defaults: ``members`` 3 of each, ``distill`` 0.3
    and ``weight_decay`` 1.0 for both, a tuned epoch always kept. Chosen on the tuning BadNets
    of benchmarks/removal_tuning.toml (fifth round; docs/research/removal.md). Twice the
    three-member options' time: six networks.
    """

    name: ClassVar[str] = "fst-fp"
    summary: ClassVar[str] = "FST's and fine-pruning's networks, probabilities averaged geometrically"
    #: networks trained per member (for time estimates): one of each method
    networks_per_member: ClassVar[int] = 2

    members: int = setting(3, "networks of each method (FST and fine-pruning)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.ensemble_mean == "soup":
            # FST's networks have a new head, fine-pruning's pruned channels: their weights lie
            # apart, and their mean is no classifier (nor held to any budget)
            raise ValueError("fst-fp averages two methods' networks' probabilities; its ensemble_mean must be "
                             "'geometric' or 'arithmetic', not 'soup'")

    def repair(self, model: Any, clean: Dataset, *, progress: bool = False) -> Repair:
        """The average of the FST networks and the fine-pruned ones; the two ensembles in
        :attr:`Repair.artifacts` (``"fst"``, ``"fine-pruning"``, each a FinePruneResult)."""
        from ..nets.models import average_models

        params = self.get_params()
        shift = FeatureShiftTuning(**{k: v for k, v in params.items() if k not in _PRUNE_ONLY})
        prune = FinePruning(**{k: v for k, v in params.items() if k not in _SHIFT_ONLY})
        shifted = shift.tune(model, clean, progress=progress, desc=f"{self.name} (fst)")
        pruned = prune.tune(model, clean, progress=progress, desc=f"{self.name} (fine-pruning)")
        networks = [m.model for m in shifted.members + pruned.members]
        combined = average_models(networks, name="fst_fp", mean=self.ensemble_mean)
        choices = {"layer": pruned.layer, "fst": member_choices(shifted), "fine-pruning": member_choices(pruned)}
        history = {"fst": [[dict(h) for h in m.history] for m in shifted.members],
                   "fine-pruning": [[dict(h) for h in m.history] for m in pruned.members]}
        repaired = Repaired(label=self.name, model=combined, channels_pruned=pruned.channels_pruned)
        return Repair(defense=self.name, models=(repaired,), record=self.make_record(choices, [history]),
                      artifacts={"fst": shifted, "fine-pruning": pruned},
                      warnings=(*shifted.warnings, *pruned.warnings))
