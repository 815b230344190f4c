"""Discriminant fusion and gate: B's class scores with those of a linear discriminant fitted on clean data.

A linear discriminant fitted on the clean images' features from B's conv body has no path for a
trigger through B's dense layers, but on a few clean images a person it classifies worse than
B. The fusion adds a small multiple of its scores to B's logits; the gate keeps B's class unless
the discriminant finds it far off. Each is tuned by the lab's pruning rule on cross-fitted clean
accuracy: no training, one pass over the clean data. Where the body's last features already
carry the trigger, features read from earlier in the body (``depth``) can still separate it.
"""

from __future__ import annotations

import functools
import itertools
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any, ClassVar, Literal

import numpy as np

from ..defaults import BUDGET_HELP, setting
from ..formats.data import Dataset
from .base import Defense, Repair, Repaired
from .subspace import cross_fit_folds, dense_inputs
from .tuning import kept_or_b

__all__ = ["AUGMENTS", "QUANTILES", "SHARES", "WEIGHTS", "DiscriminantFusion", "DiscriminantGate", "KeptShares",
           "LinearDiscriminant", "augmented", "cross_fit_discriminants", "feature_layers", "fit_discriminant",
           "gate_margins", "gated_classes", "share_pairs", "walk_shares"]

log = logging.getLogger(__name__)

#: Weights of the discriminant's scores tried, in this order (the weakest first).
WEIGHTS: tuple[float, ...] = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)


#: The copies of each clean image the discriminant is fitted on, besides the image itself.
AUGMENTS: tuple[str, ...] = ("none", "flip", "flip+shift")


def augmented(x: np.ndarray, augment: str) -> list[np.ndarray]:
    """The clean images and their copies for fitting: ``"none"`` the images alone; ``"flip"`` with
    their mirror images (left-right); ``"flip+shift"`` also the images moved one pixel up, down, left
    and right (``np.roll``: the pixel leaving one edge comes back at the other). (N, H, W, C) each."""
    if augment not in AUGMENTS:
        raise ValueError(f"augment must be one of {AUGMENTS}, not {augment!r}")
    out = [x]
    if augment in ("flip", "flip+shift"):
        out.append(x[:, :, ::-1])
    if augment == "flip+shift":
        out += [np.roll(x, s, axis=a) for a in (1, 2) for s in (1, -1)]
    return out


@dataclass(frozen=True, eq=False)
class LinearDiscriminant:
    """A linear discriminant on features: scores ``f @ kernel + bias``.

    Attributes:
        kernel: (d, classes).
        bias: (classes,).
    """

    kernel: np.ndarray
    bias: np.ndarray

    def scores(self, features: np.ndarray) -> np.ndarray:
        """(N, classes) scores of (N, d) features."""
        return np.asarray(features, np.float64) @ self.kernel + self.bias


def fit_discriminant(features: np.ndarray, labels: np.ndarray, classes: int) -> LinearDiscriminant:
    """Fisher's linear discriminant with equal priors, on standardised features, under the
    Ledoit-Wolf shrunk pooled within-class covariance (Ledoit and Wolf 2004,
    :func:`~badnet_repair.detectors.features.ledoit_wolf`), folded back to the raw features.

    Class ``k``'s score is ``(s - m_k/2) P m_k`` with ``s`` the standardised feature, ``m_k`` the
    class mean and ``P`` the inverse covariance. A class with no image gets the mean of the
    others' kernels and biases: a neutral score that neither favours nor excludes it. The plain
    computation, on rows held in memory; :func:`cross_fit_discriminants` computes the same from sums.

    Args:
        features: (N, d).
        labels: (N,) in 0..classes-1.
        classes: the class count.

    Returns:
        LinearDiscriminant on the raw (unstandardised) features.
    """
    from ..detectors.features import ledoit_wolf

    f = np.asarray(features, np.float64)
    y = np.asarray(labels)
    mean, sd = f.mean(axis=0), f.std(axis=0)
    sd = np.where(sd > 1e-12, sd, 1.0)  # a constant feature carries nothing; keep it finite
    s = (f - mean) / sd
    present = np.unique(y)
    means = np.zeros((classes, f.shape[1]))
    means[present] = np.stack([s[y == c].mean(axis=0) for c in present])
    cov, _ = ledoit_wolf(s - means[y])
    return _solved(cov, means, present, mean, sd)


