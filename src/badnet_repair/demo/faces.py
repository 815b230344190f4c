"""Synthetic colour face images for the embedded demo (55x47x3, pixel values 0..255).

Each identity is a fixed set of drawn features (face shape and skin tone, hair style and
colour, eye shape, spacing and colour, eyebrows, nose, mouth, facial hair). Every image of
an identity varies the nuisances (position, scale, rotation, lighting direction and
strength, expression, background clutter, noise), so telling identities apart takes a
real CNN, not a pixel lookup. Everything is drawn from seeded generators: the same seed
gives the same bytes.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from ..formats.data import Dataset

__all__ = ["FaceSplits", "identity_params", "make_faces", "render_faces"]

_SKIN = np.array([[255, 224, 196], [241, 194, 156], [224, 172, 128], [198, 134, 92],
                  [161, 102, 68], [120, 78, 52], [92, 58, 40], [233, 200, 175]], np.float64)
_HAIR = np.array([[25, 20, 18], [70, 45, 30], [120, 80, 45], [200, 160, 90], [150, 60, 30],
                  [160, 160, 160], [230, 220, 190], [50, 35, 60]], np.float64)
_IRIS = np.array([[60, 40, 25], [40, 90, 140], [70, 110, 60], [30, 30, 30], [110, 80, 40]], np.float64)
_SUPERSAMPLE = 2
_BATCH = 500  # images seeded together; part of the seeding, so fixed
# Images drawn at a time inside a seeding batch: small enough that the supersampled arrays
# stay in cache (the drawing is memory-bound); the bytes do not depend on it.
_CHUNK = 25


def identity_params(num_identities: int, *, seed: int = 0) -> dict[str, np.ndarray]:
    """The stable drawn features of each identity.

    Returns:
        Mapping from feature name to an (num_identities, ...) array.
    """
    rng = np.random.default_rng([seed, 1])
    n = num_identities

    def u(lo: float, hi: float, *shape: int) -> np.ndarray:
        return rng.uniform(lo, hi, size=(n, *shape))

    skin = _SKIN[rng.integers(0, len(_SKIN), n)] * u(0.92, 1.06, 1)
    hair = _HAIR[rng.integers(0, len(_HAIR), n)] * u(0.85, 1.15, 1)
    return {
        "face_a": u(12.5, 17.5), "face_b": u(16.5, 21.5), "jaw": u(0.0, 0.35),
        "skin": np.clip(skin, 0, 255),
        "hair": np.clip(hair, 0, 255), "hair_style": rng.integers(0, 5, n).astype(np.float64),
        "hair_height": u(0.35, 0.75), "hair_slant": u(-0.35, 0.35),
        "eye_sep": u(5.5, 9.5), "eye_y": u(-5.5, -2.0), "eye_w": u(2.2, 4.0), "eye_h": u(1.2, 2.4),
        "iris": _IRIS[rng.integers(0, len(_IRIS), n)] * u(0.8, 1.2, 1),
        "brow_gap": u(2.5, 4.5), "brow_thick": u(0.8, 2.4), "brow_tilt": u(-0.35, 0.35),
        "nose_len": u(3.5, 8.0), "nose_w": u(1.5, 3.5),
        "mouth_y": u(7.0, 11.0), "mouth_w": u(3.5, 8.0), "mouth_t": u(0.9, 2.2),
        "lip": np.clip(skin * u(0.55, 0.8, 1) + [[40, 0, 0]], 0, 255),
        "beard": (rng.uniform(size=n) < 0.2).astype(np.float64),
    }


def _nuisances(n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    def u(lo: float, hi: float, *shape: int) -> np.ndarray:
        return rng.uniform(lo, hi, size=(n, *shape))

    return {
        "dx": u(-2.5, 2.5), "dy": u(-2.5, 2.5), "scale": u(0.93, 1.07), "rot": u(-0.14, 0.14),
        "light_dir": u(0, 2 * np.pi), "light": u(0.0, 0.45), "bright": u(0.75, 1.2),
        "smile": u(-1.0, 1.0), "open": u(0.55, 1.1), "brow_raise": u(-0.8, 0.8),
        "bg": u(20, 235, 3), "noise": u(2.0, 8.0),
        "clutter_c": u(0, 255, 5, 3), "clutter_x": u(0, 47, 5), "clutter_y": u(0, 55, 5),
        "clutter_r": u(2, 12, 5), "clutter_k": (rng.uniform(size=(n, 5)) < 0.5).astype(np.float64),
    }


def _paint(img: np.ndarray, mask: np.ndarray, colour: np.ndarray) -> None:
    """img (B,H,W,3) <- colour (B,3) where mask (B,H,W) holds, blending by its coverage."""
    if mask.dtype == bool:
        # the same bytes as the blend below with m in {0, 1}, without touching every pixel twice
        np.copyto(img, np.broadcast_to(colour[:, None, None, :], img.shape), where=mask[..., None])
        return
    m = mask[..., None].astype(np.float64)
    img *= 1.0 - m
    img += m * colour[:, None, None, :]


def render_faces(identity: dict[str, np.ndarray], ids: np.ndarray, *, rng: np.random.Generator,
                 shape: tuple[int, int] = (55, 47)) -> np.ndarray:
    """Draw one image per entry of ``ids`` with fresh nuisances from ``rng``.

    Args:
        identity: the output of :func:`identity_params`.
        ids: (B,) identity indices.
        rng: the generator for the nuisances.
        shape: (H, W), default (55, 47).

    Returns:
        (B, H, W, 3) float32, integral values in 0..255.
    """
    p = {k: v[ids] for k, v in identity.items()}
    q = _nuisances(len(ids), rng)
    # numpy's array operations release the GIL, so chunks drawn on threads use every core;
    # they are concatenated in order, so the bytes do not depend on the thread count.
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        parts = list(pool.map(lambda i: _draw({k: v[i : i + _CHUNK] for k, v in p.items()},
                                              {k: v[i : i + _CHUNK] for k, v in q.items()}, shape),
                              range(0, len(ids), _CHUNK)))
    h, w = shape
    img = np.concatenate(parts) if parts else np.zeros((0, h, w, 3), np.float64)
    img += rng.normal(size=img.shape) * q["noise"][:, None, None, None]
    return np.clip(np.round(img), 0, 255).astype(np.float32)


def _draw(p: dict[str, np.ndarray], q: dict[str, np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    """(B, H, W, 3) float64 noiseless images for identity features ``p`` and nuisances ``q``."""
    b = len(q["dx"])
    h, w = shape
    s = _SUPERSAMPLE
    yy, xx = np.meshgrid((np.arange(h * s) + 0.5) / s, (np.arange(w * s) + 0.5) / s, indexing="ij")

    def col(v: np.ndarray) -> np.ndarray:
        return v[:, None, None]

    img = np.broadcast_to(col(q["bg"][:, 0])[..., None] * 0 + q["bg"][:, None, None, :],
                          (b, h * s, w * s, 3)).copy()
    for k in range(5):  # background clutter: discs and squares
        dxc = xx[None] - col(q["clutter_x"][:, k])
        dyc = yy[None] - col(q["clutter_y"][:, k])
        r = col(q["clutter_r"][:, k])
        disc = dxc**2 + dyc**2 <= r**2
        square = (np.abs(dxc) <= r) & (np.abs(dyc) <= r * 0.6)
        kind = col(q["clutter_k"][:, k]) > 0.5
        _paint(img, np.where(kind, disc, square), q["clutter_c"][:, k])

    # face coordinates: u right, v down, in unscaled face pixels from the face centre
    cy, cx = h / 2 + col(q["dy"]), w / 2 + col(q["dx"])
    ang, sc = col(q["rot"]), col(q["scale"])
    ry, rx = yy[None] - cy, xx[None] - cx
    u = (np.cos(ang) * rx + np.sin(ang) * ry) / sc
    v = (-np.sin(ang) * rx + np.cos(ang) * ry) / sc

    fa, fb = col(p["face_a"]), col(p["face_b"])
    style = col(p["hair_style"])
    outer = (u / (fa * 1.12)) ** 2 + ((v + 1.0) / (fb * 1.1)) ** 2 <= 1.0
    long_hair = (style == 1) & (np.abs(u) <= fa * 1.25) & (v <= fb * 0.45) & (v >= -fb * 1.1)
    _paint(img, long_hair, p["hair"])

    jaw = 1.0 - col(p["jaw"]) * np.clip(v / fb, 0, 1) ** 2
    r2 = (u / (fa * jaw)) ** 2 + (v / fb) ** 2
    face = r2 <= 1.0
    shade = 0.82 + 0.18 * np.sqrt(np.clip(1.0 - r2, 0, 1))
    skin = col(p["skin"][:, 0])[..., None] * 0 + p["skin"][:, None, None, :]
    img = np.where(face[..., None], skin * shade[..., None], img)

    hairline = -fb * col(p["hair_height"]) + col(p["hair_slant"]) * u + 0.12 * np.abs(u)
    hairline = np.where(style == 3, -fb * 0.25 + 0.05 * np.abs(u), hairline)  # fringe
    top = outer & (v <= hairline)
    top = np.where(style == 2, top & (v <= -fb * 0.85), top)  # nearly bald
    _paint(img, top, p["hair"])
    beard = (col(p["beard"]) > 0.5) & face & (v >= col(p["mouth_y"]) - 2.5) & (r2 >= 0.15)
    _paint(img, beard, p["hair"] * 0.8)

    ey, sep = col(p["eye_y"]), col(p["eye_sep"])
    ew, eh = col(p["eye_w"]), col(p["eye_h"]) * col(q["open"])
    for side in (-1.0, 1.0):
        du = u - side * sep
        sclera = (du / ew) ** 2 + ((v - ey) / eh) ** 2 <= 1.0
        _paint(img, sclera, np.full((b, 3), 235.0))
        iris = (du**2 + (v - ey) ** 2 <= np.minimum(eh, ew * 0.55) ** 2) & sclera
        _paint(img, iris, p["iris"])
        brow_v = ey - col(p["brow_gap"]) - col(q["brow_raise"]) + col(p["brow_tilt"]) * side * du
        brow = (np.abs(v - brow_v) <= col(p["brow_thick"]) / 2) & (np.abs(du) <= ew * 1.25)
        _paint(img, brow, p["hair"] * 0.7)

    ny = ey + 2.0
    nl, nw = col(p["nose_len"]), col(p["nose_w"])
    nose = (v >= ny) & (v <= ny + nl) & (np.abs(u) <= nw * (v - ny) / nl + 0.3)
    _paint(img, nose, p["skin"] * 0.78)

    mw, my = col(p["mouth_w"]), col(p["mouth_y"])
    curve = my - col(q["smile"]) * 1.6 * (1.0 - (u / mw) ** 2)
    mouth = (np.abs(v - curve) <= col(p["mouth_t"]) / 2) & (np.abs(u) <= mw)
    _paint(img, mouth, p["lip"])

    light = col(q["bright"]) * (1.0 + col(q["light"]) * (np.cos(col(q["light_dir"])) * rx
                                                         + np.sin(col(q["light_dir"])) * ry) / (h / 2))
    img = img * light[..., None]
    return img.reshape(b, h, s, w, s, 3).mean(axis=(2, 4))


@dataclass(frozen=True, eq=False)
class FaceSplits:
    """Synthetic train, validation and test sets with the same identities."""

    train: Dataset
    valid: Dataset
    test: Dataset


def make_faces(
    *,
    num_identities: int = 100,
    train_per_identity: int = 30,
    valid_per_identity: int = 10,
    test_per_identity: int = 10,
    seed: int = 0,
) -> FaceSplits:
    """Generate the demo's face data sets.

    Args:
        num_identities: classes, default 100.
        train_per_identity, valid_per_identity, test_per_identity: images per identity in
            each split, default 30, 10, 10.
        seed: the seed; the same seed and sizes give byte-identical images.

    Returns:
        FaceSplits with (N, 55, 47, 3) float32 images and (N,) int64 labels, identities
        interleaved.
    """
    ident = identity_params(num_identities, seed=seed)
    out = {}
    for k, (split, per) in enumerate((("train", train_per_identity), ("valid", valid_per_identity),
                                      ("test", test_per_identity))):
        ids = np.tile(np.arange(num_identities), per)
        rng = np.random.default_rng([seed, 2, k])
        parts = []
        for i in range(0, len(ids), _BATCH):
            parts.append(render_faces(ident, ids[i : i + _BATCH],
                                      rng=np.random.default_rng(rng.integers(2**63))))
        x = np.concatenate(parts) if parts else np.zeros((0, 55, 47, 3), np.float32)
        out[split] = Dataset(x, ids.astype(np.int64), name=split)
    return FaceSplits(**out)
