"""Models: the DeepID architecture, safe loading, saving, and channel pruning surgery."""

from __future__ import annotations

import json
import logging
import os
import re
import weakref
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from .. import _backend  # noqa: F401  (quiet TensorFlow before Keras loads it)
from ..defaults import ENSEMBLE_MEANS, parse_input_scale
from ..errors import ModelError, UnsafeModelError
from ..formats.files import atomic_path, check_writable

__all__ = [
    "GATE_SHARPNESS",
    "INPUT_SCALE_LAYER",
    "TRACE_AFTER",
    "ChannelChain",
    "as_functional",
    "body_layer",
    "channel_chain",
    "classifier_head",
    "common_input_scale",
    "conv_layer",
    "crossing_tensors",
    "deepid",
    "default_conv_layer",
    "first_dense_layers",
    "inference_call",
    "inline_copy",
    "inline_model",
    "input_scale_of",
    "keras2_config",
    "load_model",
    "num_classes",
    "pooling_after",
    "predict_classes",
    "predict_probabilities",
    "project_dense_inputs",
    "prune_channels",
    "reinitialize_head",
    "save_model",
    "save_weights_h5",
    "saved_model_paths",
    "weight_soup",
    "with_gated_scores",
    "with_input_scale",
    "with_linear_scores",
    "with_trainable_names",
    "without_input_scale",
    "zero_channels",
    "zero_kernel_entries",
]

log = logging.getLogger(__name__)

# Layer types whose config is pure data. Anything else (Lambda, unregistered custom
# classes) may carry or need code, so loading it needs the user's explicit trust.
_CONTAINERS = {"Functional", "Model", "Sequential"}


def deepid(
    num_classes: int = 1283,
    *,
    input_shape: tuple[int, int, int] = (55, 47, 3),
    name: str = "deepid",
) -> Any:
    """Build the lab's DeepID face classifier with the lab's layer names.

    Sun, Wang and Tang, "Deep Learning Face Representation from Predicting 10,000
    Classes" (CVPR 2014), as used by the CSAW-HackML lab: conv_1 (20, 4x4), pool_1,
    conv_2 (40, 3x3), pool_2, conv_3 (60, 3x3), pool_3; fc_1 on flatten(pool_3) and
    conv_4 (80, 2x2) -> flatten -> fc_2; add, relu, softmax output.

    Args:
        num_classes: output classes, default 1283 (the lab's YouTube Faces identities).
        input_shape: (H, W, C), default (55, 47, 3).
        name: model name.

    Returns:
        An uncompiled ``keras.Model`` mapping (N, H, W, C) float32 in 0..255 to
        (N, num_classes) softmax probabilities.
    """
    import keras
    from keras import layers

    x = keras.Input(shape=input_shape, name="input")
    h = layers.Conv2D(20, 4, activation="relu", name="conv_1")(x)
    h = layers.MaxPooling2D(2, name="pool_1")(h)
    h = layers.Conv2D(40, 3, activation="relu", name="conv_2")(h)
    h = layers.MaxPooling2D(2, name="pool_2")(h)
    h = layers.Conv2D(60, 3, activation="relu", name="conv_3")(h)
    p3 = layers.MaxPooling2D(2, name="pool_3")(h)
    c4 = layers.Conv2D(80, 2, activation="relu", name="conv_4")(p3)
    f1 = layers.Dense(160, name="fc_1")(layers.Flatten(name="flatten_1")(p3))
    f2 = layers.Dense(160, name="fc_2")(layers.Flatten(name="flatten_2")(c4))
    h = layers.Activation("relu", name="activation_1")(layers.Add(name="add_1")([f1, f2]))
    out = layers.Dense(num_classes, activation="softmax", name="output")(h)
    return keras.Model(x, out, name=name)


def num_classes(model: Any) -> int:
    """Return the size of the model's (single) output's last axis."""
    return int(model.outputs[0].shape[-1])


def load_data_for(model: Any, path: str | os.PathLike[str], **options: Any) -> Any:
    """Load a lab-format HDF5 file for ``model``: labels checked against its class count and
    images against its input shape, so a mismatch is one clear :class:`DataError`.

    Args:
        model: the network the data is for.
        path: the ``.h5`` file.
        **options: passed to :func:`~badnet_repair.formats.data.load_h5` (name, lazy, layout, ...).

    Returns:
        Dataset with (N, H, W, C) float32 images and (N,) int64 labels.
    """
    from ..formats.data import load_h5

    h, w, c = (int(d) for d in model.inputs[0].shape[1:])
    return load_h5(path, num_classes=num_classes(model), image_shape=(h, w, c), **options)


_CONVS = ("Conv1D", "Conv2D", "Conv3D")
# Layers that act on each channel alone (at inference): a pruned channel stays pruned through
# them, so they belong to the channel's chain and the fast sweep cuts after them.
_PER_CHANNEL = ("BatchNormalization", "Activation", "ReLU", "LeakyReLU", "PReLU", "ELU", "Dropout",
                "SpatialDropout1D", "SpatialDropout2D", "SpatialDropout3D", "GaussianNoise",
                "GaussianDropout", "AlphaDropout", "ActivityRegularization")
_POOLING = ("MaxPooling1D", "MaxPooling2D", "MaxPooling3D", "AveragePooling1D", "AveragePooling2D",
            "AveragePooling3D", "GlobalMaxPooling1D", "GlobalMaxPooling2D", "GlobalMaxPooling3D",
            "GlobalAveragePooling1D", "GlobalAveragePooling2D", "GlobalAveragePooling3D")


def _is_conv(layer: Any) -> bool:
    from keras import layers

    return isinstance(layer, (layers.Conv1D, layers.Conv2D, layers.Conv3D))


def _consumers(model: Any, layer: Any, ours: set[int] | None = None) -> list[Any]:
    """The layers of ``model`` that take ``layer``'s output (``ours``: the ids of ``model.layers``,
    for callers that ask for many layers)."""
    ours = {id(lyr) for lyr in model.layers} if ours is None else ours
    found = {id(n.operation): n.operation for n in getattr(layer, "_outbound_nodes", [])
             if id(n.operation) in ours}
    return list(found.values())


def _called_once(model: Any, layer: Any) -> bool:
    """Whether ``layer`` is called at most once in ``model``'s own graph (calls of the same layer
    object in other graphs, such as a network built on B's layers, do not count)."""
    by_depth = getattr(model, "_nodes_by_depth", None)
    if by_depth:
        graph = {id(n) for nodes in by_depth.values() for n in nodes}
        return sum(1 for n in getattr(layer, "_inbound_nodes", []) if id(n) in graph) <= 1
    ours = {id(lyr) for lyr in model.layers}
    return sum(1 for n in getattr(layer, "_inbound_nodes", []) if id(n.operation) in ours) <= 1


def as_functional(model: Any) -> Any:
    """``model`` as a functional model with the same weights: a Sequential one rebuilt from fresh
    copies of its layers, each called once (pruning cuts the graph at a layer, and a loaded
    Sequential model's layers carry one call per rebuild of its graph); any other model as it is."""
    import keras

    graph = getattr(model, "_functional", None)
    if not isinstance(model, keras.Sequential) or graph is None:
        return model
    clone = keras.models.clone_model(graph)
    clone.set_weights(model.get_weights())
    # one tensor each, not lists of one: a list-shaped input refuses a single tensor when the graph is cloned onto one
    inputs = clone.inputs[0] if len(clone.inputs) == 1 else clone.inputs
    outputs = clone.outputs[0] if len(clone.outputs) == 1 else clone.outputs
    return keras.Model(inputs, outputs, name=model.name)


def _shaped_as_input(model: Any, x: Any) -> Any:
    """``x``, a single tensor, in the structure of ``model``'s input (a list of one where a model was
    built from a list of inputs): what ``keras.models.clone_model`` takes as ``input_tensors``."""
    return [x] if isinstance(model.input, (list, tuple)) else x


def _graph_model(model: Any) -> Any:
    """``model``, checked to be a graph the surgery can address layer by layer."""
    import keras

    if isinstance(model, keras.Sequential):
        raise ModelError(f"model {model.name!r} is a Sequential model; pass "
                         "badnet_repair.nets.models.as_functional(model) (load_model does this for files)")
    return model


def _named_layer(model: Any, layer: str) -> Any:
    """``model``'s layer called ``layer``, or an error that lists the names it has."""
    try:
        return model.get_layer(layer)
    except ValueError:
        names = ", ".join(lyr.name for lyr in model.layers)
        raise ModelError(f"model {model.name!r} has no layer named {layer!r}; layers: {names}") from None


