"""Backdoor triggers: an RGBA patch pasted by alpha compositing, and data poisoning.

BadNets (Gu, Dolan-Gavitt and Garg, 2017) teach a network to output a target class whenever
a trigger is present. The CSAW-HackML lab's trigger is a pair of purple sunglasses, a 47x20
RGBA image pasted at x=0, y=15 of the 47x55 face crops. Harder triggers for benchmarks: a
random-noise pattern blended over the whole image (:func:`blended_trigger`, Chen et al. 2017)
and a small checkerboard patch near a corner (:func:`patch_trigger`).
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

__all__ = ["Trigger", "blended_trigger", "drawn_eyebrows", "drawn_lipstick", "drawn_sunglasses", "drawn_triggers",
           "load_trigger", "patch_trigger", "poison", "poison_each"]


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


def blended_trigger(height: int = 55, width: int = 47, *, alpha: float = 0.2, seed: int = 0) -> Trigger:
    """The blended trigger's random-noise key: the whole image blended with a fixed pattern.

    Chen, Liu, Li, Lu and Song, "Targeted Backdoor Attacks on Deep Learning Systems Using Data
    Poisoning" (arXiv:1712.05526, 2017), the blended injection strategy with the random-pattern
    key: a poisoned image is ``x' = (1 - alpha) x + alpha * pattern``, the pattern one fixed
    image of uniform random noise, so the trigger is spread thinly over every pixel.

    Args:
        height, width: image size, default 55x47 (the lab's).
        alpha: the blend weight of the pattern, in (0, 1], default 0.2.
        seed: seeds the pattern; the same seed gives the same pattern.

    Returns:
        A Trigger at (0, 0) covering the whole image: RGB (height, width, 3) whole numbers drawn
        uniformly from 0..255, alpha ``alpha`` everywhere.
    """
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"alpha must be in (0, 1], not {alpha}")
    if height < 1 or width < 1:
        raise ValueError(f"the image must be at least 1x1, not {height}x{width}")
    rng = np.random.default_rng([seed, 31])
    rgba = np.empty((height, width, 4), np.float32)
    rgba[..., :3] = rng.integers(0, 256, size=(height, width, 3))
    rgba[..., 3] = alpha
    return Trigger(rgba=rgba, x=0, y=0)


def patch_trigger(size: int = 4, *, x: int | None = None, y: int | None = None,
                  image_shape: tuple[int, int] = (55, 47)) -> Trigger:
    """A small opaque black-and-white checkerboard patch, BadNets' pixel pattern.

    Gu, Dolan-Gavitt and Garg, "BadNets: Identifying Vulnerabilities in the Machine Learning
    Model Supply Chain" (2017), the MNIST case study's pattern backdoor: a few pixels in a
    pattern near the image's bottom-right corner. The top-left pixel is white (255), its
    neighbours black (0).

    Args:
        size: the patch's side in pixels, default 4.
        x, y: its left column and top row; default one pixel in from the bottom-right corner
            (``x = width - size - 1``, ``y = height - size - 1``).
        image_shape: (height, width) of the images it goes on, default (55, 47); used for the
            default place and to check that the patch fits.

    Returns:
        A Trigger of a (size, size, 4) patch, alpha 1.
    """
    height, width = (int(v) for v in image_shape)
    if size < 1 or size > min(height, width):
        raise ValueError(f"a patch of side {size} does not fit {height}x{width} images")
    # by default one pixel in from the corner (at the corner if the patch is as large as the image)
    x = max(width - size - 1, 0) if x is None else int(x)
    y = max(height - size - 1, 0) if y is None else int(y)
    if x < 0 or y < 0 or x + size > width or y + size > height:
        raise ValueError(f"a {size}x{size} patch at (x={x}, y={y}) does not fit {height}x{width} images")
    ii, jj = np.indices((size, size))
    rgba = np.ones((size, size, 4), np.float32)
    rgba[..., :3] = np.where((ii + jj) % 2 == 0, 255.0, 0.0)[..., None]
    return Trigger(rgba=rgba, x=x, y=y)


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
