"""Training plumbing shared by the attacks and the defenses: determinism, channels held at
zero, sharpness-aware and feature-shift steps, and a progress bar over epochs. Below both; imports neither."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from .. import _backend  # noqa: F401
from .models import zero_channels

__all__ = ["EpochProgress", "FeatureShift", "SharpnessAware", "ZeroChannels", "deterministic_ops"]

import keras


@contextlib.contextmanager
def deterministic_ops() -> Iterator[None]:
    """TensorFlow's op determinism inside the block, so seeded training gives the same bytes
    on every run (on machines of the same kind, with the same TensorFlow); the process's
    setting is restored after. Other backends: nothing to do."""
    if keras.backend.backend() != "tensorflow":
        yield
        return
    import tensorflow as tf

    # The public API can only turn it on; TensorFlow's own config module can read and undo it.
    from tensorflow.python.framework import config as tf_config

    was_on = getattr(tf_config, "is_op_determinism_enabled", lambda: True)()
    tf.config.experimental.enable_op_determinism()
    try:
        yield
    finally:
        if not was_on and hasattr(tf_config, "disable_op_determinism"):
            tf_config.disable_op_determinism()


class ZeroChannels(keras.callbacks.Callback):
    """Keeps the given output channels of a conv layer at zero during training (along its
    chain: kernel, bias and any BatchNormalization after it)."""

    def __init__(self, layer: str, channels: Sequence[int]) -> None:
        super().__init__()
        self.layer_name = layer
        self.channels = np.asarray(sorted(channels), dtype=np.int64)

    def zero(self) -> None:
        # a SharpnessAware wrapper trains the network it wraps
        zero_channels(getattr(self.model, "inner", self.model), self.layer_name, self.channels)

    def on_train_begin(self, logs: Any = None) -> None:
        self.zero()

    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        self.zero()


class SharpnessAware(keras.Model):
    """Trains the wrapped network by sharpness-aware minimisation (Foret et al., ICLR 2021), or
    its adaptive form (ASAM; Kwon et al., ICML 2021), with the optimizer given to ``compile``.

    Each step takes the batch's gradient ``g`` at the weights ``w``, moves to the worst nearby
    weights ``w + e`` with ``e = rho * T^2 g / |T g|`` (``T = |w|`` elementwise when adaptive,
    else the identity), and applies the gradient taken there to ``w``. The adaptive radius is
    relative to each weight's size, so one ``rho`` suits layers of any scale (DeepID's first
    layers see 0..255 pixels). TensorFlow backend.

    Args:
        inner: the network trained (its weights are this model's weights).
        rho: the neighbourhood's radius.
        adaptive: ASAM's scaling, default True.
    """

    def __init__(self, inner: Any, rho: float, adaptive: bool = True) -> None:
        super().__init__(name=f"{inner.name}_sharpness_aware")
        if not rho > 0:
            raise ValueError(f"rho must be > 0, not {rho}")
        self.inner = inner
        self.rho = float(rho)
        self.adaptive = bool(adaptive)

    def call(self, x: Any, training: bool = False) -> Any:
        return self.inner(x, training=training)

    def train_step(self, data: Any) -> Any:
        import tensorflow as tf

        x, y = data[0], data[1]
        weights = self.trainable_variables
        with tf.GradientTape() as tape:
            y_pred = self(x, training=True)
            loss = self.compute_loss(x=x, y=y, y_pred=y_pred)
        grads = tape.gradient(loss, weights)
        scale = [tf.abs(w) if self.adaptive else tf.ones_like(w) for w in weights]
        norm = tf.linalg.global_norm([t * g for t, g in zip(scale, grads, strict=True)]) + 1e-12
        steps = [self.rho * t * t * g / norm for t, g in zip(scale, grads, strict=True)]
        for w, e in zip(weights, steps, strict=True):
            w.assign_add(e)
        with tf.GradientTape() as tape:
            worst = self.compute_loss(x=x, y=y, y_pred=self(x, training=True))
        sharp = tape.gradient(worst, weights)
        for w, e in zip(weights, steps, strict=True):
            w.assign_sub(e)
        self.optimizer.apply_gradients(zip(sharp, weights, strict=True))
        for metric in self.metrics:
            if metric.name == "loss":
                metric.update_state(loss)
            else:
                metric.update_state(y, y_pred)
        return {m.name: m.result() for m in self.metrics}


class FeatureShift(keras.Model):
    """Trains the wrapped network with Feature Shift Tuning's loss (FST; Min, Qin, Shen and
    Cheng, NeurIPS 2023), with the optimizer given to ``compile``.

    The loss is the task's loss plus ``alpha / C * <K, K0>``: the inner product of the
    classifier head's kernel ``K`` with the BadNet's ``K0``, per class (``C`` classes); after
    every step ``K`` is rescaled to the norm of ``K0``. Under that constraint the penalty pushes
    the new head away from the old one, so the features under it must shift to stay correct on
    clean data, and the backdoor's features, entangled with clean ones when few poisoned images
    were used, shift with them. The paper sums over the classes; dividing by ``C`` keeps the
    penalty's pull on each class's weights against the task loss's (whose gradient on a class
    falls as 1/C) the same for 38 classes or 1283, so one ``alpha`` fits both: the paper's
    alpha on CIFAR-10 is this one divided by 10. The head is re-initialised by the caller
    (:func:`~badnet_repair.nets.models.reinitialize_head`). TensorFlow backend.

    Args:
        inner: the network trained (its weights are this model's weights).
        head: the name of its classifier's Dense layer.
        original: ``K0``, (features, classes).
        alpha: the penalty's weight per class.
    """

    def __init__(self, inner: Any, head: str, original: np.ndarray, alpha: float) -> None:
        super().__init__(name=f"{inner.name}_feature_shift")
        if not alpha >= 0:
            raise ValueError(f"alpha must be >= 0, not {alpha}")
        self.inner = inner
        self.alpha = float(alpha)
        self.kernel = inner.get_layer(head).kernel
        if tuple(self.kernel.shape) != tuple(original.shape):
            raise ValueError(f"original kernel {original.shape} does not match head {head!r}'s "
                             f"{tuple(self.kernel.shape)}")
        self.original = np.asarray(original, dtype=np.float32)
        self.weight = self.alpha / self.original.shape[-1]
        self.norm = float(np.linalg.norm(self.original))

    def call(self, x: Any, training: bool = False) -> Any:
        return self.inner(x, training=training)

    def train_step(self, data: Any) -> Any:
        import tensorflow as tf

        x, y = data[0], data[1]
        weights = self.trainable_variables
        original = tf.constant(self.original)
        with tf.GradientTape() as tape:
            y_pred = self(x, training=True)
            loss = self.compute_loss(x=x, y=y, y_pred=y_pred)
            total = loss + self.weight * tf.reduce_sum(self.kernel * original)
        grads = tape.gradient(total, weights)
        self.optimizer.apply_gradients(zip(grads, weights, strict=True))
        self.kernel.assign(self.kernel * (self.norm / (tf.norm(self.kernel) + 1e-12)))
        for metric in self.metrics:
            if metric.name == "loss":
                metric.update_state(loss)
            else:
                metric.update_state(y, y_pred)
        return {m.name: m.result() for m in self.metrics}


class EpochProgress(keras.callbacks.Callback):
    """A tqdm bar over epochs with the latest loss and accuracy; records the history."""

    def __init__(self, epochs: int, desc: str, enabled: bool) -> None:
        super().__init__()
        self.history: list[dict[str, float]] = []
        self.bar: Any = None
        if enabled:
            from ..progress import bar

            self.bar = bar(total=epochs, desc=desc, unit="epoch")

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        logs = {k: float(v) for k, v in (logs or {}).items()}
        self.history.append(logs)
        if self.bar is not None:
            self.bar.set_postfix({k: f"{v:.3f}" for k, v in logs.items()})
            self.bar.update()

    def on_train_end(self, logs: Any = None) -> None:
        if self.bar is not None:
            self.bar.close()
