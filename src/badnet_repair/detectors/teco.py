"""TeCo: flag inputs whose prediction breaks at very different corruption severities."""

from __future__ import annotations

import io
import logging
import math
import os
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any, ClassVar

import numpy as np

from ..formats.data import Dataset, pixel_range
from .base import ThresholdDetector, check_sampling, checked_false_alarm

__all__ = ["CORRUPTIONS", "SEVERITIES", "TeCo", "corrupt", "first_change", "image_rngs"]

log = logging.getLogger(__name__)

#: Severity levels per corruption (ImageNet-C's); an input whose class never changes gets one more.
SEVERITIES = 5

#: A corruption: (n, H, W, C) float32 images in 0..1 and one random generator per image ->
#: (SEVERITIES, n, H, W, C) float32 corrupted copies in 0..1, severities 1..5 in order.
Corruption = Callable[[np.ndarray, Sequence[np.random.Generator]], np.ndarray]


# ----------------------------------------------------------------------------- corruptions
# The severity constants are ImageNet-C's (Hendrycks and Dietterich, ICLR 2019) as the
# imagecorruptions package has them, which TeCo's reference code applies (to 32x32 CIFAR images).


def _gaussian_noise(u: np.ndarray, rngs: Sequence[np.random.Generator]) -> np.ndarray:
    # one noise field per image for all severities: a change at severity s is not undone at s + 1 by luck
    z = np.stack([r.standard_normal(u.shape[1:], np.float32) for r in rngs])
    out = np.empty((SEVERITIES, *u.shape), np.float32)
    for s, c in enumerate((0.08, 0.12, 0.18, 0.26, 0.38)):
        np.multiply(z, np.float32(c), out=out[s])
        out[s] += u
        np.clip(out[s], 0.0, 1.0, out=out[s])
    return out


def _shot_noise(u: np.ndarray, rngs: Sequence[np.random.Generator]) -> np.ndarray:
    out = np.empty((SEVERITIES, *u.shape), np.float32)
    lam = np.clip(u, 0.0, 1.0).astype(np.float64)
    for i, r in enumerate(rngs):
        for s, c in enumerate((60.0, 25.0, 12.0, 5.0, 3.0)):
            out[s, i] = np.clip(r.poisson(lam[i] * c) / c, 0.0, 1.0)
    return out


def _impulse_noise(u: np.ndarray, rngs: Sequence[np.random.Generator]) -> np.ndarray:
    # salt and pepper on each value with probability `amount`, half each (scikit-image's "s&p");
    # one uniform field per image, so the corrupted values grow with the severity
    v = np.stack([r.random(u.shape[1:], np.float32) for r in rngs])
    out = []
    for amount in (0.03, 0.06, 0.09, 0.17, 0.27):
        half = np.float32(amount / 2)
        out.append(np.where(v < half, np.float32(0.0), np.where(v >= 1 - half, np.float32(1.0), u)))
    return np.stack(out)


def _gaussian_taps(size: int, sigma: float) -> np.ndarray:
    t = np.arange(size) - (size - 1) / 2
    g = np.exp(-(t**2) / (2 * sigma**2))
    return g / g.sum()


def _disk(radius: float, alias_blur: float) -> np.ndarray:
    """ImageNet-C's defocus kernel: a disk of ``radius``, antialiased by a small Gaussian blur
    (OpenCV's GaussianBlur with reflected borders, here in numpy)."""
    if radius <= 8:
        grid, size = np.arange(-8.0, 9.0), 3
    else:
        grid, size = np.arange(-radius, radius + 1), 5
    xx, yy = np.meshgrid(grid, grid)
    disk = (xx**2 + yy**2 <= radius**2).astype(np.float64)
    disk /= disk.sum()
    g, h = _gaussian_taps(size, alias_blur), size // 2
    for axis in (0, 1):
        pad = [(0, 0), (0, 0)]
        pad[axis] = (h, h)
        p = np.pad(disk, pad, mode="reflect")
        disk = sum(g[i] * np.take(p, np.arange(i, i + disk.shape[axis]), axis=axis) for i in range(size))
    return disk