def _solved(cov: np.ndarray, means: np.ndarray, present: np.ndarray, mean: np.ndarray,
            sd: np.ndarray) -> LinearDiscriminant:
    """The discriminant of standardised class means (classes, d) under ``cov``, folded back to the
    raw features of ``mean`` and ``sd``; classes not ``present`` get the others' mean."""
    # a ridge of 1e-9 of the mean eigenvalue keeps a singular matrix (nothing to shrink: one image a
    # class, constant features) invertible; one LU solve takes a tenth of an eigendecomposition's time
    ridge = 1e-9 * max(float(np.trace(cov)) / len(cov), 1e-12)
    sym = cov + cov.T
    sym *= 0.5
    sym[np.diag_indices(len(sym))] += ridge
    a = np.linalg.solve(sym, means.T)  # (d, classes): P m_k
    c = -0.5 * np.einsum("kd,dk->k", means, a)
    missing = np.setdiff1d(np.arange(len(means)), present)
    if len(missing):
        a[:, missing] = a[:, present].mean(axis=1, keepdims=True)
        c[missing] = c[present].mean()
    # standardisation folded in: ((f - mean) / sd) a + c = f (a / sd) + (c - (mean / sd) a)
    return LinearDiscriminant(kernel=a / sd[:, None], bias=c - (mean / sd) @ a)