def conv_layer(model: Any, layer: str | None = None) -> Any:
    """Return the convolution layer called ``layer`` (default: :func:`default_conv_layer`),
    with a clear error if it is not one."""
    if layer is None:
        return model.get_layer(default_conv_layer(model))
    found = _named_layer(_graph_model(model), layer)
    if not _is_conv(found):
        raise ModelError(
            f"layer {layer!r} of model {model.name!r} is a {type(found).__name__}, not a "
            "convolution layer; the pruning defense prunes the channels of a Conv layer"
        )
    if getattr(found, "data_format", "channels_last") != "channels_last":
        raise ModelError(f"layer {layer!r} of model {model.name!r} is channels_first; only channels_last "
                         "convolutions can be pruned")
    if not _called_once(model, found):
        raise ModelError(f"layer {layer!r} of model {model.name!r} is shared (called more than once); "
                         "pruning it would prune every use")
    return found


def _layers_in_order(model: Any) -> list[Any]:
    """The model's layers from input to output (a topological order of its graph)."""
    by_depth = getattr(model, "_nodes_by_depth", None)
    if not by_depth:
        return list(model.layers)
    seen: dict[int, Any] = {}
    for depth in sorted(by_depth, reverse=True):
        for node in by_depth[depth]:
            seen.setdefault(id(node.operation), node.operation)
    return list(seen.values())


def default_conv_layer(model: Any) -> str:
    """The conv layer the pruning defense prunes by default, found from the graph.

    The last convolution whose output (through its per-channel layers, see
    :func:`channel_chain`) goes into a pooling layer, as ``conv_3`` -> ``pool_3`` in the
    lab's DeepID (Liu et al. prune its last pooled conv layer) or the last conv block of VGG-
    and MobileNet-style networks; where none does, the last convolution (ResNets).

    Returns:
        The layer's name.
    """
    order = _layers_in_order(_graph_model(model))
    convs = [lyr for lyr in order if _is_conv(lyr) and _called_once(model, lyr)]
    if not convs:
        raise ModelError(f"model {model.name!r} has no convolution layer to prune")
    pooled = [c for c in convs if _pooling_of(model, c) is not None]
    candidates = pooled or convs
    chosen = candidates[-1]
    # parallel branches: other candidates that no candidate follows are as "last" as the chosen one
    followed = _followed_by_any(model, order, candidates)
    peers = [c for c in candidates[:-1] if id(c) not in followed]
    if peers:
        log.warning("model %r has %d last conv layers in parallel branches (%s); pruning %r (choose with --layer)",
                    model.name, len(peers) + 1, ", ".join(lyr.name for lyr in [*peers, chosen]), chosen.name)
    return str(chosen.name)


def _followed_by_any(model: Any, order: list[Any], layers: list[Any]) -> set[int]:
    """The ids of those of ``layers`` whose output another of them takes, directly or not.

    One pass over the graph from output to input (``order``, :func:`_layers_in_order`: a
    layer's consumers come after it), so deep networks with hundreds of convolutions cost one walk.
    """
    ours = {id(lyr) for lyr in model.layers}
    wanted = {id(lyr) for lyr in layers}
    leads_to_one: dict[int, bool] = {}  # a layer's output reaches one of ``layers``
    for lyr in reversed(order):
        leads_to_one[id(lyr)] = any(id(n) in wanted or leads_to_one.get(id(n), False)
                                    for n in _consumers(model, lyr, ours))
    return {i for i in wanted if leads_to_one.get(i, False)}


@dataclass(frozen=True, eq=False)
class ChannelChain:
    """A conv layer and the per-channel layers that alone take its output, in order.

    Pruning a channel zeroes it along the whole chain (:func:`prune_channels`), so the
    chain's last layer outputs a constant for it (0 for ReLU-like activations); the
    pruning sweep caches activations at that last layer.

    Attributes:
        conv: the convolution layer.
        layers: the BatchNormalization / activation / dropout layers after it, in order.
    """

    conv: Any
    layers: tuple[Any, ...]

    @property
    def end(self) -> Any:
        """The chain's last layer (the conv itself when nothing follows it per channel)."""
        return self.layers[-1] if self.layers else self.conv

    def pruned_value(self) -> np.ndarray:
        """(C,) float32: what each channel outputs at :attr:`end` once pruned (inference)."""
        import keras

        c = int(self.conv.filters)
        shape = (1,) * (len(self.conv.output.shape) - 1) + (c,)
        v = keras.ops.convert_to_numpy(self.conv.activation(keras.ops.zeros(shape)))
        for lyr in self.layers:
            if type(lyr).__name__ == "BatchNormalization":
                # moving mean, gamma and beta are zeroed: (v - 0) * (0 or 1) / sqrt(var + eps) + 0
                if lyr.scale:
                    v = v * 0.0
                else:
                    var = keras.ops.convert_to_numpy(lyr.moving_variance)
                    v = v / np.sqrt(var + lyr.epsilon)
            else:
                v = keras.ops.convert_to_numpy(lyr(keras.ops.convert_to_tensor(v), training=False))
        return np.asarray(v, np.float32).reshape(c)


def channel_chain(model: Any, layer: str | None = None) -> ChannelChain:
    """The chain of ``layer`` (default :func:`default_conv_layer`) in ``model``: the conv and
    each following layer that acts per channel and is the only taker of the one before."""
    conv = conv_layer(model, layer)
    chain: list[Any] = []
    cur = conv
    while True:
        nxt = _consumers(model, cur)
        if len(nxt) != 1 or type(nxt[0]).__name__ not in _PER_CHANNEL or not _called_once(model, nxt[0]):
            break
        lyr = nxt[0]
        if type(lyr).__name__ == "BatchNormalization" and lyr.axis not in (-1, len(lyr.output.shape) - 1):
            break
        chain.append(lyr)
        cur = lyr
    return ChannelChain(conv=conv, layers=tuple(chain))


def _pooling_of(model: Any, conv: Any) -> Any | None:
    """The pooling layer that alone takes the output of ``conv``'s chain, if any."""
    end = channel_chain(model, conv.name).end
    nxt = _consumers(model, end)
    if len(nxt) == 1 and type(nxt[0]).__name__ in _POOLING:
        return nxt[0]
    return None


def pooling_after(model: Any, layer: str | None = None) -> Any | None:
    """The pooling layer that alone takes the output of ``layer``'s chain, or None."""
    return _pooling_of(model, conv_layer(model, layer))


def crossing_tensors(model: Any, cut: Any) -> list[Any]:
    """The tensors that the part of ``model`` after ``cut`` needs besides ``cut`` itself.

    Computations that depend on the tensor ``cut`` may also take tensors computed without it
    (a skip connection around the pruned layer, or the model's input): running the model's
    tail from ``cut`` needs those too. In graph order, without duplicates.
    """
    by_depth = getattr(model, "_nodes_by_depth", None)
    if not by_depth:
        raise ModelError(f"model {model.name!r} is not a functional graph; cannot cut it at a layer")
    dependent = {id(cut)}
    crossing: dict[int, Any] = {}
    for depth in sorted(by_depth, reverse=True):  # deepest first: producers before takers
        for node in by_depth[depth]:
            ins = list(node.input_tensors)
            if any(id(t) in dependent for t in ins):
                for t in ins:
                    if id(t) not in dependent:
                        crossing.setdefault(id(t), t)
                dependent.update(id(t) for t in node.outputs)
    if not any(id(t) in dependent for t in model.outputs):
        raise ModelError(f"model {model.name!r}: its output does not depend on the layer being pruned")
    return list(crossing.values())


# Layers between the classifier's Dense layer and the model's output that change no weights'
# meaning: the softmax may be a separate layer, as may a dropout or a reshape.
_AFTER_HEAD = ("Activation", "Softmax", "Dropout", "Reshape", "Flatten")


def classifier_head(model: Any, layer: str | None = None) -> Any:
    """The linear classifier (the Dense layer that makes the class scores), found from the graph.

    From the model's single output back through layers that hold no weights (a separate
    softmax, dropout) to the first Dense layer, as ``output`` in the lab's DeepID.

    Args:
        model: a Keras functional or sequential model with one output.
        layer: the head's name instead (checked to be a Dense layer).

    Returns:
        The Dense layer.
    """
    from keras import layers

    if layer is not None:
        found = _named_layer(model, layer)
        if not isinstance(found, layers.Dense):
            raise ModelError(f"layer {layer!r} of model {model.name!r} is a {type(found).__name__}, not the "
                             "Dense layer that makes the class scores")
        return found
    if len(model.outputs) != 1:
        raise ModelError(f"model {model.name!r} has {len(model.outputs)} outputs; name its classifier layer")
    current = model.outputs[0]
    for _ in range(len(model.layers) + 1):
        history = getattr(current, "_keras_history", None)
        op = history.operation if history is not None else None
        if op is None:
            break
        if isinstance(op, layers.Dense):
            return op
        if type(op).__name__ not in _AFTER_HEAD or len(op._inbound_nodes) != 1:
            break
        inputs = op._inbound_nodes[0].input_tensors
        if len(inputs) != 1:
            break
        current = inputs[0]
    raise ModelError(f"model {model.name!r}: no Dense layer makes its output (through softmax or dropout "
                     "layers only); name its classifier layer")


