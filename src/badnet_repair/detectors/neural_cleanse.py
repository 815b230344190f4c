"""Neural Cleanse: reverse-engineer the smallest trigger for each class; a backdoor target
needs a far smaller one than the other classes.

Wang et al., "Neural Cleanse: Identifying and Mitigating Backdoor Attacks in Neural
Networks", IEEE S&P 2019. For a class t, find a mask m (H, W) in [0, 1] and a pattern p
(H, W, C) in [0, pixel_max] such that ``(1 - m) x + m p`` sends clean images x to t, with
the smallest L1 norm |m|: minimise ``CE(B((1 - m) x + m p), t) + lambda |m|``, lambda raised
while the reversed trigger sends >= ``success`` of the images to t and lowered while it does
not (the paper's schedule). A class whose norm is a low outlier among all classes' norms
(anomaly index, by the median absolute deviation, above ``anomaly_threshold``) is flagged as
a backdoor target.

Optimising each of the lab's 1283 classes fully is too slow on a CPU, so the scan has up to
three stages. The *pre-selection* (K-Arm's pre-screening: Shen et al., "Backdoor Scanning for
Deep Neural Networks through K-Arm Optimization", ICML 2021) ranks the labels by how often
B puts each among its top ``round(preselect_share K)`` labels on the clean images
(:func:`topk_share`; a backdoor target's logit is raised on every input, so it sits in the
top share of almost all of them) and keeps the ``preselect`` labels ranked highest. The
*screen* optimises each pre-selected class for ``screen_steps`` steps, many classes per
batch; the ``candidates`` classes with the smallest screened norms, and ``reference`` classes
drawn at random from all the other classes (pre-selected or not), are then optimised fully
(``steps``). The anomaly index of each fully optimised class is measured against the median
and MAD of the fully optimised norms of the random reference classes, which estimate those of
all classes without the pre-selection's or the screen's selection bias. A target the
pre-selection or the screen does not pass on is missed; where there are at most
``candidates + reference`` classes, all are optimised fully (the paper's scan) and none can
be missed that way, and where there are at most ``preselect`` classes, all are screened.

The reversed trigger's pattern lies in the images' FILE pixel range, ``[0, pixel_max]``:
255 for 0..255 files, 1 for 0..1 files (:func:`~badnet_repair.formats.data.pixel_range` of
the clean images unless ``pixel_max`` is given). A model with an input-scale layer in front
still takes file pixels, so its range is its files' range, not its scaled one.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..formats.data import Dataset, pixel_range

__all__ = ["CleanseScan", "NeuralCleanse", "ReversedTrigger", "anomaly_index", "preselect_order", "topk_share"]

log = logging.getLogger(__name__)

#: The MAD's consistency constant for normally distributed norms (the paper's 1.4826).
MAD_CONSISTENCY = 1.4826


def anomaly_index(norms: np.ndarray, reference: np.ndarray | None = None) -> np.ndarray:
    """Neural Cleanse's anomaly index: how many (MAD-estimated) standard deviations each norm
    lies *below* the median, ``(median - norm) / (1.4826 * MAD)``.

    Args:
        norms: (K,) mask norms.
        reference: (R,) norms the median and MAD come from, default ``norms`` themselves.

    Returns:
        (K,) float64; positive below the median. ``inf`` below a median with MAD 0.
    """
    norms = np.asarray(norms, np.float64)
    ref = norms if reference is None else np.asarray(reference, np.float64)
    med = float(np.median(ref))
    spread = MAD_CONSISTENCY * float(np.median(np.abs(ref - med)))
    with np.errstate(divide="ignore", invalid="ignore"):
        out = (med - norms) / spread if spread > 0 else np.where(norms < med, np.inf, 0.0)
    return np.asarray(out, np.float64)


def topk_share(probabilities: np.ndarray, share: float = 0.25) -> np.ndarray:
    """K-Arm's pre-screening statistic (Shen et al., ICML 2021): for each label, the share of
    images whose ``k = max(1, round(share * K))`` most probable labels include it.

    A label is among an image's top k where fewer than k labels are strictly more probable
    (ties at the k-th value all count in, so the result does not depend on a sort's order).

    Args:
        probabilities: (N, K) B's outputs on clean images (probabilities or logits: only the
            order within a row matters).
        share: the top share of labels, K-Arm's gamma, default 0.25.

    Returns:
        (K,) float64 in [0, 1].
    """
    p = np.asarray(probabilities)
    n, k = p.shape
    if n == 0:
        return np.zeros(k)
    top = min(k, max(1, round(share * k)))
    kth = np.partition(p, k - top, axis=1)[:, k - top]
    return np.asarray(np.mean(p >= kth[:, None], axis=0), np.float64)


def preselect_order(probabilities: np.ndarray, share: float = 0.25) -> np.ndarray:
    """The labels in pre-selection order: by :func:`topk_share` (highest first), ties by the
    mean probability on the images (highest first), then by label.

    Args:
        probabilities: (N, K) B's outputs on clean images.
        share: the top share of labels, default 0.25.

    Returns:
        (K,) int64, a permutation of the labels.
    """
    p = np.asarray(probabilities, np.float64)
    counts = topk_share(p, share)
    mean = p.mean(axis=0) if len(p) else np.zeros(p.shape[1])
    # lexsort's last key is the primary one; it is stable, so equal keys keep label order
    return np.asarray(np.lexsort((-mean, -counts)), np.int64)


@dataclass(frozen=True, eq=False)
class ReversedTrigger:
    """A reverse-engineered trigger for one class.

    Attributes:
        target: the class it sends inputs to.
        mask: (H, W) float32 in [0, 1], the share of each pixel the pattern replaces.
        pattern: (H, W, C) float32 in [0, pixel_max].
        norm: the mask's L1 norm (pixels' worth of trigger).
        attack_success: % of held-out clean images of other classes it sends to ``target``.
    """

    target: int
    mask: np.ndarray
    pattern: np.ndarray
    norm: float
    attack_success: float

    def apply(self, images: np.ndarray) -> np.ndarray:
        """(N, H, W, C) float32: ``(1 - mask) x + mask pattern``."""
        x = np.asarray(images, np.float32)
        m = self.mask[..., None]
        return (1.0 - m) * x + m * self.pattern


@dataclass(frozen=True, eq=False)
class CleanseScan:
    """What :meth:`NeuralCleanse.scan` found.

    Attributes:
        flagged: the classes flagged as backdoor targets, most anomalous first.
        norms: (K,) every class's mask norm: the full optimisation's where a class was
            optimised fully (H x W, the whole image, where its trigger never reached the
            success share), else the screen's; NaN for a class neither screened nor optimised
            fully (left out by the pre-selection).
        screen_norms: (K,) the screen's norm of every screened class (equal to ``norms`` where
            there was no screen; NaN for a class the pre-selection left out). A class whose
            trigger never reached the success share in the screen ranks after all that did:
            its value is the largest norm + 1 + its final loss.
        anomaly: (K,) anomaly index of each fully optimised class against the reference
            classes' norms; NaN for classes only screened.
        candidates: classes optimised fully because the screen ranked them lowest (all
            classes where there was no screen).
        reference: random classes optimised fully to measure the norms' median and MAD.
        triggers: class -> reversed trigger, for every fully optimised class.
        screened: whether there was a screen.
        seconds: wall time of the scan.
        settings: the scanner's settings.
        screen_reached: (K,) bool, whether the screen found a trigger reaching the success
            share for each class (all True where there was no screen; False for a class the
            pre-selection left out).
        preselected: the classes the pre-selection passed on to the screen, best first;
            None where there was no pre-selection (every class screened, or none).
        preselect_share: (K,) each class's pre-selection statistic (:func:`topk_share`);
            None where there was no pre-selection.
    """

    flagged: tuple[int, ...]
    norms: np.ndarray
    screen_norms: np.ndarray
    anomaly: np.ndarray
    candidates: tuple[int, ...]
    reference: tuple[int, ...]
    triggers: dict[int, ReversedTrigger]
    screened: bool
    seconds: float
    settings: dict[str, Any] = field(default_factory=dict)
    screen_reached: np.ndarray | None = None
    preselected: tuple[int, ...] | None = None
    preselect_share: np.ndarray | None = None

    def screen_rank(self, cls: int) -> int:
        """1-based rank of ``cls`` among the screen's norms (1 = smallest); a class the
        pre-selection left out ranks after every screened class."""
        screened = np.isfinite(self.screen_norms)
        if not np.isfinite(self.screen_norms[cls]):
            return int(np.sum(screened)) + 1
        return int(np.sum(self.screen_norms[screened] < self.screen_norms[cls])) + 1

    def preselect_rank(self, cls: int) -> int | None:
        """1-based rank of ``cls`` in the pre-selection order (1 = passed on first); None
        where there was no pre-selection. For a class left out, one more than the number of
        classes with a strictly higher statistic (its ties on the statistic, broken by the
        mean probability, which is not recorded, count in its favour)."""
        if self.preselect_share is None:
            return None
        share = self.preselect_share
        if self.preselected is not None and cls in self.preselected:
            return self.preselected.index(cls) + 1
        return int(np.sum(share > share[cls])) + 1

    def summary(self) -> dict[str, Any]:
        """JSON-able: flagged classes, each fully optimised class's norm, anomaly index and
        attack success, every class's norm, and the settings."""
        return {
            "flagged": list(self.flagged),
            "screened": self.screened,
            "seconds": round(self.seconds, 2),
            "settings": self.settings,
            "optimised": [
                {"class": c, "norm": round(float(self.norms[c]), 3),
                 "anomaly_index": round(float(self.anomaly[c]), 3),
                 "attack_success": round(t.attack_success, 2),
                 "screen_norm": _json_float(self.screen_norms[c]),
                 "role": "candidate" if c in self.candidates else "reference"}
                for c, t in sorted(self.triggers.items(), key=lambda kv: self.norms[kv[0]])
            ],
            "norms": [_json_float(v) for v in self.norms],
            "screen_reached": None if self.screen_reached is None else [bool(v) for v in self.screen_reached],
            "preselected": None if self.preselected is None else list(self.preselected),
            "preselect_share": (None if self.preselect_share is None else
                                [round(float(v), 6) for v in self.preselect_share]),
        }

    def to_json(self) -> str:
        return json.dumps(self.summary(), indent=1)


