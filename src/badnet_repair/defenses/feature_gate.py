"""The feature gate: overrule B with its runner-up class where its features are far from its class's clean ones.

The project's own method (issue 31, round 15), built on the default detector, Lee et al.'s feature
ensemble ("A Simple Unified Framework for Detecting Out-of-Distribution Samples and Adversarial
Attacks", NeurIPS 2018; :class:`~badnet_repair.detectors.features.FeatureEnsemble`), and the lab's
pruning rule (Liu et al., "Fine-Pruning", RAID 2018):

1. The feature ensemble is fitted on the clean images: each clean image gets a score from
   statistics that did not see it (5-fold cross-fitting), the distance of B's features from the
   clean mean of the class B gives it.
2. For each share ``q`` of ``quantiles`` in turn (the fewest first), the threshold flags ``q`` of
   the clean images, and the cross-fitted accuracy is that of B's class, or B's second most
   probable class where the image is flagged (:func:`walk_flag_shares`).
3. Kept: the share before the accuracy first falls more than ``drop`` points below B's; the
   repaired model outputs B's probabilities, or one-hot at B's runner-up class where the
   ensemble (fitted on all the clean images) flags the input, built of Keras's own layers
   (:func:`~badnet_repair.detectors.goodnet.build_portable_runner_up_model`): it saves as a
   full ``.h5`` that Keras 2, the lab's ``eval.py``, loads. None within ``drop``: B,
   with a loud line.

A trigger sends B to the target through features unlike any clean image of the target; B's own
next choice on such an input is not the target, and on faces it is often the person's class.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from ..defaults import BUDGET_HELP, setting
from ..detectors.features import DEFAULT_FOLDS, DEFAULT_LAYERS
from ..errors import ModelError
from ..formats.data import Dataset
from .base import Defense, Repair, Repaired
from .discriminant import QUANTILES, KeptShares
from .tuning import kept_or_b

__all__ = ["FeatureGate", "TwoGates", "runner_up", "walk_flag_shares"]

log = logging.getLogger(__name__)


def runner_up(probs: np.ndarray) -> np.ndarray:
    """(N,) int64 each row's second most probable class (ties: the first, as ``np.argmax``),
    computed as :class:`~badnet_repair.nets.layers.RunnerUpWhereFlagged` does: the top class
    pushed below every probability."""
    p = np.asarray(probs, np.float32)
    top = np.eye(p.shape[1], dtype=np.float32)[p.argmax(axis=1)]
    return np.argmax(p - np.float32(2.0) * top, axis=1).astype(np.int64)


def walk_flag_shares(top: np.ndarray, second: np.ndarray, labels: np.ndarray, scores: np.ndarray,
                     quantiles: Sequence[float], drop: float, *,
                     unflagged_right: np.ndarray | None = None) -> tuple[list[dict[str, Any]], KeptShares | None]:
    """The feature gate's rule: the share of clean images it may overrule, tried in turn.

    For each share ``q`` of ``quantiles`` the threshold is the score that flags at most ``q`` of
    the clean images (:func:`~badnet_repair.detectors.base.threshold_at`; flags are ``score >
    threshold``), and the accuracy is that of ``top`` (or of the model gated first, where
    ``unflagged_right`` is given), or ``second`` where flagged. Kept: the
    last share before the accuracy first falls more than ``drop`` points below that of ``top``,
    among the shares that flag at least one clean image (a threshold above every clean score
    still flags about one new clean input in N + 1, a cost the clean images cannot measure).

    Args:
        top: (N,) B's classes of the clean images.
        second: (N,) B's runner-up classes.
        labels: (N,) their classes.
        scores: (N,) their cross-fitted detector scores (higher = more likely triggered).
        quantiles: the shares tried, fewest first.
        drop: the accuracy drop in points the gate may cost (below ``top``'s accuracy, B's).
        unflagged_right: (N,) whether the class kept where not flagged is right, default ``top ==
            labels`` (another gate's cross-fitted predictions, for :class:`TwoGates`).

    Returns:
        The rows tried (share, threshold, accuracy and share overruled, in %) and the kept share
        (one gate), None where even the first falls more than ``drop``.
    """
    from ..detectors.base import threshold_at

    top, second, labels = np.asarray(top), np.asarray(second), np.asarray(labels)
    scores = np.asarray(scores, np.float64)
    base_acc = float(100.0 * np.mean(top == labels))
    kept_right = top == labels if unflagged_right is None else np.asarray(unflagged_right, bool)
    tried: list[dict[str, Any]] = []
    kept: KeptShares | None = None
    for q in quantiles:
        threshold = threshold_at(scores, 100.0 * q)
        over = scores > threshold
        right = np.where(over, second == labels, kept_right)
        acc = float(100.0 * np.mean(right))
        tried.append({"quantile": float(q), "threshold": threshold, "accuracy": acc,
                      "overruled": float(100.0 * np.mean(over))})
        if base_acc - acc > drop:
            break  # accuracy first falls more than drop: the share before is kept
        if over.any():
            kept = KeptShares((float(q),), (threshold,), right)
    return tried, kept


@dataclass(frozen=True)
class FeatureGate(Defense):
    """Overrule B with its runner-up class where its features are far from its class's clean ones.

    The project's own method (issue 31, round 15): Lee et al.'s feature ensemble (NeurIPS 2018;
    :class:`~badnet_repair.detectors.features.FeatureEnsemble`, the default detector) as the gate,
    its threshold set by the lab's rule (Liu et al., "Fine-Pruning", RAID 2018) on the
    cross-fitted clean scores: the largest share of ``quantiles`` whose cross-fitted accuracy,
    with B's runner-up class where flagged, is within ``drop`` points of B's
    (:func:`walk_flag_shares`). The repaired model outputs B's probabilities, or one-hot at B's
    runner-up class where flagged, from Keras's own layers in float32 (a full ``.h5`` that Keras 2
    loads; its flags are the detector's except within float32 rounding of the threshold). Held to
    the clean-accuracy ``budget`` on the cross-fitted predictions, with the caution line where the
    clean images are too few to bound the drop.
    No training: one pass of B over the clean images for the features, one for the classes.

    Args:
        drop: the cross-fitted accuracy drop, in points, the gate may cost, default 3.
        quantiles: the shares of clean images the gate may overrule, tried in order, default
            the discriminant gate's (0.001 up to 0.2).
        layers: the feature ensemble's layers, default ``("head", "conv")``.
        folds: the feature ensemble's cross-fitting folds, default 5.
        fold_correction: each cross-fitted distance scaled to the statistics of all the clean images
            (:func:`~badnet_repair.detectors.features.fold_scale`), default True (chosen in issue 31's
            round 15 on tuning BadNets: the share the rule walks is then nearer the share of new clean
            inputs flagged; the detector's own default stays False, issue 32's round 10).
        budget: the clean-accuracy budget in points, default 3 (None = off).
        batch_size: inputs per forward pass, default 1024.
        seed: the folds' seed, default 0.
    """

    name: ClassVar[str] = "feature-gate"
    summary: ClassVar[str] = ("overrule B with its runner-up class where its features are far from its class's clean "
                              "ones (Lee et al.'s feature ensemble; threshold by the lab's rule)")

    drop: float = setting(3.0, "cross-fitted clean accuracy drop, in points, the gate may cost")
    quantiles: tuple[float, ...] = setting(QUANTILES, "shares of the clean images the gate may overrule, tried in "
                                                      "order, fewest first")
    layers: tuple[str, ...] = setting(DEFAULT_LAYERS, "the feature ensemble's layers ('head', 'conv' or a layer's "
                                                      "name)")
    folds: int = setting(int(DEFAULT_FOLDS or 5), "cross-fitting folds: each clean image is scored by statistics "
                                                  "of the others")
    fold_correction: bool = setting(True, "scale each cross-fitted score's distances to the statistics of all the "
                                          "clean images (features.fold_scale; issue 31's round 15)")
    budget: float | None = setting(3.0, BUDGET_HELP)
    batch_size: int = setting(1024, "inputs per forward pass")
    seed: int = setting(0, "cross-fitting folds' seed")

    def __post_init__(self) -> None:
        if not self.drop >= 0:
            raise ValueError(f"drop must be >= 0 points, not {self.drop}")
        if not self.quantiles or not all(0.0 < q < 1.0 for q in self.quantiles):
            raise ValueError(f"quantiles must be shares in (0, 1), not {self.quantiles}")
        if isinstance(self.folds, bool) or int(self.folds) != self.folds or self.folds < 2:
            raise ValueError(f"folds must be a whole number >= 2, not {self.folds}")
        if self.budget is not None and not self.budget >= 0:
            raise ValueError(f"budget must be >= 0 points or None, not {self.budget}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, not {self.batch_size}")
        if not self.layers:
            raise ValueError("layers must name one or more layers")

    def repair(self, model: Any, clean: Dataset, *, progress: bool = False) -> Repair:
        """B gated by the feature ensemble (or B, with the loud line); the record holds each share
        tried (threshold, cross-fitted accuracy, share overruled), the share kept and the budget check."""
        return self._gate(model, clean, None)

    def _gate(self, model: Any, clean: Dataset, first: Repair | None) -> Repair:
        """The feature gate on B, or on top of ``first``, another gate's repair of B: its classes
        where the ensemble does not flag, its cross-fitted predictions of the clean images
        (``artifacts["cross_fitted_right"]``) where the rule walks."""
        from ..detectors.features import FeatureEnsemble
        from ..detectors.goodnet import build_portable_runner_up_model, build_runner_up_model
        from ..nets.models import predict_probabilities

        detector = FeatureEnsemble(layers=self.layers, folds=self.folds, fold_correction=self.fold_correction,
                                   seed=self.seed, batch_size=self.batch_size).fit(model, clean)
        assert detector.calibration_scores is not None
        probs = predict_probabilities(model, clean.x, batch_size=self.batch_size)
        top, second, y = probs.argmax(axis=1), runner_up(probs), np.asarray(clean.y)
        base_right = top == y
        below, first_right = None, None
        if first is not None and first.model is not model:  # the model gated first, and its clean predictions
            below, first_right = first.model, np.asarray(first.artifacts["cross_fitted_right"], np.bool_)
        tried, kept = walk_flag_shares(top, second, y, detector.calibration_scores, self.quantiles, self.drop,
                                       unflagged_right=first_right)

        def build() -> Any:
            if kept is None:  # the feature gate kept no share: the first gate's model alone
                assert below is not None
                return below
            assert kept.thresholds[0] is not None
            detector.threshold = kept.thresholds[0]  # the share the rule kept, not the detector's 5 %
            name = f"{model.name}_{self.name.replace('-', '_')}"
            try:
                return build_portable_runner_up_model(model, detector, name=name, otherwise=below)
            except ModelError as err:  # B nests other models: only the custom layer's form (Keras 3) holds it
                if below is not None:
                    raise
                log.info("%s: %s; the gated model is built with a custom layer (Keras 3 only)", self.name, err)
                return build_runner_up_model(model, detector, name=name)

        if any(t["overruled"] > 0 for t in tried):
            none_kept = (f"every share that overrules a clean image (from {100 * self.quantiles[0]:g}%) fell more than "
                         f"{self.drop:g} points below the BadNet on the clean images, cross-fitted")
        else:
            none_kept = f"no share of the {len(y)} clean images flags any of them, too few to set its threshold"
        if first is not None:
            none_kept = f"neither gate kept a share; the feature gate: {none_kept}"
        right = kept.right if kept is not None else first_right
        net, check, warnings = kept_or_b(self.name, model, base_right, right, none_kept, self.budget, build)
        share = None if kept is None or net is model else kept.shares[0]
        threshold = None if kept is None or net is model else kept.thresholds[0]
        log.info("%s: kept share %s (threshold %s); cross-fitted accuracy %.2f%% (B %.2f%%)", self.name,
                 "-" if share is None else f"{share:g}", "-" if threshold is None else f"{threshold:.4g}",
                 check.accuracy, float(100.0 * np.mean(base_right)))
        choices = {"layers": list(self.layers), "quantile": share, "threshold": threshold, "folds": self.folds,
                   "fold_correction": self.fold_correction,
                   "tried": tried, "clean_images": len(y), **check.as_dict()}
        if first is not None:
            choices["first"] = {"defense": first.defense, "returned_b": first.model is model,
                                "warnings": list(first.warnings), **dict(first.record.get("choices", {}))}
            if below is not None and net is not model:  # its lines are about a model in the result
                warnings = [*first.warnings, *warnings]
        return Repair(defense=self.name, models=(Repaired(label=self.name, model=net),),
                      record=self.make_record(choices, tried), warnings=tuple(warnings))


@dataclass(frozen=True)
class TwoGates(FeatureGate):
    """The discriminant gate, then the feature gate on what it left: each overrules B where it finds it off.

    The project's own method (issue 31, rounds 17 and 18), the two gates of rounds 14 and 15 in turn:

    1. :class:`~badnet_repair.defenses.discriminant.DiscriminantGate` with its defaults (its ``drop``
       this class's ``first_drop``; ``budget``, ``batch_size`` and ``seed`` this class's) repairs B:
       its class where a linear discriminant on clean features finds B's class far off. It removes
       multi-target and partial backdoors the feature gate leaves, and often gains clean accuracy
       (it corrects B's own errors).
    2. The feature gate (:class:`FeatureGate`, its settings here) walks its shares on top: where
       its ensemble flags an input, B's runner-up class; elsewhere the first gate's class. Its
       accuracy is that of those predictions on the clean images, both cross-fitted, within
       ``drop`` points of B's (:func:`walk_flag_shares` with the first gate's predictions).

    Where the feature gate keeps no share the first gate's model is returned; where neither keeps
    one, B with the loud line. The model is built of Keras's own layers (Keras 2 loads its ``.h5``).
    About the two gates' time together: a minute on a demo BadNet, some minutes at the lab's scale.

    The drop is shared: the first gate may cost ``first_drop`` points, the feature gate on top
    whatever is left of ``drop``, both counted from B's cross-fitted accuracy. The default, 0,
    keeps the discriminant gate only where it costs nothing, leaving the feature gate at least
    ``drop``; None lets it spend all of ``drop``, as round 17's two gates did.

    Args:
        first_drop: the cross-fitted accuracy drop, in points, the discriminant gate may cost,
            default 0 (chosen in issue 31's round 18 on tuning BadNets); None: ``drop``.
        Others as :class:`FeatureGate`'s (``budget``, ``batch_size`` and ``seed`` shared with the
        first gate).
    """

    name: ClassVar[str] = "two-gates"
    summary: ClassVar[str] = ("the discriminant gate, then the feature gate on top: B's runner-up where B's features "
                              "are far off, else the discriminant gate's class")

    first_drop: float | None = setting(0.0, "cross-fitted clean accuracy drop, in points, the first (discriminant) "
                                            "gate may cost (issue 31's round 18); None: drop")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.first_drop is not None and not 0 <= self.first_drop <= self.drop:
            raise ValueError(f"first_drop must be between 0 and drop ({self.drop:g}) points or None, "
                             f"not {self.first_drop}")

    def repair(self, model: Any, clean: Dataset, *, progress: bool = False) -> Repair:
        """B gated by the discriminant gate, then the feature gate (or what each kept, with their lines);
        the record holds the feature gate's walk, and the first gate's choices under ``"first"``."""
        from .discriminant import DiscriminantGate

        first_drop = self.drop if self.first_drop is None else self.first_drop
        quiet = _FirstGateKeptNothing()
        tuning_log = logging.getLogger(kept_or_b.__module__)
        tuning_log.addFilter(quiet)
        try:
            first = DiscriminantGate(drop=first_drop, budget=self.budget, batch_size=self.batch_size,
                                     seed=self.seed).repair(model, clean, progress=progress)
        finally:
            tuning_log.removeFilter(quiet)
        if first.model is model:
            log.info("%s: the discriminant gate kept no share within %g points; the feature gate gates B alone",
                     self.name, first_drop)
        return self._gate(model, clean, first)


class _FirstGateKeptNothing(logging.Filter):
    """Drops the first gate's "returned the BadNet unchanged" line from the log: inside the two
    gates it is not the result (the feature gate still gates B; the result's own lines say what
    was returned), and it stays in the record under ``"first"``."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno >= logging.WARNING and "returned the BadNet unchanged" in record.getMessage())