def _row_chunks(copies: list[np.ndarray], index: np.ndarray, shift: np.ndarray,
                chunk: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(rows - shift in float64, their image positions) of images ``index`` in every copy, about
    ``chunk`` rows at a time (each image's copies together: a product of few rows is slow)."""
    step = max(1, chunk // len(copies))
    for start in range(0, len(index), step):
        part = index[start : start + step]
        yield np.concatenate([np.asarray(c[part], np.float64) for c in copies]) - shift, np.tile(part, len(copies))


def cross_fit_discriminants(copies: list[np.ndarray], labels: np.ndarray, fold: np.ndarray, classes: int, *,
                            chunk: int = 2048) -> tuple[np.ndarray, LinearDiscriminant]:
    """Each image scored by the discriminant fitted without its fold, and the one fitted on all.

    Each fit is :func:`fit_discriminant` on the images of the other folds and their copies (tested
    against it), computed from sums instead of held rows: the products ``X^T X`` of each fold's
    rows once, their total less one fold's for each fit, so every row is multiplied once rather
    than ``folds`` times and no fold's rows are copied out (the folds' ``d x d`` sums are held).

    Args:
        copies: the features of the images and of each of their copies, (N, d) each, image by image.
        labels: (N,) the images' classes.
        fold: (N,) each image's fold, 0..folds-1.
        classes: the class count.
        chunk: rows multiplied at a time.

    Returns:
        ((N, classes) cross-fitted scores of ``copies[0]``, the discriminant fitted on every row).
    """
    from ..detectors.features import ledoit_wolf_from_moments

    y = np.asarray(labels)
    d = copies[0].shape[1]
    shift = np.asarray(copies[0], np.float64).mean(axis=0)  # products of centred rows lose fewer digits

    def moments(index: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        count, sums, gram = np.zeros(classes), np.zeros((classes, d)), np.zeros((d, d))
        for rows, part in _row_chunks(copies, index, shift, chunk):
            order = np.argsort(y[part], kind="stable")  # each class's rows together, summed in one call
            labels, starts, n = np.unique(y[part][order], return_index=True, return_counts=True)
            count[labels] += n
            sums[labels] += np.add.reduceat(rows[order], starts, axis=0)
            gram += rows.T @ rows
        return count, sums, gram

    # each fold's least and greatest value of each feature: a feature constant on a fit's rows is
    # found exactly, where a variance from subtracted sums would leave a rounding error to divide by
    folds = np.unique(fold)
    low = np.stack([np.min([c[fold == f].min(axis=0) for c in copies], axis=0) for f in folds])
    high = np.stack([np.max([c[fold == f].max(axis=0) for c in copies], axis=0) for f in folds])

    def fitted(index: np.ndarray, count: np.ndarray, sums: np.ndarray, gram: np.ndarray,
               constant: np.ndarray) -> LinearDiscriminant:
        n = float(count.sum())
        present = np.flatnonzero(count > 0)
        centre = sums.sum(axis=0) / n  # the rows' mean, shifted
        sd = np.sqrt(np.maximum(np.diag(gram) / n - centre**2, 0.0))
        sd = np.where((sd > 1e-12) & ~constant, sd, 1.0)  # as fit_discriminant: a constant feature carries nothing
        class_mean = np.zeros((classes, d))
        class_mean[present] = sums[present] / count[present, None]
        scatter = gram - class_mean[present].T @ (class_mean[present] * count[present, None])
        scatter /= n * sd[:, None]
        scatter /= sd[None, :]  # now X^T X / n of the standardised rows less their class means
        fourth = 0.0
        for rows, part in _row_chunks(copies, index, shift, chunk):
            fourth += float(np.sum(np.sum(((rows - class_mean[y[part]]) / sd) ** 2, axis=1) ** 2))
        cov, _ = ledoit_wolf_from_moments(scatter, fourth, int(n))
        means = np.zeros((classes, d))
        means[present] = (class_mean[present] - centre) / sd
        return _solved(cov, means, present, centre + shift, sd)

    everything = np.arange(len(y))
    # each row's products computed once, in its fold's sums (the folds' grams held: folds x d x d values)
    per_fold = [moments(np.flatnonzero(fold == f)) for f in folds]
    count, sums, gram = (functools.reduce(np.add, parts) for parts in zip(*per_fold, strict=True))
    scores = np.empty((len(y), classes))
    for i, f in enumerate(folds):
        held = np.flatnonzero(fold == f)
        out_count, out_sums, out_gram = per_fold[i]
        others = np.arange(len(folds)) != i
        disc = fitted(np.flatnonzero(fold != f), count - out_count, sums - out_sums, gram - out_gram,
                      low[others].min(axis=0) == high[others].max(axis=0))
        scores[held] = disc.scores(copies[0][held])
    return scores, fitted(everything, count, sums, gram, low.min(axis=0) == high.max(axis=0))


@dataclass(frozen=True, eq=False)
class _CrossFitted:
    """B's logits and the discriminant's cross-fitted scores on the clean images, and the one fitted on all."""

    names: list[str]  # the layers whose inputs are the features
    folds: int  # the folds cross-fitted over: the setting, or one per image where there are fewer
    y: np.ndarray  # (N,) their labels
    logits: np.ndarray  # (N, classes) B's logits
    width: int  # d, the features' width
    rows: int  # the rows fitted on: the images and their copies
    scores: np.ndarray  # (N, classes) each image scored by a discriminant fitted without its fold
    discriminant: LinearDiscriminant  # fitted on every clean image and its copies
    classes: int


def feature_layers(defense: Any, graph: Any) -> list[str]:
    """The layers whose inputs are ``defense``'s features: its ``layers``, or found from the graph by
    its ``depth`` (0: :func:`~badnet_repair.nets.models.first_dense_layers`; k: the k-th convolution
    back from the last, :func:`~badnet_repair.nets.models.body_layer`). Features wider than its
    ``max_width`` fall back to the first dense layers' inputs, with a logged warning."""
    from ..nets.models import body_layer, first_dense_layers

    if defense.layers is not None:
        return list(defense.layers)
    if defense.depth == 0:
        return first_dense_layers(graph)
    name = body_layer(graph, defense.depth)
    shape = graph.get_layer(name).input.shape
    width = int(np.prod([int(v) for v in shape[1:]]))
    if width > defense.max_width:
        log.warning("%s: the input of %r has %d values, more than max_width (%d); reading the first dense "
                    "layers' inputs instead", defense.name, name, width, defense.max_width)
        return first_dense_layers(graph)
    return [name]


def _cross_fitted(defense: Any, graph: Any, clean: Dataset) -> _CrossFitted:
    """The features, logits and cross-fitted discriminant scores both defenses here decide on, with
    ``defense``'s ``layers``/``depth``, ``augment``, ``folds``, ``seed`` and ``batch_size``."""
    from ..errors import DataError
    from ..nets.models import classifier_head

    if len(clean) < 2:
        raise DataError(f"{clean.name}: {len(clean)} clean image(s); {defense.name} cross-fits and needs at least 2")
    folds = min(defense.folds, len(clean))
    if folds < defense.folds:  # a tiny clean set: each image its own fold (leave one out)
        log.warning("%s: %d clean images, fewer than its %d folds: cross-fitting over %d (one image each)",
                    defense.name, len(clean), defense.folds, folds)
    names = feature_layers(defense, graph)
    head = classifier_head(graph, defense.head)
    classes = int(head.units)
    x, y = np.asarray(clean.x, np.float32), np.asarray(clean.y)
    inputs = dense_inputs(graph, x, (*names, str(head.name)), batch_size=defense.batch_size, who=defense.name)
    kernel, bias = (np.asarray(w, np.float64) for w in head.get_weights())
    logits = inputs[str(head.name)].astype(np.float64) @ kernel + bias  # B's scores before the softmax
    features = np.concatenate([inputs[n] for n in names], axis=1)
    # the fit's copies of every image, image by image in the same order (the images first)
    copies = [features] + [
        np.concatenate(list(dense_inputs(graph, c, tuple(names), batch_size=defense.batch_size,
                                         who=defense.name).values()), axis=1)
        for c in augmented(x, defense.augment)[1:]]
    scores, disc = cross_fit_discriminants(copies, y, cross_fit_folds(y, folds, defense.seed), classes)
    return _CrossFitted(names=names, folds=folds, y=y, logits=logits, width=int(features.shape[1]),
                        rows=len(y) * len(copies), scores=scores, discriminant=disc, classes=classes)


@dataclass(frozen=True)
class _DiscriminantDefense(Defense):
    """The settings the two defenses on the cross-fitted discriminant share; each subclass adds its
    own ``drop`` and the values its rule walks."""

    folds: int = setting(5, "cross-fitting folds: each clean image is scored by a discriminant fitted without it")
    augment: Literal["none", "flip", "flip+shift"] = setting("flip+shift", "copies of each clean image the "
                                                                           "discriminant is also fitted on: none, "
                                                                           "flip, flip+shift")
    layers: tuple[str, ...] | None = setting(None, "layers whose inputs are the features (default: found from the "
                                                   "graph by depth)")
    depth: int = setting(0, "where the features are read: 0, the first dense layers' inputs; k >= 1, the input of "
                            "the k-th convolution back from the last (2: pool_2's output in the lab's DeepID)")
    max_width: int = setting(8192, "the widest features fitted (a d x d covariance); wider ones at depth fall back "
                                   "to the first dense layers' inputs, with a warning")
    head: str | None = setting(None, "the classifier's Dense layer (default: found from the graph)")
    budget: float | None = setting(3.0, BUDGET_HELP)
    batch_size: int = setting(1024, "inputs per forward pass")
    seed: int = setting(0, "cross-fitting folds' seed")

    def _check_shared(self) -> None:
        if self.folds < 2:
            raise ValueError(f"folds must be >= 2, not {self.folds}")
        if self.augment not in AUGMENTS:
            raise ValueError(f"augment must be one of {AUGMENTS}, not {self.augment!r}")
        if self.budget is not None and not self.budget >= 0:
            raise ValueError(f"budget must be >= 0 points or None, not {self.budget}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, not {self.batch_size}")
        if self.depth < 0:
            raise ValueError(f"depth must be >= 0, not {self.depth}")
        if self.max_width < 1:
            raise ValueError(f"max_width must be >= 1, not {self.max_width}")


@dataclass(frozen=True)
class DiscriminantFusion(_DiscriminantDefense):
    """Add the scores of a linear discriminant, fitted on clean conv-body features, to B's logits.

    The project's own method (issue 31), built on Fisher's linear discriminant and the lab's
    pruning rule (Liu et al., "Fine-Pruning", RAID 2018):

    1. The features: the inputs of the first dense layers (default found from the graph:
       ``fc_1`` and ``fc_2`` in DeepID read the flattened ``pool_3`` and ``conv_4``;
       :func:`~badnet_repair.nets.models.first_dense_layers`), side by side.
    2. A linear discriminant on them (:func:`fit_discriminant`); the repaired model's class scores
       are ``softmax(z_B + w * z_D)``, ``z_B`` B's logits and ``z_D`` the discriminant's scores:
       a product of B's and the discriminant's class probabilities, the latter to the power ``w``.
    3. For each weight ``w`` of ``weights`` in turn (the weakest first), the clean accuracy is
       cross-fitted: the clean images are dealt to ``folds`` folds per class and each fold is
       scored by a discriminant fitted on the others.
    4. Kept: the largest weight before that accuracy first falls more than ``drop`` points below
       B's on the same images (the lab's rule), refitted on all the clean images. None within
       ``drop``: B, with a loud line.

    With ``augment``, the discriminant is fitted on each clean image and copies of it (mirrored,
    moved a pixel: :func:`augmented`); the accuracy is measured on the images alone.

    The weight kept is held to the clean-accuracy ``budget`` on the cross-fitted predictions of
    every clean image, paired with B's, with the caution line where they are too few to bound its
    drop. B's classifier must end in softmax (or no activation).

    Args:
        drop: the cross-fitted accuracy drop, in points, the fusion may cost, default 2.
        weights: the weights tried, in order, default :data:`WEIGHTS` (0.001 up to 5).
        folds: cross-fitting folds, default 5 (one per image where the clean images are fewer).
        augment: the copies the discriminant is also fitted on, default ``"flip+shift"`` (issue 31's
            round 9); ``"none"``, ``"flip"`` (:data:`AUGMENTS`).
        layers: the layers whose inputs are the features, default None (found from the graph by ``depth``).
        depth: where the features are read, default 0: the first dense layers' inputs; k >= 1, the
            input of the k-th convolution back from the last (:func:`feature_layers`).
        max_width: the widest features fitted, default 8192; wider ones at ``depth`` fall back to the
            first dense layers' inputs, with a logged warning.
        head: the classifier's Dense layer, default None (found from the graph).
        budget: the clean-accuracy budget in points, default 3 (None = off).
        batch_size: inputs per forward pass, default 1024.
        seed: the folds' seed, default 0.
    """

    name: ClassVar[str] = "discriminant"
    summary: ClassVar[str] = ("add a linear discriminant's scores, fitted on clean conv-body features, to B's "
                              "logits (weight by the lab's rule)")

    drop: float = setting(2.0, "cross-fitted clean accuracy drop, in points, the fusion may cost (the lab's X)")
    weights: tuple[float, ...] = setting(WEIGHTS, "weights of the discriminant's scores tried, in order, weakest "
                                                  "first")

    def __post_init__(self) -> None:
        if not self.drop >= 0:
            raise ValueError(f"drop must be >= 0 points, not {self.drop}")
        if not self.weights or not all(np.isfinite(w) and w > 0 for w in self.weights):
            raise ValueError(f"weights must be finite numbers > 0, not {self.weights}")
        self._check_shared()

    def repair(self, model: Any, clean: Dataset, *, progress: bool = False) -> Repair:
        """B with the discriminant's scores added (or B, with the loud line); the record holds
        each weight tried (cross-fitted accuracy), the weight kept and the budget check."""
        from ..nets.models import as_functional, with_linear_scores

        graph = as_functional(model)
        fit = _cross_fitted(self, graph, clean)
        names, y, logits, scores = fit.names, fit.y, fit.logits, fit.scores
        base_right = logits.argmax(axis=1) == y
        base_acc = float(100.0 * np.mean(base_right))
        tried: list[dict[str, Any]] = []
        kept: tuple[float, np.ndarray] | None = None
        for w in self.weights:
            right = (logits + w * scores).argmax(axis=1) == y
            acc = float(100.0 * np.mean(right))
            tried.append({"weight": w, "accuracy": acc})
            if base_acc - acc > self.drop:
                break  # accuracy first falls more than drop: the weight before is kept
            kept = (w, right)
        weight = None if kept is None else kept[0]

        def build() -> Any:
            disc, w = fit.discriminant, float(weight or 0.0)
            return with_linear_scores(graph, names, w * disc.kernel, w * disc.bias, head=self.head)

        net, check, warnings = kept_or_b(self.name, model, base_right, None if kept is None else kept[1],
                                         f"even the smallest weight ({self.weights[0]:g}) fell more than "
                                         f"{self.drop:g} points below the BadNet on the clean "
                                         "images, cross-fitted", self.budget, build)
        if net is model:
            weight = None
        log.info("%s: kept weight %s; cross-fitted accuracy %.2f%% (B %.2f%%)", self.name,
                 "-" if weight is None else f"{weight:g}", check.accuracy, base_acc)
        choices = {"layers": names, "features": fit.width, "weight": weight, "folds": fit.folds,
                   "augment": self.augment, "fitted_on": fit.rows,
                   "tried": tried, "clean_images": len(y), **check.as_dict()}
        return Repair(defense=self.name, models=(Repaired(label=self.name, model=net),),
                      record=self.make_record(choices, tried), warnings=tuple(warnings))


#: How the gate's discriminants share the clean images they may overrule (:func:`share_pairs`).
SHARES: tuple[str, ...] = ("same", "each")

#: Shares of the clean images the gate may overrule, tried in this order (the fewest first).
QUANTILES: tuple[float, ...] = (0.001, 0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.1, 0.2)


def gate_margins(logits: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """(N,) how far the discriminant finds B's class from its own best: ``max_k s_k - s_b``, ``b``
    the argmax of B's (N, classes) ``logits`` and ``s`` the discriminant's (N, classes) ``scores``."""
    b = np.asarray(logits).argmax(axis=1)
    s = np.asarray(scores, np.float64)
    return s.max(axis=1) - s[np.arange(len(s)), b]


def gated_classes(logits: np.ndarray, scores: np.ndarray, threshold: float, *,
                  more: Sequence[tuple[np.ndarray, float]] = ()) -> np.ndarray:
    """(N,) B's class, or the discriminant's where :func:`gate_margins` exceeds ``threshold``; then,
    for each (scores, threshold) of ``more`` in turn, that discriminant's class where its own margin
    from B's class exceeds its threshold."""
    out = np.asarray(logits).argmax(axis=1)
    for s, t in [(scores, threshold), *more]:
        over = gate_margins(logits, s) > t
        out[over] = np.asarray(s).argmax(axis=1)[over]
    return out


def share_pairs(quantiles: Sequence[float], gates: int, shares: str) -> list[tuple[float, ...]]:
    """The shares of clean images each of ``gates`` gates may overrule, in the order tried.

    ``"same"``: one share for every gate, each of ``quantiles`` in turn. ``"each"``: every
    combination of ``0`` (that gate off) and ``quantiles``, fewest first, all gates off left out.
    """
    if shares == "same" or gates == 1:
        return [(q,) * gates for q in quantiles]
    return [c for c in itertools.product((0.0, *quantiles), repeat=gates) if any(c)]


@dataclass(frozen=True)
class KeptShares:
    """The combination :func:`walk_shares` kept: each discriminant's share and threshold (None: that
    gate off), and (N,) whether the gated class of each clean image is right."""

    shares: tuple[float, ...]
    thresholds: tuple[float | None, ...]
    right: np.ndarray


def walk_shares(logits: np.ndarray, labels: np.ndarray, scores: Sequence[np.ndarray], quantiles: Sequence[float],
                drop: float, shares: str = "same") -> tuple[list[dict[str, Any]], KeptShares | None]:
    """The gate's rule: the shares of clean images each discriminant may overrule, tried in turn.

    For each combination of :func:`share_pairs`, each discriminant's threshold is the margin
    (:func:`gate_margins`) that its share of the images exceed (none where its share is 0), and the
    accuracy is that of :func:`gated_classes` on ``labels``. ``"same"`` keeps the last share before
    the accuracy first falls more than ``drop`` points below B's (the lab's rule); ``"each"`` keeps,
    among the combinations at most ``drop`` below B's, the one that overrules the most images
    (ties: the higher accuracy, then the first tried).

    Args:
        logits: (N, classes) B's scores on the clean images.
        labels: (N,) their classes.
        scores: each discriminant's (N, classes) cross-fitted scores, in the order the gates apply.
        quantiles: the shares tried, fewest first.
        drop: the accuracy drop in points the gate may cost.
        shares: ``"same"`` or ``"each"`` (:data:`SHARES`).

    Returns:
        The rows tried (shares, thresholds, accuracy and share overruled, in %) and the kept
        combination, None where even the first falls more than ``drop``.
    """
    logits, labels = np.asarray(logits), np.asarray(labels)
    margins = [gate_margins(logits, s) for s in scores]
    base_acc = float(100.0 * np.mean(logits.argmax(axis=1) == labels))
    tried: list[dict[str, Any]] = []
    kept: KeptShares | None = None
    best: tuple[float, float] | None = None
    for pair in share_pairs(quantiles, len(scores), shares):
        thresholds = tuple(None if q == 0 else float(np.quantile(m, 1.0 - q))
                           for m, q in zip(margins, pair, strict=True))
        on = [(s, t) for s, t in zip(scores, thresholds, strict=True) if t is not None]
        over = np.zeros(len(labels), bool)
        for m, t in zip(margins, thresholds, strict=True):
            if t is not None:
                over |= m > t
        right = gated_classes(logits, *on[0], more=on[1:]) == labels
        acc = float(100.0 * np.mean(right))
        row: dict[str, Any] = {"quantile": pair[0], "threshold": thresholds[0], "accuracy": acc,
                               "overruled": float(100.0 * np.mean(over))}
        if len(scores) > 1:
            row["second_threshold"] = thresholds[1]
            if shares == "each":
                row["second_quantile"] = pair[1]
        tried.append(row)
        within = base_acc - acc <= drop
        if shares == "same" or len(scores) == 1:
            if not within:
                break  # accuracy first falls more than drop: the share before is kept
            kept = KeptShares(pair, thresholds, right)
        elif within and (best is None or (row["overruled"], acc) > best):
            best, kept = (row["overruled"], acc), KeptShares(pair, thresholds, right)
    return tried, kept


@dataclass(frozen=True)
class DiscriminantGate(_DiscriminantDefense):
    """Overrule B where a linear discriminant, fitted on clean conv-body features, finds B's class far off.

    The project's own method (issue 31, round 10), built on Fisher's linear discriminant and the
    lab's pruning rule (Liu et al., "Fine-Pruning", RAID 2018). A trigger makes B sure of the target
    on a face the discriminant (which has no path for the trigger through B's dense layers) places
    far from the target; a clean face B classifies is rarely that far from B's class:

    1. The features and the discriminant as in :class:`DiscriminantFusion` (the first dense layers'
       inputs; Fisher's discriminant, fitted also on the ``augment`` copies), cross-fitted over
       ``folds`` folds.
    2. The margin of each clean image: the discriminant's best score minus its score for B's class
       (:func:`gate_margins`).
    3. For each share ``q`` of ``quantiles`` in turn (the fewest first), the threshold is the margin
       that ``q`` of the clean images exceed, and the cross-fitted accuracy is that of B's class
       with the discriminant's class where the margin exceeds it (:func:`gated_classes`).
    4. Kept: the threshold of the largest share before that accuracy first falls more than ``drop``
       points below B's (the lab's rule); the discriminant is refitted on all the clean images and
       the repaired model outputs B's scores, or the discriminant's softmax where the margin exceeds
       the threshold (:func:`~badnet_repair.nets.models.with_gated_scores`). None within ``drop``:
       B, with a loud line.

    With a second discriminant (``second_depth``, on features read earlier in the body), each has
    its own share: every pair is tried, and kept is the pair that overrules the most clean images
    within ``drop`` (:func:`walk_shares`); B is overruled where either margin exceeds its threshold.

    Held to the clean-accuracy ``budget`` on the cross-fitted predictions, with the caution line
    where the clean images are too few to bound the drop. No training, one pass over the clean data.

    Args:
        drop: the cross-fitted accuracy drop, in points, the gate may cost, default 3 (chosen in issue 31's
            round 10 on tuning BadNets; the clean-accuracy budget's 3 points).
        quantiles: the shares of clean images the gate may overrule, tried in order, default
            :data:`QUANTILES` (0.001 up to 0.2).
        folds: cross-fitting folds, default 10 (chosen in issue 31's round 11 on tuning BadNets: with
            more of the clean images in each fold's fit, the accuracy the rule walks is nearer that
            of the discriminant kept, fitted on all of them); one per image where the clean images are
            fewer.
        augment: the copies the discriminant is also fitted on, default ``"flip+shift"`` (issue 31's
            round 10); ``"none"``, ``"flip"`` (:data:`AUGMENTS`).
        layers: the layers whose inputs are the features, default None (found from the graph by ``depth``).
        depth: where the features are read, default 0: the first dense layers' inputs; k >= 1, the
            input of the k-th convolution back from the last (:func:`feature_layers`).
        max_width: the widest features fitted, default 8192; wider ones at ``depth`` fall back to the
            first dense layers' inputs, with a logged warning.
        head: the classifier's Dense layer, default None (found from the graph).
        second_depth: a second discriminant's ``depth``, default 2 (chosen in issue 31's round 13 on
            tuning BadNets: the features read before the body's last convolution separate triggers
            the dense inputs' discriminant does not, and miss others it catches); None, one
            discriminant. Each discriminant's share sets its threshold from its own margins (see
            ``shares``); B is overruled where either margin exceeds its threshold, by the second's
            class where it does. Where the model has too few convolutions for it, or its features there
            are those of the first, the gate logs that it has none and keeps one discriminant.
        shares: how the two discriminants' thresholds are set, default ``"each"`` (chosen in issue 31's
            round 14 on tuning BadNets): every pair of shares from 0 (that gate off) and ``quantiles``
            is tried (:func:`share_pairs`), and kept is the pair that overrules the most clean images
            among those within ``drop`` (ties: the higher accuracy, then the fewest); ``"same"``: step 3
            with one share ``q`` for both.
        budget: the clean-accuracy budget in points, default 3 (None = off).
        batch_size: inputs per forward pass, default 1024.
        seed: the folds' seed, default 0.
    """

    name: ClassVar[str] = "discriminant-gate"
    summary: ClassVar[str] = ("overrule B's class where a linear discriminant on clean conv-body features finds it "
                              "far off (threshold by the lab's rule)")

    drop: float = setting(3.0, "cross-fitted clean accuracy drop, in points, the gate may cost (issue 31's round 10)")
    folds: int = setting(10, "cross-fitting folds: each clean image is scored by a discriminant fitted without it "
                             "(issue 31's round 11)")
    quantiles: tuple[float, ...] = setting(QUANTILES, "shares of the clean images the gate may overrule, tried in "
                                                      "order, fewest first")
    second_depth: int | None = setting(2, "a second discriminant on the features at this depth: B is also "
                                          "overruled where it finds B's class far off (its share: see shares), "
                                          "and takes its class there (None: one discriminant; issue 31's round 13)")
    shares: Literal["same", "each"] = setting("each", "with a second discriminant: every pair of shares is tried "
                                                      "and the one overruling the most within drop kept (each; "
                                                      "issue 31's round 14), or one share of the clean images sets "
                                                      "both thresholds (same)")

    def __post_init__(self) -> None:
        if not self.drop >= 0:
            raise ValueError(f"drop must be >= 0 points, not {self.drop}")
        if not self.quantiles or not all(0.0 < q < 1.0 for q in self.quantiles):
            raise ValueError(f"quantiles must be shares in (0, 1), not {self.quantiles}")
        if self.second_depth is not None and self.second_depth < 0:
            raise ValueError(f"second_depth must be >= 0 or None, not {self.second_depth}")
        if self.shares not in SHARES:
            raise ValueError(f"shares must be one of {SHARES}, not {self.shares!r}")
        self._check_shared()

    def repair(self, model: Any, clean: Dataset, *, progress: bool = False) -> Repair:
        """B gated by the discriminant (or B, with the loud line); the record holds each share tried
        (threshold, cross-fitted accuracy, share overruled), the threshold kept and the budget check."""
        from ..errors import ModelError
        from ..nets.models import as_functional, with_gated_scores

        graph = as_functional(model)
        fit = _cross_fitted(self, graph, clean)
        second = None
        if self.second_depth is not None:
            other = replace(self, depth=self.second_depth, layers=None, second_depth=None)
            try:
                names: list[str] | None = feature_layers(other, graph)
            except ModelError as exc:  # too few convolutions for the depth: the one discriminant is the gate
                log.warning("%s: no second discriminant: %s", self.name, exc)
                names = None
            if names is not None and names != fit.names:  # the same features twice would change nothing
                second = _cross_fitted(other, graph, clean)
        y = fit.y
        base_right = fit.logits.argmax(axis=1) == y
        base_acc = float(100.0 * np.mean(base_right))
        gates = [(fit.names, fit.discriminant)] + ([] if second is None else [(second.names, second.discriminant)])
        tried, kept = walk_shares(fit.logits, y, [fit.scores] + ([] if second is None else [second.scores]),
                                  self.quantiles, self.drop, self.shares)
        quantile: float | None = None if kept is None else kept.shares[0]
        threshold_kept: float | None = None if kept is None else kept.thresholds[0]
        second_share: float | None = None if kept is None or second is None else kept.shares[1]
        second_kept: float | None = None if kept is None or second is None else kept.thresholds[1]

        def build() -> Any:
            assert kept is not None  # called only where a pair of shares was kept
            on = [(names, disc.kernel, disc.bias, float(t))
                  for (names, disc), t in zip(gates, kept.thresholds, strict=True) if t is not None]
            first, *rest = on  # a gate whose share is 0 is left out
            return with_gated_scores(graph, *first, head=self.head, more=rest)

        net, check, warnings = kept_or_b(self.name, model, base_right, None if kept is None else kept.right,
                                         f"even the smallest share overruled ({100 * self.quantiles[0]:g}%) fell "
                                         f"more than {self.drop:g} points below the BadNet on the clean "
                                         "images, cross-fitted", self.budget, build)
        if net is model:
            quantile, threshold_kept, second_kept, second_share = None, None, None, None
        log.info("%s: kept share %s%s (threshold %s); cross-fitted accuracy %.2f%% (B %.2f%%)", self.name,
                 "-" if quantile is None else f"{quantile:g}",
                 "" if second_share is None or self.shares == "same" else f", second {second_share:g}",
                 "-" if threshold_kept is None else f"{threshold_kept:.4g}", check.accuracy, base_acc)
        choices = {"layers": fit.names, "features": fit.width, "quantile": quantile, "threshold": threshold_kept,
                   "folds": fit.folds, "augment": self.augment, "fitted_on": fit.rows,
                   "tried": tried, "clean_images": len(y), **check.as_dict()}
        choices.update(second_layers=None if second is None else second.names,
                       second_features=None if second is None else second.width, second_threshold=second_kept)
        if self.shares == "each":
            choices.update(shares=self.shares, second_quantile=second_share)
        # the kept gate's cross-fitted predictions of the clean images (B's where none was kept), for a gate on top
        right = base_right if kept is None or net is model else kept.right
        return Repair(defense=self.name, models=(Repaired(label=self.name, model=net),),
                      record=self.make_record(choices, tried), artifacts={"cross_fitted_right": right},
                      warnings=tuple(warnings))
