"""Metrics of a repaired model: accuracy, attack success, and GoodNet alarm rates."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

__all__ = [
    "Evaluation",
    "accuracy",
    "attack_success_rate",
    "auroc",
    "detection_rate",
    "evaluate_predictions",
    "evaluate_repair",
    "false_alarm_rate",
    "goodnet_predict",
]


def _pct(mask: np.ndarray) -> float:
    if mask.size == 0:
        raise ValueError("cannot compute a rate over zero inputs")
    return float(100.0 * np.count_nonzero(mask) / mask.size)


def accuracy(pred: np.ndarray, labels: np.ndarray) -> float:
    """Percentage of (N,) predictions equal to the (N,) true labels."""
    return _pct(np.asarray(pred) == np.asarray(labels))


def attack_success_rate(pred: np.ndarray, target: int | np.ndarray) -> float:
    """Percentage of poisoned inputs classified as the attack's target.

    Args:
        pred: (N,) predictions on poisoned inputs.
        target: the target class, or (N,) per-input targets (the poisoned file's labels).
    """
    return _pct(np.asarray(pred) == np.asarray(target))


def detection_rate(pred: np.ndarray, alarm_class: int) -> float:
    """Percentage of poisoned inputs that a GoodNet flags as ``alarm_class`` (N)."""
    return _pct(np.asarray(pred) == alarm_class)


def false_alarm_rate(pred: np.ndarray, alarm_class: int) -> float:
    """Percentage of clean inputs that a GoodNet flags as ``alarm_class`` (N)."""
    return _pct(np.asarray(pred) == alarm_class)


def auroc(clean_scores: np.ndarray, poisoned_scores: np.ndarray) -> float:
    """The area under the ROC curve of scores that should rank poisoned inputs above clean ones.

    The Mann-Whitney form: the probability that a poisoned input scores above a clean one, ties
    counting one half (average ranks). It needs no threshold, so it says how well a detector's
    scores separate the two sets before any false-alarm budget is spent.

    Args:
        clean_scores: (N,) scores of clean inputs.
        poisoned_scores: (M,) scores of poisoned inputs.

    Returns:
        A float in [0, 1]; 0.5 is chance.
    """
    c = np.asarray(clean_scores, np.float64).ravel()
    b = np.asarray(poisoned_scores, np.float64).ravel()
    if c.size == 0 or b.size == 0:
        raise ValueError("AUROC needs clean and poisoned scores")
    if np.isnan(c).any() or np.isnan(b).any():
        raise ValueError("AUROC of NaN scores")
    both = np.concatenate([c, b])
    order = np.argsort(both, kind="mergesort")
    sorted_scores = both[order]
    ranks = np.empty(both.size, np.float64)
    # average ranks over runs of equal scores
    edges = np.flatnonzero(np.diff(sorted_scores)) + 1
    starts = np.concatenate([[0], edges])
    ends = np.concatenate([edges, [both.size]])
    for s0, e0 in zip(starts, ends, strict=True):
        ranks[order[s0:e0]] = (s0 + e0 + 1) / 2.0
    rank_sum = ranks[c.size:].sum()
    return float((rank_sum - b.size * (b.size + 1) / 2.0) / (b.size * c.size))


@dataclass(frozen=True)
class Evaluation:
    """One model's numbers on a clean and a poisoned set (percentages).

    ``detection_rate`` and ``false_alarm_rate`` are set for GoodNets only; ``auroc`` (0..1) for
    a GoodNet from a detector with scores (:func:`auroc` of its scores on the two sets).
    """

    model: str
    kind: str
    clean_accuracy: float | None
    attack_success_rate: float | None
    detection_rate: float | None = None
    false_alarm_rate: float | None = None
    threshold: float | None = None
    channels_pruned: int | None = None
    clean_set: str | None = None
    poisoned_set: str | None = None
    auroc: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def evaluate_predictions(
    *,
    model: str,
    kind: str,
    clean_pred: np.ndarray | None,
    clean_labels: np.ndarray | None,
    poisoned_pred: np.ndarray | None,
    poisoned_labels: np.ndarray | None,
    alarm_class: int | None = None,
    threshold: float | None = None,
    channels_pruned: int | None = None,
    clean_set: str | None = None,
    poisoned_set: str | None = None,
    auroc: float | None = None,
) -> Evaluation:
    """Build an :class:`Evaluation` from predictions; alarm rates when ``alarm_class`` is set."""
    has_clean = clean_pred is not None and clean_labels is not None
    has_bd = poisoned_pred is not None and poisoned_labels is not None
    cp, cl = np.asarray(clean_pred), np.asarray(clean_labels)
    bp, bl = np.asarray(poisoned_pred), np.asarray(poisoned_labels)
    alarm = alarm_class is not None
    return Evaluation(
        model=model,
        kind=kind,
        clean_accuracy=accuracy(cp, cl) if has_clean else None,
        attack_success_rate=attack_success_rate(bp, bl) if has_bd else None,
        detection_rate=detection_rate(bp, alarm_class) if has_bd and alarm else None,  # type: ignore[arg-type]
        false_alarm_rate=false_alarm_rate(cp, alarm_class) if has_clean and alarm else None,  # type: ignore[arg-type]
        threshold=threshold,
        channels_pruned=channels_pruned,
        clean_set=clean_set,
        poisoned_set=poisoned_set,
        auroc=auroc,
    )


def goodnet_predict(bad_pred: np.ndarray, repaired_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """G's classes from B's and B''s class predictions.

    Args:
        bad_pred: (N,) classes predicted by B.
        repaired_pred: (N,) classes predicted by B', or (S, N) for S pruning steps.
        num_classes: N of B; the alarm class is N.

    Returns:
        int64 of ``repaired_pred``'s shape: ``bad_pred`` where the two agree, ``num_classes``
        where they differ.
    """
    bad_pred = np.asarray(bad_pred, dtype=np.int64)
    repaired_pred = np.asarray(repaired_pred, dtype=np.int64)
    if repaired_pred.shape[repaired_pred.ndim - bad_pred.ndim:] != bad_pred.shape:
        raise ValueError(f"prediction shapes differ: {bad_pred.shape} vs {repaired_pred.shape}")
    return np.where(bad_pred == repaired_pred, bad_pred, np.int64(num_classes))


def evaluate_repair(
    label: str,
    *,
    clean_pred: np.ndarray | None,
    poisoned_pred: np.ndarray | None,
    base_clean_pred: np.ndarray | None,
    base_poisoned_pred: np.ndarray | None,
    clean_labels: np.ndarray | None,
    poisoned_labels: np.ndarray | None,
    num_classes: int,
    goodnet_label: str | None = None,
    channels_pruned: int = 0,
    threshold: float | None = None,
    clean_set: str | None = None,
    poisoned_set: str | None = None,
) -> tuple[Evaluation, Evaluation]:
    """A repaired model's row and its GoodNet's, from class predictions.

    The GoodNet is the lab's: B's class where B and the repaired model agree, else the alarm
    class N (:func:`goodnet_predict`). A set not given (None) is left out of both rows.

    Args:
        label: the repaired model's name in tables; its GoodNet is ``goodnet_label``
            (default ``"G (<label>)"``).
        clean_pred, poisoned_pred: (N,) the repaired model's classes on the clean and poisoned sets.
        base_clean_pred, base_poisoned_pred: (N,) B's classes on the same sets.
        clean_labels, poisoned_labels: (N,) their labels (the target for poisoned sets).
        num_classes: N, B's classes (the alarm class).
        channels_pruned, threshold, clean_set, poisoned_set: recorded in both rows.

    Returns:
        (the repaired model's Evaluation, the GoodNet's Evaluation).
    """
    def goodnet(base: np.ndarray | None, pred: np.ndarray | None) -> np.ndarray | None:
        return None if base is None or pred is None else goodnet_predict(base, pred, num_classes)

    common: dict[str, Any] = dict(clean_labels=clean_labels, poisoned_labels=poisoned_labels, threshold=threshold,
                                  channels_pruned=channels_pruned, clean_set=clean_set, poisoned_set=poisoned_set)
    return (evaluate_predictions(model=label, kind="repaired", clean_pred=clean_pred, poisoned_pred=poisoned_pred,
                                 **common),
            evaluate_predictions(model=goodnet_label or f"G ({label})", kind="goodnet", alarm_class=num_classes,
                                 clean_pred=goodnet(base_clean_pred, clean_pred),
                                 poisoned_pred=goodnet(base_poisoned_pred, poisoned_pred), **common))
