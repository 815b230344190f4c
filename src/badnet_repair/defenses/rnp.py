"""RNP, Reconstructive Neuron Pruning (Li, Lyu, Ma, Koren, Lyu, Li and Jiang, "Reconstructive
Neuron Pruning for Backdoor Defense", ICML 2023).

Unlearn, then recover: a copy of B unlearns its clean images (gradient ascent until few are
right); a mask on each conv neuron of the unlearned copy is then learnt, with its weights frozen,
to bring the clean images back. Clean unlearning breaks the clean features but leaves the
backdoor's, and recovery reopens the neurons the clean task needs; the neurons whose masks stay
low are the backdoor's, and they are pruned from B itself. No trigger, no poisoned image and no
fine-tuning of B: its other weights are left as they are.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from ..defaults import BUDGET_HELP, setting
from ..formats.data import Dataset
from .base import Defense, Repair, Repaired

__all__ = ["ReconstructiveNeuronPruning", "conv_neuron_layers", "masked_values", "neurons_at_most", "recover_masks"]

log = logging.getLogger(__name__)


def conv_neuron_layers(model: Any) -> tuple[str, ...]:
    """The layers whose neurons RNP masks, found from the graph by type: every Conv1D, Conv2D and
    Conv3D layer of ``model``, in the model's order (the paper masks the BatchNorm neuron after each
    convolution; without BatchNorm the convolution's own output channels are the neurons)."""
    import keras

    kinds = (keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D)
    return tuple(str(lyr.name) for lyr in model.layers if isinstance(lyr, kinds))


def masked_values(variables: Sequence[Any], masks: Mapping[int, Any]) -> list[Any]:
    """The values of ``variables`` with each one found in ``masks`` (by ``id``) multiplied by its
    mask along the last axis: a conv's kernel ``(..., out)`` and bias ``(out,)`` times ``m`` give
    ``m * (conv(x, W) + b)``, so a ReLU after it outputs ``m * relu(...)`` for ``m >= 0``, and
    ``m = 0`` is the neuron pruned."""
    return [v.value * masks[id(v)] if id(v) in masks else v.value for v in variables]


def recover_masks(model: Any, data: Dataset, layers: Sequence[str], *, rate: float, epochs: int, alpha: float,
                  batch_size: int, shift: int, flip: bool, seed: int = 0, progress: bool = False,
                  desc: str = "rnp recovering") -> tuple[dict[str, np.ndarray], list[dict[str, float]]]:
    """RNP's recovering step: a mask in [0, 1] on each neuron of ``layers``, learnt on ``data`` with
    ``model``'s weights frozen.

    The masks start at 1; SGD (momentum 0.9, rate ``rate``) descends ``alpha`` times the
    cross-entropy of freshly augmented batches each epoch, and every mask is clipped to [0, 1]
    after each step, as the authors' code does. TensorFlow backend.

    Args:
        model: the network whose neurons are masked (RNP: the unlearned copy; not changed).
        data: the clean images.
        layers: the masked layers (:func:`conv_neuron_layers`).
        rate, epochs, alpha: the optimiser's rate, the epochs, the loss's weight.
        batch_size, shift, flip: batches and augmentation.
        seed: shuffling and augmentation seed.

    Returns:
        (layer -> (units,) mask values, per epoch: ``epoch``, ``loss``, ``accuracy`` (% of the
        epoch's images right under the masks)).
    """
    import keras
    import tensorflow as tf

    from ..nets.augment import augment_images
    from ..nets.training import EpochProgress, deterministic_ops

    with deterministic_ops():
        keras.utils.set_random_seed(seed)
        rng = np.random.default_rng([seed, 37])
        variables = {name: tf.Variable(tf.ones(int(model.get_layer(name).kernel.shape[-1])), name=f"mask_{name}")
                     for name in layers}
        by_weight: dict[int, Any] = {}
        for name, mask in variables.items():
            lyr = model.get_layer(name)
            by_weight[id(lyr.kernel)] = mask
            if getattr(lyr, "bias", None) is not None:
                by_weight[id(lyr.bias)] = mask
        trainable, frozen = list(model.trainable_variables), list(model.non_trainable_variables)
        masks = list(variables.values())
        sgd = keras.optimizers.SGD(rate, momentum=0.9)
        sgd.build(masks)
        classes = int(model.outputs[0].shape[-1])

        @tf.function(reduce_retracing=True)
        def step(x: Any, y: Any) -> tuple[Any, Any]:
            with tf.GradientTape() as tape:
                probs, _ = model.stateless_call(masked_values(trainable, by_weight), [v.value for v in frozen], x,
                                                training=False)
                ce = keras.losses.categorical_crossentropy(tf.one_hot(y, classes), probs)
                loss = alpha * tf.reduce_mean(ce)
            sgd.apply_gradients(zip(tape.gradient(loss, masks), masks, strict=True))
            for m in masks:
                m.assign(tf.clip_by_value(m, 0.0, 1.0))
            right = tf.reduce_sum(tf.cast(tf.equal(tf.argmax(probs, axis=-1, output_type=tf.int32), y), tf.float32))
            return loss, right

        x_all = np.asarray(data.x, dtype=np.float32)
        y_all = np.asarray(data.y, dtype=np.int32)
        history: list[dict[str, float]] = []
        bar = EpochProgress(epochs, desc, progress)
        for epoch in range(1, epochs + 1):
            x = augment_images(x_all, rng=rng, shift=shift, flip=flip) if shift or flip else x_all
            order = rng.permutation(len(x))
            losses, right = [], 0.0
            for i in range(0, len(order), batch_size):
                idx = order[i:i + batch_size]
                loss, r = step(tf.constant(x[idx]), tf.constant(y_all[idx]))
                losses.append(float(loss))
                right += float(r)
            history.append({"epoch": float(epoch), "loss": float(np.mean(losses)),
                            "accuracy": float(100.0 * right / len(x))})
            bar.on_epoch_end(epoch, {"accuracy": history[-1]["accuracy"]})
        bar.on_train_end()
    return {name: np.asarray(v.numpy(), np.float64) for name, v in variables.items()}, history