def _defocus_blur(u: np.ndarray, rngs: Sequence[np.random.Generator]) -> np.ndarray:
    """ImageNet-C's defocus blur: each channel filtered with :func:`_disk`, borders reflected
    without repeating the edge (OpenCV's filter2D default); through the FFT, the images'
    transform shared by the five kernels."""
    kernels = [_disk(r, a) for r, a in ((3, 0.1), (4, 0.5), (6, 0.5), (8, 0.5), (10, 0.5))]
    h = max(k.shape[0] for k in kernels) // 2
    height, width = u.shape[1:3]
    # (n, C, H, W): the transformed axes contiguous
    p = np.pad(u.transpose(0, 3, 1, 2), ((0, 0), (0, 0), (h, h), (h, h)), mode="reflect")
    hp, wp = p.shape[2:]
    spectrum = np.fft.rfft2(p)
    out = []
    for kernel in kernels:
        kh = kernel.shape[0] // 2
        k = np.zeros((hp, wp))
        k[: kernel.shape[0], : kernel.shape[1]] = kernel
        k = np.roll(k, (-kh, -kh), axis=(0, 1))  # centred at (0, 0); the padding keeps the wrap-around out
        blurred = np.fft.irfft2(spectrum * np.fft.rfft2(k), s=(hp, wp))[:, :, h : h + height, h : h + width]
        out.append(np.clip(blurred.transpose(0, 2, 3, 1), 0.0, 1.0).astype(np.float32))
    return np.stack(out)


def _motion_blur(u: np.ndarray, rngs: Sequence[np.random.Generator]) -> np.ndarray:
    """ImageNet-C's motion blur: a Gaussian-weighted sum of copies shifted along a random angle
    in -45..45 degrees (one per image), edges repeated.

    A tap's shift depends on its index and the angle only, not on the severity, so each shifted
    copy is made once and added to every severity that has that tap (each sum in tap order)."""
    n, height, width = u.shape[:3]
    theta = np.deg2rad(np.array([r.uniform(-45, 45) for r in rngs]))
    rows, cols = np.arange(height), np.arange(width)
    batch = np.arange(n)[:, None, None]
    weights = []
    for radius, sigma in ((10, 3), (15, 5), (15, 8), (15, 12), (20, 15)):
        taps = np.exp(-(np.arange(2 * radius + 1) ** 2) / (2 * sigma**2))
        weights.append(taps / taps.sum())
    out = np.zeros((SEVERITIES, *u.shape), np.float32)
    alive = np.ones(n, bool)
    for i in range(max(len(w) for w in weights)):
        dy = -np.ceil(i * np.sin(theta) - 0.5).astype(np.int64)
        dx = -np.ceil(i * np.cos(theta) - 0.5).astype(np.int64)
        alive &= (np.abs(dy) < height) & (np.abs(dx) < width)  # motion past the border ends the sum
        r = np.clip(rows[None] - dy[:, None], 0, height - 1)
        c = np.clip(cols[None] - dx[:, None], 0, width - 1)
        shifted = u[batch, r[:, :, None], c[:, None, :]]
        for s, taps in enumerate(weights):
            if i < len(taps):
                out[s] += np.float32(taps[i]) * alive[:, None, None, None] * shifted
    return np.clip(out, 0.0, 1.0, out=out)


def _linear_resize_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights of SciPy's order-1 zoom: output i samples input i (n_in - 1) / (n_out - 1)."""
    pos = np.arange(n_out) * ((n_in - 1) / (n_out - 1) if n_out > 1 else 0.0)
    lo = np.clip(np.floor(pos).astype(np.int64), 0, n_in - 1)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = pos - lo
    m = np.zeros((n_out, n_in))
    np.add.at(m, (np.arange(n_out), lo), 1 - frac)
    np.add.at(m, (np.arange(n_out), hi), frac)
    return m