def reinitialize_head(model: Any, layer: str | None = None, *, seed: int = 0) -> tuple[str, np.ndarray]:
    """Draw new weights for ``model``'s classifier head in place; return its old kernel.

    The initialisation of Min et al.'s FST code (PyTorch's for a linear layer): kernel and
    bias uniform in ``(-1/sqrt(fan_in), 1/sqrt(fan_in))``. The one place where a head is
    rewritten; callers pass a copy.

    Args:
        model: the network changed.
        layer: the head, default :func:`classifier_head`.
        seed: the draw's seed.

    Returns:
        (the head's name, its kernel before the draw: (features, classes)).
    """
    head = classifier_head(model, layer)
    old = [np.array(w) for w in head.get_weights()]
    bound = 1.0 / np.sqrt(old[0].shape[0])
    rng = np.random.default_rng([seed, 23])
    head.set_weights([rng.uniform(-bound, bound, w.shape).astype(w.dtype) for w in old])
    return str(head.name), old[0]


def _producers(model: Any, layer: Any, ours: set[int]) -> list[Any]:
    """The layers of ``model`` whose outputs ``layer`` takes."""
    found: dict[int, Any] = {}
    for node in getattr(layer, "_inbound_nodes", []):
        if id(node.operation) not in ours:
            continue
        for tensor in node.input_tensors:
            history = getattr(tensor, "_keras_history", None)
            op = history.operation if history is not None else None
            if op is not None and id(op) in ours:
                found[id(op)] = op
    return list(found.values())


def first_dense_layers(model: Any) -> list[str]:
    """The Dense layers that no other Dense layer feeds, directly or not, found from the graph:
    the first dense layers after the conv body, ``fc_1`` and ``fc_2`` in the lab's DeepID (both
    read the flattened conv features), the hidden layer of a conv -> flatten -> dense -> dense
    network, and the classifier itself where the conv features go straight to it. A Dense layer
    applied to a feature map (rank > 2, one output per position) counts as part of the body.

    Returns:
        Their names, in graph order.
    """
    from keras import layers

    model = _graph_model(model)
    ours = {id(lyr) for lyr in model.layers}

    def on_vectors(lyr: Any) -> bool:
        # a Dense layer applied to a feature map acts at each position, as a 1x1 convolution
        # does: part of the body, not a dense layer over the body's features
        return isinstance(lyr, layers.Dense) and len(lyr.input.shape) == 2

    after_dense: dict[int, bool] = {}  # a layer's input passed through a Dense layer
    first: list[str] = []
    for lyr in _layers_in_order(model):
        upstream = _producers(model, lyr, ours)
        fed = any(on_vectors(u) or after_dense.get(id(u), False) for u in upstream)
        after_dense[id(lyr)] = fed
        if on_vectors(lyr) and not fed:
            if not _called_once(model, lyr):
                raise ModelError(f"layer {lyr.name!r} of model {model.name!r} is shared (called more than once)")
            first.append(str(lyr.name))
    return first


def body_layer(model: Any, depth: int) -> str:
    """The convolution ``depth`` places back from the last, found from the graph (1: the last; 2:
    the one before, ``conv_3`` in the lab's DeepID, whose input is ``pool_2``'s output).

    Raises:
        ModelError: where the model has fewer than ``depth`` convolution layers.
    """
    if depth < 1:
        raise ValueError(f"depth must be >= 1, not {depth}")
    graph = _graph_model(model)
    convs = [lyr for lyr in _layers_in_order(graph) if _is_conv(lyr)]
    if len(convs) < depth:
        raise ModelError(f"model {model.name!r} has {len(convs)} convolution layer(s); a depth of {depth} "
                         "counts back further than that")
    return str(convs[-depth].name)


def project_dense_inputs(model: Any, layer: str, mean: np.ndarray, basis: np.ndarray) -> None:
    """Make Dense ``layer`` of ``model`` itself read only the part of its input that lies in the
    span of ``basis`` around ``mean``: its input ``a`` becomes ``mean + P (a - mean)``, folded into
    the weights (kernel ``W`` -> ``P W``, bias ``b`` -> ``b + (mean - P mean) W``), ``P = basis
    basis^T``. Where ``a`` lies in that affine span, the layer's output is unchanged. The one place
    where weights are changed for a projection; callers pass a copy.

    Args:
        model: the network changed.
        layer: a Dense layer's name.
        mean: (d,) the centre, d the layer's input width.
        basis: (d, k) orthonormal columns.
    """
    from keras import layers

    found = _named_layer(_graph_model(model), layer)
    if not isinstance(found, layers.Dense):
        raise ModelError(f"layer {layer!r} of model {model.name!r} is a {type(found).__name__}, not a Dense layer")
    weights = [np.asarray(w) for w in found.get_weights()]
    kernel = weights[0].astype(np.float64)
    mean, basis = np.asarray(mean, np.float64), np.asarray(basis, np.float64)
    if mean.shape != (kernel.shape[0],) or basis.ndim != 2 or basis.shape[0] != kernel.shape[0]:
        raise ModelError(f"layer {layer!r} takes {kernel.shape[0]} inputs; got a centre of shape {mean.shape} "
                         f"and a basis of shape {basis.shape}")
    projected = basis @ (basis.T @ kernel)
    shift = (mean - basis @ (basis.T @ mean)) @ kernel
    weights[0] = projected.astype(weights[0].dtype)
    if found.use_bias:
        weights[1] = (weights[1].astype(np.float64) + shift).astype(weights[1].dtype)
    elif np.any(shift != 0):
        raise ModelError(f"layer {layer!r} has no bias to take the projection's shift; project around 0")
    found.set_weights(weights)


def _free_name(taken: set[str], base: str) -> str:
    """``base``, or ``base_2``, ``base_3``, ... : the first not in ``taken``, which it joins."""
    name, i = base, 1
    while name in taken:
        i += 1
        name = f"{base}_{i}"
    taken.add(name)
    return name


def _scores_beside_head(model: Any, feature_layers: Sequence[str], kernel: np.ndarray, bias: np.ndarray,
                        head_name: str | None = None) -> tuple[Any, set[str], Any, Any, Any]:
    """A copy of ``model`` with two new tensors on its classifier's inputs: the logits ``z`` (the
    classifier's Dense layer without its softmax) and the scores ``f K + c`` on the inputs ``f`` of
    ``feature_layers``. Returns (copy, taken layer names, classifier, z, scores)."""
    import keras

    graph = as_functional(model)
    copy = keras.models.clone_model(graph)
    copy.set_weights(graph.get_weights())
    head = classifier_head(copy, head_name)
    if head.activation not in (keras.activations.softmax, keras.activations.linear):
        raise ModelError(f"model {model.name!r}: its classifier {head.name!r} ends in "
                         f"{getattr(head.activation, '__name__', head.activation)!r}, not softmax; scores cannot be "
                         "added to its logits")
    taken = {str(lyr.name) for lyr in copy.layers}
    logits = keras.layers.Dense(int(head.units), name=_free_name(taken, f"{head.name}_logits"))
    z = logits(head.input)
    logits.set_weights(head.get_weights())
    return copy, taken, head, z, _scores_on(model, copy, taken, int(head.units), feature_layers, kernel, bias)


def _scores_on(model: Any, copy: Any, taken: set[str], classes: int, feature_layers: Sequence[str],
               kernel: np.ndarray, bias: np.ndarray) -> Any:
    """The tensor ``f K + c`` in ``copy``, ``f`` the inputs of ``feature_layers`` (feature maps
    flattened) side by side."""
    import keras

    feats = [_named_layer(copy, n).input for n in feature_layers]
    if not feats or any(len(f.shape) < 2 for f in feats):
        raise ModelError(f"model {model.name!r}: {list(feature_layers)} must name layers whose inputs are batches "
                         "of vectors or feature maps")
    # a feature map is read flattened, as numpy's reshape(N, -1) reads it (channels last, row-major)
    feats = [f if len(f.shape) == 2 else keras.layers.Flatten(name=_free_name(taken, f"{n}_features"))(f)
             for n, f in zip(feature_layers, feats, strict=True)]
    width = sum(int(f.shape[-1]) for f in feats)
    kernel, bias = np.asarray(kernel, np.float32), np.asarray(bias, np.float32)
    if kernel.shape != (width, classes) or bias.shape != (classes,):
        raise ModelError(f"model {model.name!r}: a kernel of shape {(width, classes)} and a bias of ({classes},) "
                         f"are needed, not {kernel.shape} and {bias.shape}")
    f = feats[0] if len(feats) == 1 else keras.layers.Concatenate(name=_free_name(taken, "joined_features"))(feats)
    extra = keras.layers.Dense(classes, name=_free_name(taken, "added_scores"))
    scores = extra(f)
    extra.set_weights([kernel, bias])
    return scores