def neurons_at_most(masks: Mapping[str, np.ndarray], threshold: float) -> dict[str, tuple[int, ...]]:
    """The neurons whose mask is at most ``threshold``, by layer (layers with none left out)."""
    out = {name: tuple(int(j) for j in np.flatnonzero(m <= threshold)) for name, m in masks.items()}
    return {name: units for name, units in out.items() if units}


def _pruned_copy(model: Any, neurons: Mapping[str, Sequence[int]]) -> Any:
    """A copy of ``model`` with ``neurons`` pruned (:func:`~badnet_repair.nets.models.zero_channels`)."""
    import keras

    from ..nets.models import zero_channels

    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    for name, units in neurons.items():
        zero_channels(copy, name, units)
    return copy


@dataclass(frozen=True)
class ReconstructiveNeuronPruning(Defense):
    """RNP (Li et al., ICML 2023): prune from B the conv neurons that a mask learnt to recover
    clean accuracy on an unlearned copy of B keeps low.

    1. The clean data is split into a tuning part and a held-out part, per class
       (:func:`~badnet_repair.defenses.tuning.split_clean`).
    2. **Unlearning**: a copy of B climbs the tuning images' cross-entropy (SGD, momentum 0.9, each
       step's whole gradient clipped to ``rnp_clipnorm``) until at most ``rnp_unlearn_accuracy`` %
       of them are right (:func:`~badnet_repair.defenses.tsbd.clean_unlearning`).
    3. **Recovering**: a mask on each neuron of every conv layer (:func:`conv_neuron_layers`) of the
       unlearned copy, learnt on the tuning images with its weights frozen (:func:`recover_masks`).
    4. **Pruning**: the neurons whose mask is at most ``rnp_threshold`` are pruned from B
       (:func:`~badnet_repair.nets.models.zero_channels`); B's other weights are not changed.

    The result is held to the clean-accuracy ``budget`` on the held-out part: where it falls more
    than that below B, the largest lower threshold (in steps of ``rnp_threshold_step``) whose
    pruning is within the budget is returned instead, else B, with the loud line.

    Args:
        holdout_fraction: share of the clean data held out for the budget, default 0.2.
        rnp_unlearn_rate: the unlearning SGD's rate, default 1e-3 (the authors' 0.01), in the units of
            the same network fed 0..1 pixels (:func:`~badnet_repair.defenses.tsbd.input_units`).
        rnp_clipnorm: the unlearning gradient's largest global norm, default 1 (the authors' 20).
        rnp_unlearn_accuracy: stop unlearning at this % of the tuning images right, default 20 (the
            authors' ``clean_threshold``).
        rnp_unlearn_epochs: at most this many unlearning epochs, default 20.
        rnp_recover_rate: the masks' SGD rate, default 0.01 (the authors' 0.2).
        rnp_recover_epochs: recovering epochs, default 20 (the authors').
        rnp_alpha: the weight of the recovering loss, default 0.2 (the authors').
        rnp_threshold: neurons with a mask at most this are pruned, default 0.2.
        rnp_threshold_step: the budget's fallback thresholds' step, default 0.05 (the authors'
            ``pruning_step``).
        batch_size: unlearning and recovering batch, default 128 (the authors').
        shift: random shifts of up to this many pixels in both steps, default 2.
        flip: random horizontal flips in both steps, default True.
        budget: the clean-accuracy budget in points, default 3 (None = off).
        pixel_scale: the pixel value of one input unit, default None (1 or 255 from the data).
        seed: split, shuffling and augmentation seed, default 0.

    Adapted to this setting: the rates are lower than the authors' (unlearning 0.01 clipped at 20,
    masks 0.2): on a few clean images per class theirs unlearn everything within an epoch and the
    masks, driven to 0 or 1 at once, recover nothing (docs/research/removal31.md, round 6). The
    authors unlearn with weight decay 5e-4 (none here) and mask a ResNet's BatchNorm neurons; here
    the conv layers' output channels, which a network without BatchNorm (DeepID) has. Their
    threshold is read off a sweep on test and poisoned data; here it is a setting, with the
    budget's fallback on held-out clean data.
    """

    name: ClassVar[str] = "rnp"
    summary: ClassVar[str] = ("unlearn the clean data, learn masks that recover it, prune the neurons they leave "
                              "low from B (Li et al. 2023)")

    holdout_fraction: float = setting(0.2, "validation share held out to check the budget")
    rnp_unlearn_rate: float = setting(1e-3, "RNP: clean unlearning's SGD learning rate (momentum 0.9)")
    rnp_clipnorm: float = setting(1.0, "RNP: clean unlearning's largest global gradient norm")
    rnp_unlearn_accuracy: float = setting(20.0, "RNP: unlearning stops once at most this % of the tuning images are "
                                                "right")
    rnp_unlearn_epochs: int = setting(20, "RNP: at most this many clean unlearning epochs")
    rnp_recover_rate: float = setting(0.01, "RNP: the neuron masks' SGD learning rate (momentum 0.9)")
    rnp_recover_epochs: int = setting(20, "RNP: epochs of mask recovering")
    rnp_alpha: float = setting(0.2, "RNP: weight of the recovering loss")
    rnp_threshold: float = setting(0.2, "RNP: neurons whose recovered mask is at most this are pruned from B")
    rnp_threshold_step: float = setting(0.05, "RNP: step of the lower thresholds the budget falls back to")
    batch_size: int = setting(128, "unlearning and recovering batch size")
    shift: int = setting(2, "augmentation: random shifts of up to this many pixels (0 = none)")
    flip: bool = setting(True, "augmentation: random horizontal flips (off for data that is not left-right "
                               "symmetric)")
    budget: float | None = setting(3.0, BUDGET_HELP)
    pixel_scale: float | None = setting(None, "pixel value of one input unit: the layers fed pixels are stepped as "
                                              "if fed pixels / this (None: 1 or 255 from the data)")
    seed: int = setting(0, "split, shuffling and augmentation seed")

    def __post_init__(self) -> None:
        if not 0.0 < self.holdout_fraction < 1.0:
            raise ValueError(f"holdout_fraction must be in (0, 1), not {self.holdout_fraction}")
        for name in ("rnp_unlearn_rate", "rnp_clipnorm", "rnp_recover_rate", "rnp_alpha", "rnp_threshold_step"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, not {getattr(self, name)}")
        if not 0.0 <= self.rnp_unlearn_accuracy <= 100.0:
            raise ValueError(f"rnp_unlearn_accuracy must be in [0, 100] %, not {self.rnp_unlearn_accuracy}")
        if not 0.0 <= self.rnp_threshold <= 1.0:
            raise ValueError(f"rnp_threshold must be in [0, 1], not {self.rnp_threshold}")
        for name in ("rnp_unlearn_epochs", "rnp_recover_epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, not {getattr(self, name)}")
        if self.shift < 0:
            raise ValueError(f"shift must be >= 0, not {self.shift}")
        if self.budget is not None and not self.budget >= 0:
            raise ValueError(f"budget must be >= 0 points or None, not {self.budget}")
        if self.pixel_scale is not None and not self.pixel_scale > 0:
            raise ValueError(f"pixel_scale must be > 0 or None, not {self.pixel_scale}")

    def thresholds(self) -> tuple[float, ...]:
        """The thresholds tried in order: ``rnp_threshold``, then lower ones in steps of
        ``rnp_threshold_step`` down to 0 (the budget's fallbacks)."""
        n = int(np.floor(self.rnp_threshold / self.rnp_threshold_step + 1e-9))
        lower = [round(self.rnp_threshold_step * k, 10) for k in range(n, -1, -1)]
        return (self.rnp_threshold, *[t for t in lower if t < self.rnp_threshold])

    def masks(self, model: Any, tune: Dataset, *, progress: bool = False) -> tuple[dict[str, np.ndarray],
                                                                                     dict[str, Any]]:
        """Steps 2 and 3 on the tuning images: the recovered mask of each conv neuron, by layer,
        and the record (the unlearning's, ``recovering`` per epoch)."""
        from ..formats.data import pixel_range
        from .tsbd import clean_unlearning, input_units

        layers = conv_neuron_layers(model)
        if not layers:
            from ..errors import ModelError

            raise ModelError(f"{self.name}: the model has no conv layer whose neurons could be masked")
        scales = input_units(model, self.pixel_scale if self.pixel_scale is not None else pixel_range(tune.x))
        unlearned, record = clean_unlearning(
            model, tune, rate=self.rnp_unlearn_rate, stop_accuracy=self.rnp_unlearn_accuracy,
            max_epochs=self.rnp_unlearn_epochs, clipnorm=self.rnp_clipnorm, batch_size=self.batch_size,
            shift=self.shift, flip=self.flip, scales=scales, seed=self.seed, progress=progress,
            desc=f"{self.name} unlearning")
        masks, history = recover_masks(unlearned, tune, layers, rate=self.rnp_recover_rate,
                                       epochs=self.rnp_recover_epochs, alpha=self.rnp_alpha,
                                       batch_size=self.batch_size, shift=self.shift, flip=self.flip, seed=self.seed,
                                       progress=progress, desc=f"{self.name} recovering")
        return masks, {**record, "recovering": history}

    def repair(self, model: Any, clean: Dataset, *, progress: bool = False) -> Repair:
        """B with the neurons RNP finds pruned (or the budget's fallback); the record holds the
        masks, the unlearning and recovering histories, the threshold kept and the budget check."""
        from ..nets.trainer import right_on
        from .tuning import check_budget, split_clean

        def label(t: float) -> str:
            return f"pruning at mask <= {t:g}"

        tune, holdout, _, hold_idx = split_clean(clean, holdout_fraction=self.holdout_fraction, seed=self.seed)
        masks, record = self.masks(model, tune, progress=progress)
        base_right = right_on(model, holdout)
        base_acc = float(100.0 * np.mean(base_right))
        # (threshold, neurons pruned, network, its held-out images right), from rnp_threshold down
        tried: list[tuple[float, dict[str, tuple[int, ...]], Any, np.ndarray]] = []
        for t in self.thresholds():
            neurons = neurons_at_most(masks, t)
            if tried and neurons == tried[-1][1]:
                continue
            net = _pruned_copy(model, neurons) if neurons else model
            tried.append((t, neurons, net, right_on(net, holdout) if neurons else base_right))
            if self.budget is None or base_acc - 100.0 * np.mean(tried[-1][3]) <= self.budget:
                break  # the first within the budget is the one returned; lower ones are not needed
        first_t, first_neurons, first_net, first_right = tried[0]
        candidates: list[tuple[str, float] | tuple[str, float, np.ndarray | None]] = [
            (label(t), float(100.0 * np.mean(r)), r) for t, n, _, r in tried[1:] if n]
        candidates.append(("B", base_acc))
        # B itself (nothing pruned) needs no bound on its drop
        check = check_budget(self.name, float(100.0 * np.mean(first_right)), base_acc, self.budget, candidates,
                             (base_right, first_right) if first_neurons else None)
        kept_t: float | None = first_t
        neurons, net = first_neurons, first_net
        if check.fallback == "B":
            kept_t, neurons, net = None, {}, model
        elif check.fallback is not None:
            kept_t, neurons, net = next((t, n, m) for t, n, m, _ in tried if label(t) == check.fallback)
        pruned = sum(len(u) for u in neurons.values())
        warnings = list(check.lines)
        if not first_neurons:
            line = (f"WARNING: {self.name} found no neuron whose recovered mask is at most {self.rnp_threshold:g}: "
                    "nothing pruned, returned the BadNet unchanged: the backdoor is NOT removed")
            log.warning("%s", line)
            warnings.append(line)
        log.info("%s: %d of %d conv neurons pruned (mask <= %s); held-out accuracy %.2f%% (B %.2f%%)", self.name,
                 pruned, sum(len(m) for m in masks.values()), "-" if kept_t is None else f"{kept_t:g}",
                 check.accuracy, base_acc)
        choices = {**{k: v for k, v in record.items() if k not in ("unlearning", "recovering")},
                   "masks": {name: [round(float(v), 4) for v in m] for name, m in masks.items()},
                   "threshold": kept_t, "neurons_pruned": {name: list(u) for name, u in neurons.items()},
                   "tried": [{"threshold": t, "neurons": sum(len(u) for u in n.values()),
                              "holdout_accuracy": float(100.0 * np.mean(r))} for t, n, _, r in tried],
                   "holdout_images": len(hold_idx), **check.as_dict()}
        history = {"unlearning": record["unlearning"], "recovering": record["recovering"]}
        repaired = Repaired(label=self.name, model=net, channels_pruned=pruned)
        return Repair(defense=self.name, models=(repaired,), record=self.make_record(choices, [history]),
                      warnings=tuple(warnings))