def _clipped_zoom(u: np.ndarray, factor: float) -> np.ndarray:
    """ImageNet-C's zoom of (n, C, H, W) images: the central 1/factor of each enlarged (linear
    interpolation), its top-left H x W kept."""
    height, width = u.shape[2:]
    ch, cw = math.ceil(height / factor), math.ceil(width / factor)
    top, left = (height - ch) // 2, (width - cw) // 2
    crop = u[:, :, top : top + ch, left : left + cw]
    a = _linear_resize_matrix(ch, round(ch * factor))[:height]
    b = _linear_resize_matrix(cw, round(cw * factor))[:width]
    zoomed = a @ crop @ b.T
    out = np.zeros(u.shape, np.float64)
    out[:, :, : zoomed.shape[2], : zoomed.shape[3]] = zoomed
    return out


def _zoom_blur(u: np.ndarray, rngs: Sequence[np.random.Generator]) -> np.ndarray:
    """ImageNet-C's zoom blur: the mean of the image and its zooms by each factor of the severity.

    The severities share most factors (24 distinct of 63), so each distinct zoom is made once,
    in ascending order, and added to every severity that has it: each severity's sum is the
    same additions in the same order as summing its own list."""
    factors = (np.arange(1, 1.11, 0.01), np.arange(1, 1.16, 0.01), np.arange(1, 1.21, 0.02),
               np.arange(1, 1.26, 0.02), np.arange(1, 1.31, 0.03))
    chw = u.transpose(0, 3, 1, 2).astype(np.float64)
    sums: dict[int, np.ndarray] = {}
    for z in sorted({float(z) for zooms in factors for z in zooms}):
        zoomed = _clipped_zoom(chw, z)
        for s, zooms in enumerate(factors):
            if z in zooms:
                sums[s] = np.add(sums[s], zoomed, out=sums[s]) if s in sums else zoomed.copy()
    out = np.empty((SEVERITIES, *u.shape), np.float32)
    for s, zooms in enumerate(factors):
        out[s] = np.clip((chw + sums[s]) / (len(zooms) + 1), 0.0, 1.0).transpose(0, 2, 3, 1)
    return out


def _brightness(u: np.ndarray, rngs: Sequence[np.random.Generator]) -> np.ndarray:
    """ImageNet-C's brightness: ``c`` added to HSV value. At a fixed hue and saturation RGB is
    proportional to the value, so RGB scales by V'/V (a black pixel becomes grey V')."""
    out = []
    for c in (0.1, 0.2, 0.3, 0.4, 0.5):
        if u.shape[-1] != 3:
            out.append(np.clip(u + np.float32(c), 0.0, 1.0))
            continue
        v = u.max(axis=-1, keepdims=True)
        v_new = np.minimum(v + np.float32(c), np.float32(1.0))
        ratio = np.divide(v_new, v, out=np.zeros_like(v), where=v > 0)
        out.append(np.clip(np.where(v > 0, u * ratio, v_new), 0.0, 1.0))
    return np.stack(out)


def _contrast(u: np.ndarray, rngs: Sequence[np.random.Generator]) -> np.ndarray:
    means = u.mean(axis=(1, 2), keepdims=True)
    return np.stack([np.clip((u - means) * np.float32(c) + means, 0.0, 1.0) for c in (0.4, 0.3, 0.2, 0.1, 0.05)])


