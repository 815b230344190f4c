"""Fine-tuning and fine-pruning: repair a BadNet with clean data only.

Liu, Dolan-Gavitt and Garg, "Fine-Pruning: Defending Against Backdooring Attacks on Deep
Neural Networks" (RAID 2018), Section 5: prune the last conv layer's least active channels
(as the pruning defense does), then fine-tune the pruned network on clean data, with the
pruned channels kept at zero. Fine-tuning alone is the paper's other baseline.

The clean validation data is split into a tuning part and a held-out part. Every choice
(how much to prune, which epoch to keep) is made on the held-out part alone; no test and
no poisoned data is seen.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

import numpy as np

from .. import _backend  # noqa: F401
from ..defaults import ENSEMBLE_MEANS, FINE_TUNING, TuningSettings
from ..formats.data import Dataset
from ..nets.models import conv_layer, predict_classes, prune_channels

__all__ = ["DEFAULTS", "FinePruneResult", "FineTuned", "fine_prune", "fine_tune", "split_clean"]

log = logging.getLogger(__name__)

DEFAULTS = FINE_TUNING


@dataclass(frozen=True, eq=False)
class FineTuned:
    """One fine-tuned (or fine-pruned) network and how it was chosen.

    Attributes:
        model: the tuned network (a new model; the BadNet is not changed).
        seed: its seed (split, ranking, shuffling, augmentation).
        pruned_channels: channels kept at zero (empty for fine-tuning).
        kept_epoch: the epoch whose weights were kept (1..epochs), or 0 where, with
            ``keep_pruned_start``, no tuned epoch did as well on the held-out part as the
            pruned, untuned start.
        holdout_accuracy: held-out clean accuracy (%) of the kept network.
        base_holdout_accuracy: held-out clean accuracy (%) of the BadNet.
        pruned_holdout_accuracy: held-out accuracy (%) after pruning, before tuning.
        history: per epoch: ``loss``, ``accuracy`` (tuning part), ``holdout_accuracy`` and,
            when distilling, ``teacher_agreement`` (% of the epoch's augmented tuning images the
            teacher classified correctly, the ones distilled); the first row (epoch 0) is the
            start, before tuning.
        tune_index: (M,) indices of the validation images used for tuning.
        holdout_index: (K,) indices of the held-out validation images.
    """

    model: Any
    seed: int
    pruned_channels: tuple[int, ...]
    kept_epoch: int
    holdout_accuracy: float
    base_holdout_accuracy: float
    pruned_holdout_accuracy: float
    history: tuple[dict[str, float], ...]
    tune_index: np.ndarray
    holdout_index: np.ndarray


@dataclass(frozen=True, eq=False)
class FinePruneResult:
    """A model repaired by fine-tuning or fine-pruning: one network or an average of several.

    Attributes:
        model: the repaired model: the single member's network, or with several members a
            model averaging their probabilities (:func:`~badnet_repair.nets.models.average_models`).
        method: ``"fine-pruning"`` or ``"fine-tuning"``.
        layer: the pruned layer.
        members: the tuned networks, each with its own split, pruning and kept epoch.
    """

    model: Any
    method: str
    layer: str
    members: tuple[FineTuned, ...]

    @property
    def channels_pruned(self) -> int:
        """Channels pruned: the member's count, or the median over the members."""
        return int(np.median([len(m.pruned_channels) for m in self.members]))

    @property
    def kept_epochs(self) -> tuple[int, ...]:
        """Each member's kept epoch."""
        return tuple(m.kept_epoch for m in self.members)


