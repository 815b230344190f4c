"""The pruning defense: rank a conv layer's channels, prune them in order, pick B'_X.

Liu, Dolan-Gavitt and Garg, "Fine-Pruning: Defending Against Backdooring Attacks on Deep
Neural Networks" (RAID 2018), Section 3: channels of the last convolutional layer that
clean inputs leave dormant are where a backdoor hides; pruning them in increasing order of
mean clean activation removes the backdoor before clean accuracy falls much.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from .. import _backend  # noqa: F401
from ..errors import ModelError
from ..formats.data import Dataset
from ..metrics import goodnet_predict
from ..nets.models import ChannelChain, channel_chain, crossing_tensors, num_classes, pooling_after, prune_channels

__all__ = [
    "ChannelRanking",
    "Selection",
    "SweepResult",
    "SweepStep",
    "extend_sweep",
    "prune_sweep",
    "rank_channels",
    "select_threshold",
]

log = logging.getLogger(__name__)

RankAt = Literal["pooled", "conv"]
Engine = Literal["fast", "plain"]

@dataclass(frozen=True, eq=False)
class ChannelRanking:
    """Channels of a conv layer ordered for pruning.

    Attributes:
        layer: the pruned conv layer.
        measured_at: the layer whose output was averaged (the conv layer or its pooling).
        mean_activation: (C,) float64 mean activation per channel on the clean data.
        order: (C,) int64 channel indices in pruning order (ties broken by index).
        descending: whether the most active channels come first.
    """

    layer: str
    measured_at: str
    mean_activation: np.ndarray
    order: np.ndarray
    descending: bool = False


@dataclass(frozen=True)
class SweepStep:
    """The state after ``channels_pruned`` channels are pruned (0 = the BadNet B).

    ``metrics`` maps each evaluated set's name to the percentage of its predictions equal
    to its labels: clean accuracy for clean sets, attack success rate for poisoned sets.
    """

    channels_pruned: int
    channel: int | None
    fraction_pruned: float
    metrics: Mapping[str, float]


@dataclass(frozen=True)
class Selection:
    """B'_X: the first sweep step whose validation accuracy is >= X points below B's."""

    threshold: float
    channels_pruned: int
    channels: tuple[int, ...]
    valid_accuracy: float
    accuracy_drop: float


@dataclass(frozen=True, eq=False)
class SweepResult:
    """Everything a pruning sweep measured.

    Attributes:
        ranking: the channel order used.
        valid_set: name of the clean validation set that drives the stop rule.
        kinds: set name -> ``"clean"`` or ``"poisoned"``.
        steps: C+1 steps, from 0 channels pruned (B) to all C.
        predictions: set name -> (C+1, N) int32 class predictions at every step.
        labels: set name -> (N,) int64 labels (the target class for poisoned sets).
        num_classes: N, the classes of B (G's alarm class is N).
        selections: threshold X -> Selection, or None where accuracy never fell X points.
        engine: ``"fast"`` or ``"plain"``.
    """

    ranking: ChannelRanking
    valid_set: str
    kinds: Mapping[str, str]
    steps: tuple[SweepStep, ...]
    predictions: Mapping[str, np.ndarray]
    labels: Mapping[str, np.ndarray]
    num_classes: int
    selections: Mapping[float, Selection | None] = field(default_factory=dict)
    engine: str = "fast"

    @property
    def layer(self) -> str:
        return self.ranking.layer

    def channels_at(self, drop: float) -> tuple[int, ...]:
        """The channels B'_drop prunes (the first step ``drop`` points below B), or every channel
        where accuracy never fell that far; ``drop`` must be one of the sweep's thresholds."""
        if float(drop) not in self.selections:
            raise ValueError(f"the sweep has no threshold {drop:g}; it has {', '.join(map(str, self.selections))}")
        sel = self.selections[float(drop)]
        return tuple(int(c) for c in (sel.channels if sel is not None else self.ranking.order))

    def metric(self, name: str) -> np.ndarray:
        """(C+1,) percentage of ``name``'s predictions equal to its labels, per step."""
        return np.array([s.metrics[name] for s in self.steps])

    def goodnet_predictions(self, name: str, step: int) -> np.ndarray:
        """(N,) classes G outputs on set ``name`` with B' = the model at ``step``."""
        p = self.predictions[name]
        return goodnet_predict(p[0], p[step], self.num_classes)

    def goodnet_metric(self, name: str, *, what: str = "match") -> np.ndarray:
        """(C+1,) G's percentage per step on ``name``.

        ``what="match"``: outputs equal to the labels (accuracy, or ASR on poisoned sets);
        ``what="alarm"``: outputs equal to the alarm class N (detection rate on poisoned
        sets, false-alarm rate on clean sets).
        """
        p = self.predictions[name]
        g = goodnet_predict(p[0], p, self.num_classes)
        hit = g == self.labels[name] if what == "match" else g == self.num_classes
        return 100.0 * hit.mean(axis=1)

    def select(self, threshold: float) -> Selection | None:
        """The first step whose validation accuracy is at least ``threshold`` points below B's."""
        return select_threshold(
            self.predictions[self.valid_set], self.labels[self.valid_set], self.ranking.order, threshold
        )


def select_threshold(
    valid_predictions: np.ndarray, valid_labels: np.ndarray, order: np.ndarray, threshold: float
) -> Selection | None:
    """Apply the stop rule to per-step validation predictions.

    Compares correct-prediction counts in integers (drop * 100 >= X * N), so a drop of
    exactly X points counts, with no float rounding at the boundary.

    Args:
        valid_predictions: (C+1, N) predictions per step, step 0 being B.
        valid_labels: (N,) labels.
        order: (C,) pruning order.
        threshold: X, in percentage points; must be >= 0.

    Returns:
        The Selection, or None if no step falls that far.
    """
    x = float(threshold)
    if not np.isfinite(x) or x < 0:
        raise ValueError(f"threshold must be a number >= 0, not {threshold!r}")
    n = valid_labels.shape[0]
    correct = (valid_predictions == valid_labels[None, :]).sum(axis=1).astype(np.int64)
    drops = (correct[0] - correct[1:]) * 100
    hits = np.flatnonzero(drops >= x * n)
    if hits.size == 0:
        return None
    k = int(hits[0]) + 1
    return Selection(
        threshold=x,
        channels_pruned=k,
        channels=tuple(int(c) for c in order[:k]),
        valid_accuracy=float(100.0 * correct[k] / n),
        accuracy_drop=float(100.0 * (correct[0] - correct[k]) / n),
    )


# ----------------------------------------------------------------------------- helpers


def _single_io(model: Any) -> None:
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise ModelError(f"model {model.name!r} must have one input and one output for pruning")


def _compiled(fn_model: Any, *, argmax: bool) -> Callable[..., Any]:
    """A fast batched call of a Keras model of one or more inputs (traced once under TensorFlow)."""
    import keras

    many = len(fn_model.inputs) > 1
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        # One trace per model is expected (the plain engine builds a model per step).
        tf.get_logger().setLevel("ERROR")
        spec = [tf.TensorSpec([None, *t.shape[1:]], tf.float32) for t in fn_model.inputs]

        def call(*xs: Any) -> Any:
            out = fn_model(list(xs) if many else xs[0], training=False)
            if argmax:
                return tf.argmax(out, axis=-1, output_type=tf.int32)
            return out

        traced = tf.function(call, input_signature=spec, reduce_retracing=True)

        def run(*xs: np.ndarray) -> Any:
            out = traced(*(np.ascontiguousarray(x, dtype=np.float32) for x in xs))
            return tf.nest.map_structure(lambda t: t.numpy(), out)

        return run

    def run_eager(*xs: np.ndarray) -> Any:
        arrays = [np.asarray(x, dtype=np.float32) for x in xs]
        out = fn_model(arrays if many else arrays[0], training=False)
        if argmax:
            return keras.ops.convert_to_numpy(keras.ops.argmax(out, axis=-1)).astype(np.int32)
        return keras.tree.map_structure(keras.ops.convert_to_numpy, out)

    return run_eager


def _predict_all(fn: Callable[[np.ndarray], np.ndarray], x: np.ndarray, batch_size: int) -> np.ndarray:
    out = np.empty(len(x), dtype=np.int32)
    for i in range(0, len(x), batch_size):
        out[i : i + batch_size] = fn(x[i : i + batch_size])
    return out


def _means_from_batches(batches: Any, channels: int) -> np.ndarray:
    total = np.zeros(channels, dtype=np.float64)
    count = 0
    for b in batches:
        b = np.asarray(b, dtype=np.float64)
        total += b.reshape(-1, channels).sum(axis=0)
        count += b.size // channels
    if count == 0:
        raise ValueError("cannot rank channels on an empty data set")
    return total / count


def _ranking(layer: str, at_name: str, means: np.ndarray, descending: bool) -> ChannelRanking:
    order = np.argsort(-means if descending else means, kind="stable").astype(np.int64)
    return ChannelRanking(layer=layer, measured_at=at_name, mean_activation=means, order=order,
                          descending=descending)


def _measure_layer(model: Any, chain: ChannelChain, at: RankAt) -> Any:
    """The layer whose output ranks the channels: the pooling after the chain, or its end."""
    if at not in ("pooled", "conv"):
        raise ValueError(f"at must be 'pooled' or 'conv', not {at!r}")
    if at == "conv":
        return chain.end
    pool = pooling_after(model, chain.conv.name)
    if pool is None:
        log.warning("layer %r is not followed by a pooling layer; ranking at %r", chain.conv.name, chain.end.name)
        return chain.end
    return pool


def rank_channels(
    model: Any,
    data: Dataset | np.ndarray,
    *,
    layer: str | None = None,
    at: RankAt = "pooled",
    descending: bool = False,
    batch_size: int = 1024,
) -> ChannelRanking:
    """Rank a conv layer's channels by mean activation on clean data.

    Fine-Pruning (Liu et al., RAID 2018): channels that clean inputs rarely activate are
    pruned first. By default the activation is read at the pooling layer that follows the
    conv layer (conv_3 at pool_3, as the lab and its solutions do); the conv's activation is
    read after its per-channel layers (BatchNormalization, activation), see
    :func:`~badnet_repair.nets.models.channel_chain`.

    Args:
        model: the BadNet B.
        data: clean validation images (N, H, W, C), or a Dataset.
        layer: the conv layer, default :func:`~badnet_repair.nets.models.default_conv_layer`
            (``conv_3`` in DeepID).
        at: ``"pooled"`` (default) or ``"conv"`` (the end of the conv's chain).
        descending: most active first, instead of least active first (default).
        batch_size: images per forward pass, default 1024.

    Returns:
        ChannelRanking with (C,) mean activations and the (C,) pruning order.
    """
    import keras

    _single_io(model)
    chain = channel_chain(model, layer)
    target = _measure_layer(model, chain, at)
    x = data.x if isinstance(data, Dataset) else np.asarray(data, dtype=np.float32)
    fn = _compiled(keras.Model(model.inputs[0], target.output), argmax=False)
    means = _means_from_batches((fn(x[i : i + batch_size]) for i in range(0, len(x), batch_size)),
                                int(chain.conv.filters))
    return _ranking(chain.conv.name, target.name, means, descending)


# ----------------------------------------------------------------------------- engines


class _ActivationCache:
    """One set's activations at the cut (and the tensors crossing it), kept so each step
    re-runs only the tail."""

    def __init__(self, acts: np.ndarray, crossing: list[np.ndarray], fill: np.ndarray, batch_size: int) -> None:
        self.acts = acts
        self.crossing = crossing
        # active[n, c]: channel c of input n differs from its pruned value somewhere;
        # where it does not, pruning c cannot change that input's prediction.
        self.active = np.zeros((acts.shape[0], acts.shape[-1]), dtype=bool)
        spatial = tuple(range(1, acts.ndim - 1))
        for i in range(0, acts.shape[0], batch_size):
            self.active[i : i + batch_size] = (acts[i : i + batch_size] != fill).any(axis=spatial)


def _sweep_fast(
    model: Any, chain: ChannelChain, sets: Mapping[str, Dataset], ranking: ChannelRanking | None,
    at: RankAt, descending: bool, batch_size: int, progress: bool,
) -> tuple[ChannelRanking, dict[str, np.ndarray]]:
    import keras

    cut = chain.end.output
    # the tail takes the cut and every tensor that goes around it (skip connections)
    crossing = crossing_tensors(model, cut)
    head = _compiled(keras.Model(model.inputs[0], [cut, *crossing, model.outputs[0]]), argmax=False)
    tail = _compiled(keras.Model([cut, *crossing], model.outputs[0]), argmax=True)
    fill = chain.pruned_value()
    channels = int(chain.conv.filters)
    caches: dict[str, _ActivationCache] = {}
    preds: dict[str, np.ndarray] = {}
    for name, ds in sets.items():
        n = len(ds)
        acts = np.empty((n, *cut.shape[1:]), dtype=np.float32)
        around = [np.empty((n, *t.shape[1:]), dtype=np.float32) for t in crossing]
        preds[name] = np.empty((channels + 1, n), dtype=np.int32)
        for i in range(0, n, batch_size):
            a, *others, p = head(ds.x[i : i + batch_size])
            acts[i : i + len(a)] = a
            for store, o in zip(around, others, strict=True):
                store[i : i + len(a)] = o
            preds[name][0, i : i + len(a)] = np.argmax(p, axis=-1)
        caches[name] = _ActivationCache(acts, around, fill, batch_size)
    if ranking is None:
        valid = caches[next(iter(sets))].acts
        target = _measure_layer(model, chain, at)
        if target is chain.end:
            batches: Any = (valid[i : i + batch_size] for i in range(0, len(valid), batch_size))
        else:
            # Pooling has no weights; an eager call per batch adds no graph nodes.
            batches = (keras.ops.convert_to_numpy(target(valid[i : i + batch_size]))
                       for i in range(0, len(valid), batch_size))
        ranking = _ranking(chain.conv.name, target.name, _means_from_batches(batches, channels), descending)
    steps = _progress(ranking.order, progress, chain.conv.name)
    for k, c in enumerate(steps, start=1):
        for name, cache in caches.items():
            cur = preds[name][k]
            cur[:] = preds[name][k - 1]
            cache.acts[..., c] = fill[c]
            rows = np.flatnonzero(cache.active[:, c])
            for i in range(0, rows.size, batch_size):
                r = rows[i : i + batch_size]
                cur[r] = tail(cache.acts[r], *(t[r] for t in cache.crossing))
    return ranking, preds


def _sweep_plain(
    model: Any, conv: Any, sets: Mapping[str, Dataset], ranking: ChannelRanking,
    batch_size: int, progress: bool,
) -> dict[str, np.ndarray]:
    """The obviously-correct reference: at every step, a pruned copy runs the whole network."""
    channels = int(conv.filters)
    preds = {name: np.empty((channels + 1, len(ds)), dtype=np.int32) for name, ds in sets.items()}
    base = _compiled(model, argmax=True)
    for name, ds in sets.items():
        preds[name][0] = _predict_all(base, ds.x, batch_size)
    for k in _progress(range(1, channels + 1), progress, f"{conv.name} (plain)"):
        pruned = _compiled(prune_channels(model, conv.name, ranking.order[:k]), argmax=True)
        for name, ds in sets.items():
            preds[name][k] = _predict_all(pruned, ds.x, batch_size)
    return preds


def _progress(it: Any, progress: bool, what: str) -> Any:
    if not progress:
        return it
    from ..progress import bar

    return bar(it, desc=f"pruning {what}", unit="channel")


def prune_sweep(
    model: Any,
    valid: Dataset,
    *,
    others: Mapping[str, Dataset] | None = None,
    poisoned: Collection[str] = (),
    layer: str | None = None,
    thresholds: Sequence[float] = (2.0, 4.0, 10.0),
    ranking: ChannelRanking | None = None,
    at: RankAt = "pooled",
    descending: bool = False,
    engine: Engine = "fast",
    batch_size: int = 1024,
    valid_name: str = "valid",
    progress: bool = False,
) -> SweepResult:
    """Prune a conv layer's channels one at a time and measure every set at every step.

    The pruning defense of Liu, Dolan-Gavitt and Garg ("Fine-Pruning", RAID 2018):
    channels are pruned cumulatively in ranking order until all are gone; for each X in
    ``thresholds``, B'_X is the first step whose clean validation accuracy is at least X
    points below B's.

    The ``"fast"`` engine runs the network up to ``layer`` once, caches that layer's
    activations, and at each step re-runs only the rest of the network, only for inputs on
    which the newly pruned channel was not already constant. It cuts the network after the
    conv's per-channel layers (BatchNormalization, activation) and carries every tensor that
    goes around the cut (skip connections), so it works on residual and BN networks. Its predictions equal the
    ``"plain"`` engine's (clone, zero the channels, run the whole model) up to flips
    between classes whose scores tie within float32 rounding.

    Args:
        model: the BadNet B (not modified).
        valid: clean validation data; ranks the channels and drives the stop rule.
        others: more sets to measure at every step, by name (poisoned validation, test...).
        poisoned: names in ``others`` that hold poisoned inputs labelled with the target.
        layer: the conv layer to prune, default
            :func:`~badnet_repair.nets.models.default_conv_layer` (``conv_3`` in DeepID).
        thresholds: the accuracy drops X, in points, default (2, 4, 10).
        ranking: a precomputed ranking; by default ranked on ``valid`` (see ``at``).
        at: where activations are averaged for ranking, ``"pooled"`` (default) or ``"conv"``.
        descending: prune the most active channels first.
        engine: ``"fast"`` (default) or ``"plain"``.
        batch_size: inputs per forward pass, default 1024.
        valid_name: the name of ``valid`` in the results, default ``"valid"``.
        progress: show a tqdm progress bar.

    Returns:
        SweepResult with C+1 steps and (C+1, N) predictions per set.
    """
    _single_io(model)
    chain = channel_chain(model, layer)
    conv = chain.conv
    others = dict(others or {})
    if valid_name in others:
        raise ValueError(f"a set in others is named {valid_name!r}, the validation set's name")
    unknown = set(poisoned) - set(others)
    if unknown:
        raise ValueError(f"poisoned names {sorted(unknown)} are not in others")
    sets: dict[str, Dataset] = {valid_name: valid, **others}
    for name, ds in sets.items():
        if len(ds) == 0:
            raise ValueError(f"set {name!r} is empty")
    for x in thresholds:
        select_threshold(np.zeros((2, 1)), np.zeros(1), np.zeros(1), x)  # validates x
    channels = int(conv.filters)
    if engine == "fast":
        ranking, preds = _sweep_fast(model, chain, sets, ranking, at, descending, batch_size, progress)
    elif engine == "plain":
        if ranking is None:
            ranking = rank_channels(model, valid, layer=conv.name, at=at, descending=descending,
                                    batch_size=batch_size)
        preds = _sweep_plain(model, conv, sets, ranking, batch_size, progress)
    else:
        raise ValueError(f"engine must be 'fast' or 'plain', not {engine!r}")
    if sorted(int(c) for c in ranking.order) != list(range(channels)):
        raise ValueError(f"ranking order must be a permutation of the {channels} channels of {conv.name!r}")
    labels = {name: ds.y for name, ds in sets.items()}
    kinds = {name: ("poisoned" if name in poisoned else "clean") for name in sets}
    selections = {
        float(x): select_threshold(preds[valid_name], labels[valid_name], ranking.order, x)
        for x in thresholds
    }
    for x, sel in selections.items():
        if sel is None:
            log.warning("validation accuracy never fell %g points below B's; no B' for X=%g", x, x)
    return _result(ranking, valid_name, kinds, preds, labels, num_classes(model), selections, engine)


def extend_sweep(
    model: Any,
    sweep: SweepResult,
    others: Mapping[str, Dataset],
    *,
    poisoned: Collection[str] = (),
    batch_size: int = 1024,
    progress: bool = False,
) -> SweepResult:
    """The same sweep measured on more sets, without sweeping its sets again.

    The workflow's order (repair on clean data, then evaluate) needs the steps of a finished
    sweep on the test and poisoned sets: this runs ``sweep``'s ranking, engine and steps on
    ``others`` only and joins them to what ``sweep`` already measured. Its predictions on
    ``others`` equal those of one :func:`prune_sweep` over every set.

    Args:
        model: the BadNet B the sweep was run on (not modified).
        sweep: a finished sweep (the repair's: ranking, selections and its sets' predictions).
        others: more sets by name; none may share a name with a set of ``sweep``.
        poisoned: names in ``others`` that hold poisoned inputs labelled with the target.
        batch_size: inputs per forward pass, default 1024.
        progress: show a tqdm progress bar.

    Returns:
        A SweepResult with every set of ``sweep`` and of ``others``; the ranking, the
        selections and the stop rule's set are ``sweep``'s.
    """
    _single_io(model)
    others = dict(others)
    clash = set(others) & set(sweep.kinds)
    if clash:
        raise ValueError(f"sets {sorted(clash)} were measured by the sweep already")
    unknown = set(poisoned) - set(others)
    if unknown:
        raise ValueError(f"poisoned names {sorted(unknown)} are not in others")
    for name, ds in others.items():
        if len(ds) == 0:
            raise ValueError(f"set {name!r} is empty")
    chain = channel_chain(model, sweep.layer)
    preds = dict(sweep.predictions)
    if others:
        if sweep.engine == "fast":
            _, more = _sweep_fast(model, chain, others, sweep.ranking, "pooled", sweep.ranking.descending,
                                  batch_size, progress)
        else:
            more = _sweep_plain(model, chain.conv, others, sweep.ranking, batch_size, progress)
        preds.update(more)
    labels = {**sweep.labels, **{name: ds.y for name, ds in others.items()}}
    kinds = {**sweep.kinds, **{name: ("poisoned" if name in poisoned else "clean") for name in others}}
    return _result(sweep.ranking, sweep.valid_set, kinds, preds, labels, sweep.num_classes, sweep.selections,
                   sweep.engine)


def _result(ranking: ChannelRanking, valid_name: str, kinds: Mapping[str, str], preds: Mapping[str, np.ndarray],
            labels: Mapping[str, np.ndarray], n_classes: int, selections: Mapping[float, Selection | None],
            engine: str) -> SweepResult:
    """A SweepResult from per-step predictions: each step's metrics computed from them."""
    channels = len(ranking.order)
    steps = tuple(
        SweepStep(
            channels_pruned=k,
            channel=None if k == 0 else int(ranking.order[k - 1]),
            fraction_pruned=k / channels,
            metrics={name: float(100.0 * np.mean(preds[name][k] == labels[name])) for name in kinds},
        )
        for k in range(channels + 1)
    )
    return SweepResult(
        ranking=ranking, valid_set=valid_name, kinds=dict(kinds), steps=steps, predictions=dict(preds),
        labels=dict(labels), num_classes=n_classes, selections=dict(selections), engine=engine,
    )