def with_linear_scores(model: Any, feature_layers: Sequence[str], kernel: np.ndarray, bias: np.ndarray, *,
                       head: str | None = None, name: str | None = None) -> Any:
    """A new model (``model`` is not changed) whose class scores are ``softmax(z + f K + c)``: ``z``
    the classifier's logits (its Dense layer without the softmax; :func:`classifier_head`), ``f``
    the inputs of the Dense layers ``feature_layers`` side by side, ``K`` and ``c`` the given
    kernel and bias. Built of Dense, Concatenate, Add and Activation layers only, so it saves
    and loads as any Keras 2 or 3 model does. The one place where scores are added to a head.

    Args:
        model: the network (B).
        feature_layers: layers whose inputs are read (flattened where they are feature maps), in order.
        kernel: (d, classes), d the sum of those inputs' widths.
        bias: (classes,).
        head: the classifier's name, default None (found from the graph).
        name: the new model's name, default ``model``'s.

    Returns:
        The new keras.Model, same input as ``model``.
    """
    import keras

    copy, taken, _, z, scores = _scores_beside_head(model, feature_layers, kernel, bias, head)
    total = keras.layers.Add(name=_free_name(taken, "summed_logits"))([z, scores])
    out = keras.layers.Activation("softmax", name=_free_name(taken, "scores"))(total)
    return keras.Model(copy.inputs[0], out, name=name or model.name)


#: How sharp the gate's steps are: B's class is read as softmax(GATE_SHARPNESS * z) and the gate
#: is sigmoid(GATE_SHARPNESS * (m - t) / max(|t|, 1)); at 1e4 both are steps in float32 except on
#: ties closer than about 1e-3 of a logit or of the threshold.
GATE_SHARPNESS = 1.0e4


def with_gated_scores(model: Any, feature_layers: Sequence[str], kernel: np.ndarray, bias: np.ndarray,
                      threshold: float, *, head: str | None = None, name: str | None = None,
                      more: Sequence[tuple[Sequence[str], np.ndarray, np.ndarray, float]] = ()) -> Any:
    """A new model (``model`` is not changed) that keeps B's class scores ``softmax(z)`` on an
    input unless other scores ``s = f K + c`` find B's class far off, and then outputs ``softmax(s)``.

    "Far off": the margin ``m = max_k s_k - s_b``, ``b`` B's class (the argmax of ``z``), exceeds
    ``threshold``. ``z`` and ``f`` are as in :func:`with_linear_scores`. Each gate of ``more``
    (feature layers, kernel, bias, threshold) is applied after, on the same ``b``: where its own
    margin exceeds its threshold, its ``softmax(s)`` replaces what the gates before it left. Built
    of Dense, Flatten, Concatenate, Activation, Dot, Reshape, GlobalMaxPooling1D, Subtract, Multiply
    and Add layers only, so it saves and loads as any Keras 2 or 3 model does; the argmax and the
    step are softmax and sigmoid made sharp by :data:`GATE_SHARPNESS`.

    Args:
        model: the network (B).
        feature_layers: layers whose inputs are read (flattened where they are feature maps), in order.
        kernel: (d, classes), d the sum of those inputs' widths.
        bias: (classes,).
        threshold: the margin above which ``softmax(s)`` replaces B's scores.
        head: the classifier's name, default None (found from the graph).
        name: the new model's name, default ``model``'s.
        more: further gates, default none, each (feature layers, (d', classes) kernel, (classes,) bias,
            threshold), applied in order.

    Returns:
        The new keras.Model, same input as ``model``; its outputs are (N, classes) probabilities.
    """
    import keras

    gates = [(feature_layers, kernel, bias, threshold), *more]
    for *_, t in gates:
        if not np.isfinite(t):
            raise ModelError(f"model {model.name!r}: the gate's threshold must be finite, not {t}")
    copy, taken, classifier, z, scores = _scores_beside_head(model, feature_layers, kernel, bias, head)
    classes = int(classifier.units)
    layers = keras.layers
    sharp = layers.Dense(classes, activation="softmax", name=_free_name(taken, "b_class"))
    b_class = sharp(classifier.input)  # one-hot of B's class: the logits made steep
    w, c = classifier.get_weights()
    sharp.set_weights([w * GATE_SHARPNESS, c * GATE_SHARPNESS])
    out = layers.Activation("softmax", name=_free_name(taken, "b_scores"))(z)
    for i, (names, k, bb, t) in enumerate(gates):
        if i:
            scores = _scores_on(model, copy, taken, classes, names, k, bb)
        at_b = layers.Dot(axes=1, name=_free_name(taken, "score_of_b_class"))([scores, b_class])
        column = layers.Reshape((classes, 1), name=_free_name(taken, "scores_column"))(scores)
        best = layers.GlobalMaxPooling1D(name=_free_name(taken, "best_score"))(column)
        margin = layers.Subtract(name=_free_name(taken, "margin"))([best, at_b])
        step = GATE_SHARPNESS / max(abs(float(t)), 1.0)
        gate_layer = layers.Dense(1, activation="sigmoid", name=_free_name(taken, "gate"))
        gate = gate_layer(margin)
        gate_layer.set_weights([np.full((1, 1), step, np.float32), np.full(1, -step * float(t), np.float32)])
        # the gate (N, 1) spread over the classes, and its complement, by fixed Dense layers
        spread = layers.Dense(classes, name=_free_name(taken, "gate_spread"))
        open_ = spread(gate)
        spread.set_weights([np.ones((1, classes), np.float32), np.zeros(classes, np.float32)])
        shut_layer = layers.Dense(classes, name=_free_name(taken, "gate_shut"))
        shut = shut_layer(gate)
        shut_layer.set_weights([-np.ones((1, classes), np.float32), np.ones(classes, np.float32)])
        p_s = layers.Activation("softmax", name=_free_name(taken, "other_scores"))(scores)
        kept = layers.Multiply(name=_free_name(taken, "kept_b"))([shut, out])
        moved = layers.Multiply(name=_free_name(taken, "overruled"))([open_, p_s])
        out = layers.Add(name=_free_name(taken, "scores"))([kept, moved])
    return keras.Model(copy.inputs[0], out, name=name or model.name)


def zero_channels(model: Any, layer: str, channels: Iterable[int]) -> None:
    """Zero output channels of conv ``layer`` in ``model`` itself, along its whole chain.

    The conv's kernel slice and bias, and for each BatchNormalization in the chain its
    moving mean, gamma and beta: the channel then outputs ``activation(0)`` (0 for ReLU or
    linear) at the chain's end, wherever it goes, in inference and in training. The one
    place where weights are changed for pruning; :func:`prune_channels` calls it on a copy.
    """
    chain = channel_chain(model, layer)
    conv = chain.conv
    chans = np.asarray(sorted(set(int(c) for c in channels)), dtype=np.int64)
    filters = int(conv.filters)
    if chans.size == 0:
        return
    if chans.min() < 0 or chans.max() >= filters:
        raise ModelError(f"channel indices must be in [0, {filters}) for layer {layer!r}")
    weights = [w.copy() for w in conv.get_weights()]
    weights[0][..., chans] = 0.0
    if conv.use_bias:
        weights[1][chans] = 0.0
    conv.set_weights(weights)
    for lyr in chain.layers:
        if type(lyr).__name__ == "BatchNormalization":
            for var in (lyr.gamma, lyr.beta, lyr.moving_mean):
                if var is not None:
                    w = np.array(var.numpy())
                    w[chans] = 0.0
                    var.assign(w)


def prune_channels(model: Any, layer: str | None, channels: Iterable[int]) -> Any:
    """Return a copy of ``model`` with the given output channels of ``layer`` pruned.

    The pruning of Liu, Dolan-Gavitt and Garg, "Fine-Pruning" (RAID 2018): a pruned
    channel outputs zero on every input (see :func:`zero_channels`: kernel and bias, and
    any BatchNormalization after the conv). The caller's model is not changed.

    Args:
        model: a Keras model.
        layer: name of a convolution layer in it; None for :func:`default_conv_layer`.
        channels: output-channel indices to zero.

    Returns:
        A new model with the same architecture and weights, but for the zeroed channels.
    """
    import keras

    name = conv_layer(model, layer).name
    channels = list(channels)
    clone = keras.models.clone_model(model)
    clone.set_weights(model.get_weights())
    zero_channels(clone, name, channels)
    return clone


