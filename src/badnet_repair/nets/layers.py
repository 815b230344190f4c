"""Custom Keras layers stored inside the models this package saves.

Importing this module registers them with Keras, so ``keras.models.load_model`` reads the
saved models without ``safe_mode=False``. ``import badnet_repair`` makes sure it is imported
as soon as Keras is (see the package's ``__init__``).
"""

from __future__ import annotations

from typing import Any

from .. import _backend  # noqa: F401

__all__ = ["GeometricMean", "GoodNetCombine"]

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="badnet_repair")
class GeometricMean(keras.layers.Layer):
    """The normalised geometric mean of K (N, C) probability outputs: softmax(mean_k log p_k).

    A product of experts (Hinton, 2002): a class scores high only if every member gives it
    some probability, so one member that still answers a backdoor's target class is
    outvoted by members that have unlearned it, where an arithmetic mean lets that one
    confident member carry the average. Probabilities are floored at ``floor`` before the
    log so that a member's exact zero does not turn into ``-inf``.
    """

    def __init__(self, floor: float = 1e-12, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.floor = float(floor)

    def call(self, inputs: Any) -> Any:
        logs = [ops.log(ops.maximum(p, self.floor)) for p in inputs]
        return ops.softmax(ops.mean(ops.stack(logs, axis=0), axis=0), axis=-1)

    def compute_output_shape(self, input_shape: Any) -> tuple[Any, ...]:
        return tuple(input_shape[0])

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "floor": self.floor}


@keras.saving.register_keras_serializable(package="badnet_repair")
class GoodNetCombine(keras.layers.Layer):
    """Combine B's and B''s (N,) probabilities into G's (N+1,) probabilities.

    Where argmax(B) == argmax(B') the output is B's probabilities with 0 appended for class
    N; elsewhere it is one-hot class N. Ties in argmax resolve to the lowest class, as in
    ``numpy.argmax``.
    """

    def call(self, inputs: Any) -> Any:
        p_bad, p_repaired = inputs
        n = ops.shape(p_bad)[-1]
        agree = ops.equal(ops.argmax(p_bad, axis=-1), ops.argmax(p_repaired, axis=-1))
        padded = ops.pad(p_bad, [[0, 0], [0, 1]])
        alarm = ops.one_hot(ops.full(ops.shape(p_bad)[:1], n, dtype="int32"), n + 1, dtype=p_bad.dtype)
        return ops.where(ops.expand_dims(agree, -1), padded, alarm)

    def compute_output_shape(self, input_shape: Any) -> tuple[Any, ...]:
        shape = tuple(input_shape[0])
        return (*shape[:-1], None if shape[-1] is None else shape[-1] + 1)
