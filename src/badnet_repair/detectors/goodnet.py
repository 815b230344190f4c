"""The GoodNet G: a repaired classifier that flags inputs on which B and B' disagree.

The CSAW-HackML lab's repair: G runs the BadNet B and its pruned copy B' on each input and
outputs B's class where they agree and the extra class N (of N+1) where they differ, the
disagreement being the mark of a trigger the pruning removed (Liu, Dolan-Gavitt and Garg,
"Fine-Pruning", RAID 2018).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .. import _backend  # noqa: F401
from ..errors import ModelError
from ..metrics import goodnet_predict
from ..nets.layers import AlarmCombine, GoodNetCombine, RunnerUpWhereFlagged
from ..nets.models import (
    common_input_scale,
    inline_copy,
    input_scale_of,
    predict_probabilities,
    renamed_copy,
    with_input_scale,
    without_input_scale,
)
from ..nets.models import num_classes as _num_classes
from .base import Detector
from .combine import AnyOf

__all__ = ["GoodNetCombine", "SplitGoodNet", "build_detector_goodnet", "build_goodnet", "build_portable_goodnet",
           "build_portable_runner_up_model", "build_runner_up_model",
           "goodnet_predict", "has_keras_form", "is_goodnet", "load_split_goodnet", "save_split_goodnet",
           "split_goodnet_paths"]

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


def is_goodnet(model: Any) -> bool:
    """Whether ``model`` is a GoodNet this package built (its last class is the alarm class N): one
    with the package's combining layer (:func:`build_goodnet`, :func:`build_detector_goodnet`) or
    the portable one of standard layers (:func:`build_portable_goodnet`, ``goodnet_X.h5``, found by
    its output layer's name, which no layer of B's can take)."""
    if any(isinstance(lyr, GoodNetCombine | AlarmCombine) for lyr in model.layers):
        return True
    history = getattr(model.outputs[0], "_keras_history", None) if len(model.outputs) == 1 else None
    return history is not None and history.operation.name == "goodnet_output"


def build_portable_goodnet(badnet: Any, repaired: Any, *, name: str = "goodnet") -> Any:
    """G from standard Keras layers only, for a full ``.h5`` that Keras 2 loads.

    The lab's GoodNet rule (Liu et al., RAID 2018, as the CSAW-HackML lab defines G) without
    a custom layer: B and B' are inlined into one flat graph (their layers renamed
    ``badnet_*`` and ``repaired_*``; G's own layers are named ``goodnet_*``, so no layer name of
    B's can collide with them); each one's top class is marked exactly
    (:func:`~badnet_repair.nets.plain.top_mark`: Reshape, GlobalMaxPooling1D, RepeatVector,
    Subtract, 1x1 Conv1Ds, ReLU(max_value=1)); ``agree`` is 1 where the two marks share a
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
    from keras import layers

    from ..nets.plain import constant_dense, top_mark

    k = _num_classes(badnet)
    if _num_classes(repaired) != k:
        raise ValueError(f"B has {k} classes but B' has {_num_classes(repaired)}")
    input_scale = common_input_scale((badnet, repaired))
    badnet, repaired = without_input_scale(badnet), without_input_scale(repaired)
    x = keras.Input(shape=tuple(badnet.inputs[0].shape[1:]), name="input")
    p_bad = inline_copy(badnet, x, "badnet_")
    p_rep = inline_copy(repaired, x, "repaired_")

    top_bad, top_rep = top_mark(p_bad, k, "goodnet_badnet_top"), top_mark(p_rep, k, "goodnet_repaired_top")
    both = layers.Multiply(name="goodnet_both_top")([top_bad, top_rep])
    shared = constant_dense(both, np.ones((k, 1)), None, "goodnet_shared_top")
    agree = layers.ReLU(max_value=1.0, name="goodnet_agree")(shared)
    kept = layers.Multiply(name="goodnet_kept")([p_bad, constant_dense(agree, np.ones((1, k)), None,
                                                                       "goodnet_agree_per_class")])
    alarm = constant_dense(agree, np.full((1, 1), -1.0), np.ones(1), "goodnet_alarm")
    out = layers.Concatenate(name="goodnet_output")([kept, alarm])
    return with_input_scale(keras.Model(x, out, name=name), input_scale)