def _json_float(v: Any) -> float | None:
    """A norm for JSON: 3 decimals; None (read back as NaN) for a class not measured."""
    return round(float(v), 3) if np.isfinite(v) else None


class NeuralCleanse:
    """Neural Cleanse (Wang et al., IEEE S&P 2019): reverse-engineer each class's smallest
    trigger and flag the classes whose trigger is anomalously small.

    ``scan(model, clean)`` reads only the BadNet and clean labelled images: all of them for the
    pre-selection, ``images`` of them (seeded draw) to optimise on, the rest (up to
    ``images``) to measure each reversed trigger's attack success.

    Args:
        preselect: labels the pre-selection passes on to the screen, default 128 (one screen
            batch of ``classes_per_batch``, a tenth of the lab's 1283 classes: the screen, which
            dominated the scan's time, then costs a tenth); None screens every class. A no-op
            where there are at most ``preselect`` classes or no screen (at most
            ``candidates + reference`` classes).
        preselect_share: K-Arm's gamma, the top share of labels :func:`topk_share` counts
            an image's label among, default 0.25 (the paper's).
        steps: optimisation steps per fully optimised class, default 300.
        screen_steps: steps of the screen, default 60.
        candidates: classes the screen passes on, default 10.
        reference: random other classes optimised fully for the median and MAD, default 30.
        batch_images: clean images per step per class (full optimisation), default 24.
        screen_images: clean images per step per class in the screen, default 8.
        screen_cost: the screen's lambda, fixed (no schedule), default 0.01: strong enough that
            within ``screen_steps`` only classes with a small trigger reach ``success``.
        classes_per_batch: classes optimised together, default 128.
        learning_rate: Adam's step (on the tanh-space mask and pattern), default 0.1.
        cost: the initial lambda, default 1e-3.
        success: the attack-success share a trigger must reach, default 0.99.
        epoch_steps: steps between lambda updates, default 10.
        patience: updates in a row above (below) ``success`` before lambda rises (falls),
            default 2.
        anomaly_threshold: anomaly index above which a class is flagged, default 2.
        images: clean images to optimise on, at most, default 1000.
        pixel_max: the top of the pattern's range in file pixels, default None: the clean
            images' :func:`~badnet_repair.formats.data.pixel_range` (255 for 0..255 files, 1 for
            0..1 files, also where the model scales its input itself).
        seed: the image draw, the reference classes and the initial masks, default 0.
    """

    def __init__(self, *, steps: int = 300, screen_steps: int = 60, candidates: int = 10, reference: int = 30,
                 preselect: int | None = 128, preselect_share: float = 0.25,
                 batch_images: int = 24, screen_images: int = 8, screen_cost: float = 0.01,
                 classes_per_batch: int = 128,
                 learning_rate: float = 0.1, cost: float = 1e-3, success: float = 0.99, epoch_steps: int = 10,
                 patience: int = 2, anomaly_threshold: float = 2.0, images: int = 1000,
                 pixel_max: float | None = None, seed: int = 0) -> None:
        for name, v in (("steps", steps), ("screen_steps", screen_steps), ("candidates", candidates),
                        ("batch_images", batch_images), ("screen_images", screen_images),
                        ("classes_per_batch", classes_per_batch), ("epoch_steps", epoch_steps),
                        ("patience", patience), ("images", images)):
            if int(v) < 1:
                raise ValueError(f"{name} must be at least 1, not {v}")
        if reference < 3:
            raise ValueError(f"reference must be at least 3 classes (a median and a MAD), not {reference}")
        if not 0.0 < success <= 1.0:
            raise ValueError(f"success is a share in (0, 1], not {success}")
        if preselect is not None and int(preselect) < 1:
            raise ValueError(f"preselect must be at least 1 class (or None: screen every class), not {preselect}")
        if not 0.0 < preselect_share <= 1.0:
            raise ValueError(f"preselect_share is a share of the labels in (0, 1], not {preselect_share}")
        if pixel_max is not None and not pixel_max > 0:
            raise ValueError(f"pixel_max must be > 0 (or None: the clean images' pixel range), not {pixel_max}")
        self.steps, self.screen_steps = int(steps), int(screen_steps)
        self.candidates, self.reference = int(candidates), int(reference)
        self.preselect = None if preselect is None else int(preselect)
        self.preselect_share = float(preselect_share)
        self.batch_images, self.screen_images = int(batch_images), int(screen_images)
        self.screen_cost = float(screen_cost)
        self.classes_per_batch = int(classes_per_batch)
        self.learning_rate, self.cost, self.success = float(learning_rate), float(cost), float(success)
        self.epoch_steps, self.patience = int(epoch_steps), int(patience)
        self.anomaly_threshold, self.images = float(anomaly_threshold), int(images)
        self.pixel_max = None if pixel_max is None else float(pixel_max)
        self.seed = int(seed)

    def get_params(self) -> dict[str, Any]:
        """The settings, by name."""
        return dict(vars(self))

    def scan(self, model: Any, clean: Dataset, *, progress: bool = False) -> CleanseScan:
        """Reverse-engineer triggers for ``model``'s classes and flag the anomalous ones.

        Args:
            model: the BadNet B, (N, H, W, C) -> (N, K) probabilities (not changed).
            clean: clean labelled images; the only data read.
            progress: progress bars.

        Returns:
            CleanseScan.
        """
        from ..nets.models import num_classes, predict_classes, predict_probabilities

        start = time.perf_counter()
        k = num_classes(model)
        x, y = np.asarray(clean.x, np.float32), np.asarray(clean.y)
        if len(x) < 2:
            raise ValueError("Neural Cleanse needs at least two clean images")
        pixel_max = float(pixel_range(x)) if self.pixel_max is None else self.pixel_max
        rng = np.random.default_rng(self.seed)
        order = rng.permutation(len(x))
        n_fit = min(self.images, max(1, len(x) // 2))
        fit_x = x[np.sort(order[:n_fit])]
        held = np.sort(order[n_fit : n_fit + self.images])
        held_x, held_y = x[held], y[held]
        opt = _Optimiser(model, self, pixel_max=pixel_max, progress=progress)
        screened = k > self.candidates + self.reference
        preselected: np.ndarray | None = None
        shares: np.ndarray | None = None
        if screened and self.preselect is not None and k > self.preselect:
            probs = predict_probabilities(model, x)
            shares = topk_share(probs, self.preselect_share)
            preselected = preselect_order(probs, self.preselect_share)[: self.preselect]
            del probs
            log.info("Neural Cleanse pre-selection: %d of %d classes screened", len(preselected), k)
        if screened:
            screen_classes = np.arange(k) if preselected is None else np.sort(preselected)
            screen = opt.run(fit_x, screen_classes, steps=self.screen_steps, batch_images=self.screen_images,
                             rng=rng, desc="Neural Cleanse screen", cost=self.screen_cost)
            screen_norms = np.full(k, np.nan)
            screen_norms[screen_classes] = screen.ranking_norms()
            screen_reached = np.zeros(k, bool)
            screen_reached[screen_classes] = screen.reached
            ranked = screen_classes[np.argsort(screen_norms[screen_classes], kind="stable")]
            cands = np.sort(ranked[: self.candidates])
            # the references come from every class, not only the pre-selected ones: their
            # median and MAD stand for all classes'
            rest = np.setdiff1d(np.arange(k), cands)
            refs = np.sort(rng.choice(rest, size=min(self.reference, len(rest)), replace=False))
        else:
            cands, refs = np.arange(k), np.arange(k)
        full_classes = np.union1d(cands, refs)
        full = opt.run(fit_x, full_classes, steps=self.steps, batch_images=self.batch_images, rng=rng,
                       desc="Neural Cleanse")
        triggers: dict[int, ReversedTrigger] = {}
        for i, c in enumerate(full_classes):
            mask, pattern, norm = full.best(i)
            others = held_y != c
            asr = (100.0 * float(np.mean(predict_classes(model, _stamp(held_x[others], mask, pattern)) == c))
                   if others.any() else float("nan"))
            triggers[int(c)] = ReversedTrigger(int(c), mask, pattern, norm, asr)
        # a class whose trigger never reached the success share has no small trigger: it counts
        # as needing the whole image, not as the tiny mask the penalty left it with
        whole = float(x.shape[1] * x.shape[2])
        full_norms = np.array([triggers[int(c)].norm if full.reached[i] else whole
                               for i, c in enumerate(full_classes)])
        if not screened:
            screen_norms = full_norms.copy()
            screen_reached = np.ones(k, bool)
        norms = np.asarray(screen_norms, np.float64).copy()
        norms[full_classes] = full_norms
        anomaly = np.full(k, np.nan)
        anomaly[full_classes] = anomaly_index(full_norms, norms[refs])
        reached = {int(c) for i, c in enumerate(full_classes) if full.reached[i]}
        flagged = sorted((int(c) for c in cands if anomaly[c] > self.anomaly_threshold and int(c) in reached),
                         key=lambda c: -anomaly[c])
        seconds = time.perf_counter() - start
        log.info("Neural Cleanse: %d classes, flagged %s in %.0f s", k, flagged, seconds)
        return CleanseScan(flagged=tuple(flagged), norms=norms, screen_norms=np.asarray(screen_norms, np.float64),
                           anomaly=anomaly, candidates=tuple(int(c) for c in cands),
                           reference=tuple(int(c) for c in refs), triggers=triggers, screened=screened,
                           seconds=seconds, settings={**self.get_params(), "pixel_max": pixel_max},
                           screen_reached=screen_reached,
                           preselected=None if preselected is None else tuple(int(c) for c in preselected),
                           preselect_share=shares)


def _stamp(x: np.ndarray, mask: np.ndarray, pattern: np.ndarray) -> np.ndarray:
    m = mask[..., None]
    return (1.0 - m) * x + m * pattern


@dataclass
class _Run:
    """Per-class results of one optimisation run."""

    best_norm: np.ndarray
    best_mask: np.ndarray
    best_pattern: np.ndarray
    last_norm: np.ndarray
    last_loss: np.ndarray
    last_objective: np.ndarray
    reached: np.ndarray

    def ranking_norms(self) -> np.ndarray:
        """A norm per class for ranking: the best one that reached the attack-success share;
        classes that never reached it rank after all that did, by their last loss."""
        out = self.best_norm.copy()
        missing = ~self.reached
        if missing.any():
            ceiling = float(np.nanmax(np.concatenate([self.last_norm, out[self.reached]]))) + 1.0
            out[missing] = ceiling + self.last_loss[missing]
        return out

    def best(self, i: int) -> tuple[np.ndarray, np.ndarray, float]:
        return self.best_mask[i], self.best_pattern[i], float(self.best_norm[i] if self.reached[i]
                                                             else self.last_norm[i])


class _Optimiser:
    """Neural Cleanse's optimisation, for many classes at once (TensorFlow)."""

    def __init__(self, model: Any, nc: NeuralCleanse, *, pixel_max: float, progress: bool) -> None:
        self.model, self.nc, self.progress = model, nc, progress
        self.pixel_max = float(pixel_max)
        self.shape = tuple(int(d) for d in model.inputs[0].shape[1:])

    def run(self, x: np.ndarray, classes: Sequence[int] | np.ndarray, *, steps: int, batch_images: int,
            rng: np.random.Generator, desc: str, cost: float | None = None) -> _Run:
        """Optimise each class's trigger; ``cost`` fixes lambda (no schedule), else the paper's
        schedule from ``nc.cost``."""
        from ..progress import bar

        classes = np.asarray(classes, np.int64)
        n = len(classes)
        h, w, c = self.shape
        out = _Run(best_norm=np.full(n, np.inf), best_mask=np.zeros((n, h, w), np.float32),
                   best_pattern=np.zeros((n, h, w, c), np.float32), last_norm=np.zeros(n),
                   last_loss=np.zeros(n), last_objective=np.zeros(n), reached=np.zeros(n, bool))
        per = max(1, self.nc.classes_per_batch)
        chunks = [np.arange(i, min(i + per, n)) for i in range(0, n, per)]
        with bar(total=len(chunks) * steps, desc=desc, unit="step", disable=not self.progress) as pbar:
            for idx in chunks:
                self._run_chunk(x, classes[idx], idx, out, steps=steps, batch_images=batch_images, rng=rng,
                                pbar=pbar, cost=cost)
        return out

    def _run_chunk(self, x: np.ndarray, classes: np.ndarray, idx: np.ndarray, out: _Run, *, steps: int,
                   batch_images: int, rng: np.random.Generator, pbar: Any, cost: float | None) -> None:
        import tensorflow as tf

        nc, n = self.nc, len(classes)
        h, w, c = self.shape
        # the paper's initialisation: mask and pattern uniform at random, optimised in tanh space
        init_m = np.arctanh((rng.uniform(0.0, 1.0, (n, h, w, 1)) - 0.5) * (2 - 1e-6)).astype(np.float32)
        init_p = np.arctanh((rng.uniform(0.0, 1.0, (n, h, w, c)) - 0.5) * (2 - 1e-6)).astype(np.float32)
        m_var, p_var = tf.Variable(init_m), tf.Variable(init_p)
        lam_np = np.full(n, nc.cost if cost is None else cost)
        lam = tf.Variable(lam_np.astype(np.float32))
        targets = tf.constant(np.repeat(classes, batch_images).astype(np.int32))
        import keras

        adam = keras.optimizers.Adam(nc.learning_rate, beta_1=0.5, beta_2=0.9)
        adam.build([m_var, p_var])
        model, pixel_max = self.model, self.pixel_max

        @tf.function(reduce_retracing=True)
        def step(xb: Any) -> tuple[Any, Any, Any]:
            with tf.GradientTape() as tape:
                mask = tf.tanh(m_var) / 2 + 0.5
                pattern = (tf.tanh(p_var) / 2 + 0.5) * pixel_max
                adv = (1 - mask)[:, None] * xb[None] + (mask * pattern)[:, None]
                probs = model(tf.reshape(adv, (-1, h, w, c)), training=False)
                p_t = tf.gather(probs, targets, batch_dims=1)
                ce = -tf.math.log(tf.clip_by_value(p_t, 1e-7, 1.0))
                ce = tf.reduce_mean(tf.reshape(ce, (n, batch_images)), axis=1)
                l1 = tf.reduce_sum(mask, axis=(1, 2, 3))
                loss = tf.reduce_sum(ce + lam * l1)
            grads = tape.gradient(loss, [m_var, p_var])
            adam.apply_gradients(zip(grads, [m_var, p_var], strict=False))
            hit = tf.cast(tf.equal(tf.argmax(probs, axis=-1, output_type=tf.int32), targets), tf.float32)
            return ce, l1, tf.reduce_mean(tf.reshape(hit, (n, batch_images)), axis=1)

        up = np.zeros(n, np.int64)
        down = np.zeros(n, np.int64)
        acc_sum, ce_sum, l1_last = np.zeros(n), np.zeros(n), np.zeros(n)
        for s in range(steps):
            pick = rng.choice(len(x), size=batch_images, replace=len(x) < batch_images)
            ce, l1, acc = (v.numpy() for v in step(tf.constant(x[pick])))
            acc_sum += acc
            ce_sum += ce
            l1_last = l1
            pbar.update()
            if (s + 1) % nc.epoch_steps and s + 1 != steps:
                continue
            # an epoch: keep the smallest trigger that reached the success share; the paper's lambda schedule
            epoch_acc = acc_sum / nc.epoch_steps
            ok = epoch_acc >= nc.success
            better = ok & (l1_last < out.best_norm[idx])
            if better.any():
                mask = (np.tanh(m_var.numpy()) / 2 + 0.5)[..., 0]
                pattern = (np.tanh(p_var.numpy()) / 2 + 0.5) * pixel_max
                sel = idx[better]
                out.best_norm[sel] = l1_last[better]
                out.best_mask[sel] = mask[better]
                out.best_pattern[sel] = pattern[better]
                out.reached[sel] = True
            out.last_norm[idx] = l1_last
            out.last_loss[idx] = ce_sum / nc.epoch_steps
            out.last_objective[idx] = out.last_loss[idx] + lam_np * l1_last
            acc_sum[:] = 0.0
            ce_sum[:] = 0.0
            if cost is not None:
                continue
            up = np.where(ok, up + 1, 0)
            down = np.where(ok, 0, down + 1)
            lam_np = np.where(up >= nc.patience, lam_np * 1.5, lam_np)
            lam_np = np.where(down >= nc.patience, lam_np / 1.5**1.5, lam_np)
            up = np.where(up >= nc.patience, 0, up)
            down = np.where(down >= nc.patience, 0, down)
            lam.assign(lam_np.astype(np.float32))
        never = idx[~out.reached[idx]]
        if len(never):
            mask = (np.tanh(m_var.numpy()) / 2 + 0.5)[..., 0]
            pattern = (np.tanh(p_var.numpy()) / 2 + 0.5) * pixel_max
            local = ~out.reached[idx]
            out.best_mask[never] = mask[local]
            out.best_pattern[never] = pattern[local]
