"""STRIP: flag inputs whose prediction survives being blended with other images."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import numpy as np

from ..formats.data import Dataset, pixel_range
from .base import Detector, checked_false_alarm, detector_model

__all__ = ["Strip", "prediction_entropy"]


def prediction_entropy(probs: np.ndarray) -> np.ndarray:
    """Shannon entropy in bits of each row of (..., K) probabilities (0 log 0 = 0).

    Returns:
        float64 of shape ``probs.shape[:-1]``.
    """
    p = np.clip(np.asarray(probs, np.float64), 0.0, 1.0)
    logs = np.zeros_like(p)
    np.log2(p, out=logs, where=p > 0)  # a zero's log is never taken: 0 log 0 = 0
    return -np.einsum("...k,...k->...", p, logs)


class Strip(Detector):
    """STRIP (Gao et al., "STRIP: a defence against trojan attacks on deep neural networks",
    ACSAC 2019).

    Each input is superimposed on ``copies`` clean images; a clean input's class then wanders
    and B's predictions on the copies have high entropy, while a trigger keeps sending every
    copy to the target: low entropy. The superimposition is the paper's (its reference code
    adds the two images, ``cv2.addWeighted(x, 1, clean, 1, 0)``, saturating at the pixel
    range): ``blend="add"`` gives ``min(x + clean, pixel_max)``; ``blend="mix"`` gives the
    weighted mean ``alpha x + (1 - alpha) clean`` instead, which halves the trigger's
    contrast. The score is minus the mean entropy (bits); the threshold is set on clean data
    only, so that ``false_alarm`` % of held-out clean inputs are flagged.

    ``fit(model, clean)`` splits the clean data per class (``seed``): ``copies`` images to
    superimpose on every input, kept in the detector (``overlays``; the same for every input,
    so an input's score does not depend on what it is scored with), and the rest (at most
    ``calibration_images``) to set the threshold on. With fewer than ``2 copies`` clean images,
    half are overlays and half set the threshold (a threshold on one or two images would be
    noise); where they are still too few for ``false_alarm``, ``fit`` says so
    (:attr:`calibration_warning`).

    Args:
        copies: clean images superimposed on each input, default 32 (the paper uses up to 100).
        blend: ``"add"`` (default, the paper's) or ``"mix"``.
        alpha: the input's weight with ``blend="mix"``, default 0.5.
        pixel_max: the pixel range's top, for ``"add"``, default None: the clean images' range
            (255 for the lab's raw pixels, 1 for images in 0..1; :func:`~badnet_repair.formats.data.pixel_range`).
        false_alarm: the share of held-out clean inputs flagged, in %, default 5.
        calibration_images: held-out clean images the threshold is set on, at most, default 1000.
        seed: the split and the draw of the overlays, default 0.
        batch_size: images per forward pass, default 1024.
    """

    name: ClassVar[str] = "strip"
    summary: ClassVar[str] = "B stays confident on the input blended with clean images (Gao et al. 2019)"

    def __init__(self, *, copies: int = 32, blend: Literal["add", "mix"] = "add", alpha: float = 0.5,
                 pixel_max: float | None = None, false_alarm: float = 5.0, calibration_images: int = 1000,
                 seed: int = 0, batch_size: int = 1024) -> None:
        if copies < 1 or calibration_images < 1:
            raise ValueError("copies and calibration_images must be at least 1")
        if blend not in ("add", "mix"):
            raise ValueError(f"blend must be 'add' or 'mix', not {blend!r}")
        if not 0.0 < alpha < 1.0:
            raise ValueError(f"alpha must be between 0 and 1, not {alpha}")
        checked_false_alarm(false_alarm)
        self.copies, self.alpha, self.false_alarm = int(copies), float(alpha), float(false_alarm)
        if pixel_max is not None and not pixel_max > 0:
            raise ValueError(f"pixel_max must be positive, not {pixel_max}")
        self.blend_mode = blend
        self.pixel_max = None if pixel_max is None else float(pixel_max)
        self.pixel_top: float | None = self.pixel_max  # the range in use: the setting, or the data's at fit
        self.calibration_images = int(calibration_images)
        self.seed, self.batch_size = int(seed), int(batch_size)
        self.model: Any = None
        self.overlays: np.ndarray | None = None
        self.threshold: float | None = None
        self.calibration_entropy: np.ndarray | None = None

    def fit(self, model: Any, clean: Dataset) -> Strip:
        """Keep B and the overlays; set the entropy threshold on the other clean images."""
        x, y = np.asarray(clean.x), np.asarray(clean.y)
        if len(x) < 2:
            raise ValueError("STRIP needs at least two clean images (overlays, and some to set the threshold)")
        rng = np.random.default_rng(self.seed)
        order = rng.permutation(len(x))
        # per class, round-robin: the overlays cover the classes evenly
        by_class = [order[y[order] == c] for c in np.unique(y)]
        interleaved = np.array([i for group in _round_robin(by_class) for i in group], dtype=np.int64)
        n_overlays = min(self.copies, len(x) // 2)
        overlay_idx, rest = interleaved[:n_overlays], interleaved[n_overlays:]
        self.model = model
        self.pixel_top = self.pixel_max if self.pixel_max is not None else pixel_range(x)
        self.overlays = np.asarray(x[np.sort(overlay_idx)], np.float32)
        calib = np.sort(rng.permutation(rest)[: self.calibration_images])
        self.calibration_entropy = self.entropy(np.asarray(x[calib], np.float32))
        # flag the lowest false_alarm % of held-out clean entropies
        self.threshold = float(np.quantile(self.calibration_entropy, self.false_alarm / 100.0, method="lower"))
        self.note_calibration(len(calib), int(np.sum(self.calibration_entropy <= self.threshold)), self.false_alarm)
        return self

    def entropy(self, x: np.ndarray) -> np.ndarray:
        """(N,) mean entropy in bits of B's predictions on each input's blended copies."""
        from ..nets.models import predict_probabilities

        if self.model is None or self.overlays is None:
            raise RuntimeError("call fit(model, clean) first")
        x = np.asarray(x, np.float32)
        out = np.empty(len(x), np.float64)
        step = max(1, self.batch_size // len(self.overlays))
        buffer = np.empty((min(step, len(x)), *self.overlays.shape), np.float32)  # reused: no fresh pages a chunk
        for start in range(0, len(x), step):
            chunk = x[start : start + step]
            blended = self.superimpose(chunk[:, None], self.overlays[None], out=buffer[: len(chunk)])
            probs = predict_probabilities(self.model, blended.reshape(-1, *x.shape[1:]), batch_size=self.batch_size)
            per_copy = prediction_entropy(probs).reshape(len(chunk), len(self.overlays))
            out[start : start + len(chunk)] = per_copy.mean(axis=1)
        return out

    def superimpose(self, x: np.ndarray, clean: np.ndarray, *, out: np.ndarray | None = None) -> np.ndarray:
        """The inputs ``x`` superimposed on clean images (broadcasting), by ``blend``; written
        into ``out`` where given (of the broadcast shape)."""
        if self.blend_mode == "add":
            if out is None:
                return np.minimum(x + clean, self._top())
            np.add(x, clean, out=out)
            return np.minimum(out, self._top(), out=out)
        if out is None:
            return self.alpha * x + (1.0 - self.alpha) * clean
        np.multiply(x, self.alpha, out=out)
        out += (1.0 - self.alpha) * clean
        return out

    def scores(self, x: np.ndarray) -> np.ndarray:
        """(N,) minus the mean entropy: higher = more likely triggered."""
        return -self.entropy(x)

    def flags(self, x: np.ndarray) -> np.ndarray:
        """(N,) bool: mean entropy at or below the threshold set on held-out clean data."""
        return self.scores_and_flags(x)[1]

    def scores_and_flags(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.threshold is None:
            raise RuntimeError("call fit(model, clean) first")
        entropy = self.entropy(x)
        return -entropy, entropy <= self.threshold

    def keras_flags(self, x: Any, *, prefix: str, scale: float = 1.0) -> Any:
        """1 where B's mean entropy on the input superimposed on the stored overlays is at or
        below the threshold; the overlays and the pixel range go into ``x``'s range (``scale``)."""
        from ..nets.layers import EntropyAlarm, Superimpose
        from ..nets.models import renamed_copy

        if self.model is None or self.overlays is None or self.threshold is None:
            raise ValueError("fit the detector before building its GoodNet")
        strip_b = renamed_copy(detector_model(self.model, scale), f"{prefix}_strip_badnet")
        blend = Superimpose(self.overlays.shape, mode=self.blend_mode, alpha=self.alpha,
                            pixel_max=self._top() * scale, name=f"{prefix}_superimpose")
        flags = EntropyAlarm(len(self.overlays), self.threshold, name=f"{prefix}_alarm")(strip_b(blend(x)))
        blend.overlays.assign((self.overlays * scale).astype("float32"))
        return flags

    def _top(self) -> float:
        if self.pixel_top is None:
            raise RuntimeError("call fit(model, clean) first")
        return self.pixel_top

    def state(self) -> dict[str, np.ndarray]:
        """The overlays, the threshold, the calibration entropies and the pixel range in use."""
        if self.overlays is None or self.threshold is None or self.calibration_entropy is None:
            raise ValueError("fit the detector before saving it")
        return {"overlays": self.overlays, "threshold": np.asarray(self.threshold, np.float64),
                "calibration_entropy": self.calibration_entropy, "pixel_max": np.asarray(self._top(), np.float64)}

    def restore(self, model: Any, state: dict[str, np.ndarray]) -> Strip:
        self.model = model
        # a state saved before the range was stored: the setting, else the lab's raw pixels
        self.pixel_top = float(state["pixel_max"]) if "pixel_max" in state else (self.pixel_max or 255.0)
        self.overlays = np.asarray(state["overlays"], np.float32)
        self.threshold = float(state["threshold"])
        self.calibration_entropy = np.asarray(state["calibration_entropy"], np.float64)
        return self


def _round_robin(groups: list[np.ndarray]) -> list[list[int]]:
    """[[g0[0], g1[0], ...], [g0[1], g1[1], ...], ...] over groups of unequal length."""
    longest = max((len(g) for g in groups), default=0)
    return [[int(g[i]) for g in groups if i < len(g)] for i in range(longest)]
