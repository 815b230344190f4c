"""The GoodNet G: a repaired classifier that flags inputs on which B and B' disagree.

The CSAW-HackML lab's repair: G runs the BadNet B and its pruned copy B' on each input and
outputs B's class where they agree and the extra class N (of N+1) where they differ, the
disagreement being the mark of a trigger the pruning removed (Liu, Dolan-Gavitt and Garg,
"Fine-Pruning", RAID 2018).
"""

from __future__ import annotations

from typing import Any

from .. import _backend  # noqa: F401
from ..metrics import goodnet_predict
from ..nets.models import num_classes as _num_classes
from ..nets.models import renamed_copy

__all__ = ["GoodNetCombine", "build_goodnet", "goodnet_predict"]

import keras
from keras import ops


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


def build_goodnet(badnet: Any, repaired: Any, *, name: str = "goodnet") -> Any:
    """Build G from B and B' as one Keras model.

    Both models are copied (the callers' models are not changed or shared) and nested as
    ``badnet`` and ``repaired``. G saves as ``.keras`` and loads with
    ``keras.models.load_model`` once :mod:`badnet_repair` is imported.

    Args:
        badnet: B, mapping (N, H, W, C) inputs to (N, K) probabilities.
        repaired: B', the same input and output shapes.
        name: the model name.

    Returns:
        A ``keras.Model`` mapping (N, H, W, C) to (N, K+1) probabilities: B's where B and
        B' agree, one-hot class K where they differ.
    """
    if _num_classes(badnet) != _num_classes(repaired):
        raise ValueError(
            f"B has {_num_classes(badnet)} classes but B' has {_num_classes(repaired)}"
        )
    b = renamed_copy(badnet, "badnet")
    r = renamed_copy(repaired, "repaired")
    x = keras.Input(shape=tuple(badnet.inputs[0].shape[1:]), name="input")
    out = GoodNetCombine(name="goodnet_combine")([b(x), r(x)])
    return keras.Model(x, out, name=name)