def build_detector_goodnet(model: Any, detector: Any, *, name: str = "goodnet") -> Any:
    """A GoodNet from a fitted detector, as one Keras model: the model's class, or the alarm
    class N where the detector flags the input (:func:`~badnet_repair.detectors.goodnet_classes`).

    Each detector brings its own Keras form (:meth:`~badnet_repair.detectors.Detector.keras_flags`);
    :class:`~badnet_repair.detectors.Disagreement` alone is the lab's G (:func:`build_goodnet`).
    G saves as ``.keras`` and loads with ``keras.models.load_model`` after ``import badnet_repair``.
    A detector without a Keras form is saved beside its model instead (:func:`save_split_goodnet`).

    Args:
        model: the model whose classes G outputs (B, or a repaired model), (N, H, W, C) -> (N, K).
        detector: a fitted detector.
        name: the model name.

    Returns:
        A ``keras.Model`` (N, H, W, C) -> (N, K+1) probabilities. Where ``model`` has an input
        scale (:func:`~badnet_repair.nets.models.with_input_scale`), G has it in front and none
        inside: G without it (what :func:`~badnet_repair.nets.models.save_model` writes) takes
        pixels times the scale, the detectors' pixel constants scaled alike.

    Raises:
        NoKerasForm: for a detector (or a part) without a Keras form; ValueError: if it is not
        fitted; ModelError: if the detector's models take another input scale than ``model``.
    """
    from .disagreement import Disagreement

    if type(detector) is Disagreement:  # the lab's G (a subclass restricts the rule: its own form)
        return build_goodnet(model, detector.repaired, name=name)
    return _model_beside_flags(model, detector, AlarmCombine(name="alarm_combine"), name)


def _model_beside_flags(model: Any, detector: Any, combine: Any, name: str) -> Any:
    """``combine([model's probabilities, detector's flags])`` as one Keras model on ``model``'s
    input, its input scale in front (a copy of ``model`` inside; the detector's own Keras form)."""
    scale = input_scale_of(model)
    inner = renamed_copy(without_input_scale(model), "model")
    x = keras.Input(shape=tuple(model.inputs[0].shape[1:]), name="input")
    flags = detector.keras_flags(x, prefix="detector", scale=scale)
    return with_input_scale(keras.Model(x, combine([inner(x), flags]), name=name), scale)


def build_runner_up_model(model: Any, detector: Any, *, name: str = "runner_up") -> Any:
    """A repaired model from a fitted detector, as one Keras model: the model's class, or its
    second most probable class where the detector flags the input (no alarm class; the output
    keeps the model's K classes). Built as :func:`build_detector_goodnet` is, with
    :class:`~badnet_repair.nets.layers.RunnerUpWhereFlagged` in place of the alarm; it saves as
    ``.keras`` and loads with ``keras.models.load_model`` after ``import badnet_repair``.

    Args:
        model: the model whose classes it outputs (B), (N, H, W, C) -> (N, K).
        detector: a fitted detector with a Keras form.
        name: the model name.

    Returns:
        A ``keras.Model`` (N, H, W, C) -> (N, K): the model's probabilities, or one-hot at its
        runner-up class where flagged; the model's input scale in front, as in
        :func:`build_detector_goodnet`.
    """
    if not has_keras_form(detector):
        raise ModelError(f"detector {detector.name!r} has no Keras form: it cannot gate a saved model")
    return _model_beside_flags(model, detector, RunnerUpWhereFlagged(name="runner_up_where_flagged"), name)


