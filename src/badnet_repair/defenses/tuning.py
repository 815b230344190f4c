"""What fine-tuning defenses share: the split of the clean data into a tuning part and a held-out
part, the clean-accuracy budget every repair respects, and the results of the fine-tuning family.

The clean validation data is split into a tuning part and a held-out part. Every choice
(how much to prune, which epoch to keep, whether a result is within the budget) is made on
the held-out part alone; no test and no poisoned data is seen. The training itself is
:class:`~badnet_repair.nets.trainer.Trainer`'s; the defenses are in
:mod:`~badnet_repair.defenses.finetuning` and the modules beside it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import DataError
from ..formats.data import Dataset

__all__ = ["BudgetCheck", "FinePruneResult", "FineTuned", "check_budget", "drop_upper_bound", "kept_or_b",
           "split_clean"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BudgetCheck:
    """How a repaired network stands against the clean-accuracy budget, on held-out clean data.

    Attributes:
        budget: the most points below B's held-out accuracy a result may fall (None: no budget).
        base_accuracy: B's held-out accuracy (%).
        accuracy: the returned network's held-out accuracy (%).
        fallback: what was returned instead of the defense's own result where that fell more
            than the budget below B: a label such as ``"pruned start"`` or ``"B"``; None where the
            result was kept.
        warning: the loud line that says so, or that no candidate was within the budget; None
            where the result was within it.
        drop_bound: for a result kept within the budget, or a fallback other than B, checked image
            by image, the one-sided 95 % upper bound on its drop in points
            (:func:`drop_upper_bound`); None otherwise.
        caution: the line that says the held-out images are too few to hold the budget, where
            ``drop_bound`` is above it; None otherwise.
    """

    budget: float | None
    base_accuracy: float
    accuracy: float
    fallback: str | None = None
    warning: str | None = None
    drop_bound: float | None = None
    caution: str | None = None

    @property
    def lines(self) -> tuple[str, ...]:
        """The lines the user must see: the warning and the caution, where there are any."""
        return tuple(line for line in (self.warning, self.caution) if line)

    def as_dict(self) -> dict[str, Any]:
        return {"budget": self.budget, "base_holdout_accuracy": self.base_accuracy,
                "holdout_accuracy": self.accuracy, "fallback": self.fallback, "warning": self.warning,
                "drop_bound": self.drop_bound, "caution": self.caution}


def drop_upper_bound(base_right: np.ndarray, right: np.ndarray, *, z: float = 1.645) -> float:
    """A one-sided upper confidence bound (default 95 %) on how many points a result's clean
    accuracy lies below B's, from the same images scored by both.

    Each image gives ``d = [B right] - [result right]`` (1, 0 or -1); the bound is
    ``100 (mean(d) + z sqrt(v / n))`` with ``v = (b + c + 1) / n - mean(d)^2``, ``b`` and ``c``
    the images only B and only the result got right: the normal approximation to the paired
    difference, with one discordant image added to the variance so that a few images on which
    the two agree everywhere do not pass as proof of no drop (five agreeing images still allow
    a drop of 33 points).

    Args:
        base_right: (n,) bool, B right on each image.
        right: (n,) bool, the result right on each image.
        z: the normal quantile, default 1.645 (one-sided 95 %).

    Returns:
        The bound in points (inf for no images).
    """
    base_right, right = np.asarray(base_right, bool), np.asarray(right, bool)
    if base_right.shape != right.shape:
        raise ValueError(f"paired scores of different shapes: {base_right.shape} and {right.shape}")
    n = base_right.size
    if n == 0:
        return float("inf")
    d = base_right.astype(np.float64) - right.astype(np.float64)
    mean = float(d.mean())
    discordant = float(np.count_nonzero(d))
    v = max((discordant + 1.0) / n - mean**2, 0.0)
    return 100.0 * (mean + z * np.sqrt(v / n))


def check_budget(who: str, accuracy: float, base_accuracy: float, budget: float | None,
                 candidates: Sequence[tuple[str, float] | tuple[str, float, np.ndarray | None]],
                 paired: tuple[np.ndarray, np.ndarray] | None = None) -> BudgetCheck:
    """The clean-accuracy budget's rule: a result more than ``budget`` points below B on the
    held-out clean images is replaced by the first candidate within the budget, and either
    way the user is told in one loud line (also logged as a warning).

    Args:
        who: the defense (and member) named in the line.
        accuracy: the result's held-out accuracy (%).
        base_accuracy: B's held-out accuracy (%) on the same images.
        budget: points, or None (no budget: the result is kept without a check).
        candidates: ``(label, held-out accuracy)`` or ``(label, held-out accuracy, right)`` of the
            fallbacks in order of preference (for example the pruned start, then ``"B"`` itself at
            ``base_accuracy``); ``right``, (n,) bool, the candidate right on the same images as
            ``paired``.
        paired: ``(B right, result right)``, (n,) bool each, on the held-out images: where the
            result is kept within the budget, :func:`drop_upper_bound` of them; above the budget,
            a caution line says the images are too few to hold it. Where a fallback other than B
            is returned and its ``right`` is given, the same bound and caution are of it.

    Returns:
        BudgetCheck; its ``fallback`` names the candidate to return instead, if any.
    """
    if budget is not None and not budget >= 0:
        raise ValueError(f"budget must be >= 0 points or None, not {budget}")
    if budget is None:
        return BudgetCheck(budget, base_accuracy, accuracy)
    if base_accuracy - accuracy <= budget:
        if paired is None:
            return BudgetCheck(budget, base_accuracy, accuracy)
        bound = drop_upper_bound(*paired)
        caution = _caution(who, base_accuracy - accuracy, len(paired[0]), budget, bound)
        return BudgetCheck(budget, base_accuracy, accuracy, drop_bound=bound, caution=caution)
    drop = base_accuracy - accuracy
    found = next((c for c in candidates if base_accuracy - c[1] <= budget), None)
    if found is None:
        line = (f"WARNING: {who} is {drop:.1f} points below the BadNet on the clean images it held out "
                f"({accuracy:.2f}% against {base_accuracy:.2f}%), more than the budget of {budget:g}, and no "
                "candidate was within it: it is far worse than the model given; do not use it as a repair "
                "without checking")
        log.warning("%s", line)
        return BudgetCheck(budget, base_accuracy, accuracy, warning=line)
    label, acc = found[0], found[1]
    if label == "B":
        what = "returned the BadNet unchanged: the backdoor is NOT removed"
    else:
        what = (f"returned the {label} instead ({acc:.2f}%, {base_accuracy - acc:.1f} points below); its backdoor "
                "may be only partly removed")
    line = (f"WARNING: {who} fell {drop:.1f} points below the BadNet on the clean images it held out "
            f"({accuracy:.2f}% against {base_accuracy:.2f}%), more than the budget of {budget:g}: {what}")
    log.warning("%s", line)
    right = found[2] if len(found) > 2 else None
    if label == "B" or right is None or paired is None:
        return BudgetCheck(budget, base_accuracy, acc, fallback=label, warning=line)
    # the fallback was chosen as the first within the budget on these images: as for a kept
    # result, few images cannot show that it holds on new ones
    bound = drop_upper_bound(paired[0], right)
    caution = _caution(f"the {label} that {who} returned", base_accuracy - acc, len(right), budget, bound)
    return BudgetCheck(budget, base_accuracy, acc, fallback=label, warning=line, drop_bound=bound, caution=caution)


def kept_or_b(who: str, model: Any, base_right: np.ndarray, right: np.ndarray | None, none_kept: str,
              budget: float | None, build: Callable[[], Any]) -> tuple[Any, BudgetCheck, list[str]]:
    """The end of a repair that walks the lab's rule on cross-fitted clean predictions (``subspace``,
    ``discriminant``, ``discriminant-gate``, ``feature-gate``): (the model returned, the budget check, its lines).

    Where the rule kept nothing (``right`` None): ``model`` (B) with the loud line
    ``"WARNING: {who}: {none_kept}: returned the BadNet unchanged: the backdoor is NOT removed"``
    (``none_kept`` says why, e.g. how far the first step fell below the BadNet). Otherwise
    :func:`check_budget` of the kept result's predictions ``right`` beside B's ``base_right``
    ((n,) bool each), and the model ``build()`` makes, or B where the budget falls back to it
    (``build`` is then not called).
    """
    base_acc = float(100.0 * np.mean(base_right))
    if right is None:
        line = f"WARNING: {who}: {none_kept}: returned the BadNet unchanged: the backdoor is NOT removed"
        log.warning("%s", line)
        return model, check_budget(who, base_acc, base_acc, budget, []), [line]
    check = check_budget(who, float(100.0 * np.mean(right)), base_acc, budget, [("B", base_acc)], (base_right, right))
    return (model if check.fallback == "B" else build()), check, list(check.lines)


def _caution(what: str, drop: float, images: int, budget: float, bound: float) -> str | None:
    """The caution line (also logged) where ``bound`` is above the budget; None where it is not."""
    if bound <= budget:
        return None
    where = f"{drop:.1f} points below" if drop >= 0.05 else (f"{-drop:.1f} points above" if drop <= -0.05
                                                                else "level with")
    line = (f"CAUTION: {what} is {where} the BadNet on the {images} clean images it held out, "
            f"within the budget of {budget:g}, but so few images allow a drop of up to {bound:.1f} points "
            "(one-sided 95 % bound): measure it on more clean data before relying on it")
    log.warning("%s", line)
    return line


@dataclass(frozen=True, eq=False)
class FineTuned:
    """One fine-tuned (or fine-pruned) network and how it was chosen.

    Attributes:
        model: the network returned (a new model; the BadNet is not changed): the tuned
            network, or where that fell more than the budget below B, the fallback.
        seed: its seed (split, ranking, shuffling, augmentation).
        pruned_channels: channels kept at zero (empty for fine-tuning).
        kept_epoch: the epoch whose weights were kept (1..epochs), or 0 where the pruned,
            untuned start was kept (``keep_pruned_start``, or the budget's fallback).
        holdout_accuracy: held-out clean accuracy (%) of the returned network.
        base_holdout_accuracy: held-out clean accuracy (%) of the BadNet.
        pruned_holdout_accuracy: held-out accuracy (%) of the start (after pruning, or the
            defense's own start), before tuning; B's where it starts from B.
        history: per epoch: ``loss``, ``accuracy`` (tuning part), ``holdout_accuracy`` and what
            the defense's parts record (distillation: ``teacher_agreement``); the first row
            (epoch 0) is the start, before tuning.
        tune_index: (M,) indices of the validation images used for tuning.
        holdout_index: (K,) indices of the held-out validation images.
        budget: the clean-accuracy budget's check of this network.
        notes: what the defense recorded about this member (JSON-able; TSBD: its first stage).
    """

    model: Any
    seed: int
    pruned_channels: tuple[int, ...]
    kept_epoch: int
    holdout_accuracy: float
    base_holdout_accuracy: float
    pruned_holdout_accuracy: float
    history: tuple[dict[str, float], ...]
    tune_index: np.ndarray
    holdout_index: np.ndarray
    budget: BudgetCheck | None = None
    notes: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, eq=False)
class FinePruneResult:
    """A model repaired by a fine-tuning defense: one network or an average of several.

    Attributes:
        model: the repaired model: the single member's network, or with several members a
            model averaging their probabilities or their weights
            (:func:`~badnet_repair.nets.models.average_models`).
        method: the defense's name (``"fine-pruning"``, ``"fine-tuning"``, ``"fst"``...).
        layer: the pruned layer.
        members: the tuned networks, each with its own split, pruning and kept epoch.
        budget: the clean-accuracy budget's check of the combined model, where it is checked as a
            whole (a weight soup, on the part every member held out); None where each member
            was checked alone.
        soup_members: the indices of the members a weight soup holds (all of them, or those a
            greedy soup kept, in the order added); empty where the members are not a soup.
    """

    model: Any
    method: str
    layer: str
    members: tuple[FineTuned, ...]
    budget: BudgetCheck | None = None
    soup_members: tuple[int, ...] = ()

    def soup_record(self) -> dict[str, Any] | None:
        """The soup's budget check and the members it holds (1-based), for records and
        results.json; None where the members are not a soup."""
        if self.budget is None:
            return None
        return {**self.budget.as_dict(), "members": [i + 1 for i in self.soup_members]}

    @property
    def channels_pruned(self) -> int:
        """Channels pruned: the member's count, or the median over the members."""
        return int(np.median([len(m.pruned_channels) for m in self.members]))

    @property
    def kept_epochs(self) -> tuple[int, ...]:
        """Each member's kept epoch."""
        return tuple(m.kept_epoch for m in self.members)

    @property
    def warnings(self) -> tuple[str, ...]:
        """The clean-accuracy budget's lines (warnings and cautions), the members' and the
        whole's (loud: the user must see them)."""
        checks = [m.budget for m in self.members] + [self.budget]
        return tuple(line for c in checks if c is not None for line in c.lines)


def split_clean(data: Dataset, *, holdout_fraction: float = 0.2, seed: int = 0
                ) -> tuple[Dataset, Dataset, np.ndarray, np.ndarray]:
    """Split clean data into a tuning part and a disjoint held-out part, per class.

    Args:
        data: clean labelled data.
        holdout_fraction: share of each class held out, default 0.2 (at least one image of
            each class with two or more images).
        seed: the split's seed.

    Returns:
        (tune, holdout, tune_index, holdout_index), the indices into ``data``, sorted.
    """
    if not 0.0 < holdout_fraction < 1.0:
        raise ValueError(f"holdout_fraction must be in (0, 1), not {holdout_fraction}")
    rng = np.random.default_rng([seed, 5])
    hold: list[np.ndarray] = []
    adjusted: dict[tuple[int, int], int] = {}  # (held out, of) -> number of classes
    for c in np.unique(data.y):
        idx = rng.permutation(np.flatnonzero(data.y == c))
        k = want = round(holdout_fraction * len(idx))
        if len(idx) >= 2:
            k = min(max(k, 1), len(idx) - 1)
        if k != want:
            adjusted[(k, len(idx))] = adjusted.get((k, len(idx)), 0) + 1
        hold.append(idx[:k])
    hold_idx = np.sort(np.concatenate(hold)) if hold else np.zeros(0, np.int64)
    if adjusted:
        cases = ", ".join(f"{n} class{'es' if n > 1 else ''} {k} of {size}"
                          for (k, size), n in sorted(adjusted.items(), key=lambda kv: -kv[1]))
        log.warning("held out %d of %d clean images (%.1f%%, %.0f%% asked): classes too small for %.0f%% "
                    "keep at least one image on each side (%s)", len(hold_idx), len(data),
                    100.0 * len(hold_idx) / len(data), 100 * holdout_fraction, 100 * holdout_fraction, cases)
    if len(hold_idx) == 0 or len(hold_idx) == len(data):
        # every class has one image: no class can be split, so images are held out at random (their
        # classes then have no tuning image, and the held-out accuracy measures what tuning keeps)
        if len(data) < 2:
            raise DataError(f"{data.name}: {len(data)} clean image(s); a repair that trains needs at least 2 "
                            "(one to tune on, one to hold out to choose the epoch and check the budget)")
        k = min(max(round(holdout_fraction * len(data)), 1), len(data) - 1)
        hold_idx = np.sort(rng.permutation(len(data))[:k])
        log.warning("held out %d of %d clean images at random: no class has two images to split (classes of "
                    "held-out images are not tuned on)", k, len(data))
    mask = np.ones(len(data), bool)
    mask[hold_idx] = False
    tune_idx = np.flatnonzero(mask)
    x = np.asarray(data.x[:]) if not isinstance(data.x, np.ndarray) else data.x
    return (Dataset(x[tune_idx], data.y[tune_idx], name="tune"),
            Dataset(x[hold_idx], data.y[hold_idx], name="holdout"), tune_idx, hold_idx)