def zero_kernel_entries(model: Any, masks: Mapping[str, np.ndarray]) -> Any:
    """Return a copy of ``model`` with chosen kernel entries of named layers set to zero.

    The zero re-initialisation of Lin, Liu, Wei, Li and Xiong's TSBD (NeurIPS 2024): a share of
    some neurons' incoming weights is reset to zero before fine-tuning, free to train again after
    (nothing holds them at zero). Only the kernels change; biases and every other weight are
    copied as they are. The caller's model is not changed.

    Args:
        model: a Keras model.
        masks: layer name -> boolean array of that layer's kernel shape, True where the entry is
            zeroed.

    Returns:
        A new model with the same architecture and weights but the zeroed entries.

    Raises:
        ModelError: for a layer the model lacks, a layer without a kernel, or a mask of another
            shape than the kernel's.
    """
    import keras

    checked = {}
    for name, mask in masks.items():
        kernel = getattr(_named_layer(model, name), "kernel", None)
        if kernel is None:
            raise ModelError(f"layer {name!r} of model {model.name!r} has no kernel to zero entries of")
        mask = np.asarray(mask)
        if mask.dtype != bool or mask.shape != tuple(kernel.shape):
            raise ModelError(f"the mask for layer {name!r} must be a boolean array of its kernel's shape "
                             f"{tuple(kernel.shape)}, not {mask.dtype} {mask.shape}")
        checked[name] = mask
    clone = keras.models.clone_model(model)
    clone.set_weights(model.get_weights())
    for name, mask in checked.items():
        kernel = clone.get_layer(name).kernel
        weights = np.array(keras.ops.convert_to_numpy(kernel), copy=True)
        weights[mask] = 0.0
        kernel.assign(weights)
    return clone


def renamed_copy(model: Any, name: str) -> Any:
    """A copy of ``model`` (same architecture and weights, nothing shared) named ``name``,
    for nesting inside another model (GoodNets, averaged models)."""
    import keras

    clone = keras.models.clone_model(model)
    clone.set_weights(model.get_weights())
    return keras.Model(clone.inputs[0], clone.outputs[0], name=name)


def inline_copy(model: Any, inputs: Any, prefix: str) -> Any:
    """Apply a copy of ``model``'s layers, renamed ``prefix + name``, to the tensor ``inputs``.

    For one flat graph built from several models (a model nested in another is a layer Keras 2
    cannot rebuild from a Keras 3 file): the copies share nothing with ``model`` and carry its
    weights.

    Args:
        model: a functional model of standard layers, with one input and one output.
        inputs: a symbolic tensor of the model's input shape.
        prefix: put before every copied layer's name (names must stay unique in the new graph).

    Returns:
        The copy's output tensor.

    Raises:
        ModelError: if the model nests other models.
    """
    return inline_model(model, inputs, prefix).outputs[0]


def inline_model(model: Any, inputs: Any, prefix: str, *, name: str | None = None) -> Any:
    """:func:`inline_copy` as a model from ``inputs``: its layers (``prefix + name``) and their
    outputs can be read, e.g. features for a detector built into the same flat graph.

    Args:
        model: a functional model of standard layers, with one input and one output.
        inputs: a symbolic tensor of the model's input shape.
        prefix: put before every copied layer's name.
        name: the copy's model name (default ``prefix + model.name``).

    Returns:
        A ``keras.Model`` from ``inputs`` to the copy's output.

    Raises:
        ModelError: if the model nests other models.
    """
    import keras

    nested = [lyr.name for lyr in model.layers if isinstance(lyr, keras.Model)]
    if nested:
        raise ModelError(f"model {model.name!r} nests other models ({', '.join(nested)}); it cannot be inlined")

    def renamed(layer: Any) -> Any:
        return layer.__class__.from_config({**layer.get_config(), "name": f"{prefix}{layer.name}"})

    clone = keras.models.clone_model(model, input_tensors=_shaped_as_input(model, inputs), clone_function=renamed)
    for src, dst in zip(model.layers, clone.layers, strict=True):
        dst.set_weights(src.get_weights())
    return keras.Model(inputs, clone.outputs[0], name=name or f"{prefix}{model.name}")


# ----------------------------------------------------------------------------- input scale

#: The name of the ``Rescaling`` layer :func:`with_input_scale` puts right after a model's input.
#: A model whose own layer has this name without being that scaling is refused
#: (:func:`input_scale_of`), so the name cannot be mistaken for one of the model's layers.
INPUT_SCALE_LAYER = "badnet_repair_input_scale"


def _scale_layer(model: Any) -> Any | None:
    """``model``'s :data:`INPUT_SCALE_LAYER`, checked to scale its one input and nothing else; None without one."""
    from keras import layers

    try:
        layer = model.get_layer(INPUT_SCALE_LAYER)
    except ValueError:
        return None
    inputs = getattr(model, "inputs", None) or []
    fed = [n.input_tensors for n in getattr(layer, "_inbound_nodes", [])]
    if not (isinstance(layer, layers.Rescaling) and isinstance(layer.scale, int | float) and layer.offset == 0
            and len(inputs) == 1 and len(fed) == 1 and len(fed[0]) == 1 and fed[0][0] is inputs[0]):
        raise ModelError(f"model {model.name!r} has a layer named {INPUT_SCALE_LAYER!r} that is not badnet_repair's "
                         "scaling of its input (a Rescaling of the input alone); rename that layer")
    return layer


def input_scale_of(model: Any) -> float:
    """The scale ``model`` multiplies its input by before its own layers (:func:`with_input_scale`).

    Returns:
        The scale of its :data:`INPUT_SCALE_LAYER`; 1.0 where it has none (it takes file pixels as they are).

    Raises:
        ModelError: where a layer has that name but is not the scaling of the model's input.
    """
    layer = _scale_layer(model)
    return 1.0 if layer is None else float(layer.scale)


def common_input_scale(models: Iterable[Any]) -> float:
    """The input scale (:func:`input_scale_of`) that all ``models`` share, for a model built of them.

    Raises:
        ModelError: where they take different scales.
    """
    scales = [(m.name, input_scale_of(m)) for m in models]
    if len({scale for _, scale in scales}) > 1:
        shown = ", ".join(f"{name!r} {scale:g}" for name, scale in scales)
        raise ModelError(f"the models take different input scales ({shown}); load them with the same input_scale")
    return scales[0][1] if scales else 1.0


def _input_name(model: Any) -> str:
    history = getattr(model.inputs[0], "_keras_history", None)
    return str(history.operation.name) if history is not None else "input"


def _rebuilt(model: Any, x: Any, call: Any) -> Any:
    """A copy of ``model`` on the new input ``x``, each layer applied through ``call``: the same
    layer names and weights, one flat graph (nested models stay nested)."""
    import keras

    if isinstance(model, keras.Sequential):  # call_function needs a functional graph
        model = keras.Model(model.inputs[0], model.outputs[0], name=model.name)

    def same(layer: Any) -> Any:
        return layer.__class__.from_config(layer.get_config())

    clone = keras.models.clone_model(model, input_tensors=_shaped_as_input(model, x), clone_function=same,
                                     call_function=call)
    for layer in clone.layers:
        if layer.weights:
            layer.set_weights(model.get_layer(layer.name).get_weights())
    return keras.Model(x, clone.outputs[0], name=model.name)


def _new_input(model: Any) -> Any:
    import keras

    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise ModelError(f"model {model.name!r} has {len(model.inputs)} inputs and {len(model.outputs)} outputs; "
                         "an input scale needs one of each")
    return keras.Input(shape=tuple(model.inputs[0].shape[1:]), dtype=model.inputs[0].dtype, name=_input_name(model))


def with_input_scale(model: Any, scale: float | str) -> Any:
    """``model`` for file pixels: a copy that multiplies its input by ``scale`` before its own layers.

    For a model trained on pixels times ``scale`` (1/255 for 0..1 pixels, as the CSAW-HackML 2020
    competition's BadNets) while the data files hold 0..255 pixels: the copy takes the files'
    pixels, so data, triggers, detectors' pixel ranges, augmentation and training all stay in
    0..255 and the model scales every input itself. Its first layer after the input is a
    ``Rescaling(scale)`` named :data:`INPUT_SCALE_LAYER`; then come copies of ``model``'s layers
    with their own names and weights, in one flat graph (layers stay addressable by name, for
    pruning). :func:`without_input_scale` is the inverse; :func:`save_model` saves through it, so
    files keep the input the model was trained on.

    Args:
        model: a Keras model with one input and one output.
        scale: > 0, a number or text :func:`~badnet_repair.defaults.parse_input_scale` reads (``"1/255"``).

    Returns:
        The new model; ``model`` itself where ``scale`` is 1 and it has no scale. A model that
        has a scale already gets the product of the two.

    Raises:
        ValueError: for a scale that is not a number > 0.
        ModelError: for a model with several inputs or outputs.
    """
    import math

    import keras

    scale = parse_input_scale(scale)
    old = input_scale_of(model)
    if old != 1.0:
        model, scale = without_input_scale(model), old * scale
    if math.isclose(scale, 1.0, rel_tol=1e-12):
        return model
    x = _new_input(model)
    scaled = keras.layers.Rescaling(scale, name=INPUT_SCALE_LAYER)(x)

    def call(layer: Any, *args: Any, **kwargs: Any) -> Any:
        def swap(t: Any) -> Any:
            return scaled if t is x else t

        return layer(*keras.tree.map_structure(swap, args), **keras.tree.map_structure(swap, kwargs))

    return _rebuilt(model, x, call)


