"""Fine-tuning and fine-pruning (Liu, Dolan-Gavitt and Garg, "Fine-Pruning", RAID 2018, Section 5).

Fine-pruning prunes the last conv layer's least active channels (as the pruning defense does),
then fine-tunes the pruned network on clean data with the pruned channels held at zero;
fine-tuning alone is the paper's other baseline. Both train on
:class:`~badnet_repair.nets.trainer.Trainer`; their own parts are here: distillation of the
BadNet's correct answers (:class:`Distillation`) and channels held at zero
(:class:`FrozenChannels`). :class:`FineTuning` also holds the loop every fine-tuning defense
shares (members, split, start, training, the clean-accuracy budget); FT-SAM, FST and Neural
Cleanse's unlearning subclass it with their own parts, in their own modules.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np

from ..defaults import BUDGET_HELP, ENSEMBLE_MEANS, LAYER_HELP, setting
from ..formats.data import Dataset
from ..nets.trainer import Part, Step, TrainingSettings, Warmup
from .base import Defense, Repair, Repaired

if TYPE_CHECKING:
    from .tuning import FinePruneResult

log = logging.getLogger(__name__)

# TensorFlow is imported when a repair runs, so the command line can list these classes'
# settings without loading it.

__all__ = ["Distillation", "FinePruning", "FineTuning", "FrozenChannels", "TrainingPlan", "fine_prune",
           "greedy_soup", "soup_member_split"]

class Distillation(Part):
    """Training targets that mix in a teacher's predictions (Hinton et al., 2015).

    Each image the teacher classifies correctly is labelled
    ``(1 - weight) * one_hot(label) + weight * teacher(image)``; the others keep their one-hot
    label. The teacher's soft outputs on clean images carry its clean knowledge, which a few
    labelled images per class cannot. Its mistakes are not distilled: on shifted and flipped
    clean images a BadNet sometimes answers its target class, and distilling those answers
    teaches the backdoor back. Records ``teacher_agreement`` (% of the epoch's images the
    teacher got right).

    Args:
        teacher: the network whose predictions are distilled (the BadNet).
        weight: in (0, 1].
    """

    def __init__(self, teacher: Any, weight: float) -> None:
        if not 0.0 < weight <= 1.0:
            raise ValueError(f"distill must be in [0, 1], not {weight}")
        self.teacher = teacher
        self.weight = float(weight)

    def targets(self, x: np.ndarray, labels: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, dict[str, float]]:
        soft = np.asarray(self.teacher.predict(x, batch_size=512, verbose=0), dtype=np.float32)
        agree = soft.argmax(axis=1) == labels
        mixed = np.where(agree[:, None], (1.0 - self.weight) * targets + self.weight * soft, targets)
        return mixed, {"teacher_agreement": float(100 * agree.mean())}


class FrozenChannels(Part):
    """Output channels of a conv layer held at zero throughout (pruned channels stay pruned):
    zeroed before training and after every batch, along the layer's chain
    (:func:`~badnet_repair.nets.models.zero_channels`)."""

    def __init__(self, layer: str, channels: tuple[int, ...]) -> None:
        self.layer = layer
        self.channels = tuple(sorted(int(c) for c in channels))

    def begin(self, network: Any) -> None:
        from ..nets.models import zero_channels

        zero_channels(network, self.layer, self.channels)

    def after_batch(self, network: Any) -> None:
        self.begin(network)


@dataclass(frozen=True, eq=False)
class Member:
    """One network a fine-tuning defense trains: what :meth:`FineTuning.start` and
    :meth:`FineTuning.plan` are given.

    Attributes:
        badnet: B (never changed).
        tune: this member's tuning images (trained on).
        holdout: its held-out images (only measured: they choose the epoch and hold the budget).
        layer: the conv layer pruned channels belong to ("" where the network has none).
        seed: the member's seed (``seed + 1000 * index``).
        index: 0 for the first member.
        pixel_scale: the clean images' pixel range (255 for 0..255 files;
            :func:`~badnet_repair.formats.data.pixel_range`), the unit of perturbation settings.
        progress: progress bars.
        desc: the progress bars' label.
        notes: what the defense records about this member (JSON-able), copied into its
            :class:`~badnet_repair.defenses.tuning.FineTuned` and the record's choices.
    """

    badnet: Any
    tune: Dataset
    holdout: Dataset
    layer: str
    seed: int
    index: int
    pixel_scale: float
    progress: bool = False
    desc: str = ""
    notes: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TrainingPlan:
    """What a fine-tuning defense hands the trainer for one network: its parts, its step and
    any warm-up (:meth:`FineTuning.plan`)."""

    parts: tuple[Part, ...] = ()
    step: Step | None = None
    warmup: Warmup | None = None


@dataclass(frozen=True)
class FineTuning(TrainingSettings, Defense):
    """Fine-tuning on clean data (Liu et al., RAID 2018, Section 5), the epoch kept chosen on a
    held-out part of it.

    For each of ``members`` networks (member ``i`` with seed ``seed + 1000 i``): split the clean
    data into a tuning and a held-out part (:func:`~badnet_repair.defenses.tuning.split_clean`),
    make the start (:meth:`start`; here B itself), train it on the tuning part with this
    defense's parts (:meth:`plan`) and keep the epoch best on the held-out part, then hold the
    result to the clean-accuracy ``budget``. With several members the repaired model averages
    their probabilities: each is tuned on a different split, so together they learn from all the
    clean data, at ``members`` times the time and size.

    Settings: the trainer's (:class:`~badnet_repair.nets.trainer.TrainingSettings`: epochs,
    learning rate, batch size, schedule, augmentation, clipping, weight decay) and:

    Args:
        holdout_fraction: share of the clean data held out to choose the epoch, default 0.2.
        members: networks tuned on different splits and averaged, default 1 (the paper's).
        ensemble_mean: ``"geometric"`` (default; the normalised product of the members'
            probabilities, so a member that kept the backdoor is outvoted), ``"arithmetic"``, or
            ``"soup"``: one network with the mean of the members' weights (a uniform model soup;
            Wortsman et al., ICML 2022; :func:`~badnet_repair.nets.models.weight_soup`). A soup's
            members all hold out one shared half of ``holdout_fraction`` and each a half of its own
            (:func:`soup_member_split`); the budget holds the soup, on the shared half. (Members
            that prune prune different channels; their soup holds none of them at zero.)
        greedy_soup: with ``ensemble_mean="soup"``, a greedy soup (Wortsman et al., recipe 1):
            the members ranked by accuracy on the shared half, each added, best first, only
            where the soup's accuracy there does not fall (ties join), default False (all of
            them; a uniform soup). The budget reads the same shared half.
        distill: weight of B's own correct predictions in the targets, default 0 (off;
            :class:`Distillation`).
        budget: the clean-accuracy budget in points, default 3 (None = off): a network that falls
            more below B on its held-out images is replaced by the pruned start (where there is one
            and it is within the budget) or by B, and a loud line says so (:attr:`Repair.warnings`).
        budget_apart: check the budget on half of each network's held-out images that nothing
            else read, default False. The held-out part is split per class
            (:func:`~badnet_repair.defenses.tuning.split_clean`, half and half): the prune amount
            and the epoch are chosen on one half, the budget compares B and the result on the
            other, so the choice's optimism (the best of many epochs on a few dozen images) does
            not pass a network the test set then finds far below B. Each half is noisier than
            the whole. Not with ``ensemble_mean="soup"`` (the soup's budget has its own part).
        layer: the conv layer pruned channels belong to, default found from the graph.
        seed: split, shuffling and augmentation seed, default 0.
    """

    name: ClassVar[str] = "fine-tuning"
    summary: ClassVar[str] = "fine-tune on augmented clean data, epoch chosen on a held-out part"
    #: networks trained per member (for time estimates)
    networks_per_member: ClassVar[int] = 1
    #: whether :meth:`start` prunes a conv layer (a model without one can still be fine-tuned)
    prunes: ClassVar[bool] = False
    #: what the budget's fallback calls the network :meth:`start` makes, where it is not B
    start_label: ClassVar[str] = "pruned start"

    holdout_fraction: float = setting(0.2, "validation share held out to choose the prune amount and epoch")
    members: int = setting(1, "networks tuned on different splits of the clean data and averaged "
                              "(1 = a single network, as in the paper)")
    ensemble_mean: Literal["geometric", "arithmetic", "soup"] = setting(
        "geometric", "how several members are combined: their probabilities averaged (geometric: a member that "
                     "kept the backdoor is outvoted; arithmetic), or their weights (soup: one network)")
    greedy_soup: bool = setting(False, "with ensemble_mean='soup': add the members best first, each only where the "
                                       "soup's accuracy on the part they all held out does not fall (a greedy soup)")
    distill: float = setting(0.0, "weight of the BadNet's own correct predictions on the clean tuning images in the "
                                  "targets (0 = labels only)")
    budget: float | None = setting(3.0, BUDGET_HELP)
    budget_apart: bool = setting(False, "check the budget on half the held-out images, which the prune amount and "
                                        "epoch choice never read (they read the other half)")
    layer: str | None = setting(None, LAYER_HELP)
    seed: int = setting(0, "split, shuffling and augmentation seed")

    def __post_init__(self) -> None:
        if self.members < 1:
            raise ValueError(f"members must be >= 1, not {self.members}")
        if self.ensemble_mean not in ENSEMBLE_MEANS:
            raise ValueError(f"ensemble_mean must be one of {ENSEMBLE_MEANS}, not {self.ensemble_mean!r}")
        if self.budget_apart and self.soup:
            raise ValueError("budget_apart is for single networks and probability ensembles: a soup's budget is "
                             "checked on the part all its members held out")
        if self.greedy_soup and not self.soup:
            raise ValueError("greedy_soup needs ensemble_mean='soup' and members > 1 "
                             f"(here {self.ensemble_mean!r}, {self.members} member(s))")
        if not 0.0 <= self.distill <= 1.0:
            raise ValueError(f"distill must be in [0, 1], not {self.distill}")
        if self.budget is not None and not self.budget >= 0:
            raise ValueError(f"budget must be >= 0 points or None, not {self.budget}")
        self.trainer()  # the trainer's own checks (epochs, weight decay...)

    @property
    def soup(self) -> bool:
        """Whether the members are combined into one network by their weights (a soup)."""
        return self.members > 1 and self.ensemble_mean == "soup"

    # -- what a subclass changes ---------------------------------------------------------------

    def start(self, member: Member) -> tuple[Any, tuple[int, ...]]:
        """The network training starts from, and the channels of ``member.layer`` held at zero:
        B itself, nothing held."""
        return member.badnet, ()

    def plan(self, member: Member, start: Any, pruned: tuple[int, ...]) -> TrainingPlan:
        """The parts one network is trained with: B's correct answers distilled (where
        ``distill``), the pruned channels held at zero (where any)."""
        parts: list[Part] = []
        if self.distill:
            parts.append(Distillation(member.badnet, self.distill))
        if pruned:
            parts.append(FrozenChannels(member.layer, pruned))
        return TrainingPlan(parts=tuple(parts))

    def step_cost(self) -> float:
        """The cost of one training step in plain steps (for time estimates), default 1."""
        return 1.0

    def fixed_cost(self) -> float:
        """Work per member outside the trainer's epochs, in plain passes over the tuning part
        (for time estimates; a cut in epochs does not shrink it), default 0."""
        return 0.0

    def keeps_start(self, pruned: tuple[int, ...]) -> bool:
        """Whether the untrained start may win the epoch choice: never for B itself, which clean
        data always prefers and which still holds the backdoor."""
        return False

    # -- the loop --------------------------------------------------------------------------------

    def tune(self, model: Any, clean: Dataset, *, progress: bool = False, desc: str | None = None,
             parts: tuple[Part, ...] = ()) -> FinePruneResult:
        """Train ``members`` networks and combine them (the steps in the class's description).

        Args:
            model: the BadNet (not changed).
            clean: clean labelled data; nothing else is read.
            progress: progress bars.
            desc: the progress bars' label, default the defense's name.
            parts: parts added to every network's plan, after its own (what a defense found
                before training, such as Neural Cleanse's reversed triggers).

        Returns:
            FinePruneResult.
        """
        from ..errors import ModelError
        from ..formats.data import pixel_range
        from ..nets.models import average_models, conv_layer
        from ..nets.trainer import right_on
        from .tuning import FinePruneResult, FineTuned, check_budget, split_clean

        try:
            layer = str(conv_layer(model, self.layer).name)
        except ModelError:
            if self.prunes or self.layer is not None:
                raise
            layer = ""  # a network with no conv layer can still be tuned where nothing is pruned
        trainer = self.trainer()
        label = desc or self.name
        tuned: list[FineTuned] = []
        scale = pixel_range(clean.x)
        soup = self.soup
        rest_idx, shared_idx = np.arange(len(clean)), np.zeros(0, np.int64)
        if soup:
            # The soup learns from every member's tuning part, so only images no member tuned on can
            # hold its budget: half the held-out share is held out by all members alike.
            _, _, rest_idx, shared_idx = split_clean(clean, holdout_fraction=self.holdout_fraction / 2,
                                                     seed=self.seed)
        for i in range(self.members):
            member_seed = self.seed + 1000 * i
            if soup:
                tune, holdout, tune_idx, hold_idx = soup_member_split(clean, rest_idx, shared_idx,
                                                                      self.holdout_fraction, seed=member_seed)
            else:
                tune, holdout, tune_idx, hold_idx = split_clean(clean, holdout_fraction=self.holdout_fraction,
                                                                seed=member_seed)
            choose, apart = self._budget_halves(holdout, member_seed)
            member = Member(badnet=model, tune=tune, holdout=choose, layer=layer, seed=member_seed, index=i,
                            pixel_scale=scale, progress=progress,
                            desc=label + (f" {i + 1}/{self.members}" if self.members > 1 else ""))
            checked_on = apart if apart is not None else choose  # the images the budget compares on
            base_right = right_on(model, checked_on)
            base_acc = float(100.0 * np.mean(base_right))
            start, pruned = self.start(member)
            start_right = base_right if start is model else right_on(start, checked_on)
            start_acc = float(100.0 * np.mean(start_right))
            log.info("%s member %d/%d: %d channels of %s held at zero; held-out accuracy %.2f (B) -> %.2f (start)",
                     self.name, i + 1, self.members, len(pruned), layer or "(no conv layer)", base_acc, start_acc)
            plan = self.plan(member, start, pruned)
            trained = trainer.train(start, tune, choose, parts=(*plan.parts, *parts), step=plan.step,
                                    warmup=plan.warmup, seed=member_seed, keep_start=self.keeps_start(pruned),
                                    progress=progress, desc=member.desc)
            who = self.name if self.members == 1 else f"{self.name} member {i + 1}"
            # the start is a fallback where it is not B (nor B itself copied: a pruning that pruned nothing)
            own_start = start is not model and not (self.prunes and not pruned)
            candidates: list[tuple[str, float] | tuple[str, float, np.ndarray | None]] = (
                [(self.start_label, start_acc, start_right)] if own_start else [])
            candidates.append(("B", base_acc))
            # a soup's members are not checked one by one (a member given back as B would put the
            # backdoor back into the soup): the soup is checked as a whole, below
            # (B right, the result right) on the budget's images, for the bound on a kept result's drop
            paired = None if soup else (base_right, right_on(trained.model, checked_on))
            result_acc = trained.holdout_accuracy if paired is None or apart is None else \
                float(100.0 * np.mean(paired[1]))
            check = check_budget(who, result_acc, base_acc, None if soup else self.budget, candidates, paired)
            net, epoch = trained.model, trained.kept_epoch
            if check.fallback == self.start_label:
                net, epoch = start, 0
            elif check.fallback == "B":
                net, epoch, pruned = model, 0, ()
            tuned.append(FineTuned(model=net, seed=member_seed, pruned_channels=pruned, kept_epoch=epoch,
                                   holdout_accuracy=check.accuracy, base_holdout_accuracy=base_acc,
                                   pruned_holdout_accuracy=start_acc, history=trained.history,
                                   tune_index=tune_idx, holdout_index=hold_idx, budget=check,
                                   notes=dict(member.notes)))
        stem = self.name.replace("-", "_")
        if not soup:
            repaired = tuned[0].model if self.members == 1 else average_models(
                [t.model for t in tuned], name=f"{stem}_ensemble", mean=self.ensemble_mean)
            return FinePruneResult(model=repaired, method=self.name, layer=layer, members=tuple(tuned))
        shared = clean.subset(shared_idx)
        if self.greedy_soup:
            kept, repaired, soup_acc = greedy_soup([t.model for t in tuned], shared, name=f"{stem}_soup")
            who = f"{self.name} (a greedy soup of {len(kept)} of {self.members})"
        else:
            kept = tuple(range(self.members))
            repaired = average_models([t.model for t in tuned], name=f"{stem}_soup", mean="soup")
            soup_acc = None
            who = f"{self.name} (a soup of {self.members})"
        paired = (right_on(model, shared), right_on(repaired, shared))
        base_acc = float(100.0 * np.mean(paired[0]))
        if soup_acc is None:
            soup_acc = float(100.0 * np.mean(paired[1]))
        check = check_budget(who, soup_acc, base_acc, self.budget, [("B", base_acc)], paired)
        if check.fallback == "B":
            repaired = model
        return FinePruneResult(model=repaired, method=self.name, layer=layer, members=tuple(tuned), budget=check,
                               soup_members=kept)

    def _budget_halves(self, holdout: Dataset, seed: int) -> tuple[Dataset, Dataset | None]:
        """(the images the prune amount and epoch are chosen on, the images the budget is checked
        on or None where they are the same): with ``budget_apart``, the held-out part split per
        class, half and half; without it, or where it holds fewer than 2 images, all of it."""
        from .tuning import split_clean

        if not self.budget_apart:
            return holdout, None
        if len(holdout) < 2:
            log.warning("%s: %d held-out image(s), too few to split: the budget is checked on the images the "
                        "epoch was chosen on", self.name, len(holdout))
            return holdout, None
        choose, apart, _, _ = split_clean(holdout, holdout_fraction=0.5, seed=seed + 7)
        log.info("%s: the epoch is chosen on %d held-out images, the budget checked on %d others", self.name,
                 len(choose), len(apart))
        return choose, apart

    def repair(self, model: Any, clean: Dataset, *, progress: bool = False) -> Repair:
        """The fine-tuned model (or the average of ``members`` of them); the members' budget
        lines in :attr:`Repair.warnings`."""
        return self.as_repair(self.tune(model, clean, progress=progress))

    def as_repair(self, result: FinePruneResult) -> Repair:
        """A :class:`FinePruneResult` as this defense's :class:`Repair`."""
        choices: dict[str, Any] = {"layer": result.layer, "members": member_choices(result)}
        soup = result.soup_record()
        if soup is not None:
            choices["soup"] = soup
        history = [[dict(h) for h in m.history] for m in result.members]
        repaired = Repaired(label=self.name, model=result.model, channels_pruned=result.channels_pruned)
        return Repair(defense=self.name, models=(repaired,), record=self.make_record(choices, history),
                      warnings=result.warnings)


def greedy_soup(models: Sequence[Any], holdout: Dataset, *, name: str = "soup") -> tuple[tuple[int, ...], Any, float]:
    """A greedy weight soup (Wortsman et al., "Model soups", ICML 2022, recipe 1): the models
    ranked by accuracy on ``holdout``, the best kept, each next one added where the soup of the
    kept ones and it is at least as accurate on ``holdout`` as the soup without it.

    Args:
        models: networks of one architecture (fine-tuned from one start, so that their mean stays
            in its basin where it can).
        holdout: labelled images none of the models was trained on.
        name: the soup's name, default ``"soup"``.

    Returns:
        (the indices kept, in the order added; the soup, one network (the best model itself where
        no other joined it); its accuracy on ``holdout`` in %).
    """
    from ..nets.models import weight_soup
    from ..nets.trainer import accuracy

    models = list(models)
    if not models:
        raise ValueError("greedy_soup needs at least one model")
    alone = [accuracy(m, holdout) for m in models]
    order = sorted(range(len(models)), key=lambda i: -alone[i])  # stable: ties keep the members' order
    kept, soup, best = [order[0]], models[order[0]], alone[order[0]]
    for i in order[1:]:
        candidate = weight_soup([models[j] for j in (*kept, i)], name=name)
        acc = accuracy(candidate, holdout)
        log.info("greedy soup: member %d %s (soup of %d: %.2f, without it %.2f)", i + 1,
                 "joins" if acc >= best else "left out", len(kept) + 1, acc, best)
        if acc >= best:
            kept, soup, best = [*kept, i], candidate, acc
    return tuple(kept), soup, best


def soup_member_split(clean: Dataset, rest_idx: np.ndarray, shared_idx: np.ndarray, holdout_fraction: float,
                      *, seed: int) -> tuple[Dataset, Dataset, np.ndarray, np.ndarray]:
    """One soup member's split: it holds out the part all members hold out (``shared_idx``,
    half of ``holdout_fraction``) and a part of its own of the rest, as large again; it tunes on
    what is left, a different share of the clean images for each member.

    Args:
        clean: the clean data.
        rest_idx: indices of the images not in the shared part.
        shared_idx: indices of the shared held-out part.
        holdout_fraction: the member's whole held-out share, in (0, 1).
        seed: the member's seed.

    Returns:
        (tune, holdout, tune_index, holdout_index), the indices into ``clean``, sorted.
    """
    from .tuning import split_clean

    own = (holdout_fraction / 2) / (1 - holdout_fraction / 2)
    _, _, tune_rel, hold_rel = split_clean(clean.subset(rest_idx), holdout_fraction=own, seed=seed)
    tune_idx = np.sort(rest_idx[tune_rel])
    hold_idx = np.sort(np.concatenate([shared_idx, rest_idx[hold_rel]]))
    return clean.subset(tune_idx), clean.subset(hold_idx), tune_idx, hold_idx


def member_choices(result: FinePruneResult) -> list[dict[str, Any]]:
    """What was chosen for each member of a fine-tuning result (a record's choices)."""
    return [{"seed": m.seed, "channels_pruned": len(m.pruned_channels), "kept_epoch": m.kept_epoch,
             "base_holdout_accuracy": m.base_holdout_accuracy, "pruned_holdout_accuracy": m.pruned_holdout_accuracy,
             "holdout_accuracy": m.holdout_accuracy,
             "fallback": m.budget.fallback if m.budget is not None else None,
             "drop_bound": m.budget.drop_bound if m.budget is not None else None, **m.notes} for m in result.members]


@dataclass(frozen=True)
class FinePruning(FineTuning):
    """Fine-pruning (Liu et al., RAID 2018): prune until held-out clean accuracy falls
    ``accuracy_drop`` points (or prune ``prune_fraction`` of the channels), then fine-tune with
    the pruned channels held at zero.

    The ranking and the amount are measured on each member's held-out part: channels of
    ``layer`` ranked by mean activation there and pruned in ascending order
    (:func:`~badnet_repair.defenses.sweep.prune_sweep`).

    Settings: those of :class:`FineTuning`, plus ``accuracy_drop`` (default 4 points),
    ``prune_fraction`` (default None: use the drop) and ``keep_pruned_start`` (default False,
    chosen on the tuning BadNets of benchmarks/removal_tuning.toml; docs/research/removal.md:
    the pruned start still holds whatever backdoor pruning missed, and its held-out accuracy,
    measured on the images that chose the prune amount, flatters it). The budget's fallback
    may still return the pruned start, with its loud line.
    """

    name: ClassVar[str] = "fine-pruning"
    summary: ClassVar[str] = "prune to a held-out accuracy drop, then fine-tune (Liu et al. 2018)"
    prunes: ClassVar[bool] = True

    accuracy_drop: float | None = setting(4.0, "prune until held-out accuracy falls this many points")
    prune_fraction: float | None = setting(None, "prune this fraction of the channels instead")
    keep_pruned_start: bool = setting(False, "keep the pruned, untuned network where no tuned epoch matches its "
                                             "held-out accuracy (default: always a tuned epoch)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.prune_fraction is not None and not 0.0 <= self.prune_fraction <= 1.0:
            raise ValueError(f"prune_fraction must be in [0, 1], not {self.prune_fraction}")
        if self.prune_fraction is None and (self.accuracy_drop is None or not self.accuracy_drop >= 0):
            raise ValueError("give accuracy_drop >= 0 or prune_fraction")

    def start(self, member: Member) -> tuple[Any, tuple[int, ...]]:
        """B with ``layer``'s least active channels pruned (ranked and swept on the member's
        held-out images), to the drop or the fraction."""
        from ..nets.models import conv_layer, prune_channels
        from .sweep import prune_sweep

        model, holdout, layer = member.badnet, member.holdout, member.layer
        if self.prune_fraction is not None:
            sweep = prune_sweep(model, holdout, layer=layer, thresholds=())
            filters = int(conv_layer(model, layer).filters)
            pruned = tuple(int(c) for c in sweep.ranking.order[: round(self.prune_fraction * filters)])
        else:
            drop = float(self.accuracy_drop)  # type: ignore[arg-type]
            pruned = prune_sweep(model, holdout, layer=layer, thresholds=[drop]).channels_at(drop)
        return prune_channels(model, layer, pruned), pruned

    def keeps_start(self, pruned: tuple[int, ...]) -> bool:
        return bool(pruned) and self.keep_pruned_start


def fine_prune(model: Any, valid: Dataset, *, method: str = "fine-pruning", progress: bool = True,
               desc: str | None = None, **settings: Any) -> FinePruneResult:
    """Fine-pruning (Liu et al., RAID 2018), or with ``method="fine-tuning"`` fine-tuning alone:
    the :class:`FinePruning` (or :class:`FineTuning`) defense with ``settings``, its result with
    every member (:meth:`FineTuning.tune`).

    Args:
        model: the BadNet (not changed).
        valid: clean labelled validation data; nothing else is read.
        method: ``"fine-pruning"`` (default) or ``"fine-tuning"``.
        progress: progress bars.
        desc: the progress bars' label, default ``method``.
        **settings: the defense's settings (its dataclass fields).

    Returns:
        FinePruneResult.
    """
    classes: dict[str, type[FineTuning]] = {"fine-pruning": FinePruning, "fine-tuning": FineTuning}
    if method not in classes:
        raise ValueError(f"method must be 'fine-pruning' or 'fine-tuning', not {method!r}")
    cls = classes[method]
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise ValueError(f"unknown {method} setting(s) {', '.join(unknown)}; settings: {', '.join(sorted(known))}")
    return cls(**settings).tune(model, valid, progress=progress, desc=desc)
