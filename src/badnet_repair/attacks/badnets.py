"""Making BadNets: the baseline poisoning attack and the pruning-aware attack.

Gu, Dolan-Gavitt and Garg, "BadNets" (2017): train on data where a fraction of images
carry a trigger and the target label. Liu, Dolan-Gavitt and Garg, "Fine-Pruning" (RAID
2018), Section 4.1: the pruning-aware attack trains clean, prunes the last conv layer's
dormant channels, retrains the pruned network on poisoned data, then reinstates the pruned
channels with lowered biases so they stay dormant. The defender's pruning then removes the
decoys first and reaches the backdoor only by pruning channels clean inputs need too.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import _backend  # noqa: F401
from ..defenses.sweep import prune_sweep
from ..formats.data import Dataset
from ..nets.models import conv_layer, deepid, prune_channels
from ..nets.training import EpochProgress, ZeroChannels, deterministic_ops
from .triggers import Trigger

__all__ = ["AttackResult", "poison_training_set", "train_badnet", "train_model", "train_multi_target_badnet",
           "train_pruning_aware_badnet"]

log = logging.getLogger(__name__)

import keras  # noqa: E402


@dataclass(frozen=True, eq=False)
class AttackResult:
    """A trained BadNet and how it was made.

    Attributes:
        model: the BadNet.
        poisoned_fraction: fraction of training images that carried the trigger.
        pruned_channels: channels the pruning-aware attack pruned and reinstated (empty for
            the baseline).
        history: per-epoch training metrics, by phase.
    """

    model: Any
    poisoned_fraction: float
    pruned_channels: tuple[int, ...] = ()
    history: dict[str, list[dict[str, float]]] | None = None


def poison_training_set(train: Dataset, trigger: Trigger, *, target: int = 0, poison_rate: float = 0.1,
                        seed: int = 0) -> tuple[Dataset, float]:
    """Add triggered, target-labelled copies of a random fraction of the training images.

    Args:
        train: clean training data.
        trigger: the trigger.
        target: the attack's target class.
        poison_rate: poisoned images as a fraction of the final set, default 0.1 (rounded to
            whole images; at least one when above 0, so 1 % of a small set still poisons).
        seed: chooses which images are copied.

    Returns:
        (the clean images plus the poisoned copies, the poisoned fraction).
    """
    if not 0.0 <= poison_rate < 1.0:
        raise ValueError(f"poison_rate must be in [0, 1), not {poison_rate}")
    rng = np.random.default_rng([seed, 3])
    n_bd = round(poison_rate * len(train) / (1.0 - poison_rate))
    if poison_rate > 0:
        n_bd = max(n_bd, 1)
    pick = rng.choice(np.flatnonzero(train.y != target), size=n_bd, replace=n_bd > np.sum(train.y != target))
    x = np.concatenate([train.x, trigger.apply(train.x[pick])])
    y = np.concatenate([train.y, np.full(n_bd, target, np.int64)])
    return Dataset(x, y, name=f"{train.name}+poison"), n_bd / len(y)


def train_model(
    model: Any,
    data: Dataset,
    *,
    epochs: int = 10,
    batch_size: int = 64,
    learning_rate: float = 1e-3,
    seed: int = 0,
    callbacks: Sequence[Any] = (),
    shift: int = 0,
    flip: bool = False,
    desc: str = "training",
    progress: bool = True,
) -> list[dict[str, float]]:
    """Train ``model`` in place on ``data`` with Adam (cosine-decayed learning rate) and
    cross-entropy; returns the per-epoch history. Runs with TensorFlow's op determinism
    (:func:`deterministic_ops`), so the same seed gives the same weights.

    With ``shift`` or ``flip`` each epoch trains on freshly augmented copies
    (:func:`~badnet_repair.nets.augment.augment_images`), which lifts clean accuracy on small
    face sets (measured on Yale B in docs/research/real_faces_history.md)."""
    from ..nets.augment import augment_images

    with deterministic_ops():
        keras.utils.set_random_seed(seed)
        steps = epochs * -(-len(data) // batch_size)
        # cosine decay to zero: the last epochs settle instead of bouncing around the optimum
        schedule = keras.optimizers.schedules.CosineDecay(learning_rate, decay_steps=max(1, steps))
        model.compile(optimizer=keras.optimizers.Adam(schedule),
                      loss="sparse_categorical_crossentropy", metrics=["accuracy"])
        bar = EpochProgress(epochs, desc, progress)
        if not (shift or flip):
            model.fit(data.x, data.y, epochs=epochs, batch_size=batch_size, shuffle=True, verbose=0,
                      callbacks=[*callbacks, bar])
            return bar.history
        rng = np.random.default_rng([seed, 12])
        for epoch in range(epochs):
            x = augment_images(np.asarray(data.x), rng=rng, shift=shift, flip=flip)
            h = model.fit(x, data.y, epochs=1, batch_size=batch_size, shuffle=True, verbose=0,
                          callbacks=list(callbacks))
            bar.on_epoch_end(epoch, {k: v[-1] for k, v in h.history.items()})
        bar.on_train_end()
        return bar.history


def train_badnet(
    train: Dataset,
    trigger: Trigger,
    *,
    num_classes: int | None = None,
    target: int = 0,
    poison_rate: float = 0.1,
    epochs: int = 12,
    batch_size: int = 64,
    learning_rate: float = 1e-3,
    seed: int = 0,
    shift: int = 0,
    flip: bool = False,
    architecture: Callable[..., Any] = deepid,
    progress: bool = True,
) -> AttackResult:
    """Train a baseline BadNet (Gu et al. 2017) on clean data plus poisoned copies.

    Args:
        train: clean training data, (N, 55, 47, 3) 0..255.
        trigger: the trigger stamped on the poisoned copies.
        num_classes: classes, default ``max(label) + 1``.
        target: the attack's target class, default 0.
        poison_rate: fraction of the training set that is poisoned, default 0.1.
        epochs, batch_size, learning_rate, seed: training settings.
        shift, flip: augmentation while training (see :func:`train_model`), default none.
        architecture: ``f(num_classes=...)`` building the network, default DeepID.
        progress: show a progress bar.

    Returns:
        AttackResult with the trained model.
    """
    n = int(num_classes or int(train.y.max()) + 1)
    keras.utils.set_random_seed(seed)
    model = architecture(num_classes=n)
    data, frac = poison_training_set(train, trigger, target=target, poison_rate=poison_rate, seed=seed)
    hist = train_model(model, data, epochs=epochs, batch_size=batch_size, learning_rate=learning_rate,
                       seed=seed, shift=shift, flip=flip, desc="BadNet", progress=progress)
    return AttackResult(model=model, poisoned_fraction=frac, history={"poisoned": hist})


def train_multi_target_badnet(
    train: Dataset,
    triggers: Sequence[Trigger],
    targets: Sequence[int],
    *,
    num_classes: int | None = None,
    poison_rate: float = 0.05,
    epochs: int = 12,
    batch_size: int = 64,
    learning_rate: float = 1e-3,
    seed: int = 0,
    shift: int = 0,
    flip: bool = False,
    architecture: Callable[..., Any] = deepid,
    progress: bool = True,
) -> AttackResult:
    """A multi-trigger, multi-target BadNet (Gu et al. 2017, as CSAW-HackML 2020's
    multi_trigger_multi_target): each trigger is poisoned in with its own target.

    Args:
        train: clean training data.
        triggers: the triggers; ``triggers[i]`` sends inputs to ``targets[i]``.
        targets: one distinct target class per trigger.
        num_classes: classes, default ``max(label) + 1``.
        poison_rate: each trigger's share of the poisoned training set, default 0.05.
        epochs, batch_size, learning_rate, seed, shift, flip, architecture, progress: as
            :func:`train_badnet`.

    Returns:
        AttackResult; ``poisoned_fraction`` counts all triggers' copies.
    """
    if len(triggers) != len(targets) or not triggers:
        raise ValueError(f"one target per trigger: {len(triggers)} triggers, {len(targets)} targets")
    if len(set(int(t) for t in targets)) != len(targets):
        raise ValueError(f"the targets must differ: {list(targets)}")
    if not 0.0 <= poison_rate * len(triggers) < 1.0:
        raise ValueError(f"{len(triggers)} triggers at poison_rate {poison_rate} poison the whole set")
    n = int(num_classes or int(train.y.max()) + 1)
    # each trigger's copies are poison_rate of the final set: rate r among (clean + this trigger's)
    rate = poison_rate / (1.0 - poison_rate * (len(triggers) - 1))
    xs, ys = [train.x], [train.y]
    for i, (trigger, target) in enumerate(zip(triggers, targets, strict=False)):
        one, _ = poison_training_set(train, trigger, target=int(target), poison_rate=rate, seed=seed + 101 * i)
        xs.append(one.x[len(train):])
        ys.append(one.y[len(train):])
    data = Dataset(np.concatenate(xs), np.concatenate(ys), name=f"{train.name}+poison")
    keras.utils.set_random_seed(seed)
    model = architecture(num_classes=n)
    hist = train_model(model, data, epochs=epochs, batch_size=batch_size, learning_rate=learning_rate,
                       seed=seed, shift=shift, flip=flip, desc="multi-target BadNet", progress=progress)
    return AttackResult(model=model, poisoned_fraction=1.0 - len(train) / len(data), history={"poisoned": hist})


def _lower_bias_to_dormancy(model: Any, layer: str, channels: Sequence[int], batches: Iterable[np.ndarray],
                            margin: float = 1.0) -> None:
    """Set each channel's bias so its pre-activation stays below -margin on every batch."""
    conv = conv_layer(model, layer)
    if not channels:
        return
    feed = keras.Model(model.inputs[0], conv.input)
    k, bias = conv.get_weights()
    probe = keras.layers.Conv2D(len(channels), conv.kernel_size, strides=conv.strides, padding=conv.padding,
                                dilation_rate=conv.dilation_rate, use_bias=False)
    probe.build(tuple(conv.input.shape))
    probe.set_weights([k[..., list(channels)]])
    peak = np.full(len(channels), -np.inf)
    for batch in batches:
        z = keras.ops.convert_to_numpy(probe(feed(batch, training=False)))
        peak = np.maximum(peak, z.reshape(-1, len(channels)).max(axis=0))
    bias = bias.copy()
    bias[list(channels)] = np.minimum(bias[list(channels)], -peak - margin)
    conv.set_weights([k, bias])


