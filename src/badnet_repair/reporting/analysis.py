"""Where a backdoor lives: how a conv layer's channels respond to the trigger, and where the
pruning defense puts them. An evaluation tool: it reads poisoned images, which a defense never
may, to explain why a defense worked or failed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..defenses.sweep import ChannelRanking, rank_channels
from ..formats.data import Dataset
from ..nets.models import conv_layer

__all__ = ["TriggerResponse", "trigger_response"]


@dataclass(frozen=True, eq=False)
class TriggerResponse:
    """A conv layer's mean activation per channel on clean and on triggered images.

    Attributes:
        layer: the conv layer.
        clean_mean: (C,) mean activation of each channel over the clean images (all positions).
        poisoned_mean: (C,) the same over the triggered images.
        place: (C,) each channel's position in the pruning order (0 = pruned first).
    """

    layer: str
    clean_mean: np.ndarray
    poisoned_mean: np.ndarray
    place: np.ndarray

    @property
    def rise(self) -> np.ndarray:
        """(C,) how much the trigger raises each channel's mean activation."""
        return self.poisoned_mean - self.clean_mean

    def top(self, k: int = 5) -> np.ndarray:
        """The (k,) channels the trigger raises most, largest rise first (ties by index)."""
        return np.argsort(-self.rise, kind="stable")[:k]

    def as_dict(self) -> dict[str, Any]:
        """Plain types for JSON: the layer and one record per channel, in channel order."""
        return {"layer": self.layer, "channels": [
            {"channel": c, "clean_mean": float(self.clean_mean[c]), "poisoned_mean": float(self.poisoned_mean[c]),
             "rise": float(self.rise[c]), "place": int(self.place[c])} for c in range(len(self.place))]}


def trigger_response(
    model: Any,
    clean: Dataset | np.ndarray,
    poisoned: Dataset | np.ndarray,
    *,
    layer: str | None = None,
    ranking: ChannelRanking | None = None,
    batch_size: int = 256,
) -> TriggerResponse:
    """Measure how the trigger moves each channel of ``layer``, and where pruning ranks it.

    Fine-Pruning (Liu et al., RAID 2018) prunes the channels clean images activate least,
    on the premise that the backdoor lives in channels dormant on clean data; its
    pruning-aware attack puts the backdoor in channels clean data keeps active instead. This
    shows which case a BadNet is: channels with a large rise and a late place are out of the
    pruning defense's reach and must be unlearned by fine-tuning. For a like-for-like rise,
    pass the same images with and without the trigger (``poison(test, trigger)`` keeps the
    non-target images, so pair it with ``test.x[test.y != target]``).

    Args:
        model: the network (not changed).
        clean: (N, H, W, C) clean images, or a Dataset.
        poisoned: (M, H, W, C) the images with the trigger, or a Dataset.
        layer: the conv layer, default :func:`~badnet_repair.nets.models.default_conv_layer` (``conv_3`` in DeepID).
        ranking: the pruning order to place the channels in, default: :func:`rank_channels`
            of ``model`` on ``clean`` (pass the one made on the defense's own validation data).
        batch_size: images per forward pass, default 256.

    Returns:
        TriggerResponse with (C,) arrays.
    """
    import keras

    conv = conv_layer(model, layer)
    layer = str(conv.name)
    if ranking is None:
        ranking = rank_channels(model, clean, layer=layer)
    elif ranking.layer != layer or len(ranking.order) != int(conv.filters):
        raise ValueError(f"ranking is of layer {ranking.layer!r} ({len(ranking.order)} channels), "
                         f"not of {layer!r} ({conv.filters} channels)")
    probe = keras.Model(model.inputs, conv.output)
    means = []
    for images in (clean, poisoned):
        x = images.x if isinstance(images, Dataset) else np.asarray(images)
        if len(x) == 0:
            raise ValueError("trigger_response needs at least one clean and one poisoned image")
        if tuple(x.shape[1:]) != tuple(model.input_shape[1:]):
            raise ValueError(f"images are {'x'.join(map(str, x.shape[1:]))} (HxWxC) but the model expects "
                             f"{'x'.join(map(str, model.input_shape[1:]))}")
        total = np.zeros(int(conv.filters))
        for i in range(0, len(x), batch_size):
            a = np.asarray(probe.predict(np.asarray(x[i:i + batch_size], dtype=np.float32), verbose=0))
            total += a.reshape(-1, a.shape[-1]).sum(axis=0, dtype=np.float64)
        means.append(total / (len(x) * int(np.prod(probe.output.shape[1:-1]))))
    place = np.empty(len(ranking.order), dtype=np.int64)
    place[np.asarray(ranking.order)] = np.arange(len(ranking.order))
    return TriggerResponse(layer=layer, clean_mean=means[0], poisoned_mean=means[1], place=place)
