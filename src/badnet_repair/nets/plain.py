"""Arithmetic from Keras's own layers, for models that Keras 2 (the lab's ``eval.py``) loads.

A decision rule inside a model usually needs ``argmax``, ``where`` and comparisons, which Keras
has only as custom layers or ``Lambda`` (neither loads across Keras versions). Each helper here
builds one such step from layers that Keras 2.3 and Keras 3 both have (Dense, Conv1D, Reshape,
GlobalMaxPooling1D, RepeatVector, Subtract, ReLU with ``max_value``), its constants set as the
layers' weights, so the model saves as a full ``.h5``. Every helper names its layers
``prefix + ...``; the caller keeps the names unique.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["constant_dense", "first_of_marks", "minus_scaled", "select", "step_above", "top_mark"]

#: The two stretches of :func:`top_mark`: the gap below a row's maximum times 2**64, clipped to
#: [0, 1], then times 2**86: any gap of normal float32 values (at least 2**-126) ends far beyond 1.
_FIRST_STRETCH, _SECOND_STRETCH = float(2**64), float(2**86)


def constant_dense(x: Any, weights: np.ndarray, bias: np.ndarray | None, name: str) -> Any:
    """``x @ weights + bias`` as a Dense layer whose (fixed, non-trainable) weights are given.

    Args:
        x: a (N, A) Keras tensor.
        weights: (A, B) the kernel.
        bias: (B,) or None for no bias.
        name: the layer's name.

    Returns:
        The (N, B) Keras tensor.
    """
    from keras import layers

    w = np.asarray(weights, np.float32)
    dense = layers.Dense(w.shape[1], use_bias=bias is not None, trainable=False, name=name)
    out = dense(x)
    dense.set_weights([w] if bias is None else [w, np.asarray(bias, np.float32).reshape(w.shape[1])])
    return out


def top_mark(scores: Any, k: int, prefix: str) -> Any:
    """(N, K) 1.0 at each row's largest of (N, K) ``scores`` and 0.0 elsewhere.

    The gap ``max s - s`` (0 at the top, > 0 elsewhere) is stretched by 2**64 and clipped to
    [0, 1], stretched by 2**86 again and taken from 1, then clipped to [0, 1]: exact for any
    float32 scores below 1e18 in size (the smallest normal gap, 2**-126, is stretched to 2**24),
    however small the values near the top (a saturated softmax leaves many classes at 1e-30 or
    0); a CPU that flushes subnormal numbers to zero sees those as 0. Where a
    row has an exact tie for its largest, every tied class is marked (:func:`first_of_marks`
    keeps the first, as ``np.argmax``).

    Args:
        scores: the (N, K) Keras tensor.
        k: K.
        prefix: the layers' name prefix.
    """
    from keras import layers

    column = layers.Reshape((k, 1), name=f"{prefix}_column")(scores)
    top = layers.GlobalMaxPooling1D(name=f"{prefix}_max")(column)
    best = layers.RepeatVector(k, name=f"{prefix}_max_each")(top)
    gap = layers.Subtract(name=f"{prefix}_gap")([best, column])  # 0 at the top, > 0 elsewhere
    below = layers.ReLU(max_value=1.0, name=f"{prefix}_below")(
        _conv_scale(gap, _FIRST_STRETCH, 0.0, f"{prefix}_stretch"))
    mark = layers.ReLU(max_value=1.0, name=f"{prefix}_clip")(
        _conv_scale(below, -_SECOND_STRETCH, 1.0, f"{prefix}_stretch_again"))
    return layers.Reshape((k,), name=f"{prefix}_mark")(mark)


def first_of_marks(marks: Any, k: int, prefix: str) -> Any:
    """(N, K) 0/1 ``marks`` with only the first 1 of each row kept: ``relu(2 m_i - sum_{j<=i} m_j)``,
    one (K, K) Dense (for a one-hot output where :func:`top_mark` marked a tie)."""
    from keras import layers

    kernel = 2.0 * np.eye(k) - np.triu(np.ones((k, k)))  # column i: 2 m_i less the marks up to i
    return layers.ReLU(name=f"{prefix}_first")(constant_dense(marks, kernel, None, f"{prefix}_count"))


def _conv_scale(column: Any, factor: float, bias: float, name: str) -> Any:
    """(N, K, 1) ``column * factor + bias`` as a fixed 1x1 Conv1D."""
    from keras import layers

    conv = layers.Conv1D(1, 1, trainable=False, name=name)
    out = conv(column)
    conv.set_weights([np.full((1, 1, 1), factor, np.float32), np.full(1, bias, np.float32)])
    return out


def step_above(x: Any, threshold: float, prefix: str) -> Any:
    """(N, 1) 1.0 where the (N, 1) ``x`` is above ``threshold`` (both as float32), else 0.0.

    ``x * 2**40 - threshold * 2**40`` clipped to [0, 1], then stretched by 2**60 and clipped
    again: both products are exact (powers of two) and their float32 difference has the sign of
    ``x - threshold``, so any float32 ``x`` above the threshold by more than about 2**-100 gives
    1. Exactly at the threshold it gives 0, as ``x > threshold``.

    Args:
        x: the (N, 1) Keras tensor.
        threshold: the threshold (rounded to float32).
        prefix: the layers' name prefix.
    """
    from keras import layers

    t, scale = float(np.float32(threshold)), float(2**40)
    first = constant_dense(x, np.full((1, 1), scale), np.full(1, -t * scale), f"{prefix}_stretch")
    clipped = layers.ReLU(max_value=1.0, name=f"{prefix}_clip")(first)
    again = constant_dense(clipped, np.full((1, 1), float(2**60)), None, f"{prefix}_stretch_again")
    return layers.ReLU(max_value=1.0, name=f"{prefix}_flag")(again)


def minus_scaled(a: Any, b: Any, factor: float, k: int, prefix: str) -> Any:
    """(N, K) ``a - factor * b`` of two (N, K) Keras tensors (their columns side by side, a
    1x1 Conv1D: no (K, K) kernel)."""
    from keras import layers

    side = layers.Concatenate(name=f"{prefix}_side")([layers.Reshape((k, 1), name=f"{prefix}_a")(a),
                                                      layers.Reshape((k, 1), name=f"{prefix}_b")(b)])
    conv = layers.Conv1D(1, 1, use_bias=False, trainable=False, name=f"{prefix}_sum")
    out = conv(side)
    conv.set_weights([np.array([[[1.0], [-float(factor)]]], np.float32)])
    return layers.Reshape((k,), name=f"{prefix}_out")(out)


def select(flags: Any, if_flagged: Any, otherwise: Any, k: int, prefix: str) -> Any:
    """(N, K) rows of ``if_flagged`` where the (N, 1) 0/1 ``flags`` are 1, of ``otherwise``
    where 0: ``otherwise * (1 - f) + if_flagged * f``, exact for 0/1 flags and finite values."""
    from keras import layers

    on = constant_dense(flags, np.ones((1, k)), None, f"{prefix}_on")
    off = constant_dense(flags, -np.ones((1, k)), np.ones(k), f"{prefix}_off")
    kept = layers.Multiply(name=f"{prefix}_kept")([otherwise, off])
    taken = layers.Multiply(name=f"{prefix}_taken")([if_flagged, on])
    return layers.Add(name=f"{prefix}_out")([kept, taken])
