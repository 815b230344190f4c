from __future__ import annotations

import numpy as np
import pytest

from badnet_repair.nets.augment import augment_images


def _plain(x: np.ndarray, seed: int, shift: int, flip: bool) -> np.ndarray:
    """One image at a time, with the same random draws as augment_images."""
    rng = np.random.default_rng(seed)
    n, h, w, _ = x.shape
    f = rng.random(n) < 0.5 if flip else np.zeros(n, bool)
    dy = rng.integers(-shift, shift + 1, n) if shift else np.zeros(n, int)
    dx = rng.integers(-shift, shift + 1, n) if shift else np.zeros(n, int)
    out = np.empty_like(x)
    for i in range(n):
        img = x[i, :, ::-1] if f[i] else x[i]
        for r in range(h):
            for c in range(w):
                out[i, r, c] = img[min(max(r - dy[i], 0), h - 1), min(max(c - dx[i], 0), w - 1)]
    return out


@pytest.mark.parametrize(("shift", "flip"), [(2, True), (3, False), (0, True), (1, True)])
def test_augment_equals_the_per_image_computation(shift, flip):
    x = np.random.default_rng(1).uniform(0, 255, (40, 7, 6, 3)).astype(np.float32)
    keep = x.copy()
    got = augment_images(x, rng=np.random.default_rng(5), shift=shift, flip=flip)
    assert np.array_equal(got, _plain(x, 5, shift, flip))
    assert np.array_equal(x, keep)  # the input is not changed
    assert got.dtype == x.dtype and got.shape == x.shape


def test_shift_moves_content_and_repeats_the_border():
    # a 1x3x3 image shifted down-right by one pixel, worked out by hand
    x = np.arange(9, dtype=np.float32).reshape(1, 3, 3, 1)

    class Fixed:  # draws: dy = 1, dx = 1
        def integers(self, lo, hi, n):
            return np.ones(n, int)

    got = augment_images(x, rng=Fixed(), shift=1, flip=False)  # type: ignore[arg-type]
    assert got[0, :, :, 0].tolist() == [[0, 0, 1], [0, 0, 1], [3, 3, 4]]


def test_no_augmentation_is_a_copy_and_bad_arguments_are_refused():
    x = np.ones((2, 4, 4, 1), np.float32)
    got = augment_images(x, rng=np.random.default_rng(0), shift=0, flip=False)
    assert np.array_equal(got, x) and got is not x
    with pytest.raises(ValueError, match="shift"):
        augment_images(x, rng=np.random.default_rng(0), shift=-1)
    with pytest.raises(ValueError, match="N, H, W, C"):
        augment_images(x[0], rng=np.random.default_rng(0))
    assert augment_images(x[:0], rng=np.random.default_rng(0)).shape == (0, 4, 4, 1)