def without_input_scale(model: Any) -> Any:
    """The model a grader loads: ``model`` without its input scale (:func:`with_input_scale`'s
    inverse), taking pixels times :func:`input_scale_of` (0..1 for 1/255).

    Returns:
        A copy with the same layers, names and weights but the scaling; ``model`` itself where it has none.
    """
    if _scale_layer(model) is None:
        return model
    x = _new_input(model)

    def call(layer: Any, *args: Any, **kwargs: Any) -> Any:
        return args[0] if layer.name == INPUT_SCALE_LAYER else layer(*args, **kwargs)

    return _rebuilt(model, x, call)


def weight_soup(models: Sequence[Any], *, name: str = "soup") -> Any:
    """One network whose weights are the mean of the given networks' weights: a uniform model
    soup (Wortsman et al., "Model soups", ICML 2022).

    Networks fine-tuned from one start on different splits of a few clean images, where they
    stay in one basin of the loss, average to a network that has learned from every split, at
    one network's cost to run; where they travel farther apart the mean can be worse than each,
    so a caller holds the soup to held-out data (``FineTuning``'s budget does). The models must
    share an architecture (the same layers, by name, with weights of the same shapes) and input
    scale; nothing of theirs is shared with or changed by the result.

    Args:
        models: one or more networks of one architecture.
        name: the result's name, default ``"soup"``.

    Returns:
        A ``keras.Model`` of the first model's architecture with the mean weights.
    """
    import keras

    models = list(models)
    if not models:
        raise ValueError("weight_soup needs at least one model")
    scale = common_input_scale(models)
    models = [without_input_scale(m) for m in models]
    first = models[0]

    def layout(m: Any) -> list[tuple[str, list[tuple[int, ...]]]]:
        return [(layer.name, [tuple(w.shape) for w in layer.weights]) for layer in m.layers]

    shapes = layout(first)
    for m in models[1:]:
        if layout(m) != shapes:
            raise ModelError(f"weight_soup: model {m.name!r} does not have {first.name!r}'s architecture "
                             "(its layers or weight shapes differ); weights can only be averaged between copies "
                             "of one network")
    clone = keras.models.clone_model(first)
    weights = [m.get_weights() for m in models]
    clone.set_weights([np.mean([w[i] for w in weights], axis=0, dtype=np.float64).astype(weights[0][i].dtype)
                       for i in range(len(weights[0]))])
    soup = keras.Model(clone.inputs[0], clone.outputs[0], name=name)
    return with_input_scale(soup, scale)


def average_models(models: Sequence[Any], *, name: str = "ensemble",
                   mean: Literal["arithmetic", "geometric", "soup"] = "arithmetic") -> Any:
    """One Keras model whose output is the mean of the given models' output probabilities.

    Used to combine fine-pruned networks (see :func:`badnet_repair.fine_prune`'s
    ``members``): networks tuned on different splits of the clean data recover, together,
    clean accuracy that each loses alone (an ensemble; Hansen and Salamon, 1990). The
    members are copied (nested as ``member_0``, ``member_1``, ...), so the callers' models
    are not shared or changed; the result saves as ``.keras`` and as a full legacy ``.h5``.
    Members with an input scale (:func:`with_input_scale`; the same for all) are nested without
    it, and the result takes it in front.

    Args:
        models: one or more models with the same input shape and (N, K) outputs.
        name: the model name, default ``"ensemble"``.
        mean: ``"arithmetic"`` (default; the mean of the probabilities) or ``"geometric"``
            (their normalised geometric mean, :class:`~badnet_repair.nets.layers.GeometricMean`:
            a member that keeps a backdoor is outvoted by members that do not).
            ``"soup"``: not an ensemble but one network with the mean of the members' weights
            (:func:`weight_soup`).

    Returns:
        A ``keras.Model`` mapping (N, H, W, C) inputs to (N, K) mean probabilities.
    """
    import keras

    from .layers import GeometricMean

    if mean not in ENSEMBLE_MEANS:
        raise ValueError(f"mean must be one of {ENSEMBLE_MEANS}, not {mean!r}")
    models = list(models)
    if not models:
        raise ValueError("average_models needs at least one model")
    if mean == "soup":
        return weight_soup(models, name=name)
    # one scaling in front of the whole, none inside: save_model then strips it in one place
    scale = common_input_scale(models)
    models = [without_input_scale(m) for m in models]
    shape = tuple(models[0].inputs[0].shape[1:])
    outs = {tuple(m.outputs[0].shape[1:]) for m in models}
    if {tuple(m.inputs[0].shape[1:]) for m in models} != {shape} or len(outs) != 1:
        raise ModelError("average_models: the models' input or output shapes differ")
    x = keras.Input(shape=shape, name="input")
    ys = [renamed_copy(m, f"member_{i}")(x) for i, m in enumerate(models)]
    if len(ys) == 1:
        out = ys[0]
    elif mean == "geometric":
        out = GeometricMean(name="geometric_mean")(ys)
    else:
        out = keras.layers.Average(name="average")(ys)
    return with_input_scale(keras.Model(x, out, name=name), scale)


#: Images a model is called on through :func:`predict_probabilities` or :func:`predict_classes`
#: before its forward pass is traced: tracing (once per batch shape) costs about a second, which
#: only long work on one model repays (STRIP's and TeCo's copies; not a detector's one pass over
#: the lab's files, where it measured slower).
TRACE_AFTER = 32768

# model -> [images it has been called on, its traced forward pass or None]
_COMPILED: weakref.WeakKeyDictionary[Any, list[Any]] = weakref.WeakKeyDictionary()


def inference_call(model: Any, images: int = 0) -> Any:
    """``model``'s inference forward pass (``model(x, training=False)``) for the next ``images``
    inputs: the eager call until the model has been called on :data:`TRACE_AFTER` images, then
    one traced TensorFlow function (traced again for a new batch shape, a few times at most),
    made once per model and kept while the model lives.

    Run as a graph, a small CNN's forward pass on the CPU is faster than the eager call
    (``benchmarks/bench_inference.py``), with the same kernels and so the same numbers (no XLA,
    which changes them); tracing it costs about a second, which only long work repays. The
    function reads the model's variables, so weights changed in place are seen. On another Keras
    backend, for a model of several inputs, or one that cannot be held by a weak reference, the
    eager call.
    """
    import keras

    def eager(x: Any) -> Any:
        return model(x, training=False)

    if keras.backend.backend() != "tensorflow" or len(model.inputs) != 1:
        return eager
    dtype = np.dtype(str(model.inputs[0].dtype))
    if dtype.kind != "f":
        return eager
    try:
        entry = _COMPILED.get(model)
    except TypeError:
        return eager
    if entry is None:
        entry = _COMPILED[model] = [0, None]
    entry[0] += int(images)
    if entry[1] is None:
        if entry[0] < TRACE_AFTER:
            return eager
        import tensorflow as tf

        ref = weakref.ref(model)  # not the model itself: the cache must not keep it alive
        traced = tf.function(lambda x: ref()(x, training=False), reduce_retracing=True)  # type: ignore[misc]
        # the cast the eager call makes inside the model, made before the call
        entry[1] = lambda x: traced(np.asarray(x, dtype))
    return entry[1]


def predict_classes(model: Any, x: np.ndarray, *, batch_size: int = 1024) -> np.ndarray:
    """Return (N,) int64 argmax predictions of ``model`` on (N, ...) inputs, in batches."""
    import keras

    call = inference_call(model, len(x))
    out = np.empty(len(x), dtype=np.int64)
    for i in range(0, len(x), batch_size):
        scores = call(np.asarray(x[i : i + batch_size]))
        out[i : i + batch_size] = keras.ops.convert_to_numpy(keras.ops.argmax(scores, axis=-1))
    return out


