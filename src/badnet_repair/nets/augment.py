"""Label-preserving image augmentation for training on little clean data.

Random translations (edges replicated) and horizontal flips: the standard augmentations for
face recognition. Fine-tuning a BadNet on a few clean images per class overfits them within
a few epochs; augmented copies let it train long enough, at a learning rate high enough, for
the weights to move away from the backdoor (Liu et al., RAID 2018, Section 5: fine-pruning).
"""

from __future__ import annotations

import numpy as np

__all__ = ["augment_images"]


def augment_images(x: np.ndarray, *, rng: np.random.Generator, shift: int = 2, flip: bool = True) -> np.ndarray:
    """Shift each image by a random offset in ``[-shift, shift]`` pixels and flip half of them.

    Pixels moved in from outside the image repeat its border row or column (no wrap-around,
    no black bars that could look like a patch).

    Args:
        x: (N, H, W, C) images.
        rng: the random generator (seeded by the caller).
        shift: largest translation in pixels along each axis, default 2 (0 = none).
        flip: flip a random half of the images left-right, default True.

    Returns:
        (N, H, W, C) new array of ``x``'s dtype; ``x`` is not changed.
    """
    x = np.asarray(x)
    if x.ndim != 4:
        raise ValueError(f"expected (N, H, W, C) images, got shape {x.shape}")
    if shift < 0:
        raise ValueError(f"shift must be >= 0, not {shift}")
    n, h, w, _ = x.shape
    out = x.copy()
    if n == 0:
        return out
    if flip:
        f = rng.random(n) < 0.5
        out[f] = out[f, :, ::-1]
    if shift:
        s = int(min(shift, h - 1, w - 1))
        padded = np.pad(out, ((0, 0), (s, s), (s, s), (0, 0)), mode="edge")
        dy = rng.integers(-s, s + 1, n)
        dx = rng.integers(-s, s + 1, n)
        # one slice per distinct offset, not per image: (2s+1)^2 copies at most
        for oy in range(-s, s + 1):
            for ox in range(-s, s + 1):
                sel = np.flatnonzero((dy == oy) & (dx == ox))
                if sel.size:
                    out[sel] = padded[sel, s - oy:s - oy + h, s - ox:s - ox + w]
    return out
