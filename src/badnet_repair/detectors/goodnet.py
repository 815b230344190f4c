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
from ..nets.layers import GoodNetCombine
from ..nets.models import num_classes as _num_classes
from ..nets.models import renamed_copy

__all__ = ["GoodNetCombine", "build_goodnet", "goodnet_predict"]

import keras


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