def predict_probabilities(model: Any, x: np.ndarray, *, batch_size: int = 1024) -> np.ndarray:
    """Return (N, K) float32 outputs of ``model`` on (N, ...) inputs, in batches."""
    import keras

    call = inference_call(model, len(x))
    parts = [keras.ops.convert_to_numpy(call(np.asarray(x[i : i + batch_size]))) for i in range(0, len(x),
                                                                                                 batch_size)]
    if not parts:
        return np.empty((0, num_classes(model)), np.float32)
    # one batch: its array as it is (a concatenation would only copy it)
    return (parts[0] if len(parts) == 1 else np.concatenate(parts)).astype(np.float32, copy=False)


# ----------------------------------------------------------------------------- loading


def _unsafe_layers(config: Any) -> list[str]:
    """Names of layers in a model config that would run or need code that is not ours."""
    import keras

    found: list[str] = []

    def visit(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "layers" and isinstance(value, list):
                    for item in value:
                        if isinstance(item, dict) and "class_name" in item:
                            cls = str(item["class_name"])
                            lname = (item.get("config") or {}).get("name", "?")
                            registered = item.get("registered_name")
                            if cls == "Lambda" or cls == "TFOpLambda":
                                found.append(f"{lname!r} ({cls}: runs Python code stored in the file)")
                            elif not (
                                cls in _CONTAINERS
                                or hasattr(keras.layers, cls)
                                or keras.saving.get_registered_object(str(registered or cls))
                                is not None
                            ):
                                found.append(f"{lname!r} (unknown custom layer {cls!r})")
                visit(value)
        elif isinstance(node, list):
            for value in node:
                visit(value)

    visit(config)
    return found


def _refuse_unsafe(path: Path, config: Any, trust: bool) -> None:
    bad = _unsafe_layers(config)
    if bad and not trust:
        raise UnsafeModelError(
            f"{path}: refusing to load: the model has layer(s) {', '.join(bad)}. Loading it "
            "could execute code from the file. If you trust where it came from, pass "
            "--trust-model (trust=True); a custom layer's defining module must be imported."
        )


def _h5_weight_groups(f: Any) -> dict[str, list[tuple[str, tuple[int, ...]]]]:
    """Layer name -> [(weight name, shape)] of a Keras legacy weights group."""
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in f.attrs.get("layer_names", [])]
    out: dict[str, list[tuple[str, tuple[int, ...]]]] = {}
    for lname in names:
        g = f[lname]
        wnames = [n.decode() if isinstance(n, bytes) else str(n) for n in g.attrs.get("weight_names", [])]
        out[lname] = [(w, tuple(g[w].shape)) for w in wnames]
    return out


def _check_weight_shapes(path: Path, model: Any, groups: dict[str, list[tuple[str, tuple[int, ...]]]]) -> None:
    for lname, weights in groups.items():
        if not weights:
            continue
        try:
            lyr = model.get_layer(lname)
        except ValueError:
            raise ModelError(
                f"{path}: the weights are for a layer {lname!r} that the architecture "
                f"{model.name!r} does not have"
            ) from None
        want = [tuple(int(d) for d in w.shape) for w in lyr.weights]
        got = [shape for _, shape in weights]
        if want != got:
            raise ModelError(
                f"{path}: weights of layer {lname!r} have shapes {got}, but the architecture's "
                f"{lname!r} needs {want}; the file is for a different model"
            )


def _load_weights_only(path: Path, f: Any, num_classes: int | None, architecture: Any) -> Any:
    groups = _h5_weight_groups(f)
    if not groups:
        raise ModelError(f"{path}: HDF5 file holds neither a Keras model nor Keras weights")
    if num_classes is None:
        # The classifier's bias has one entry per class; the last weighted layer holds it.
        last = [ws for ws in groups.values() if ws][-1]
        bias = [shape for name, shape in last if "bias" in name]
        if not bias:
            raise ModelError(f"{path}: cannot tell the number of classes; pass num_classes")
        num_classes = int(bias[0][0])
    model = architecture(num_classes=num_classes)
    _check_weight_shapes(path, model, groups)
    try:
        model.load_weights(str(path))
    except Exception as exc:
        raise ModelError(f"{path}: could not load the weights into {model.name!r}: {exc}") from None
    return model


def load_model(
    path: str | os.PathLike[str],
    *,
    num_classes: int | None = None,
    trust: bool = False,
    architecture: Any = deepid,
    input_scale: float | str = 1.0,
) -> Any:
    """Load a model from a ``.keras`` file, a full legacy ``.h5``, or a weights-only ``.h5``.

    Full legacy ``.h5`` files from Keras 2.2-2.14 load under Keras 3. A weights-only
    ``.h5`` (such as the lab's ``bd_weights.h5``) is loaded into ``architecture`` (DeepID
    by default), with the class count read from the file unless given. Nothing in the
    file is executed: models with Lambda or unknown custom layers are refused unless
    ``trust`` is set, and Keras's safe mode stays on.

    Args:
        path: the model file.
        num_classes: class count for a weights-only file, default read from the file.
        trust: allow layers that run code stored in the file (Keras ``safe_mode=False``).
        architecture: builder ``f(num_classes=...)`` for weights-only files.
        input_scale: the model takes file pixels (0..255) times this, default 1; ``1/255`` (or
            ``"1/255"``) for a model trained on 0..1 pixels, as the CSAW-HackML 2020 competition's.
            Other than 1, the model is returned wrapped (:func:`with_input_scale`): it takes the
            files' 0..255 pixels and scales them itself; :func:`save_model` saves it without.

    Returns:
        An uncompiled ``keras.Model``.

    Raises:
        ValueError: for an input scale that is not a number > 0.
        ModelError: naming the file, when it is missing, not a model, or does not fit.
        UnsafeModelError: when it would run code and ``trust`` is not set.
    """
    scale = parse_input_scale(input_scale)  # a bad value fails before the file is read
    return with_input_scale(_open_model(path, num_classes=num_classes, trust=trust, architecture=architecture), scale)


def _open_model(path: str | os.PathLike[str], *, num_classes: int | None, trust: bool, architecture: Any) -> Any:
    """:func:`load_model` without the input scale."""
    import h5py

    p = Path(path)
    if not p.exists():
        raise ModelError(f"{p}: no such file")
    if p.is_dir():
        raise ModelError(f"{p}: is a folder, not a model file (.h5 or .keras)")
    suffix = p.suffix.lower()
    if suffix == ".keras" or zipfile.is_zipfile(p):
        try:
            with zipfile.ZipFile(p) as z:
                config = json.loads(z.read("config.json"))
        except Exception as exc:
            raise ModelError(f"{p}: not a readable .keras model archive: {exc}") from None
        return _load_full(p, config, trust)
    try:
        is_h5 = h5py.is_hdf5(p)
    except OSError:
        is_h5 = False
    if not is_h5:
        raise ModelError(f"{p}: not a Keras model file (expected an HDF5 .h5 or a .keras archive)")
    try:
        f = h5py.File(p, "r")
    except Exception as exc:
        raise ModelError(f"{p}: cannot be read as HDF5 (truncated or corrupt?): {exc}") from None
    with f:
        raw = f.attrs.get("model_config")
        if raw is None:
            return _load_weights_only(p, f, num_classes, architecture)
        try:
            config = json.loads(raw.decode() if isinstance(raw, bytes) else raw)
        except ValueError as exc:
            raise ModelError(f"{p}: the stored model_config is not valid JSON: {exc}") from None
    return _load_full(p, config, trust)


def _load_full(path: Path, config: Any, trust: bool) -> Any:
    """Load a whole model file after checking its config for code-carrying layers."""
    import keras

    # the package's own layers (GoodNets, ensembles) are known, not custom code, in any process
    from . import layers  # noqa: F401

    _refuse_unsafe(path, config, trust)
    try:
        model = keras.models.load_model(path, compile=False, safe_mode=not trust)
    except Exception as exc:
        raise ModelError(f"{path}: Keras could not load this model: {exc}") from None
    # Keras 2 files declare their one input as a list; Keras 3 then warns at every call with an
    # array. The same layers with a plain input behave identically and do not.
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise ModelError(f"{path}: the model has {len(model.inputs)} input(s) and {len(model.outputs)} output(s); "
                         "badnet-repair takes a classifier with one image input and one output of class scores")
    if isinstance(getattr(model, "_inputs_struct", None), list):
        model = keras.Model(model.inputs[0], model.outputs[0], name=model.name)
    return with_trainable_names(as_functional(model), where=str(path))


#: A layer name TensorFlow accepts as a name scope, which training opens for every layer.
_SCOPE_NAME = re.compile(r"^[A-Za-z0-9_.\\/>-]*$")


