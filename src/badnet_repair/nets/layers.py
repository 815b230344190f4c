"""Custom Keras layers stored inside the models this package saves.

Importing this module registers them with Keras, so ``keras.models.load_model`` reads the
saved models without ``safe_mode=False``. ``import badnet_repair`` makes sure it is imported
as soon as Keras is (see the package's ``__init__``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .. import _backend  # noqa: F401

__all__ = ["AlarmCombine", "Disagree", "EntropyAlarm", "FeatureDistanceAlarm", "GeometricMean", "GoodNetCombine",
           "RunnerUpWhereFlagged", "ScaleUpAlarm", "ScoreAlarm", "Superimpose"]

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


@keras.saving.register_keras_serializable(package="badnet_repair")
class Superimpose(keras.layers.Layer):
    """STRIP's superimposition inside a model: each of the (N, H, W, C) inputs on each of the
    stored (M, H, W, C) overlays, as (N * M, H, W, C), input-major.

    ``mode="add"``: ``min(x + overlay, pixel_max)`` (Gao et al. 2019's reference code);
    ``mode="mix"``: ``alpha x + (1 - alpha) overlay``. The overlays are a non-trainable weight,
    saved with the model.
    """

    def __init__(self, overlays_shape: tuple[int, ...], mode: str = "add", alpha: float = 0.5,
                 pixel_max: float = 255.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.overlays_shape = tuple(int(d) for d in overlays_shape)
        self.mode, self.alpha, self.pixel_max = str(mode), float(alpha), float(pixel_max)
        self.overlays = self.add_weight(shape=self.overlays_shape, initializer="zeros", trainable=False,
                                        name="overlays")

    def call(self, inputs: Any) -> Any:
        x = ops.expand_dims(inputs, 1)
        o = ops.expand_dims(ops.convert_to_tensor(self.overlays, dtype=inputs.dtype), 0)
        mixed = ops.minimum(x + o, self.pixel_max) if self.mode == "add" else self.alpha * x + (1.0 - self.alpha) * o
        return ops.reshape(mixed, (-1, *self.overlays_shape[1:]))

    def compute_output_shape(self, input_shape: Any) -> tuple[Any, ...]:
        return (None, *self.overlays_shape[1:])

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "overlays_shape": list(self.overlays_shape), "mode": self.mode,
                "alpha": self.alpha, "pixel_max": self.pixel_max}


@keras.saving.register_keras_serializable(package="badnet_repair")
class EntropyAlarm(keras.layers.Layer):
    """STRIP's decision inside a model: from (N * M, K) probabilities of the superimposed
    copies, 1.0 for each of the N inputs whose mean entropy (bits) is at most ``threshold``."""

    def __init__(self, copies: int, threshold: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.copies, self.threshold = int(copies), float(threshold)

    def call(self, inputs: Any) -> Any:
        p = ops.clip(inputs, 0.0, 1.0)
        terms = ops.where(p > 0, -p * ops.log(ops.maximum(p, 1e-30)) / np.log(2.0), ops.zeros_like(p))
        entropy = ops.mean(ops.reshape(ops.sum(terms, axis=-1), (-1, self.copies)), axis=-1)
        return ops.cast(entropy <= self.threshold, inputs.dtype)

    def compute_output_shape(self, input_shape: Any) -> tuple[Any, ...]:
        return (None,)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "copies": self.copies, "threshold": self.threshold}


@keras.saving.register_keras_serializable(package="badnet_repair")
class AlarmCombine(keras.layers.Layer):
    """A GoodNet's output from the model's (N, K) probabilities and a detector's (N,) flags:
    the probabilities with 0 appended where not flagged, one-hot class K where flagged."""

    def call(self, inputs: Any) -> Any:
        probs, flags = inputs
        k = ops.shape(probs)[-1]
        padded = ops.pad(probs, [[0, 0], [0, 1]])
        alarm = ops.one_hot(ops.full(ops.shape(probs)[:1], k, dtype="int32"), k + 1, dtype=probs.dtype)
        return ops.where(ops.expand_dims(flags > 0.5, -1), alarm, padded)

    def compute_output_shape(self, input_shape: Any) -> tuple[Any, ...]:
        shape = tuple(input_shape[0])
        return (*shape[:-1], None if shape[-1] is None else shape[-1] + 1)


@keras.saving.register_keras_serializable(package="badnet_repair")
class RunnerUpWhereFlagged(keras.layers.Layer):
    """A repaired model's output from the model's (N, K) probabilities and a detector's (N,)
    flags: the probabilities where not flagged, one-hot at the model's second most probable
    class where flagged (ties: the first such class, as ``np.argmax``)."""

    def call(self, inputs: Any) -> Any:
        probs, flags = inputs
        k = ops.shape(probs)[-1]
        top = ops.one_hot(ops.argmax(probs, axis=-1), k, dtype=probs.dtype)
        # the top class pushed below every probability (all are >= 0), so the argmax is the runner-up
        runner = ops.one_hot(ops.argmax(probs - 2.0 * top, axis=-1), k, dtype=probs.dtype)
        return ops.where(ops.expand_dims(flags > 0.5, -1), runner, probs)

    def compute_output_shape(self, input_shape: Any) -> tuple[Any, ...]:
        return tuple(input_shape[0])


@keras.saving.register_keras_serializable(package="badnet_repair")
class Disagree(keras.layers.Layer):
    """A detector's flags from two models' (N, K) probabilities: 1.0 where their top classes
    differ and, if ``targets`` is given, the first model's top class is one of them."""

    def __init__(self, targets: Any = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.targets = None if targets is None else [int(t) for t in targets]

    def call(self, inputs: Any) -> Any:
        p_bad, p_other = inputs
        top = ops.argmax(p_bad, axis=-1)
        flags = ops.not_equal(top, ops.argmax(p_other, axis=-1))
        if self.targets is not None:
            wanted = ops.convert_to_tensor(np.asarray(self.targets, np.int64), dtype=top.dtype)
            in_target = ops.any(ops.equal(ops.expand_dims(top, -1), ops.expand_dims(wanted, 0)), axis=-1)
            flags = ops.logical_and(flags, in_target)
        return ops.cast(flags, p_bad.dtype)

    def compute_output_shape(self, input_shape: Any) -> tuple[Any, ...]:
        return (input_shape[0][0],)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "targets": self.targets}


@keras.saving.register_keras_serializable(package="badnet_repair")
class FeatureDistanceAlarm(keras.layers.Layer):
    """:class:`~badnet_repair.detectors.features.FeatureDistance`'s decision inside a model: from
    B's (N, D) penultimate features and (N, K) output, 1.0 where the normalised squared
    Mahalanobis distance to the clean mean of B's class (or of the nearest class with a mean,
    where B's has none) is above ``threshold``; None gives the (N,) scores instead. The means,
    which classes have one, the precision and the per-class median and spread are non-trainable
    float64 weights, saved with the model.
    """

    def __init__(self, num_classes: int, dim: int, threshold: float | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("dtype", "float64")  # the numpy detector's precision: flags agree at the threshold
        super().__init__(**kwargs)
        self.num_classes, self.dim = int(num_classes), int(dim)
        self.threshold = None if threshold is None else float(threshold)
        k, d = self.num_classes, self.dim
        self.means = self.add_weight(shape=(k, d), initializer="zeros", trainable=False, name="means", dtype="float64")
        self.has_mean = self.add_weight(shape=(k,), initializer="zeros", trainable=False, name="has_mean",
                                        dtype="float64")
        self.precision = self.add_weight(shape=(d, d), initializer="zeros", trainable=False, name="precision",
                                         dtype="float64")
        self.loc = self.add_weight(shape=(k,), initializer="zeros", trainable=False, name="loc", dtype="float64")
        self.spread = self.add_weight(shape=(k,), initializer="ones", trainable=False, name="spread",
                                      dtype="float64")

    def build(self, input_shape: Any) -> None:
        self.built = True

    def call(self, inputs: Any) -> Any:
        feats, probs = inputs
        f = ops.cast(ops.reshape(feats, (-1, self.dim)), "float64")
        classes = ops.argmax(probs, axis=-1)
        means, precision = ops.convert_to_tensor(self.means), ops.convert_to_tensor(self.precision)
        has_mean = ops.convert_to_tensor(self.has_mean) > 0.5
        fp = ops.matmul(f, precision)
        mp = ops.matmul(means, precision)
        d_all = (ops.sum(fp * f, axis=1, keepdims=True) - 2.0 * ops.matmul(fp, ops.transpose(means))
                 + ops.expand_dims(ops.sum(mp * means, axis=1), 0))
        nearest = ops.argmin(ops.where(ops.expand_dims(has_mean, 0), d_all, np.inf), axis=-1)
        chosen = ops.where(ops.take(has_mean, classes, axis=0), classes, nearest)
        diff = f - ops.take(means, chosen, axis=0)
        raw = ops.sum(ops.matmul(diff, precision) * diff, axis=1)
        score = (raw - ops.take(self.loc, classes, axis=0)) / ops.take(self.spread, classes, axis=0)
        if self.threshold is None:
            return score
        return ops.cast(score > self.threshold, "float32")

    def compute_output_shape(self, input_shape: Any) -> tuple[Any, ...]:
        return (input_shape[0][0],)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "num_classes": self.num_classes, "dim": self.dim,
                "threshold": self.threshold}


@keras.saving.register_keras_serializable(package="badnet_repair")
class ScoreAlarm(keras.layers.Layer):
    """Flags from several (N,) scores: 1.0 where their sum (in float64) is above ``threshold``
    (the feature ensemble's decision)."""

    def __init__(self, threshold: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.threshold = float(threshold)

    def call(self, inputs: Any) -> Any:
        total = ops.cast(inputs[0], "float64")
        for score in inputs[1:]:
            total = total + ops.cast(score, "float64")
        return ops.cast(total > self.threshold, "float32")

    def compute_output_shape(self, input_shape: Any) -> tuple[Any, ...]:
        return (input_shape[0][0],)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "threshold": self.threshold}


@keras.saving.register_keras_serializable(package="badnet_repair")
class ScaleUpAlarm(keras.layers.Layer):
    """SCALE-UP's decision inside a model: from B's (N, K) probabilities on the inputs and on
    each scaled copy, 1.0 where ``(SPC - class_mean[c]) / class_std[c] > threshold``, ``c`` B's
    class on the input. Computed in float64, as
    :meth:`~badnet_repair.detectors.scaleup.ScaleUp.scores`, so the flags match the detector's to
    the bit.

    Args:
        class_mean: (K,) benign SPC means per class.
        class_std: (K,) benign SPC standard deviations per class.
        threshold: the score threshold.
    """

    def __init__(self, class_mean: Sequence[float], class_std: Sequence[float], threshold: float,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.class_mean = [float(v) for v in class_mean]
        self.class_std = [float(v) for v in class_std]
        if len(self.class_mean) != len(self.class_std):
            raise ValueError("class_mean and class_std must have one value per class")
        self.threshold = float(threshold)

    def call(self, inputs: Any) -> Any:
        p0, scaled = inputs[0], inputs[1:]
        top = ops.argmax(p0, axis=-1)
        agree = ops.zeros(ops.shape(top), dtype="float64")
        for p in scaled:
            agree = agree + ops.cast(ops.equal(ops.argmax(p, axis=-1), top), "float64")
        spc = agree / float(len(scaled))
        mean = ops.take(ops.convert_to_tensor(np.asarray(self.class_mean, np.float64)), top)
        std = ops.take(ops.convert_to_tensor(np.asarray(self.class_std, np.float64)), top)
        return ops.cast((spc - mean) / std > self.threshold, p0.dtype)

    def compute_output_shape(self, input_shape: Any) -> tuple[Any, ...]:
        return (input_shape[0][0],)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "class_mean": self.class_mean, "class_std": self.class_std,
                "threshold": self.threshold}