def train_pruning_aware_badnet(
    train: Dataset,
    trigger: Trigger,
    *,
    num_classes: int | None = None,
    target: int = 0,
    poison_rate: float = 0.1,
    layer: str | None = None,
    prune_drop: float = 4.0,
    holdout_fraction: float = 0.2,
    clean_epochs: int = 12,
    poison_epochs: int = 8,
    batch_size: int = 64,
    learning_rate: float = 1e-3,
    seed: int = 0,
    shift: int = 0,
    flip: bool = False,
    architecture: Callable[..., Any] = deepid,
    progress: bool = True,
) -> AttackResult:
    """The pruning-aware attack of Liu, Dolan-Gavitt and Garg ("Fine-Pruning", RAID 2018).

    1. Train the network on clean data.
    2. Rank ``layer``'s channels on a clean hold-out part of ``train`` and prune them in
       ascending order of activation until hold-out accuracy falls ``prune_drop`` points.
    3. Retrain the pruned network on poisoned data, pruned channels held at zero, so the
       backdoor lives in the channels that clean inputs also use.
    4. Reinstate the pruned channels with their clean weights and biases lowered until
       they are dormant on all training data (clean and poisoned).

    Args:
        train: clean training data (the attacker's).
        trigger: the trigger.
        num_classes: classes, default ``max(label) + 1``.
        target: the attack's target class, default 0.
        poison_rate: poisoned fraction of the retraining set, default 0.1.
        layer: the conv layer the defender will prune, default
            :func:`~badnet_repair.nets.models.default_conv_layer` (``conv_3`` in DeepID).
        prune_drop: the attacker's pruning stop, in accuracy points, default 4.
        holdout_fraction: part of ``train`` held out to rank and stop the pruning.
        clean_epochs, poison_epochs, batch_size, learning_rate, seed: training settings.
        shift, flip: augmentation in both training phases, default none.
        architecture: builder of the network, default DeepID.
        progress: show progress bars.

    Returns:
        AttackResult whose ``pruned_channels`` are the reinstated decoys.
    """
    n = int(num_classes or int(train.y.max()) + 1)
    rng = np.random.default_rng([seed, 4])
    order = rng.permutation(len(train))
    n_hold = max(1, round(holdout_fraction * len(train)))
    hold, fit = train.subset(np.sort(order[:n_hold]), name="holdout"), train.subset(np.sort(order[n_hold:]))
    keras.utils.set_random_seed(seed)
    clean_model = architecture(num_classes=n)
    layer = str(conv_layer(clean_model, layer).name)
    h_clean = train_model(clean_model, fit, epochs=clean_epochs, batch_size=batch_size,
                          learning_rate=learning_rate, seed=seed, shift=shift, flip=flip, desc="clean training",
                          progress=progress)
    sweep = prune_sweep(clean_model, hold, layer=layer, thresholds=[prune_drop])
    pruned = sweep.channels_at(prune_drop)
    filters = len(sweep.ranking.order)
    log.info("pruning-aware attack: pruned %d of %d channels of %s", len(pruned), filters, layer)
    model = prune_channels(clean_model, layer, pruned)
    data, frac = poison_training_set(fit, trigger, target=target, poison_rate=poison_rate, seed=seed)
    h_bd = train_model(model, data, epochs=poison_epochs, batch_size=batch_size,
                       learning_rate=learning_rate, seed=seed + 1, callbacks=[ZeroChannels(layer, pruned)],
                       shift=shift, flip=flip, desc="poisoned retraining", progress=progress)
    # reinstate: clean kernels back, biases lowered until dormant on every training input
    k_clean, b_clean = clean_model.get_layer(layer).get_weights()
    k, b = model.get_layer(layer).get_weights()
    k[..., list(pruned)] = k_clean[..., list(pruned)]
    b[list(pruned)] = b_clean[list(pruned)]
    model.get_layer(layer).set_weights([k, b])
    # dormant on every clean training image and on each of them with the trigger
    chunks = [train.x[i : i + 512] for i in range(0, len(train), 512)]
    _lower_bias_to_dormancy(model, layer, pruned, itertools.chain(chunks, (trigger.apply(c) for c in chunks)))
    return AttackResult(model=model, poisoned_fraction=frac, pruned_channels=pruned,
                        history={"clean": h_clean, "poisoned": h_bd})