def split_clean(data: Dataset, *, holdout_fraction: float = 0.2, seed: int = 0
                ) -> tuple[Dataset, Dataset, np.ndarray, np.ndarray]:
    """Split clean data into a tuning part and a disjoint held-out part, per class.

    Args:
        data: clean labelled data.
        holdout_fraction: share of each class held out, default 0.2 (at least one image of
            each class with two or more images).
        seed: the split's seed.

    Returns:
        (tune, holdout, tune_index, holdout_index), the indices into ``data``, sorted.
    """
    if not 0.0 < holdout_fraction < 1.0:
        raise ValueError(f"holdout_fraction must be in (0, 1), not {holdout_fraction}")
    rng = np.random.default_rng([seed, 5])
    hold: list[np.ndarray] = []
    adjusted: dict[tuple[int, int], int] = {}  # (held out, of) -> number of classes
    for c in np.unique(data.y):
        idx = rng.permutation(np.flatnonzero(data.y == c))
        k = want = round(holdout_fraction * len(idx))
        if len(idx) >= 2:
            k = min(max(k, 1), len(idx) - 1)
        if k != want:
            adjusted[(k, len(idx))] = adjusted.get((k, len(idx)), 0) + 1
        hold.append(idx[:k])
    hold_idx = np.sort(np.concatenate(hold)) if hold else np.zeros(0, np.int64)
    if adjusted:
        cases = ", ".join(f"{n} class{'es' if n > 1 else ''} {k} of {size}"
                          for (k, size), n in sorted(adjusted.items(), key=lambda kv: -kv[1]))
        log.warning("held out %d of %d clean images (%.1f%%, %.0f%% asked): classes too small for %.0f%% "
                    "keep at least one image on each side (%s)", len(hold_idx), len(data),
                    100.0 * len(hold_idx) / len(data), 100 * holdout_fraction, 100 * holdout_fraction, cases)
    mask = np.ones(len(data), bool)
    mask[hold_idx] = False
    tune_idx = np.flatnonzero(mask)
    if len(hold_idx) == 0 or len(tune_idx) == 0:
        raise ValueError(f"cannot split {len(data)} images into tuning and held-out parts")
    x = np.asarray(data.x[:]) if not isinstance(data.x, np.ndarray) else data.x
    return (Dataset(x[tune_idx], data.y[tune_idx], name="tune"),
            Dataset(x[hold_idx], data.y[hold_idx], name="holdout"), tune_idx, hold_idx)


def _accuracy(model: Any, data: Dataset) -> float:
    return float(100.0 * np.mean(predict_classes(model, data.x) == data.y))


