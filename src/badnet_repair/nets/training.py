"""Training plumbing shared by the attacks and the defenses' trainer: determinism, channels held
at zero, and a progress bar over epochs. Below both; imports neither."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from .. import _backend  # noqa: F401
from .models import zero_channels

__all__ = ["EpochProgress", "ZeroChannels", "deterministic_ops"]

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
        zero_channels(self.model, self.layer_name, self.channels)

    def on_train_begin(self, logs: Any = None) -> None:
        self.zero()

    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        self.zero()


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
