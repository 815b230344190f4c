"""Discriminant fusion: B's class scores plus those of a linear discriminant fitted on clean data.

On the faces BadNets of issue 31 the backdoor is carried by the dense layers (re-initialising
them removes it; the conv body alone does not send a triggered face to the target). A linear
discriminant fitted on the clean images' conv-body features (the first dense layers' inputs)
has no such path, but on a few clean images a person it classifies far worse than B. Adding a
small multiple of its scores to B's logits keeps B's decision where B is sure on a clean face
and lets the discriminant overrule a decision it finds far off: the weight is chosen by the
lab's pruning rule, on cross-fitted clean accuracy. No training, one pass over the clean data.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np

from ..defaults import BUDGET_HELP, setting
from ..formats.data import Dataset
from .base import Defense, Repair, Repaired
from .subspace import cross_fit_folds, dense_inputs

__all__ = ["AUGMENTS", "WEIGHTS", "DiscriminantFusion", "LinearDiscriminant", "augmented", "fit_discriminant"]

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
    others' kernels and biases: a neutral score that neither favours nor excludes it.

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
    vals, vecs = np.linalg.eigh((cov + cov.T) / 2.0)
    vals = np.maximum(vals, 1e-6 * max(float(vals.mean()), 1e-12))
    a = (vecs / vals) @ (vecs.T @ means.T)  # (d, classes): P m_k
    c = -0.5 * np.einsum("kd,dk->k", means, a)
    missing = np.setdiff1d(np.arange(classes), present)
    if len(missing):
        a[:, missing] = a[:, present].mean(axis=1, keepdims=True)
        c[missing] = c[present].mean()
    # standardisation folded in: ((f - mean) / sd) a + c = f (a / sd) + (c - (mean / sd) a)
    kernel = a / sd[:, None]
    return LinearDiscriminant(kernel=kernel, bias=c - (mean / sd) @ a)


@dataclass(frozen=True)
class DiscriminantFusion(Defense):
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
        folds: cross-fitting folds, default 5.
        augment: the copies the discriminant is also fitted on, default ``"flip+shift"`` (issue 31's
            round 9); ``"none"``, ``"flip"`` (:data:`AUGMENTS`).
        layers: the Dense layers whose inputs are the features, default None (found from the graph).
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
    folds: int = setting(5, "cross-fitting folds: each clean image is scored by a discriminant fitted without it")
    augment: Literal["none", "flip", "flip+shift"] = setting("flip+shift", "copies of each clean image the "
                                                                           "discriminant is also fitted on: none, "
                                                                           "flip, flip+shift")
    layers: tuple[str, ...] | None = setting(None, "Dense layers whose inputs are the features (default: those no "
                                                   "Dense layer feeds, found from the graph)")
    budget: float | None = setting(3.0, BUDGET_HELP)
    batch_size: int = setting(1024, "inputs per forward pass")
    seed: int = setting(0, "cross-fitting folds' seed")

    def __post_init__(self) -> None:
        if not self.drop >= 0:
            raise ValueError(f"drop must be >= 0 points, not {self.drop}")
        if not self.weights or not all(np.isfinite(w) and w > 0 for w in self.weights):
            raise ValueError(f"weights must be finite numbers > 0, not {self.weights}")
        if self.folds < 2:
            raise ValueError(f"folds must be >= 2, not {self.folds}")
        if self.augment not in AUGMENTS:
            raise ValueError(f"augment must be one of {AUGMENTS}, not {self.augment!r}")
        if self.budget is not None and not self.budget >= 0:
            raise ValueError(f"budget must be >= 0 points or None, not {self.budget}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, not {self.batch_size}")

    def repair(self, model: Any, clean: Dataset, *, progress: bool = False) -> Repair:
        """B with the discriminant's scores added (or B, with the loud line); the record holds
        each weight tried (cross-fitted accuracy), the weight kept and the budget check."""
        from ..errors import DataError
        from ..nets.models import as_functional, classifier_head, first_dense_layers, with_linear_scores
        from .tuning import check_budget

        if len(clean) < self.folds:
            raise DataError(f"{clean.name}: {len(clean)} clean image(s); {self.name} cross-fits on {self.folds} "
                            "folds and needs at least one image in each")
        graph = as_functional(model)
        names = list(self.layers) if self.layers is not None else first_dense_layers(graph)
        head = classifier_head(graph)
        classes = int(head.units)
        x, y = np.asarray(clean.x, np.float32), np.asarray(clean.y)
        inputs = dense_inputs(graph, x, (*names, str(head.name)), batch_size=self.batch_size, who=self.name)
        head_in = inputs[str(head.name)]
        kernel, bias = (np.asarray(w, np.float64) for w in head.get_weights())
        logits = head_in.astype(np.float64) @ kernel + bias  # B's scores before the softmax
        features = np.concatenate([inputs[n] for n in names], axis=1)
        # the fit's copies of every image, image by image in the same order (the images first)
        copies = [features] + [
            np.concatenate(list(dense_inputs(graph, c, tuple(names), batch_size=self.batch_size,
                                             who=self.name).values()), axis=1)
            for c in augmented(x, self.augment)[1:]]
        base_right = logits.argmax(axis=1) == y
        base_acc = float(100.0 * np.mean(base_right))
        fold = cross_fit_folds(y, self.folds, self.seed)
        scores = np.empty((len(x), classes))
        for f in range(self.folds):
            held = fold == f
            disc = fit_discriminant(np.concatenate([c[~held] for c in copies]),
                                    np.concatenate([y[~held]] * len(copies)), classes)
            scores[held] = disc.scores(features[held])
        tried: list[dict[str, Any]] = []
        kept: tuple[float, np.ndarray] | None = None
        for w in self.weights:
            right = (logits + w * scores).argmax(axis=1) == y
            acc = float(100.0 * np.mean(right))
            tried.append({"weight": w, "accuracy": acc})
            if base_acc - acc > self.drop:
                break  # accuracy first falls more than drop: the weight before is kept
            kept = (w, right)
        warnings: list[str] = []
        if kept is None:
            line = (f"WARNING: {self.name}: even the smallest weight ({self.weights[0]:g}) fell more than "
                    f"{self.drop:g} points below the BadNet on the clean images, cross-fitted: returned the BadNet "
                    "unchanged: the backdoor is NOT removed")
            log.warning("%s", line)
            check = check_budget(self.name, base_acc, base_acc, self.budget, [])
            net, weight = model, None
            warnings.append(line)
        else:
            weight, right = kept
            check = check_budget(self.name, float(100.0 * np.mean(right)), base_acc, self.budget, [("B", base_acc)],
                                 (base_right, right))
            if check.fallback == "B":
                net, weight = model, None
            else:  # refitted on every clean image only for the model returned
                disc = fit_discriminant(np.concatenate(copies), np.concatenate([y] * len(copies)), classes)
                net = with_linear_scores(graph, names, weight * disc.kernel, weight * disc.bias)
            warnings.extend(check.lines)
        log.info("%s: kept weight %s; cross-fitted accuracy %.2f%% (B %.2f%%)", self.name,
                 "-" if weight is None else f"{weight:g}", check.accuracy, base_acc)
        choices = {"layers": names, "features": int(features.shape[1]), "weight": weight, "folds": self.folds,
                   "augment": self.augment, "fitted_on": len(x) * len(copies),
                   "tried": tried, "clean_images": len(x), **check.as_dict()}
        return Repair(defense=self.name, models=(Repaired(label=self.name, model=net),),
                      record=self.make_record(choices, tried), warnings=tuple(warnings))