def _box_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights of Pillow's BOX resampling: output i averages the inputs whose
    centres fall in its footprint ``((i + 0.5) s - s / 2, (i + 0.5) s + s / 2]``, s = n_in / n_out."""
    s = n_in / n_out
    m = np.zeros((n_out, n_in))
    for i in range(n_out):
        center = (i + 0.5) * s
        lo, hi = max(int(center - s / 2 + 0.5), 0), min(int(center + s / 2 + 0.5), n_in)
        t = (np.arange(lo, hi) - center + 0.5) / s
        w = ((t > -0.5) & (t <= 0.5)).astype(np.float64)
        m[i, lo:hi] = w / w.sum() if w.sum() else 0.0
    return m


def _pixelate(u: np.ndarray, rngs: Sequence[np.random.Generator]) -> np.ndarray:
    """ImageNet-C's pixelate: BOX downsampling to ``c`` of the size, NEAREST back (Pillow's rules)."""
    height, width = u.shape[1:3]
    chw = u.transpose(0, 3, 1, 2).astype(np.float64)
    out = []
    for c in (0.6, 0.5, 0.4, 0.3, 0.25):
        h, w = max(1, int(height * c)), max(1, int(width * c))
        small = _box_matrix(height, h) @ chw @ _box_matrix(width, w).T
        big = small[:, :, _nearest_index(height, h)][:, :, :, _nearest_index(width, w)]
        out.append(big.transpose(0, 2, 3, 1).astype(np.float32))
    return np.stack(out)


def _nearest_index(n_out: int, n_in: int) -> np.ndarray:
    """(n_out,) source indices of Pillow's NEAREST resampling from n_in to n_out: it steps
    through the source by n_in / n_out, accumulating the step in double precision."""
    step, pos, idx = n_in / n_out, n_in / n_out * 0.5, []
    for _ in range(n_out):
        idx.append(min(int(pos), n_in - 1))
        pos += step
    return np.asarray(idx, np.int64)


def _jpeg_compression(u: np.ndarray, rngs: Sequence[np.random.Generator]) -> np.ndarray:
    """ImageNet-C's JPEG compression (Pillow, qualities 25..7) of the 8-bit image: RGB, or each
    channel as greyscale for other channel counts."""
    from PIL import Image

    eight = np.clip(np.rint(u * 255), 0, 255).astype(np.uint8)
    out = np.empty((SEVERITIES, *u.shape), np.float32)

    def roundtrip(img: np.ndarray, quality: int) -> np.ndarray:
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, "JPEG", quality=quality)
        buf.seek(0)
        with Image.open(buf) as im:
            return np.asarray(im, np.float32) / 255.0

    for s, quality in enumerate((25, 18, 15, 10, 7)):
        for i in range(len(u)):
            if u.shape[-1] == 3:
                out[s, i] = roundtrip(eight[i], quality)
            else:
                for ch in range(u.shape[-1]):
                    out[s, i, :, :, ch] = roundtrip(eight[i, :, :, ch], quality)
    return out


#: Corruption name (ImageNet-C's) -> function.
_CORRUPTIONS: dict[str, Corruption] = {
    "gaussian_noise": _gaussian_noise,
    "shot_noise": _shot_noise,
    "impulse_noise": _impulse_noise,
    "defocus_blur": _defocus_blur,
    "motion_blur": _motion_blur,
    "zoom_blur": _zoom_blur,
    "brightness": _brightness,
    "contrast": _contrast,
    "pixelate": _pixelate,
    "jpeg_compression": _jpeg_compression,
}

#: The corruptions implemented here, the default set: 10 of the 15 TeCo uses.
CORRUPTIONS: tuple[str, ...] = tuple(_CORRUPTIONS)

#: The most bytes of corrupted copies :meth:`TeCo.severities` holds at once.
_STEP_BYTES = 256 * 2**20

#: The corruptions that draw random numbers (from :func:`image_rngs`).
_RANDOM = frozenset({"gaussian_noise", "shot_noise", "impulse_noise", "motion_blur"})


def image_rngs(x: np.ndarray, seed: int, corruption: str) -> list[np.random.Generator]:
    """One random generator per image, seeded by ``seed``, the corruption's name and the image's
    own float32 pixels: an input's noise, and so its score, does not depend on what else it is
    scored with."""
    salt = zlib.crc32(corruption.encode())
    arr = np.ascontiguousarray(x, np.float32)
    return [np.random.default_rng([seed, salt, zlib.crc32(img.tobytes())]) for img in arr]


def corrupt(x: np.ndarray, corruption: str, *, pixel_max: float, seed: int = 0) -> np.ndarray:
    """Corrupted copies of (n, H, W, C) file-pixel images at severities 1..5.

    Args:
        x: images in 0..``pixel_max``.
        corruption: one of :data:`CORRUPTIONS`.
        pixel_max: the pixel range's top (255 or 1).
        seed: for the random corruptions (noise, the motion's angle).

    Returns:
        (5, n, H, W, C) float32 file pixels.
    """
    if corruption not in _CORRUPTIONS:
        raise ValueError(f"unknown corruption {corruption!r}; known: {', '.join(CORRUPTIONS)}")
    x = np.asarray(x, np.float32)
    u = np.clip(x / np.float32(pixel_max), 0.0, 1.0)
    out = _CORRUPTIONS[corruption](u, image_rngs(x, seed, corruption) if corruption in _RANDOM else [])
    return (out * np.float32(pixel_max)).astype(np.float32, copy=False)


def first_change(original: np.ndarray, corrupted: np.ndarray) -> np.ndarray:
    """The first severity at which the class changes.

    Args:
        original: (N,) classes of the inputs.
        corrupted: (N, T, 5) classes of their corrupted copies, per corruption and severity.

    Returns:
        (N, T) int64 in 1..5, or 6 where the class never changes.
    """
    changed = np.asarray(corrupted) != np.asarray(original)[:, None, None]
    return np.where(changed.any(axis=-1), changed.argmax(axis=-1) + 1, SEVERITIES + 1).astype(np.int64)


class TeCo(ThresholdDetector):
    """TeCo (Liu, Li, Wang, Hu, Ye, Jin, Wu and Xiao, "Detecting Backdoors During the Inference
    Stage Based on Corruption Robustness Consistency", CVPR 2023).

    A clean input's prediction survives every kind of image corruption to a similar severity;
    a triggered input's does not: some corruptions wipe the trigger out at once, others leave
    it working to the end. For each corruption type t the input is corrupted at severities
    1..5 and ``s_t`` is the first severity at which B's class differs from its class on the
    input (6 if it never does); the score is the standard deviation of ``s_t`` over the types
    (``np.std``, as the reference code), in 0..2.5. The threshold is set on clean images'
    scores (``false_alarm`` %); TeCo learns nothing else, so any clean images serve.

    The corruptions are ImageNet-C's with its severity constants (as the ``imagecorruptions``
    package used by the authors' code), in numpy, and Pillow for JPEG: Gaussian, shot and
    impulse noise, defocus, motion and zoom blur, brightness, contrast, pixelate and JPEG
    (:data:`CORRUPTIONS`). Left out of the paper's 15: glass blur, snow, frost, fog and elastic
    transform. Random draws (noise, the motion's angle) come from a generator seeded by
    ``seed`` and the input's own pixels, so scores are deterministic and do not depend on the
    batch. Each severity corrupts the input itself, as the paper describes.

    No Keras form (JPEG is no Keras layer): a GoodNet keeps :meth:`state`.

    Args:
        corruptions: the corruption types, at least two of :data:`CORRUPTIONS`, default all ten.
        false_alarm: the share of clean calibration inputs flagged, in %, default 5.
        calibration_images: clean images the threshold is set on, at most, default 1000.
        seed: the random corruptions and the draw of calibration images, default 0.
        batch_size: images per forward pass, default 1024.
    """

    name: ClassVar[str] = "teco"
    summary: ClassVar[str] = "B's class breaks at very different severities across corruptions (Liu et al. 2023)"

    def __init__(self, *, corruptions: Sequence[str] = CORRUPTIONS, false_alarm: float = 5.0,
                 calibration_images: int = 1000, seed: int = 0, batch_size: int = 1024) -> None:
        if isinstance(corruptions, str):
            corruptions = (corruptions,)
        corruptions = tuple(corruptions)
        unknown = [c for c in corruptions if c not in _CORRUPTIONS]
        if unknown:
            raise ValueError(f"unknown corruptions {unknown}; known: {', '.join(CORRUPTIONS)}")
        if len(set(corruptions)) != len(corruptions) or len(corruptions) < 2:
            raise ValueError("corruptions must name at least two different corruption types (a deviation across them)")
        checked_false_alarm(false_alarm)
        check_sampling(calibration_images, batch_size, seed)
        self.corruptions = corruptions
        self.false_alarm = float(false_alarm)
        self.calibration_images = int(calibration_images)
        self.seed, self.batch_size = int(seed), int(batch_size)
        self.model: Any = None
        self.pixel_max: float | None = None

    def fit(self, model: Any, clean: Dataset) -> TeCo:
        """Keep B and the pixel range; set the threshold on up to ``calibration_images`` clean images."""
        x = np.asarray(clean.x, np.float32)
        if len(x) == 0:
            raise ValueError("TeCo needs clean images to set its threshold on")
        self.model = model
        self.pixel_max = float(pixel_range(x))
        idx = np.sort(np.random.default_rng(self.seed).permutation(len(x))[: self.calibration_images])
        self.calibrate(self.scores(x[idx]))
        log.info("TeCo: threshold %.3f (deviation of first-change severities) on %d clean images",
                 self.threshold, len(idx))
        return self

    def severities(self, x: np.ndarray) -> np.ndarray:
        """(N, T) int64: per input and corruption type, the first severity (1..5) at which B's
        class changes, 6 where it never does.

        Severity by severity, B classifies only the copies whose class has not changed yet: the
        first change is all TeCo reads, and past it nothing is asked of B (about a third of the
        forward passes on faces). :func:`first_change` over every copy is the plain computation."""
        from ..nets.models import predict_classes

        if self.model is None or self.pixel_max is None:
            raise RuntimeError("call fit(model, clean) before scoring (TeCo)")
        x = np.asarray(x, np.float32)
        types = len(self.corruptions)
        out = np.empty((len(x), types), np.int64)
        copies = types * SEVERITIES
        # a few forward batches' worth of copies per step, at most _STEP_BYTES of them: big batches, bounded memory
        image_bytes = max(1, x[:1].nbytes)
        step = max(1, min(8 * self.batch_size // copies, _STEP_BYTES // (copies * image_bytes)))
        pixel_max, seed = self.pixel_max, self.seed
        # numpy and Pillow let go of the GIL, so the corruption types run side by side on the cores
        # (the forward passes already use them all); each type's copies are the same as alone
        with ThreadPoolExecutor(max_workers=min(types, os.cpu_count() or 1)) as pool:
            for start in range(0, len(x), step):
                chunk = x[start : start + step]
                corrupted = list(pool.map(partial(corrupt, chunk, pixel_max=pixel_max, seed=seed), self.corruptions))
                original = predict_classes(self.model, chunk, batch_size=self.batch_size)
                first = np.full((len(chunk), types), SEVERITIES + 1, np.int64)
                for s in range(SEVERITIES):
                    pending = [np.flatnonzero(first[:, t] > SEVERITIES) for t in range(types)]
                    if not any(len(idx) for idx in pending):
                        break
                    asked = np.concatenate([corrupted[t][s, idx] for t, idx in enumerate(pending)])
                    classes = predict_classes(self.model, asked, batch_size=self.batch_size)
                    offset = 0
                    for t, idx in enumerate(pending):
                        changed = classes[offset : offset + len(idx)] != original[idx]
                        first[idx[changed], t] = s + 1
                        offset += len(idx)
                out[start : start + len(chunk)] = first
        return out

    def scores(self, x: np.ndarray) -> np.ndarray:
        """(N,) float64: the standard deviation over corruption types of the first severity that
        changes B's class; higher = more likely triggered."""
        return np.std(self.severities(x).astype(np.float64), axis=1)

    def state(self) -> dict[str, np.ndarray]:
        """The threshold, the pixel range and the calibration scores: with the settings
        (:meth:`get_params`) and B, they restore this detector (:meth:`restore`)."""
        if self.threshold is None or self.pixel_max is None or self.calibration_scores is None:
            raise RuntimeError("call fit(model, clean) before saving the state (TeCo)")
        return {"threshold": np.array(self.threshold, np.float64), "pixel_max": np.array(self.pixel_max, np.float64),
                "calibration_scores": np.asarray(self.calibration_scores, np.float64)}

    def restore(self, model: Any, state: dict[str, np.ndarray]) -> TeCo:
        """This detector, fitted: B and a :meth:`state` saved from a TeCo with the same settings."""
        missing = {"threshold", "pixel_max", "calibration_scores"} - set(state)
        if missing:
            raise ValueError(f"a TeCo state needs {sorted(missing)}")
        self.model = model
        self.pixel_max = float(np.asarray(state["pixel_max"]))
        self.threshold = float(np.asarray(state["threshold"]))
        self.calibration_scores = np.asarray(state["calibration_scores"], np.float64)
        return self