def build_portable_runner_up_model(model: Any, detector: Any, *, name: str = "runner_up",
                                   otherwise: Any = None) -> Any:
    """:func:`build_runner_up_model` from Keras's own layers only, for a full ``.h5`` that Keras 2
    (the lab's ``eval.py``) loads.

    B is inlined into one flat graph (its layers renamed ``badnet_*``; the gate's own layers are
    named ``gate_*``, so no name of B's can collide with them); B's class is marked with
    :func:`~badnet_repair.nets.plain.top_mark`, the detector's flags come from its
    ``plain_flags`` (:meth:`~badnet_repair.detectors.features.FeatureEnsemble.plain_flags`), and
    the runner-up is the mark of B's probabilities less twice the mark of its class. Computed in
    float32: the flags equal the detector's except on inputs whose score is within float32
    rounding of the threshold (about 1e-6 of the distances). Ties for the runner-up (a saturated
    softmax leaves many classes at 0) go to the first, as there; only where B has an exact tie
    for its top class (two equal largest probabilities) may the flags and the runner-up differ
    from :func:`build_runner_up_model`'s (every tied class is marked as B's).

    Args:
        model: B, a flat functional model (N, H, W, C) -> (N, K) probabilities, the model the
            detector was fitted on.
        detector: a fitted detector with a ``plain_flags`` form
            (:class:`~badnet_repair.detectors.features.FeatureEnsemble` or
            :class:`~badnet_repair.detectors.features.FeatureDistance`).
        name: the model name.
        otherwise: a flat model on the same inputs (another repair of B, e.g. a gate) whose
            probabilities are output where not flagged, default None (B's); inlined as ``first_*``.

    Returns:
        A flat ``keras.Model`` (N, H, W, C) -> (N, K) of standard layers: B's probabilities (or
        ``otherwise``'s), or one-hot at B's runner-up class where flagged; B's input scale in front
        (:func:`~badnet_repair.nets.models.with_input_scale`).

    Raises:
        ModelError: a detector without a plain form, or fitted on another model; a model that
            nests others.
    """
    from ..nets.models import inline_model
    from ..nets.plain import first_of_marks, minus_scaled, select, top_mark

    if not hasattr(detector, "plain_flags"):
        raise ModelError(f"detector {detector.name!r} has no form of Keras's own layers: use build_runner_up_model")
    fitted_on = detector.members[0].model if hasattr(detector, "members") else detector.model
    if fitted_on is not model:
        raise ModelError(f"the detector was fitted on another model than {model.name!r}: fit it on this one")
    k = _num_classes(model)
    scale = input_scale_of(model) if otherwise is None else common_input_scale((model, otherwise))
    if otherwise is not None and _num_classes(otherwise) != k:
        raise ValueError(f"B has {k} classes but the model beside it has {_num_classes(otherwise)}")
    x = keras.Input(shape=tuple(model.inputs[0].shape[1:]), name="input")
    graph = inline_model(without_input_scale(model), x, "badnet_", name="gate_badnet")
    probs = graph.outputs[0]
    top = top_mark(probs, k, "gate_top")
    flags = detector.plain_flags(graph, top, prefix="gate_detector", layer_prefix="badnet_")
    second = first_of_marks(top_mark(minus_scaled(probs, top, 2.0, k, "gate_top_pushed_down"), k, "gate_runner_up"),
                            k, "gate_runner_up")
    kept = probs if otherwise is None else inline_copy(without_input_scale(otherwise), x, "first_")
    out = select(flags, second, kept, k, "gate_output")
    return with_input_scale(keras.Model(x, out, name=name), scale)


def has_keras_form(detector: Detector) -> bool:
    """Whether the detector (every part of a combination) brings its own Keras form."""
    if isinstance(detector, AnyOf):
        return all(has_keras_form(d) for d in detector.detectors)
    return type(detector).keras_flags is not Detector.keras_flags


@dataclass(frozen=True, eq=False)
class SplitGoodNet:
    """A GoodNet whose detectors are not all Keras graphs: the model, a Keras G of the parts
    that have a Keras form (if any), and the other detectors, fitted, beside them.

    Attributes:
        model: the model whose classes G outputs, (N, H, W, C) -> (N, K), on file pixels.
        graph: (N, H, W, C) -> (N, K+1) G of the Keras-form parts, or None.
        detectors: the fitted detectors without a Keras form.
    """

    model: Any
    graph: Any
    detectors: tuple[Detector, ...]

    def predict(self, x: np.ndarray, *, batch_size: int = 1024) -> np.ndarray:
        """(N, K+1) float32 probabilities: the Keras G's (or the model's, with a zero alarm
        column), one-hot at the alarm class K where any of the other detectors flags the input."""
        if self.graph is not None:
            p = predict_probabilities(self.graph, x, batch_size=batch_size)
        else:
            p = predict_probabilities(self.model, x, batch_size=batch_size)
            p = np.concatenate([p, np.zeros((len(p), 1), p.dtype)], axis=1)
        if self.detectors:
            flagged = np.any([d.flags(x) for d in self.detectors], axis=0)
            p[flagged] = 0.0
            p[flagged, -1] = 1.0
        return p

    def predict_classes(self, x: np.ndarray) -> np.ndarray:
        """(N,) int64 classes of G (K is the alarm)."""
        return np.argmax(self.predict(x), axis=1).astype(np.int64)


