"""One training engine for every defense that trains a network on clean data.

The :class:`Trainer` owns what all of them share: the loop over epochs, the optimiser and its
schedule, augmentation, determinism, progress, and the choice of the epoch kept on held-out
clean data (with the never-worse rule: the untrained start may win). A defense brings only
what makes it itself, as parts it assembles in its own module:

- :class:`Part` hooks: the training targets (distillation), input transforms (stamped
  triggers, generated perturbations), penalties added to the loss (feature shift), and
  constraints applied after each step (channels held at zero, a kernel kept at its norm);
- a :class:`Step`: how one batch's gradients are taken (plain; sharpness-aware; with an
  adversarial inner loop);
- a :class:`Warmup`: epochs that train some layers alone before the whole network.

The trainer names no defense and no part. Settings shared by every training defense are the
fields of :class:`TrainingSettings`, declared once here and inherited by the defense classes
(a defense with another default re-declares the field on its own class).

No TensorFlow is imported until a network is trained, so the command line can read these
settings without it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any, Literal

import numpy as np

from ..defaults import setting
from ..formats.data import Dataset

__all__ = ["Part", "Step", "Trained", "Trainer", "TrainingSettings", "Warmup", "accuracy", "gradients_at",
           "right_on", "training_model"]

log = logging.getLogger(__name__)


def accuracy(model: Any, data: Dataset) -> float:
    """Top-1 accuracy (%) of ``model`` on ``data``."""
    return float(100.0 * np.mean(right_on(model, data)))


def right_on(model: Any, data: Dataset) -> np.ndarray:
    """(N,) bool: whether ``model``'s top class is each image's label."""
    from .models import predict_classes

    return np.asarray(predict_classes(model, data.x) == data.y)


class Part:
    """A piece of a defense's training. Every hook is optional; the defaults do nothing.

    Epoch-level hooks run eagerly on numpy arrays; ``penalty`` and ``after_step`` run inside
    the traced training step (TensorFlow ops); ``begin`` and ``after_batch`` run eagerly on the
    network being trained.
    """

    def begin(self, network: Any) -> None:
        """Before the first epoch (and before the warm-up), on the network trained."""

    def transform(self, x: np.ndarray, labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """An epoch's (augmented) training images -> the images trained on; labels unchanged."""
        return x

    def targets(self, x: np.ndarray, labels: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, dict[str, float]]:
        """An epoch's training targets (N, K) -> the targets trained on, and values to record
        in the epoch's history row."""
        return targets, {}

    def penalty(self, network: Any) -> Any:
        """A scalar tensor added to each batch's loss, or None."""
        return None

    def after_step(self, network: Any) -> None:
        """Inside the traced step, after the optimiser's update (e.g. a norm constraint)."""

    def after_batch(self, network: Any) -> None:
        """Eagerly, after each batch (e.g. channels held at zero)."""


class Step:
    """How one batch's gradients are taken: the plain gradient of the loss.

    Subclasses override :meth:`gradients` (sharpness-aware steps, adversarial inner loops).
    """

    def gradients(self, trainer: Any, x: Any, y: Any) -> tuple[Any, Any, list[Any]]:
        """(task loss, predictions, gradients of the loss plus the penalties for
        ``trainer.trainable_variables``), for the batch ``x``, ``y`` (one-hot or soft targets).

        ``trainer`` is the training wrapper: ``trainer.objective(x, y)`` returns
        ``(task loss, loss plus penalties, predictions)``, ``trainer.network`` the network.
        """
        import tensorflow as tf

        with tf.GradientTape() as tape:
            loss, total, y_pred = trainer.objective(x, y)
        return loss, y_pred, tape.gradient(total, trainer.trainable_variables)


def gradients_at(trainer: Any, x: Any, y: Any, offsets: Sequence[Any]) -> list[Any]:
    """Inside a step: the gradients of the loss plus penalties with each trainable weight moved by
    its offset, the weights restored after (sharpness-aware and gradient-norm steps take their
    second gradient here).

    Args:
        trainer: the training wrapper (:meth:`Step.gradients`' ``trainer``).
        x, y: the batch.
        offsets: one tensor per ``trainer.trainable_variables``, in their order.

    Returns:
        One gradient per trainable weight.
    """
    import tensorflow as tf

    weights = trainer.trainable_variables
    for w, e in zip(weights, offsets, strict=True):
        w.assign_add(e)
    with tf.GradientTape() as tape:
        _, total, _ = trainer.objective(x, y)
    grads = tape.gradient(total, weights)
    for w, e in zip(weights, offsets, strict=True):
        w.assign_sub(e)
    return list(grads)