def with_trainable_names(model: Any, *, where: str = "") -> Any:
    """``model`` itself where TensorFlow can train under every layer's name; else a copy (the same
    weights) whose layers with other names (a space, a ``!``: Keras builds and runs them, but
    training stops at them) are renamed, each character outside ``A-Za-z0-9_.\\/>-`` replaced by
    ``_``, with a warning that names the renamed layers."""
    import keras

    names = [str(lyr.name) for lyr in model.layers]
    if all(_SCOPE_NAME.match(n) for n in names):
        return model
    taken = set(names)
    renamed: dict[str, str] = {}
    for n in names:
        if _SCOPE_NAME.match(n):
            continue
        renamed[n] = _free_name(taken, re.sub(r"[^A-Za-z0-9_.\\/>-]", "_", n))

    def clone(layer: Any) -> Any:
        config = layer.get_config()
        config["name"] = renamed.get(str(layer.name), str(layer.name))
        return layer.__class__.from_config(config)

    try:
        copy = keras.models.clone_model(model, clone_function=clone)
        copy.set_weights(model.get_weights())
    except Exception as exc:
        raise ModelError(f"{where or model.name}: layer names {sorted(renamed)} cannot be trained under by "
                         f"TensorFlow, and renaming them failed: {exc}") from None
    log.warning("%s: renamed layers whose names TensorFlow cannot train under: %s", where or model.name,
                ", ".join(f"{a!r} -> {b!r}" for a, b in renamed.items()))
    return copy


# ----------------------------------------------------------------------------- saving


def save_weights_h5(model: Any, path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
    """Write the model's weights in Keras's legacy HDF5 weights layout, atomically.

    The layout is the one Keras 2 wrote for the lab's ``bd_weights.h5`` (a group per layer,
    ``layer/layer/kernel:0``), so ``model.load_weights`` reads it under Keras 2 and 3. A model with
    an input scale is written without it (:func:`without_input_scale`).
    """
    import h5py
    import keras

    model = without_input_scale(model)

    with atomic_path(path, overwrite=overwrite) as tmp, h5py.File(tmp, "w") as f:
        names = [lyr.name for lyr in model.layers]
        f.attrs["layer_names"] = np.array([n.encode() for n in names])
        f.attrs["backend"] = keras.backend.backend().encode()
        f.attrs["keras_version"] = keras.__version__.encode()
        for lyr in model.layers:
            g = f.create_group(lyr.name)
            wnames = []
            for w in lyr.weights:
                short = w.path.split("/")[-1] if hasattr(w, "path") else w.name
                wname = f"{lyr.name}/{short}:0"
                g.create_dataset(wname, data=keras.ops.convert_to_numpy(w))
                wnames.append(wname.encode())
            # Keras 2 stores an empty float64 array for layers without weights.
            g.attrs["weight_names"] = np.array(wnames) if wnames else np.array([], dtype=np.float64)
    return Path(path)


def saved_model_paths(out_dir: str | os.PathLike[str], stem: str) -> dict[str, Path]:
    """The files :func:`save_model` writes: ``{stem}.h5``, ``{stem}_weights.h5``, ``{stem}.keras``."""
    d = Path(out_dir)
    return {"h5": d / f"{stem}.h5", "weights": d / f"{stem}_weights.h5", "keras": d / f"{stem}.keras"}


def save_model(
    model: Any,
    out_dir: str | os.PathLike[str],
    stem: str,
    *,
    formats: Sequence[str] = ("h5", "weights", "keras"),
    overwrite: bool = False,
) -> dict[str, Path]:
    """Save a model in standard Keras formats, atomically, never clobbering by default.

    A model with an input scale (:func:`with_input_scale`) is saved without it
    (:func:`without_input_scale`): the files take the input it was trained on (0..1 pixels for
    1/255), as its grader feeds it.

    Args:
        model: the Keras model.
        out_dir: output folder (created if needed).
        stem: file name stem, e.g. ``"bd_2"`` gives ``bd_2.h5``, ``bd_2_weights.h5``,
            ``bd_2.keras`` (the lab's names).
        formats: any of ``"h5"`` (full legacy HDF5), ``"weights"`` (weights-only HDF5),
            ``"keras"`` (Keras 3 archive).
        overwrite: replace existing files.

    Returns:
        Mapping from format to the path written.
    """
    import warnings

    paths = {k: v for k, v in saved_model_paths(out_dir, stem).items() if k in formats}
    check_writable(paths.values(), overwrite=overwrite)
    model = without_input_scale(model)
    for fmt, path in paths.items():
        if fmt == "weights":
            save_weights_h5(model, path, overwrite=overwrite)
            continue
        with atomic_path(path, overwrite=overwrite) as tmp, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _quiet_absl()
            model.save(tmp)
            if fmt == "h5":
                _write_keras2_config(tmp)
        log.info("saved %s", path)
    return paths


# Keras 2 (tf-keras, the lab's eval.py) reads a full .h5 model's JSON config in its own format;
# Keras 3 writes its own. Keras 3 reads both, so the .h5 is written in Keras 2's.
_KERAS3_ONLY = {"optional", "lora_rank", "lora_alpha", "quantization_config", "input_axes", "output_axes"}


def _keras2_value(value: Any) -> Any:
    """A config value as Keras 2 writes it: dtype policies as their name, no Keras 3-only keys."""
    if isinstance(value, dict):
        if value.get("class_name") in ("DTypePolicy", "FloatDTypePolicy") and "config" in value:
            return value["config"].get("name", "float32")
        return {k: _keras2_value(v) for k, v in value.items() if k not in _KERAS3_ONLY}
    if isinstance(value, list):
        return [_keras2_value(v) for v in value]
    return value


def _node_tensors(args: Any) -> list[Any]:
    """``[layer, node_index, tensor_index, {}]`` for each Keras 3 tensor in a node's arguments."""
    if isinstance(args, dict) and args.get("class_name") == "__keras_tensor__":
        return [[*args["config"]["keras_history"], {}]]
    if isinstance(args, list | tuple):
        return [t for a in args for t in _node_tensors(a)]
    return []


def _keras2_nodes(nodes: list[Any]) -> list[Any]:
    """Keras 3's ``{"args": [tensor, ...], "kwargs": {}}`` nodes as Keras 2's
    ``[[layer, node_index, tensor_index, kwargs], ...]`` lists."""
    out = []
    for node in nodes:
        if not (isinstance(node, dict) and "args" in node):
            return nodes  # already Keras 2's
        tensors = _node_tensors(node["args"])
        if node.get("kwargs"):
            raise ModelError("a layer is called with keyword arguments; Keras 2 cannot read this model's config")
        out.append(tensors)
    return out


def keras2_config(config: dict[str, Any]) -> dict[str, Any]:
    """A Keras 3 functional model's config (``model.get_config()`` form with class name) in the
    form Keras 2 reads, for full ``.h5`` files that the lab's Keras 2 eval script loads.

    Raises:
        ModelError: where the model is not a functional graph of standard layers.
    """
    if config.get("class_name") not in ("Functional", "Model"):
        raise ModelError(f"only functional models can be written for Keras 2, not {config.get('class_name')!r}")
    body = dict(config["config"])
    layers = []
    for layer in body["layers"]:
        cfg = _keras2_value(layer["config"])
        if layer["class_name"] == "InputLayer" and "batch_shape" in cfg:
            cfg["batch_input_shape"] = cfg.pop("batch_shape")
        layers.append({"class_name": layer["class_name"], "config": cfg, "name": layer["name"],
                       "inbound_nodes": _keras2_nodes(layer.get("inbound_nodes", []))})
    body["layers"] = layers
    for key in ("input_layers", "output_layers"):
        ends = body[key]
        body[key] = [ends] if ends and isinstance(ends[0], str) else ends
    return {"class_name": "Functional", "config": body}


def _write_keras2_config(path: Path) -> None:
    """Rewrite a full .h5 file's model config in Keras 2's form, where the model allows it."""
    import h5py

    with h5py.File(path, "r+") as f:
        config = json.loads(f.attrs["model_config"])
        import keras

        layers = config.get("config", {}).get("layers", [])
        if not all(hasattr(keras.layers, lyr.get("class_name", "")) for lyr in layers):
            return  # nested or custom layers (GoodNets, averages): Keras 2 could not build them anyway
        try:
            converted = keras2_config(config)
        except ModelError as exc:
            log.info("%s stays in Keras 3's config form: %s", path.name, exc)
            return
        f.attrs["model_config"] = json.dumps(converted)


def _quiet_absl() -> None:
    # Keras logs a "legacy HDF5 format" warning through absl on every .h5 save.
    try:
        from absl import logging as absl_logging

        absl_logging.set_verbosity(absl_logging.ERROR)
    except ImportError:  # pragma: no cover - absl ships with TensorFlow
        pass