def split_goodnet_paths(out_dir: str | os.PathLike[str], stem: str) -> dict[str, Path]:
    """The files :func:`save_split_goodnet` writes: ``model`` (the model whose classes G gives),
    ``keras`` (G of the Keras-form parts, where there are some) and ``detectors`` (the other
    detectors' names, settings and fitted state, ``.npz``)."""
    d = Path(out_dir)
    return {"model": d / f"{stem}_model.keras", "keras": d / f"{stem}.keras",
            "detectors": d / f"{stem}.detectors.npz"}


def save_split_goodnet(model: Any, detector: Detector, out_dir: str | os.PathLike[str], stem: str, *,
                       overwrite: bool = False) -> dict[str, Path]:
    """Save a GoodNet whose detector has parts without a Keras form: the model as
    ``<stem>_model.keras``, G of the other parts as ``<stem>.keras`` (where there are some), and the
    rest's registry names, settings and fitted state (:meth:`~badnet_repair.detectors.Detector.state`)
    as ``<stem>.detectors.npz``; :func:`load_split_goodnet` reads them back.

    Returns:
        The paths written, by name (:func:`split_goodnet_paths`).
    """
    from ..formats.files import atomic_path, check_writable
    from ..nets.models import save_model

    parts = detector.detectors if isinstance(detector, AnyOf) else (detector,)
    graph = [d for d in parts if has_keras_form(d)]
    rest = [d for d in parts if not has_keras_form(d)]
    paths = split_goodnet_paths(out_dir, stem)
    if not graph:
        del paths["keras"]
    check_writable(paths.values(), overwrite=overwrite)
    arrays: dict[str, np.ndarray] = {
        "names": np.array(json.dumps([d.name for d in rest])),
        "settings": np.array(json.dumps([d.get_params() for d in rest])),
        "input_scale": np.asarray(input_scale_of(model), np.float64),
    }
    for i, d in enumerate(rest):
        arrays.update({f"{i}/{k}": np.asarray(v) for k, v in d.state().items()})
    save_model(model, out_dir, f"{stem}_model", formats=("keras",), overwrite=overwrite)
    if graph:
        g = build_detector_goodnet(model, graph[0] if len(graph) == 1 else AnyOf(*graph), name=stem)
        save_model(g, out_dir, stem, formats=("keras",), overwrite=overwrite)
    with atomic_path(paths["detectors"], overwrite=overwrite) as tmp:
        np.savez(tmp, **arrays)  # type: ignore[arg-type]
    return paths


def load_split_goodnet(out_dir: str | os.PathLike[str], stem: str) -> SplitGoodNet:
    """Read a GoodNet :func:`save_split_goodnet` wrote; its detectors are made from the registry
    (a detector registered from outside the package must be registered again first).

    Raises:
        ModelError: for a missing or unreadable file, or an unknown detector, naming the file.
    """
    from ..nets.models import load_model
    from .registry import make_detector

    paths = split_goodnet_paths(out_dir, stem)
    try:
        with np.load(paths["detectors"], allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
        names, settings = json.loads(str(arrays["names"])), json.loads(str(arrays["settings"]))
        scale = float(arrays["input_scale"])
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"{paths['detectors']}: not a GoodNet's detectors file ({exc})") from None
    model = load_model(paths["model"], input_scale=scale)
    graph = load_model(paths["keras"], input_scale=scale) if paths["keras"].exists() else None
    detectors = []
    for i, (name, params) in enumerate(zip(names, settings, strict=True)):
        try:
            det = make_detector(name, **params)
        except ValueError as exc:
            raise ModelError(f"{paths['detectors']}: {exc}") from None
        state = {k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith(f"{i}/")}
        detectors.append(det.restore(model, state))
    return SplitGoodNet(model=model, graph=graph, detectors=tuple(detectors))
