"""Clean-subspace projection: the dense layers read only the directions clean data uses.

The pruning defense of Liu, Dolan-Gavitt and Garg (RAID 2018) removes the conv channels clean
data leaves dormant, in ascending order of activity, until clean accuracy falls X points. This
defense does the same in the principal basis of the first dense layers' inputs: a trigger that
drives features clean images hardly vary along is cut at the dense layers, whichever channels
carry it. No training: one pass over the clean data, an SVD per layer and fold, and the clean images
classified once per level tried.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from ..defaults import BUDGET_HELP, setting
from ..formats.data import Dataset
from .base import Defense, Repair, Repaired
from .finetuning import FineTuning, Member

__all__ = ["KEPT_VARIANCE", "CleanSubspaceProjection", "PrincipalDirections", "SubspaceFineTuning", "cross_fit_folds",
           "dense_inputs", "principal_directions", "projected_copy"]

log = logging.getLogger(__name__)

#: Shares of the clean inputs' variance kept, tried in this order (weakest projection first).
KEPT_VARIANCE: tuple[float, ...] = (0.9999, 0.999, 0.998, 0.995, 0.99, 0.985, 0.98, 0.975, 0.97, 0.965, 0.96,
                                    0.955, 0.95, 0.94, 0.93, 0.92, 0.91, 0.9, 0.88, 0.86, 0.84, 0.82, 0.8,
                                    0.75, 0.7)


@dataclass(frozen=True, eq=False)
class PrincipalDirections:
    """A layer's clean inputs' principal directions.

    Attributes:
        mean: (d,) the clean inputs' mean.
        basis: (d, r) the principal directions, by decreasing variance (r <= d).
        cumulative: (r,) the share of the variance the first 1..r directions hold.
    """

    mean: np.ndarray
    basis: np.ndarray
    cumulative: np.ndarray

    def directions_for(self, kept_variance: float) -> int:
        """The fewest leading directions that hold at least ``kept_variance`` of the variance."""
        if len(self.cumulative) == 0:
            return 0
        return min(int(np.searchsorted(self.cumulative, kept_variance - 1e-12)) + 1, len(self.cumulative))


def principal_directions(features: np.ndarray) -> PrincipalDirections:
    """The principal directions of (N, d) features (an SVD of the centred values, float64)."""
    a = np.asarray(features, np.float64).reshape(len(features), -1)
    mean = a.mean(axis=0)
    _, sv, vt = np.linalg.svd(a - mean, full_matrices=False)
    var = sv**2
    total = var.sum()
    keep = var > total * 1e-12 if total > 0 else np.zeros(len(var), bool)  # numerically zero directions hold nothing
    cumulative = np.cumsum(var[keep]) / total if total > 0 else np.zeros(0)
    return PrincipalDirections(mean=mean, basis=vt[keep].T, cumulative=cumulative)


def projected_copy(model: Any, directions: Mapping[str, PrincipalDirections], kept: Mapping[str, int], *,
                   into: Any = None) -> Any:
    """A copy of ``model`` whose Dense layers (``directions``' keys) read their inputs projected
    onto their first ``kept[layer]`` principal directions
    (:func:`~badnet_repair.nets.models.project_dense_inputs`). ``into``: an earlier copy of
    ``model`` to reuse (its projected layers are set back to ``model``'s weights first), so that a
    sweep over levels clones the network once."""
    import keras

    from ..nets.models import project_dense_inputs

    if into is None:
        copy = keras.models.clone_model(model)
        copy.set_weights(model.get_weights())
    else:
        copy = into
        for name in directions:
            copy.get_layer(name).set_weights(model.get_layer(name).get_weights())
    for name, d in directions.items():
        project_dense_inputs(copy, name, d.mean, d.basis[:, : kept[name]])
    return copy


def dense_inputs(model: Any, x: np.ndarray, layers: tuple[str, ...] | None = None, *, batch_size: int = 1024,
                 who: str = "subspace") -> dict[str, np.ndarray]:
    """(N, d) inputs of each of ``layers`` (default
    :func:`~badnet_repair.nets.models.first_dense_layers`) on images ``x``, by layer name."""
    import keras

    from ..errors import ModelError
    from ..nets.models import first_dense_layers

    names = list(layers) if layers is not None else first_dense_layers(model)
    if not names:
        raise ModelError(f"{who}: model {model.name!r} has no Dense layer to project")
    # one input tensor, not a list of one: the model is then called with an array as it expects
    inputs = keras.Model(model.inputs[0] if len(model.inputs) == 1 else model.inputs,
                         [model.get_layer(n).input for n in names])
    parts: list[list[np.ndarray]] = [[] for _ in names]
    for start in range(0, len(x), batch_size):
        out = inputs(np.asarray(x[start : start + batch_size], np.float32), training=False)
        for i, value in enumerate(out if isinstance(out, (list, tuple)) else [out]):
            parts[i].append(keras.ops.convert_to_numpy(value).reshape(len(value), -1))
    return {n: np.concatenate(p) for n, p in zip(names, parts, strict=True)}


def cross_fit_folds(labels: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """(N,) the fold (0..folds-1) of each image: each class's images, in a seeded order, dealt to
    the folds in turn, each class starting at the fold after the last class's last, so the folds'
    sizes differ by at most one image."""
    rng = np.random.default_rng([seed, 29])
    out = np.empty(len(labels), np.int64)
    nxt = 0
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        out[idx] = (nxt + np.arange(len(idx))) % folds
        nxt = (nxt + len(idx)) % folds
    return out


@dataclass(frozen=True)
class CleanSubspaceProjection(Defense):
    """Project the first dense layers' inputs onto the principal directions of their clean values.

    The project's own method, the pruning defense (Liu et al., "Fine-Pruning", RAID 2018) moved
    from conv channels to principal directions:

    1. The layers (default the Dense layers no Dense layer feeds, found from the graph: ``fc_1``
       and ``fc_2`` in DeepID; :func:`~badnet_repair.nets.models.first_dense_layers`).
    2. For each share ``q`` of ``kept_variance`` in turn (the weakest projection first), every such
       layer reads its input projected onto the fewest principal directions of its clean inputs
       that hold ``q`` of their variance (B's function is unchanged on inputs within that span).
    3. Each level's clean accuracy is cross-fitted: the clean images are dealt to ``folds`` folds
       per class, and each fold is classified by the projection fitted on the other folds, so every
       clean image is scored by a projection that did not see it (a projection fitted on an image
       keeps all of it, which would flatter the level).
    4. Kept: the strongest level before the cross-fitted accuracy first falls more than ``drop``
       points below B's on the same images (the lab's rule, "where accuracy first falls X points",
       with the step before it); returned fitted on all the clean images. None within ``drop``: B,
       with a loud line.

    The level kept is held to the clean-accuracy ``budget`` on the cross-fitted predictions of
    every clean image, paired with B's, with the caution line where they are too few to bound its
    drop. No labels are used to fit a projection, only to measure it.

    Args:
        drop: the cross-fitted accuracy drop, in points, the projection may cost, default 2.
        kept_variance: the shares of variance tried, in order, default :data:`KEPT_VARIANCE`
            (0.9999 down to 0.7).
        folds: cross-fitting folds, default 5.
        layers: the Dense layers projected, default None (found from the graph).
        budget: the clean-accuracy budget in points, default 3 (None = off).
        batch_size: inputs per forward pass, default 1024.
        seed: the folds' seed, default 0.
    """

    name: ClassVar[str] = "subspace"
    summary: ClassVar[str] = ("project the first dense layers' inputs onto the directions clean data uses (the "
                              "pruning defense in the principal basis)")

    drop: float = setting(2.0, "cross-fitted clean accuracy drop, in points, the projection may cost (the lab's X)")
    kept_variance: tuple[float, ...] = setting(KEPT_VARIANCE, "shares of the clean inputs' variance kept, tried in "
                                                              "order, weakest projection first")
    folds: int = setting(5, "cross-fitting folds: each clean image is scored by a projection fitted without it")
    layers: tuple[str, ...] | None = setting(None, "Dense layers projected (default: those no Dense layer feeds, "
                                                   "found from the graph)")
    budget: float | None = setting(3.0, BUDGET_HELP)
    batch_size: int = setting(1024, "inputs per forward pass")
    seed: int = setting(0, "cross-fitting folds' seed")

    def __post_init__(self) -> None:
        if not self.drop >= 0:
            raise ValueError(f"drop must be >= 0 points, not {self.drop}")
        if not self.kept_variance or not all(0.0 < q <= 1.0 for q in self.kept_variance):
            raise ValueError(f"kept_variance must be shares in (0, 1], not {self.kept_variance}")
        if self.folds < 2:
            raise ValueError(f"folds must be >= 2, not {self.folds}")
        if self.budget is not None and not self.budget >= 0:
            raise ValueError(f"budget must be >= 0 points or None, not {self.budget}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, not {self.batch_size}")

    def repair(self, model: Any, clean: Dataset, *, progress: bool = False) -> Repair:
        """B with its first dense layers projected (or B, with the loud line); the record holds
        each level tried (directions kept, cross-fitted accuracy), the level kept and the budget check."""
        from ..errors import DataError
        from ..nets.models import as_functional, predict_classes
        from .tuning import kept_or_b

        if len(clean) < self.folds:
            raise DataError(f"{clean.name}: {len(clean)} clean image(s); {self.name} cross-fits on {self.folds} "
                            "folds and needs at least one image in each")
        graph = as_functional(model)
        x, y = np.asarray(clean.x, np.float32), np.asarray(clean.y)
        features = dense_inputs(graph, x, self.layers, batch_size=self.batch_size, who=self.name)
        fold = cross_fit_folds(y, self.folds, self.seed)
        per_fold = [{n: principal_directions(a[fold != f]) for n, a in features.items()} for f in range(self.folds)]
        base_right = np.asarray(predict_classes(graph, x, batch_size=self.batch_size) == y)
        base_acc = float(100.0 * np.mean(base_right))
        tried: list[dict[str, Any]] = []
        kept: tuple[float, np.ndarray] | None = None
        previous: list[dict[str, int]] | None = None
        copies: list[Any] = [None] * self.folds  # one network per fold, projected again at each level
        for q in self.kept_variance:
            counts = [{n: d.directions_for(q) for n, d in directions.items()} for directions in per_fold]
            if counts == previous:
                continue  # the same projections as the level before
            previous = counts
            right = np.empty(len(x), bool)
            for f, directions in enumerate(per_fold):
                copies[f] = projected_copy(graph, directions, counts[f], into=copies[f])
                held = fold == f
                right[held] = predict_classes(copies[f], x[held], batch_size=self.batch_size) == y[held]
            acc = float(100.0 * np.mean(right))
            tried.append({"kept_variance": q, "directions": counts, "accuracy": acc})
            if base_acc - acc > self.drop:
                break  # accuracy first falls more than drop: the level before is kept
            kept = (q, right)
        level: float | None = None if kept is None else kept[0]
        counts_all: dict[str, int] = {}

        def build() -> Any:  # called only where a level was kept
            assert level is not None
            everything = {n: principal_directions(a) for n, a in features.items()}
            counts_all.update({n: d.directions_for(level) for n, d in everything.items()})
            return projected_copy(graph, everything, counts_all)

        net, check, warnings = kept_or_b(self.name, model, base_right, None if kept is None else kept[1],
                                         f"even the weakest projection ({self.kept_variance[0]:g} of the variance) "
                                         f"fell more than {self.drop:g} points below the BadNet on the clean "
                                         "images, cross-fitted", self.budget, build)
        if net is model:
            level = None
        log.info("%s: kept %s of the variance (%s directions); cross-fitted accuracy %.2f%% (B %.2f%%)", self.name,
                 "-" if level is None else f"{level:g}", counts_all or "no", check.accuracy, base_acc)
        choices = {"layers": list(features), "kept_variance": level, "directions": counts_all,
                   "input_widths": {n: int(a.shape[1]) for n, a in features.items()}, "folds": self.folds,
                   "tried": tried, "clean_images": len(x), **check.as_dict()}
        repaired = Repaired(label=self.name, model=net)
        return Repair(defense=self.name, models=(repaired,), record=self.make_record(choices, tried),
                      warnings=tuple(warnings))


@dataclass(frozen=True)
class SubspaceFineTuning(FineTuning):
    """Fine-tuning (Liu et al., RAID 2018, Section 5) from a clean-subspace projection of B.

    Each member's start is B with its first dense layers reading only the fewest principal
    directions of their inputs on the member's tuning images that hold ``kept_variance`` of the
    variance (:class:`CleanSubspaceProjection`'s projection at one fixed share); fine-tuning on the
    same images then wins back the accuracy the cut cost, with gradients that lie in the
    directions the clean images move (a dense kernel's gradient is its inputs times the error).
    The epoch choice on the held-out part, the budget and its fallback to B are fine-tuning's.

    Settings: those of :class:`~badnet_repair.defenses.finetuning.FineTuning`, plus:

    Args:
        kept_variance: the share of the clean inputs' variance the start keeps, default 0.95.
        project_layers: the Dense layers projected, default None (found from the graph).
    """

    name: ClassVar[str] = "subspace-ft"
    summary: ClassVar[str] = ("project the first dense layers onto the clean inputs' principal directions, then "
                              "fine-tune")
    start_label: ClassVar[str] = "projected start"

    kept_variance: float = setting(0.95, "share of the clean inputs' variance the projected start keeps")
    project_layers: tuple[str, ...] | None = setting(None, "Dense layers projected (default: those no Dense layer "
                                                           "feeds, found from the graph)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 < self.kept_variance <= 1.0:
            raise ValueError(f"kept_variance must be a share in (0, 1], not {self.kept_variance}")

    def start(self, member: Member) -> tuple[Any, tuple[int, ...]]:
        """B projected on the member's tuning images' principal directions (no channel pruned)."""
        from ..nets.models import as_functional

        graph = as_functional(member.badnet)
        features = dense_inputs(graph, np.asarray(member.tune.x, np.float32), self.project_layers, who=self.name)
        directions = {n: principal_directions(a) for n, a in features.items()}
        counts = {n: d.directions_for(self.kept_variance) for n, d in directions.items()}
        member.notes["projected_directions"] = counts
        member.notes["input_widths"] = {n: int(a.shape[1]) for n, a in features.items()}
        log.info("%s: start projected on %s directions (%g of the variance)", self.name, counts, self.kept_variance)
        return projected_copy(graph, directions, counts), ()
