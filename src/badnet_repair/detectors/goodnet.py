"""The GoodNet G: a repaired classifier that flags inputs on which B and B' disagree.

The CSAW-HackML lab's repair: G runs the BadNet B and its pruned copy B' on each input and
outputs B's class where they agree and the extra class N (of N+1) where they differ, the
disagreement being the mark of a trigger the pruning removed (Liu, Dolan-Gavitt and Garg,
"Fine-Pruning", RAID 2018).
"""

from __future__ import annotations

from typing import Any

from .. import _backend  # noqa: F401
from ..errors import ModelError
from ..metrics import goodnet_predict
from ..nets.layers import AlarmCombine, Disagree, EntropyAlarm, GoodNetCombine, Superimpose
from ..nets.models import (
    common_input_scale,
    inline_copy,
    input_scale_of,
    renamed_copy,
    with_input_scale,
    without_input_scale,
)
from ..nets.models import num_classes as _num_classes

__all__ = ["GoodNetCombine", "build_detector_goodnet", "build_goodnet", "build_portable_goodnet", "goodnet_predict"]

import keras


def build_goodnet(badnet: Any, repaired: Any, *, name: str = "goodnet") -> Any:
    """Build G from B and B' as one Keras model.

    Both models are copied (the callers' models are not changed or shared) and nested as
    ``badnet`` and ``repaired``; their input scale (:func:`~badnet_repair.nets.models.with_input_scale`,
    the same for both) is G's, in front of them. G saves as ``.keras`` and loads with
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
    # one input scale in front of G, none inside: saving G without it is then one step
    scale = common_input_scale((badnet, repaired))
    b = renamed_copy(without_input_scale(badnet), "badnet")
    r = renamed_copy(without_input_scale(repaired), "repaired")
    x = keras.Input(shape=tuple(badnet.inputs[0].shape[1:]), name="input")
    out = GoodNetCombine(name="goodnet_combine")([b(x), r(x)])
    return with_input_scale(keras.Model(x, out, name=name), scale)


#: The top-class test's scale: 2**50 times any gap between two distinct float32 probabilities
#: of a model's top class (at least 1/N) is far below -1, so the clipped ``gap * scale + 1``
#: is exactly 1 at the top class and exactly 0 elsewhere.
_TOP_SCALE = float(2**50)


def build_portable_goodnet(badnet: Any, repaired: Any, *, name: str = "goodnet") -> Any:
    """G from standard Keras layers only, for a full ``.h5`` that Keras 2 loads.

    The lab's GoodNet rule (Liu et al., RAID 2018, as the CSAW-HackML lab defines G) without
    a custom layer: B and B' are inlined into one flat graph (their layers renamed
    ``badnet_*`` and ``repaired_*``; G's own layers are named ``goodnet_*``, so no layer name of
    B's can collide with them); each one's top class is marked exactly by clipping
    ``(p - max p) * 2**50 + 1`` to [0, 1] (Reshape, GlobalMaxPooling1D, RepeatVector,
    Subtract, a 1x1 Conv1D, ReLU(max_value=1)); ``agree`` is 1 where the two marks share a
    class; the output is ``[p_B * agree, 1 - agree]``. Its outputs equal
    :func:`build_goodnet`'s wherever B's and B''s top classes are unique; where a model has
    an exact tie for its top class, this G counts the two as agreeing if any tied class is
    shared (``build_goodnet`` compares the first of each).

    Args:
        badnet: B, a flat functional model (N, H, W, C) -> (N, K) probabilities.
        repaired: B', the same shapes and flat.
        name: the model name.

    Returns:
        A flat ``keras.Model`` (N, H, W, C) -> (N, K+1) made of standard layers, with B's and B''s
        input scale (:func:`~badnet_repair.nets.models.with_input_scale`) in front.

    Raises:
        ValueError: if B and B' have different class counts.
        ModelError: if either nests other models (ensembles, GoodNets).
    """
    import numpy as np
    from keras import layers

    k = _num_classes(badnet)
    if _num_classes(repaired) != k:
        raise ValueError(f"B has {k} classes but B' has {_num_classes(repaired)}")
    input_scale = common_input_scale((badnet, repaired))
    badnet, repaired = without_input_scale(badnet), without_input_scale(repaired)
    x = keras.Input(shape=tuple(badnet.inputs[0].shape[1:]), name="input")
    p_bad = inline_copy(badnet, x, "badnet_")
    p_rep = inline_copy(repaired, x, "repaired_")

    def top(p: Any, who: str) -> tuple[Any, Any]:
        column = layers.Reshape((k, 1), name=f"goodnet_{who}_column")(p)
        top_p = layers.GlobalMaxPooling1D(name=f"goodnet_{who}_top_p")(column)
        best = layers.RepeatVector(k, name=f"goodnet_{who}_max")(top_p)
        gap = layers.Subtract(name=f"goodnet_{who}_gap")([column, best])  # 0 at the top class, < 0 elsewhere
        scale = layers.Conv1D(1, 1, name=f"goodnet_{who}_scale")
        mark = layers.ReLU(max_value=1.0, name=f"goodnet_{who}_is_top")(scale(gap))
        return layers.Reshape((k,), name=f"goodnet_{who}_top")(mark), scale

    top_bad, scale_bad = top(p_bad, "badnet")
    top_rep, scale_rep = top(p_rep, "repaired")
    both = layers.Multiply(name="goodnet_both_top")([top_bad, top_rep])
    shared = layers.Dense(1, use_bias=False, name="goodnet_shared_top")(both)
    agree = layers.ReLU(max_value=1.0, name="goodnet_agree")(shared)
    spread = layers.Dense(k, use_bias=False, name="goodnet_agree_per_class")
    alarm = layers.Dense(1, name="goodnet_alarm")
    kept = layers.Multiply(name="goodnet_kept")([p_bad, spread(agree)])
    out = layers.Concatenate(name="goodnet_output")([kept, alarm(agree)])
    model = keras.Model(x, out, name=name)
    for scale in (scale_bad, scale_rep):
        scale.set_weights([np.full((1, 1, 1), _TOP_SCALE, np.float32), np.ones(1, np.float32)])
    model.get_layer("goodnet_shared_top").set_weights([np.ones((k, 1), np.float32)])
    spread.set_weights([np.ones((1, k), np.float32)])
    alarm.set_weights([np.full((1, 1), -1.0, np.float32), np.ones(1, np.float32)])
    return with_input_scale(model, input_scale)


def build_detector_goodnet(model: Any, detector: Any, *, name: str = "goodnet") -> Any:
    """A GoodNet from a fitted detector, as one Keras model: the model's class, or the alarm
    class N where the detector flags the input (:func:`~badnet_repair.detectors.goodnet_classes`).

    Detectors with a Keras form: :class:`~badnet_repair.detectors.Disagreement` (alone: the
    lab's G, :func:`build_goodnet`), :class:`~badnet_repair.detectors.Strip` (its overlays
    stored in the model, its threshold in the config),
    :class:`~badnet_repair.detectors.ReversedTriggerDetector` (B and the repaired model inside,
    the targets in the config) and :class:`~badnet_repair.detectors.AnyOf` of these. G saves
    as ``.keras`` and loads with ``keras.models.load_model`` after ``import badnet_repair``.

    Args:
        model: the model whose classes G outputs (B, or a repaired model), (N, H, W, C) -> (N, K).
        detector: a fitted detector.
        name: the model name.

    Returns:
        A ``keras.Model`` (N, H, W, C) -> (N, K+1) probabilities. Where ``model`` has an input
        scale (:func:`~badnet_repair.nets.models.with_input_scale`), G has it in front and none
        inside: G without it (what :func:`~badnet_repair.nets.models.save_model` writes) takes
        pixels times the scale, STRIP's overlays and pixel range scaled alike.

    Raises:
        TypeError: for a detector without a Keras form; ValueError: if it is not fitted;
        ModelError: if the detector's models take another input scale than ``model``.
    """
    from .disagreement import Disagreement

    if type(detector) is Disagreement:  # the lab's G (a subclass restricts the rule: its own form)
        return build_goodnet(model, detector.repaired, name=name)
    scale = input_scale_of(model)
    inner = renamed_copy(without_input_scale(model), "model")
    x = keras.Input(shape=tuple(model.inputs[0].shape[1:]), name="input")
    flags = _flags(detector, x, "detector", scale)
    return with_input_scale(keras.Model(x, AlarmCombine(name="alarm_combine")([inner(x), flags]), name=name), scale)


def _unscaled(model: Any, scale: float) -> Any:
    """A detector's ``model`` without its input scale, checked to be G's ``scale``."""
    if input_scale_of(model) != scale:
        raise ModelError(f"the detector's model {model.name!r} takes input scale {input_scale_of(model):g}, "
                         f"but G's model takes {scale:g}; load them with the same input_scale")
    return without_input_scale(model)


def _flags(detector: Any, x: Any, prefix: str, scale: float = 1.0) -> Any:
    """The (N,) 0/1 flags of a fitted detector on the Keras tensor ``x``, which holds file pixels
    times ``scale`` (the detector's models' input scale)."""
    from .combine import AnyOf
    from .disagreement import Disagreement
    from .neural_cleanse import ReversedTriggerDetector
    from .strip import Strip

    if isinstance(detector, AnyOf):
        parts = [_flags(d, x, f"{prefix}{i}", scale) for i, d in enumerate(detector.detectors)]
        return parts[0] if len(parts) == 1 else keras.layers.Maximum(name=f"{prefix}_any")(parts)
    if isinstance(detector, Disagreement):
        if detector.model is None:
            raise ValueError("fit the detector before building its GoodNet")
        b = renamed_copy(_unscaled(detector.model, scale), f"{prefix}_badnet")
        r = renamed_copy(_unscaled(detector.repaired, scale), f"{prefix}_repaired")
        targets = list(detector.targets) if isinstance(detector, ReversedTriggerDetector) else None
        return Disagree(targets, name=f"{prefix}_disagree")([b(x), r(x)])
    if not isinstance(detector, Strip):
        raise TypeError(f"no Keras form for the {type(detector).__name__} detector")
    if detector.model is None or detector.overlays is None or detector.threshold is None:
        raise ValueError("fit the detector before building its GoodNet")
    strip_b = renamed_copy(_unscaled(detector.model, scale), f"{prefix}_strip_badnet")
    # STRIP fitted on file pixels: its clean overlays and pixel range go into x's range
    blend = Superimpose(detector.overlays.shape, mode=detector.blend_mode, alpha=detector.alpha,
                        pixel_max=detector.pixel_max * scale, name=f"{prefix}_superimpose")
    flags = EntropyAlarm(len(detector.overlays), detector.threshold, name=f"{prefix}_alarm")(strip_b(blend(x)))
    blend.overlays.assign((detector.overlays * scale).astype("float32"))
    return flags