@dataclass(frozen=True)
class Warmup:
    """Epochs that train only ``layers`` (by name) before the whole network, with Adam at the
    constant peak rate and plain labels (no part's targets), the parts' penalties and steps
    applied. FST trains its new head alone this way (linear probing before tuning; Kumar et
    al., ICLR 2022)."""

    epochs: int
    layers: tuple[str, ...]


@dataclass(frozen=True, eq=False)
class Trained:
    """A trained network and how its epoch was chosen.

    Attributes:
        model: the network with the kept epoch's weights (a new model).
        kept_epoch: 0 for the untrained start (only where ``keep_start``), else 1..epochs.
        history: one row per epoch, the first (epoch 0) the start after any warm-up: ``epoch``,
            ``holdout_accuracy`` (%), and from epoch 1 ``loss``, ``accuracy`` (% of the tuning
            images whose target's top class the network gave) and what the parts recorded.
        start_accuracy: held-out accuracy (%) of the model given, before any training.
    """

    model: Any
    kept_epoch: int
    history: tuple[dict[str, float], ...]
    start_accuracy: float

    @property
    def holdout_accuracy(self) -> float:
        """Held-out accuracy (%) of the kept epoch."""
        return self.history[self.kept_epoch]["holdout_accuracy"]


@dataclass(frozen=True)
class TrainingSettings:
    """The settings every training defense shares, declared once; a defense class inherits
    them, and :meth:`trainer` makes its :class:`Trainer`.

    Attributes:
        epochs: default 50.
        learning_rate: the optimiser's peak rate, default 2e-3. A rate too low to move the
            weights out of the BadNet's minimum leaves the backdoor in place.
        batch_size: default 64.
        schedule: ``"cosine"`` (default; decayed to 0 over the epochs) or ``"constant"``.
        shift: random translation of up to this many pixels, default 2 (0 = none).
        flip: random horizontal flips, default True (off for data that is not left-right
            symmetric, such as text or traffic signs).
        clipnorm: clip each gradient to this norm, default 1.0 (None = no clipping); keeps a
            high rate from wrecking a network fed 0..255 pixels.
        weight_decay: decoupled weight decay (AdamW; Loshchilov and Hutter, ICLR 2019), default
            0 (plain Adam): clean data's gradients hold up the weights clean images use, the
            decay wears down the others, where a backdoor that survived pruning lives.
    """

    epochs: int = setting(50, "training epochs")
    learning_rate: float = setting(2e-3, "the optimiser's (Adam's) peak learning rate")
    batch_size: int = setting(64, "training batch size")
    schedule: Literal["cosine", "constant"] = setting("cosine", "learning rate: cosine-decayed to 0 or constant")
    shift: int = setting(2, "augmentation: random shifts of up to this many pixels (0 = none)")
    flip: bool = setting(True, "augmentation: random horizontal flips (off for data that is not left-right "
                               "symmetric)")
    clipnorm: float | None = setting(1.0, "clip gradients to this norm (0 = no clipping)")
    weight_decay: float = setting(0.0, "decoupled weight decay (AdamW) while training: wears down the weights "
                                       "clean data does not use (0 = plain Adam)")

    def trainer(self, **changes: Any) -> Trainer:
        """The :class:`Trainer` with these settings (``changes`` override some)."""
        values = {f.name: getattr(self, f.name) for f in fields(TrainingSettings)}
        return Trainer(**{**values, **changes})