def fine_tune(
    model: Any,
    tune: Dataset,
    holdout: Dataset,
    *,
    epochs: int = DEFAULTS["epochs"],
    learning_rate: float = DEFAULTS["learning_rate"],
    batch_size: int = DEFAULTS["batch_size"],
    seed: int = 0,
    schedule: str = DEFAULTS["schedule"],
    shift: int = DEFAULTS["shift"],
    flip: bool = DEFAULTS["flip"],
    clipnorm: float | None = DEFAULTS["clipnorm"],
    distill: float = DEFAULTS["distill"],
    weight_decay: float = DEFAULTS["weight_decay"],
    teacher: Any | None = None,
    frozen_channels: tuple[str, tuple[int, ...]] | None = None,
    keep_start: bool = True,
    stamp: Callable[[np.ndarray, np.random.Generator], np.ndarray] | None = None,
    sam_rho: float = 0.0,
    sam_adaptive: bool = True,
    feature_shift: float | None = None,
    head: str | None = None,
    head_epochs: int = 0,
    progress: bool = True,
    desc: str = "fine-tuning",
) -> tuple[Any, int, list[dict[str, float]]]:
    """Fine-tune a copy of ``model`` on ``tune``; keep the epoch best on ``holdout``.

    Every epoch trains on freshly augmented copies of ``tune`` (:func:`augment_images`);
    the epoch kept is the one with the highest held-out accuracy, ties going to the later
    (more tuned) epoch. With ``keep_start`` the untuned start is a candidate too (epoch 0):
    a repair that starts from a pruned model is never worse than that model on the held-out
    data, and a warning says when tuning did not match it.

    Args:
        model: the network (not changed).
        tune: clean data to train on.
        holdout: clean data that chooses the epoch.
        epochs: epochs, default 50.
        learning_rate: Adam's peak learning rate, default 2e-3. A rate too low to move the
            weights out of the BadNet's minimum leaves the backdoor in place.
        schedule: ``"cosine"`` (default; decayed to 0 over the epochs) or ``"constant"``.
        batch_size: default 64.
        seed: shuffling, augmentation and initialisation seed.
        shift: random translation of up to this many pixels, default 2 (0 = none).
        flip: random horizontal flips, default True (set False for data that is not
            left-right symmetric, such as text or traffic signs).
        clipnorm: clip each gradient to this norm, default 1.0 (None = no clipping); keeps
            the high learning rate from wrecking a network fed 0..255 pixels.
        distill: weight of the teacher's predictions in the training targets, default 0 (off):
            each augmented tuning image the teacher classifies correctly is labelled
            ``(1 - distill) * one_hot(label) + distill * teacher(image)``; the others keep
            their one-hot label. The teacher's soft outputs on clean images carry its clean
            knowledge (Hinton et al., 2015), which a few labelled images per class cannot.
            Its mistakes are not distilled: on shifted and flipped clean images a BadNet
            sometimes answers its target class, and distilling those answers teaches the
            backdoor back (pruning-aware demo BadNet, one network, distill 0.3, seed 0:
            21.0 % attack success with every prediction distilled, 1.8 % without the mistakes).
        weight_decay: decoupled weight decay (AdamW; Loshchilov and Hutter, ICLR 2019), default
            0 (plain Adam): every step multiplies each weight by ``1 - rate * weight_decay``.
            Clean data's gradients hold up the weights clean images use; the decay wears down
            the ones they do not, which is where a backdoor that survived pruning lives
            (pruning-aware real-face BadNet, distill 0.3, the three networks of the seed-2 run
            scored alone: 0.0/7.1/8.6 % attack success without decay, 0.0/0.0/0.0 % at 1.0;
            docs/research/real_faces_history.md).
        teacher: the network whose predictions are distilled, default ``model``
            (:func:`fine_prune` passes the unpruned BadNet).
        frozen_channels: ``(layer, channels)`` held at zero throughout.
        keep_start: let the untuned start win, default True. :func:`fine_prune` passes True
            only for a pruned start and only with its ``keep_pruned_start``: an unpruned start
            is the BadNet itself, which clean data always prefers and which still holds the
            backdoor.
        stamp: ``f(images, rng) -> images`` applied to each epoch's augmented tuning images,
            labels unchanged (Neural Cleanse's unlearning stamps reversed triggers on a share).
        sam_rho: above 0, every step is sharpness-aware with this radius
            (:class:`~badnet_repair.nets.training.SharpnessAware`; FT-SAM), default 0 (plain steps).
        sam_adaptive: the adaptive (ASAM) radius, relative to each weight, default True.
        feature_shift: not None, Feature Shift Tuning (FST;
            :class:`~badnet_repair.nets.training.FeatureShift`): the classifier head is drawn
            anew and every step's loss adds ``feature_shift / C * <K, K0>`` (the head's kernel with
            the BadNet's, C classes), ``K`` kept at ``K0``'s norm; 0 = re-initialised head only.
            Default None (off).
        head: the classifier's Dense layer for ``feature_shift``, default found from the graph
            (:func:`~badnet_repair.nets.models.classifier_head`).
        head_epochs: with ``feature_shift``, epochs that train the new head alone (the layers
            below frozen, Adam at ``learning_rate``, the same loss) before ``epochs`` of the whole
            network; default 0 (the paper: the whole network from the start).
        progress: a progress bar over epochs.
        desc: the progress bar's label (the defense's name), default ``"fine-tuning"``.

    Returns:
        (the kept model, its epoch (0 = the untuned start, else 1..epochs), per-epoch
        history with epoch 0 = the start: for ``feature_shift``, the re-initialised head after
        its ``head_epochs``).
    """
    import keras

    from ..nets.augment import augment_images
    from ..nets.models import reinitialize_head
    from ..nets.training import EpochProgress, FeatureShift, SharpnessAware, ZeroChannels, deterministic_ops

    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, not {epochs}")
    if not 0.0 <= distill <= 1.0:
        raise ValueError(f"distill must be in [0, 1], not {distill}")
    if not weight_decay >= 0.0:
        raise ValueError(f"weight_decay must be >= 0, not {weight_decay}")
    if feature_shift is not None and sam_rho:
        raise ValueError("feature_shift and sam_rho cannot be combined (each takes over the training step)")
    if head_epochs < 0 or (head_epochs and feature_shift is None):
        raise ValueError(f"head_epochs ({head_epochs}) must be >= 0 and needs feature_shift")
    # same seed, same weights: the selection of members and epochs is then repeatable
    with deterministic_ops():
        teacher = model if teacher is None else teacher
        keras.utils.set_random_seed(seed)
        rng = np.random.default_rng([seed, 11])
        work = keras.models.clone_model(model)
        work.set_weights(model.get_weights())
        network = work
        if sam_rho:
            work = SharpnessAware(network, sam_rho, sam_adaptive)
        elif feature_shift is not None:
            head_name, original = reinitialize_head(network, head, seed=seed)
            work = FeatureShift(network, head_name, original, feature_shift)
            # the penalty's range is alpha |K0|^2 / C (times the cosine): say it, as it sets alpha's meaning
            log.info("feature shift: head %s re-initialised; penalty %g x |K0|^2 / C = %.3g", head_name,
                     feature_shift, feature_shift * float(np.mean(np.sum(original.astype(np.float64) ** 2, axis=0))))
        callbacks: list[Any] = []
        if frozen_channels is not None and frozen_channels[1]:
            zero = ZeroChannels(*frozen_channels)
            zero.set_model(work)
            zero.zero()
            callbacks.append(zero)
        rate: Any = learning_rate
        if schedule == "cosine":
            # early epochs move the weights (and the backdoor) most, late ones settle
            rate = keras.optimizers.schedules.CosineDecay(learning_rate, max(1, epochs * -(-len(tune) // batch_size)))
        elif schedule != "constant":
            raise ValueError(f"schedule must be 'constant' or 'cosine', not {schedule!r}")
        one_hot = np.eye(int(network.outputs[0].shape[-1]), dtype=np.float32)[tune.y]
        tune_x = np.asarray(tune.x, dtype=np.float32)

        def epoch_images() -> np.ndarray:
            x = augment_images(tune_x, rng=rng, shift=shift, flip=flip) if shift or flip else tune_x
            return stamp(x, rng) if stamp is not None else x

        if feature_shift is not None and head_epochs:
            # Train the new head alone on B's features first (linear probing, then tuning: Kumar et
            # al., ICLR 2022): a random head's large early gradients otherwise wreck the features
            # that a few clean images per class cannot rebuild.
            below = [lyr for lyr in network.layers if lyr.name != head_name and lyr.trainable_weights]
            for lyr in below:
                lyr.trainable = False
            work.compile(optimizer=keras.optimizers.Adam(learning_rate, clipnorm=clipnorm),
                         loss="categorical_crossentropy", metrics=["categorical_accuracy"])
            for _ in range(head_epochs):
                work.fit(epoch_images(), one_hot, epochs=1, batch_size=batch_size, shuffle=True, verbose=0)
            for lyr in below:
                lyr.trainable = True
        optimizer = (keras.optimizers.AdamW(rate, weight_decay=weight_decay, clipnorm=clipnorm) if weight_decay
                     else keras.optimizers.Adam(rate, clipnorm=clipnorm))
        work.compile(optimizer=optimizer,
                     loss="categorical_crossentropy", metrics=["categorical_accuracy"])
        history: list[dict[str, float]] = [{"epoch": 0.0, "holdout_accuracy": _accuracy(network, holdout)}]
        best_acc = history[0]["holdout_accuracy"] if keep_start else -1.0
        best_epoch, best_weights = 0, work.get_weights()
        bar = EpochProgress(epochs, desc, progress)
        for epoch in range(1, epochs + 1):
            x = epoch_images()
            y = one_hot
            if distill:
                soft = np.asarray(teacher.predict(x, batch_size=512, verbose=0), dtype=np.float32)
                agree = soft.argmax(axis=1) == tune.y
                y = np.where(agree[:, None], (1.0 - distill) * one_hot + distill * soft, one_hot)
            h = work.fit(x, y, epochs=1, batch_size=batch_size, shuffle=True, verbose=0, callbacks=callbacks)
            acc = _accuracy(network, holdout)
            # "accuracy" on the tuning part: agreement with the (soft) targets' top class
            row = {"epoch": float(epoch), "loss": float(h.history["loss"][-1]),
                   "accuracy": float(100 * h.history["categorical_accuracy"][-1]), "holdout_accuracy": acc}
            if distill:
                row["teacher_agreement"] = float(100 * agree.mean())
            history.append(row)
            bar.on_epoch_end(epoch, {"holdout_accuracy": acc})
            if acc >= best_acc:
                best_acc, best_epoch, best_weights = acc, epoch, work.get_weights()
        bar.on_train_end()
        if best_epoch == 0:
            log.warning("no fine-tuned epoch matched the untuned start's held-out accuracy (%.2f%%); "
                        "keeping the start", best_acc)
        work.set_weights(best_weights)
        return network, best_epoch, history


def fine_prune(
    model: Any,
    valid: Dataset,
    *,
    method: Literal["fine-pruning", "fine-tuning"] = "fine-pruning",
    layer: str | None = None,
    accuracy_drop: float | None = DEFAULTS["accuracy_drop"],
    prune_fraction: float | None = None,
    seed: int = 0,
    keep_pruned_start: bool = DEFAULTS["keep_pruned_start"],
    sam_rho: float = 0.0,
    sam_adaptive: bool = True,
    feature_shift: float | None = None,
    head: str | None = None,
    head_epochs: int = 0,
    progress: bool = True,
    desc: str | None = None,
    **tuning: Any,
) -> FinePruneResult:
    """Fine-pruning (Liu et al., RAID 2018): prune, then fine-tune on clean data.

    For each of ``members`` networks (member ``i`` with seed ``seed + 1000 * i``):

    1. Split ``valid`` into tuning and held-out parts (:func:`split_clean`).
    2. Rank ``layer``'s channels by mean activation on the held-out part and prune them in
       ascending order, to ``prune_fraction`` of the channels if given, else to the first
       step whose held-out accuracy is ``accuracy_drop`` points below the BadNet's.
    3. Fine-tune on augmented copies of the tuning part with the pruned channels held at
       zero, keeping the epoch with the best held-out accuracy (the pruned, untuned start
       among the candidates when ``keep_pruned_start``).

    With ``method="fine-tuning"`` step 2 is skipped (the paper's other baseline). With one
    member the result is the paper's single network; with several, the repaired model
    averages the members' probabilities (by default their geometric mean). Each member is
    tuned on a different part of the clean data, so together they learn from all of it, and
    their errors partly cancel: on real faces with ~10 tuning images per person this
    recovers the clean accuracy a single fine-pruned network loses (docs/research/real_faces_history.md), at
    ``members`` times the time and size.

    Args:
        model: the BadNet (not changed).
        valid: clean labelled validation data; nothing else is read.
        method: ``"fine-pruning"`` (default) or ``"fine-tuning"``.
        layer: conv layer to prune, default
            :func:`~badnet_repair.nets.models.default_conv_layer` (``conv_3`` in DeepID).
        accuracy_drop: prune until held-out accuracy falls this many points (default in
            :data:`DEFAULTS`).
        prune_fraction: prune this fraction of the channels instead.
        holdout_fraction: share of ``valid`` held out, default 0.2.
        members: networks tuned and averaged (default in :data:`DEFAULTS`; 1 = a single
            network, as in the paper).
        ensemble_mean: how members are averaged: ``"geometric"`` (default; normalised
            product of their probabilities, so a member that kept the backdoor is outvoted by
            those that did not) or ``"arithmetic"`` (:func:`~badnet_repair.nets.models.average_models`).
            On the real-face pruning-aware BadNet, 3 members: 1.7-2.3 % attack success
            geometric vs 2.7-4.8 % arithmetic at the same clean accuracy; not lower on every
            run (docs/research/real_faces_history.md).
        seed: member ``i`` is tuned with seed ``seed + 1000 i``, default 0.
        keep_pruned_start: let the pruned network before any tuning win where no tuned epoch
            matches its held-out accuracy, default False: a tuned epoch is always kept. The
            pruned start still holds whatever backdoor pruning missed, and its held-out
            accuracy, measured on the images that chose the prune amount, flatters it
            (docs/research/removal.md).
        sam_rho, sam_adaptive: sharpness-aware tuning (FT-SAM; see :func:`fine_tune`), default off.
        feature_shift, head, head_epochs: Feature Shift Tuning (FST; see :func:`fine_tune`), default off.
        progress: progress bars.
        desc: the progress bars' label, default ``method`` (a defense passes its name).
        **tuning: the other fine-tuning settings, fields of
            :class:`~badnet_repair.defaults.TuningSettings` (epochs, learning_rate, batch_size,
            schedule, shift, flip, clipnorm, distill, weight_decay; see :func:`fine_tune`).

    Returns:
        FinePruneResult.
    """
    from ..nets.models import average_models
    from .sweep import prune_sweep

    unknown = sorted(set(tuning) - {f.name for f in fields(TuningSettings)})
    if unknown:
        raise ValueError(f"unknown fine-tuning setting(s) {', '.join(unknown)}; settings: "
                         f"{', '.join(f.name for f in fields(TuningSettings))}")
    settings = TuningSettings(**tuning)
    holdout_fraction, members, ensemble_mean = settings.holdout_fraction, settings.members, settings.ensemble_mean
    per_network = {k: v for k, v in asdict(settings).items() if k not in ("holdout_fraction", "members",
                                                                          "ensemble_mean")}
    if method not in ("fine-pruning", "fine-tuning"):
        raise ValueError(f"method must be 'fine-pruning' or 'fine-tuning', not {method!r}")
    if members < 1:
        raise ValueError(f"members must be >= 1, not {members}")
    if ensemble_mean not in ENSEMBLE_MEANS:
        raise ValueError(f"ensemble_mean must be one of {ENSEMBLE_MEANS}, not {ensemble_mean!r}")
    if prune_fraction is not None and not 0.0 <= prune_fraction <= 1.0:
        raise ValueError(f"prune_fraction must be in [0, 1], not {prune_fraction}")
    if method == "fine-pruning" and prune_fraction is None and (accuracy_drop is None or not accuracy_drop >= 0):
        raise ValueError("give accuracy_drop >= 0 or prune_fraction")
    conv = conv_layer(model, layer)
    layer = str(conv.name)
    tuned: list[FineTuned] = []
    for i in range(members):
        member_seed = seed + 1000 * i
        tune, holdout, tune_idx, hold_idx = split_clean(valid, holdout_fraction=holdout_fraction, seed=member_seed)
        base_acc = _accuracy(model, holdout)
        pruned: tuple[int, ...] = ()
        if method == "fine-pruning":
            if prune_fraction is not None:
                sweep = prune_sweep(model, holdout, layer=layer, thresholds=())
                pruned = tuple(int(c) for c in sweep.ranking.order[: round(prune_fraction * int(conv.filters))])
            else:
                sweep = prune_sweep(model, holdout, layer=layer, thresholds=[float(accuracy_drop)])  # type: ignore[arg-type]
                sel = sweep.selections[float(accuracy_drop)]  # type: ignore[arg-type]
                pruned = tuple(int(c) for c in (sel.channels if sel is not None else sweep.ranking.order))
            start = prune_channels(model, layer, pruned)
        else:
            start = model
        pruned_acc = _accuracy(start, holdout)
        log.info("%s member %d/%d: %d channels of %s pruned; held-out accuracy %.2f -> %.2f", method, i + 1,
                 members, len(pruned), layer, base_acc, pruned_acc)
        net, epoch, history = fine_tune(start, tune, holdout, seed=member_seed, teacher=model,
                                        frozen_channels=(layer, pruned) if pruned else None,
                                        keep_start=bool(pruned) and keep_pruned_start, sam_rho=sam_rho,
                                        sam_adaptive=sam_adaptive, feature_shift=feature_shift, head=head,
                                        head_epochs=head_epochs, progress=progress,
                                        desc=(desc or method) + (f" {i + 1}/{members}" if members > 1 else ""),
                                        **per_network)
        tuned.append(FineTuned(model=net, seed=member_seed, pruned_channels=pruned, kept_epoch=epoch,
                               holdout_accuracy=history[epoch]["holdout_accuracy"], base_holdout_accuracy=base_acc,
                               pruned_holdout_accuracy=pruned_acc, history=tuple(history), tune_index=tune_idx,
                               holdout_index=hold_idx))
    repaired = tuned[0].model if members == 1 else average_models(
        [t.model for t in tuned], name=f"{method.replace('-', '_')}_ensemble", mean=ensemble_mean)
    return FinePruneResult(model=repaired, method=method, layer=layer, members=tuple(tuned))
