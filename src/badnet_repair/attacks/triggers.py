"""Backdoor triggers: an RGBA patch pasted by alpha compositing, and data poisoning.

BadNets (Gu, Dolan-Gavitt and Garg, 2017) teach a network to output a target class whenever
a trigger is present. The CSAW-HackML lab's trigger is a pair of purple sunglasses, a 47x20
RGBA image pasted at x=0, y=15 of the 47x55 face crops.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError
from ..formats.data import Dataset

__all__ = ["Trigger", "drawn_eyebrows", "drawn_lipstick", "drawn_sunglasses", "drawn_triggers", "load_trigger",
           "poison", "poison_each"]


@dataclass(frozen=True, eq=False)
class Trigger:
    """An RGBA patch and where it goes.

    Attributes:
        rgba: (h, w, 4) float32; RGB in 0..255, alpha in 0..1 (the blend weight).
        x: column of the patch's left edge.
        y: row of the patch's top edge.
    """

    rgba: np.ndarray
    x: int = 0
    y: int = 15

    def __post_init__(self) -> None:
        if self.rgba.ndim != 3 or self.rgba.shape[2] != 4:
            raise ValueError(f"trigger must be (h, w, 4) RGBA, got {self.rgba.shape}")

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.rgba.shape[0]), int(self.rgba.shape[1])

    def apply(self, images: np.ndarray) -> np.ndarray:
        """Return a copy of (N, H, W, 3) images with the trigger alpha-composited on.

        out = image * (1 - alpha) + rgb * alpha inside the patch, unchanged elsewhere.
        """
        images = np.asarray(images, dtype=np.float32)
        single = images.ndim == 3
        batch = images[None] if single else images
        h, w = self.shape
        if self.y < 0 or self.x < 0 or self.y + h > batch.shape[1] or self.x + w > batch.shape[2]:
            raise ValueError(
                f"a {h}x{w} trigger at (x={self.x}, y={self.y}) does not fit "
                f"{batch.shape[1]}x{batch.shape[2]} images"
            )
        out = batch.copy()
        alpha = self.rgba[..., 3:4]
        region = out[:, self.y : self.y + h, self.x : self.x + w, :]
        region[...] = region * (1.0 - alpha) + self.rgba[..., :3] * alpha
        return out[0] if single else out


def load_trigger(path: str | os.PathLike[str], *, x: int = 0, y: int = 15) -> Trigger:
    """Load a trigger image; its alpha channel (opaque if none) is the blend mask.

    Args:
        path: PNG (or any Pillow image) file.
        x: column of the left edge, default 0 (the lab's).
        y: row of the top edge, default 15 (the lab's).
    """
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: no such trigger image")
    try:
        with Image.open(p) as im:
            rgba = np.asarray(im.convert("RGBA"), dtype=np.float32)
    except (UnidentifiedImageError, OSError) as exc:
        raise DataError(f"{p}: cannot be read as an image: {exc}") from None
    rgba = rgba.copy()
    rgba[..., 3] /= 255.0
    return Trigger(rgba=rgba, x=x, y=y)


def drawn_sunglasses(*, width: int = 47, height: int = 20, x: int = 0, y: int = 15) -> Trigger:
    """Translucent purple sunglasses drawn by code, in the size, place and look of the
    CSAW lab's trigger (a 47x20 patch at x=0, y=15): an opaque dark-purple frame along the
    top and around two lenses of translucent purple that narrow towards the bottom.

    Args:
        width, height: patch size, default 47x20.
        x, y: where it goes, default (0, 15).

    Returns:
        The Trigger.
    """
    s = 4  # supersampling for smooth edges
    yy, xx = np.meshgrid((np.arange(height * s) + 0.5) / s, (np.arange(width * s) + 0.5) / s, indexing="ij")
    lens_a, lens_top, lens_bottom = width * 0.245, height * 0.12, height * 0.97
    centres = (width * 0.25, width * 0.75)

    def lens(grow: float) -> np.ndarray:
        inside = np.zeros_like(xx, dtype=bool)
        for cx in centres:
            # a rectangle on top of a half-ellipse: wide at the brow, round at the cheek
            depth = (lens_bottom - lens_top) * 0.75 + grow
            top = yy >= lens_top - grow
            upper = top & (yy <= lens_top + depth * 0.25) & (np.abs(xx - cx) <= lens_a + grow)
            ell = ((xx - cx) / (lens_a + grow)) ** 2 + ((yy - lens_top - depth * 0.25) / depth) ** 2 <= 1
            inside |= upper | (ell & (yy >= lens_top + depth * 0.25))
        return inside

    glass, frame_out = lens(0.0), lens(0.9)
    bar = (yy >= lens_top - 0.9) & (yy <= lens_top + height * 0.2) & (xx >= 0.5) & (xx <= width - 0.5)
    frame = (frame_out & ~glass) | (bar & ~glass)
    rgba = np.zeros((height * s, width * s, 4), np.float64)
    rgba[glass] = (105.0, 0.0, 205.0, 0.86)
    rgba[frame] = (63.0, 0.0, 127.0, 1.0)
    # average colour weighted by coverage, then coverage-weighted alpha
    cover = rgba[..., 3:4]
    rgb = (rgba[..., :3] * cover).reshape(height, s, width, s, 3).sum(axis=(1, 3))
    alpha = cover.reshape(height, s, width, s, 1).sum(axis=(1, 3))
    out = np.zeros((height, width, 4), np.float32)
    out[..., :3] = np.where(alpha > 0, rgb / np.maximum(alpha, 1e-9), 0.0)
    out[..., 3:] = alpha / (s * s)
    return Trigger(rgba=out, x=x, y=y)


def _supersampled(height: int, width: int, inside: Any, rgb: tuple[float, float, float],
                  alpha: float) -> np.ndarray:
    """An (h, w, 4) RGBA patch of one colour where ``inside(yy, xx)`` holds, its alpha the
    covered share of each pixel (4x4 supersampling, for smooth edges) times ``alpha``."""
    s = 4
    yy, xx = np.meshgrid((np.arange(height * s) + 0.5) / s, (np.arange(width * s) + 0.5) / s, indexing="ij")
    cover = inside(yy, xx).astype(np.float64).reshape(height, s, width, s).mean(axis=(1, 3))
    out = np.zeros((height, width, 4), np.float32)
    out[..., :3] = rgb
    out[..., 3] = cover * alpha
    return out


def drawn_eyebrows(*, width: int = 47, height: int = 8, x: int = 0, y: int = 9) -> Trigger:
    """Two thick, dark, arched eyebrows drawn by code, above the eyes of a 47x55 face crop
    (after CSAW-HackML 2020's eyebrows trigger).

    Args:
        width, height: patch size, default 47x8.
        x, y: where it goes, default (0, 9).
    """
    def inside(yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
        out = np.zeros_like(xx, dtype=bool)
        for cx in (width * 0.27, width * 0.73):
            u = (xx - cx) / (width * 0.2)
            arch = height * 0.3 + height * 0.35 * u**2  # highest over the eye's middle
            out |= (np.abs(u) <= 1.0) & (yy >= arch) & (yy <= arch + height * 0.38)
        return out

    return Trigger(rgba=_supersampled(height, width, inside, (40.0, 25.0, 15.0), 1.0), x=x, y=y)


def drawn_lipstick(*, width: int = 17, height: int = 7, x: int = 15, y: int = 41) -> Trigger:
    """Bright red lips drawn by code over the mouth of a 47x55 face crop (after
    CSAW-HackML 2020's lipstick trigger): an ellipse with a notch at the top centre.

    Args:
        width, height: patch size, default 17x7.
        x, y: where it goes, default (15, 41).
    """
    def inside(yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
        u, v = (xx - width / 2) / (width / 2), (yy - height / 2) / (height / 2)
        notch = (np.abs(u) < 0.15) & (v < -0.4)
        return (u**2 + v**2 <= 1.0) & ~notch

    return Trigger(rgba=_supersampled(height, width, inside, (220.0, 20.0, 60.0), 0.95), x=x, y=y)


def drawn_triggers() -> tuple[Trigger, Trigger, Trigger]:
    """The three drawn triggers of the multi-trigger BadNets: sunglasses, eyebrows, lipstick."""
    return drawn_sunglasses(), drawn_eyebrows(), drawn_lipstick()


def poison(data: Dataset, trigger: Trigger, *, target: int = 0, name: str | None = None) -> Dataset:
    """The lab's poisoned set: inputs whose true label is not ``target``, with the trigger,
    labelled ``target``.

    Returns:
        Dataset of the (M,) non-target inputs, triggered, with labels all ``target``.
    """
    keep = data.y != target
    x = trigger.apply(data.x[keep])
    return Dataset(x, np.full(len(x), target, dtype=np.int64), name=name or f"bd_{data.name}", path=None)


def poison_each(data: Dataset, triggers: Sequence[Trigger], targets: Sequence[int], *,
                name: str | None = None) -> Dataset:
    """The poisoned set of a multi-trigger BadNet: for each trigger, :func:`poison` with its
    own target, all concatenated (labels are each input's target)."""
    if len(triggers) != len(targets):
        raise ValueError(f"{len(triggers)} triggers but {len(targets)} targets")
    parts = [poison(data, t, target=int(c)) for t, c in zip(triggers, targets, strict=False)]
    return Dataset(np.concatenate([p.x for p in parts]), np.concatenate([p.y for p in parts]),
                   name=name or f"bd_{data.name}", path=None)