@dataclass(frozen=True)
class Trainer(TrainingSettings):
    """Trains a copy of a network on clean data and keeps the epoch best on held-out clean data.

    Every epoch trains on freshly augmented copies of the tuning images
    (:func:`~badnet_repair.nets.augment.augment_images`), then the parts' transforms and
    targets; the epoch kept is the one with the highest held-out accuracy, ties going to the
    later (more trained) epoch. Seeded runs give the same weights (TensorFlow's op
    determinism inside the run). Settings: :class:`TrainingSettings`.
    """

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, not {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, not {self.batch_size}")
        if not self.weight_decay >= 0.0:
            raise ValueError(f"weight_decay must be >= 0, not {self.weight_decay}")
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"schedule must be 'constant' or 'cosine', not {self.schedule!r}")

    def train(
        self,
        model: Any,
        tune: Dataset,
        holdout: Dataset,
        *,
        parts: Sequence[Part] = (),
        step: Step | None = None,
        warmup: Warmup | None = None,
        seed: int = 0,
        keep_start: bool = False,
        progress: bool = True,
        desc: str = "training",
    ) -> Trained:
        """Train a copy of ``model`` on ``tune``; keep the epoch best on ``holdout``.

        Args:
            model: the network to start from (not changed).
            tune: clean data to train on.
            holdout: clean data that chooses the epoch (never trained on).
            parts: the defense's parts, their hooks applied in this order.
            step: how a batch's gradients are taken, default the plain gradient.
            warmup: epochs training some layers alone first, default none.
            seed: shuffling, augmentation and TensorFlow seed.
            keep_start: the untrained start (after any warm-up) is a candidate too (epoch 0):
                the result is then never worse than it on the held-out data, and a warning
                says when no epoch matched it.
            progress: a progress bar over epochs.
            desc: the progress bar's label (the defense's name).

        Returns:
            Trained.
        """
        import keras

        from .augment import augment_images
        from .training import EpochProgress, deterministic_ops

        parts = tuple(parts)
        with deterministic_ops():
            keras.utils.set_random_seed(seed)
            rng = np.random.default_rng([seed, 11])
            network = keras.models.clone_model(model)
            network.set_weights(model.get_weights())
            start_accuracy = accuracy(network, holdout)
            for part in parts:
                part.begin(network)
            work = training_model(network, parts, step)
            callbacks = [_AfterBatch(network, parts)] if any(_overrides(p, "after_batch") for p in parts) else []
            one_hot = np.eye(int(network.outputs[0].shape[-1]), dtype=np.float32)[tune.y]
            tune_x = np.asarray(tune.x, dtype=np.float32)

            def epoch_images() -> np.ndarray:
                x = augment_images(tune_x, rng=rng, shift=self.shift, flip=self.flip) if self.shift or self.flip \
                    else tune_x
                for part in parts:
                    x = part.transform(x, tune.y, rng)
                return x

            if warmup is not None and warmup.epochs:
                self._warm_up(work, network, warmup, epoch_images, one_hot, callbacks)
            rate: Any = self.learning_rate
            if self.schedule == "cosine":
                # early epochs move the weights (and the backdoor) most, late ones settle
                rate = keras.optimizers.schedules.CosineDecay(
                    self.learning_rate, max(1, self.epochs * -(-len(tune) // self.batch_size)))
            optimizer = (keras.optimizers.AdamW(rate, weight_decay=self.weight_decay, clipnorm=self.clipnorm)
                         if self.weight_decay else keras.optimizers.Adam(rate, clipnorm=self.clipnorm))
            work.compile(optimizer=optimizer, loss="categorical_crossentropy", metrics=["categorical_accuracy"])
            history: list[dict[str, float]] = [{"epoch": 0.0, "holdout_accuracy": accuracy(network, holdout)}]
            best_acc = history[0]["holdout_accuracy"] if keep_start else -1.0
            best_epoch, best_weights = 0, network.get_weights()
            bar = EpochProgress(self.epochs, desc, progress)
            for epoch in range(1, self.epochs + 1):
                x = epoch_images()
                y, recorded = one_hot, {}
                for part in parts:
                    y, more = part.targets(x, tune.y, y)
                    recorded.update(more)
                h = work.fit(x, y, epochs=1, batch_size=self.batch_size, shuffle=True, verbose=0, callbacks=callbacks)
                acc = accuracy(network, holdout)
                # "accuracy" on the tuning part: agreement with the (soft) targets' top class
                row = {"epoch": float(epoch), "loss": float(h.history["loss"][-1]),
                       "accuracy": float(100 * h.history["categorical_accuracy"][-1]), "holdout_accuracy": acc,
                       **recorded}
                history.append(row)
                bar.on_epoch_end(epoch, {"holdout_accuracy": acc})
                if acc >= best_acc:
                    best_acc, best_epoch, best_weights = acc, epoch, network.get_weights()
            bar.on_train_end()
            if best_epoch == 0:
                log.warning("%s: no trained epoch matched the untrained start's held-out accuracy (%.2f%%); "
                            "keeping the start", desc, best_acc)
            network.set_weights(best_weights)
        return Trained(model=network, kept_epoch=best_epoch, history=tuple(history), start_accuracy=start_accuracy)

    def _warm_up(self, work: Any, network: Any, warmup: Warmup, epoch_images: Any, one_hot: np.ndarray,
                 callbacks: list[Any]) -> None:
        import keras

        known = {lyr.name for lyr in network.layers}
        missing = sorted(set(warmup.layers) - known)
        if missing:
            raise ValueError(f"warm-up layer(s) {', '.join(missing)} not in the network")
        frozen = [lyr for lyr in network.layers if lyr.name not in warmup.layers and lyr.trainable_weights]
        for lyr in frozen:
            lyr.trainable = False
        work.compile(optimizer=keras.optimizers.Adam(self.learning_rate, clipnorm=self.clipnorm),
                     loss="categorical_crossentropy", metrics=["categorical_accuracy"])
        for _ in range(warmup.epochs):
            work.fit(epoch_images(), one_hot, epochs=1, batch_size=self.batch_size, shuffle=True, verbose=0,
                     callbacks=callbacks)
        for lyr in frozen:
            lyr.trainable = True


def _overrides(part: Part, hook: str) -> bool:
    return getattr(type(part), hook) is not getattr(Part, hook)


def training_model(network: Any, parts: Sequence[Part] = (), step: Step | None = None) -> Any:
    """The model the trainer compiles and fits: ``network`` itself where the step is plain and
    no part works inside the step (Keras's own training step), else a wrapper whose step takes
    the gradients with ``step``, adds the parts' penalties and applies their ``after_step``.
    The wrapper's weights are the network's; its history's ``loss`` is the task's loss alone.

    Args:
        network: the network trained (changed by training).
        parts: the parts.
        step: default the plain gradient.

    Returns:
        A Keras model to ``compile`` and ``fit``.
    """
    parts, step = tuple(parts), step or Step()
    if type(step) is Step and not any(_overrides(p, h) for p in parts for h in ("penalty", "after_step")):
        return network
    return _StepModel(network, parts, step)


def _step_model_class() -> Any:
    import keras

    class StepModel(keras.Model):
        """Trains ``network`` (its weights are this model's) with a defense's step and parts."""

        def __init__(self, network: Any, parts: tuple[Part, ...], step: Step) -> None:
            super().__init__(name=f"{network.name}_training")
            self.network = network
            self.parts = parts
            self.step = step

        def call(self, x: Any, training: bool = False) -> Any:
            return self.network(x, training=training)

        def objective(self, x: Any, y: Any) -> tuple[Any, Any, Any]:
            y_pred = self(x, training=True)
            loss = self.compute_loss(x=x, y=y, y_pred=y_pred)
            total = loss
            for part in self.parts:
                extra = part.penalty(self.network)
                if extra is not None:
                    total = total + extra
            return loss, total, y_pred

        def train_step(self, data: Any) -> Any:
            x, y = data[0], data[1]
            loss, y_pred, grads = self.step.gradients(self, x, y)
            self.optimizer.apply_gradients(zip(grads, self.trainable_variables, strict=True))
            for part in self.parts:
                part.after_step(self.network)
            for metric in self.metrics:
                if metric.name == "loss":
                    metric.update_state(loss)
                else:
                    metric.update_state(y, y_pred)
            return {m.name: m.result() for m in self.metrics}

    return StepModel


def _StepModel(network: Any, parts: tuple[Part, ...], step: Step) -> Any:
    return _step_model_class()(network, parts, step)


def _after_batch_class() -> Any:
    import keras

    class AfterBatch(keras.callbacks.Callback):
        def __init__(self, network: Any, parts: tuple[Part, ...]) -> None:
            super().__init__()
            self.network = network
            self.parts = parts

        def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
            for part in self.parts:
                part.after_batch(self.network)

    return AfterBatch


def _AfterBatch(network: Any, parts: tuple[Part, ...]) -> Any:
    return _after_batch_class()(network, parts)
