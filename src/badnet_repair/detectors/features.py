"""Feature distance: flag inputs whose penultimate features do not fit the class B gives them."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from typing import Any, ClassVar

import numpy as np

from ..errors import ModelError
from ..formats.data import Dataset
from .base import ThresholdDetector, calibration_split, checked_false_alarm, detector_model, threshold_at

__all__ = ["DEFAULT_FOLDS", "DEFAULT_FOLD_CORRECTION", "DEFAULT_LAYERS", "DEFAULT_PER_CLASS_MIN", "DEFAULT_SPLITS",
           "MAX_FEATURES", "FeatureDistance", "FeatureEnsemble", "covariance_share", "feature_tensor",
           "features_model", "fold_ids", "fold_scale", "ledoit_wolf", "ledoit_wolf_from_moments", "mahalanobis_sq",
           "robust_location_scale", "run_features", "split_seeds", "split_thresholds"]

log = logging.getLogger(__name__)

#: The feature detectors' ``per_class_min`` (their one home): None, every class normalised by
#: the pooled median and spread of the calibration scores (chosen in round 5,
#: docs/research/detection32.md).
DEFAULT_PER_CLASS_MIN: int | None = None

#: The feature ensemble's ``layers`` (their one home): the classifier head's input and the last conv
#: layer's map (chosen in round 5, docs/research/detection32.md).
DEFAULT_LAYERS: tuple[str, ...] = ("head", "conv")

#: The feature detectors' ``folds`` (their one home): 5, the threshold set on out-of-fold scores
#: of all the clean images (5-fold cross-fitting; chosen in round 8, docs/research/detection32.md);
#: None, on one held-out ``share`` of them.
DEFAULT_FOLDS: int | None = 5

#: The feature detectors' ``fold_correction`` (their one home): False, the cross-fitted distances
#: as measured (issue 32's round 10 decides it, docs/research/detection32.md).
DEFAULT_FOLD_CORRECTION: bool = False

#: The feature detectors' ``splits`` (their one home): 1, the threshold of one fit/calibration
#: split; R, the mean of R splits' thresholds (the first split's statistics score new inputs).
DEFAULT_SPLITS: int = 1

#: MAD times this estimates a normal distribution's standard deviation.
_MAD_TO_SD = 1.4826


def ledoit_wolf(x: np.ndarray) -> tuple[np.ndarray, float]:
    """The Ledoit-Wolf shrunk covariance of rows that are already centred.

    Ledoit and Wolf, "A well-conditioned estimator for large-dimensional covariance matrices",
    Journal of Multivariate Analysis 88(2), 2004 (Lemma 3.2 and Theorem 3.4; the same estimate
    as ``sklearn.covariance.ledoit_wolf(x, assume_centered=True)``). With ``n`` rows
    ``x_k`` of ``p`` values, ``S = X^T X / n``, ``mu = tr(S) / p`` and the norm
    ``||A||^2 = tr(A A^T) / p``::

        d^2    = ||S - mu I||^2
        bbar^2 = (1 / n^2) sum_k ||x_k x_k^T - S||^2
               = (sum_k |x_k|^4 / n - sum_ij S_ij^2) / (n p)      (expanded; computed this way)
        b^2    = min(bbar^2, d^2)
        cov    = (b^2 / d^2) mu I + (1 - b^2 / d^2) S

    Args:
        x: (n, p) rows, centred (their mean, or their class's mean, taken off).

    Returns:
        ((p, p) float64 covariance, the shrinkage intensity b^2 / d^2 in 0..1; 0 where
        ``d^2`` is 0, i.e. ``S`` is already a multiple of the identity).
    """
    x = np.asarray(x, np.float64)
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"ledoit_wolf needs (n, p) rows with n >= 1, got shape {x.shape}")
    n = len(x)
    return ledoit_wolf_from_moments(x.T @ x / n, float(np.sum(np.sum(x**2, axis=1) ** 2)), n)


def ledoit_wolf_from_moments(s: np.ndarray, fourth: float, n: int) -> tuple[np.ndarray, float]:
    """:func:`ledoit_wolf` from the rows' moments: ``s = X^T X / n`` (p, p) and ``fourth = sum_k
    |x_k|^4``, for callers that accumulate them without holding the rows. Same returns."""
    p = len(s)
    mu = float(np.trace(s)) / p
    squares = float(np.vdot(s, s))  # sum_ij S_ij^2
    d2 = max(squares - 2.0 * mu * float(np.trace(s)) + mu * mu * p, 0.0) / p  # ||S - mu I||^2, no p x p temporary
    bbar2 = float(fourth / n - squares) / (n * p)
    b2 = min(max(bbar2, 0.0), d2)
    shrink = 0.0 if d2 <= 0.0 else b2 / d2
    cov = (1.0 - shrink) * s
    cov[np.diag_indices(p)] += shrink * mu
    return cov, float(shrink)


def _psd_inverse(cov: np.ndarray) -> np.ndarray:
    """The inverse of a symmetric positive semi-definite matrix, its eigenvalues floored at
    1e-6 of their mean: Ledoit-Wolf gives a well-conditioned matrix, except where there is
    nothing to shrink (one image, or constant features), which then still inverts."""
    vals, vecs = np.linalg.eigh((cov + cov.T) / 2.0)
    floor = 1e-6 * max(float(np.mean(vals)), 0.0)
    vals = np.maximum(vals, floor if floor > 0 else 1.0)
    return (vecs / vals) @ vecs.T


def mahalanobis_sq(features: np.ndarray, means: np.ndarray, precision: np.ndarray) -> np.ndarray:
    """(N,) squared Mahalanobis distances ``(f_i - m_i)^T P (f_i - m_i)`` of (N, D) features
    to (N, D) means (one per row, or one (D,) for all) under the (D, D) precision ``P``."""
    diff = np.asarray(features, np.float64) - np.asarray(means, np.float64)
    return np.sum((diff @ np.asarray(precision, np.float64)) * diff, axis=1)  # a BLAS product, not an einsum loop


def robust_location_scale(values: np.ndarray) -> tuple[float, float]:
    """(median, 1.4826 * MAD) of ``values``: a centre and spread that a few outliers do not move.

    Returns:
        The spread is 0 where half the values or more are equal (and for one value).
    """
    v = np.asarray(values, np.float64)
    med = float(np.median(v))
    return med, float(_MAD_TO_SD * np.median(np.abs(v - med)))


class FeatureDistance(ThresholdDetector):
    """Squared Mahalanobis distance of B's penultimate features to the clean mean of B's class.

    After Beatrix (Ma et al., "The Beatrix Resurrections: Robust Backdoor Detection via Gram
    Matrices", NDSS 2023), which tests whether an input's penultimate-layer statistics fit the
    class it is assigned to, in the simpler form of Lee et al.'s Mahalanobis detector ("A Simple
    Unified Framework for Detecting Out-of-Distribution Samples and Adversarial Attacks",
    NeurIPS 2018): a triggered input reaches the target class through features unlike those of
    the target's clean images.

    The features ``f(x)`` are the input of B's classifier head (the Dense layer that makes the
    class scores; the 160 add+ReLU units of the lab's DeepID). On the fit part of the clean data
    (:func:`~badnet_repair.detectors.base.calibration_split`, ``share`` held out per class) the
    detector learns each class's mean ``m_c`` (by label) and ONE covariance shared by all classes
    (Lee et al.'s tied covariance): the within-class deviations ``f_i - m_{y_i}``, shrunk towards
    a scaled identity by Ledoit-Wolf (:func:`ledoit_wolf`: with few clean images, as the demo's
    20 fit images, the plain covariance of 160 features is singular, and with the lab's ~6400
    within-class degrees of freedom its smallest eigenvalues are still noise that the inverse
    magnifies), inverted once into ``P``. An input's raw score is

        ``r(x) = (f(x) - m_c)^T P (f(x) - m_c)``, ``c`` = B's predicted class for ``x``,

    and its score is ``(r(x) - median_c) / spread_c``, where ``median_c`` and ``spread_c``
    (1.4826 MAD) are those of the raw scores of the held-out calibration images B predicts as
    ``c`` if there are at least ``per_class_min`` of them, and of all calibration images
    otherwise (pooled; by default always). Beatrix normalises each class's deviations by its own
    median and MAD; but the lab's clean data has 9 images a class, so 3 held out, whose median and
    MAD are noise, and where a class has enough, its own spread can still set its threshold far
    out (the choice: docs/research/detection32.md, round 5). Pooled, the score is the raw
    distance up to one affine map. The threshold is set on the calibration scores
    (``false_alarm`` % above it); where classes are normalised on their own, the same images
    give their median, MAD and the threshold (there are too few to split again).

    Degenerate cases, never an error: a class with no fit image has no mean, and an input B
    predicts as one scores by its distance to the nearest class mean (under ``P``); where no
    class has two fit images (two clean images a class: one fits, one calibrates) the covariance
    is that of all fit features about their overall mean; where no image is left to calibrate
    on (one image a class), each fit image is scored with its own class's mean left out
    (cross-fitted, 5 folds: the fold's classes then have no mean, and score by the nearest), so
    the threshold sees distances of images the statistics were not made of; it errs high (few
    false alarms), since a clean input later meets its own class's mean.

    Deviation from Beatrix: Beatrix compares Gram matrices of a layer's activations (orders
    1..p) against per-class min/max ranges; this is its first-order, Gaussian form (Lee et al.),
    which fits the lab's few clean images a class (a 160-unit Gram matrix has 12880 entries).

    Args:
        layer: where the features come from (:func:`feature_tensor`): ``"head"`` (default, the
            classifier head's input), ``"conv"`` (the last conv layer's map) or a layer's name.
        share: the share of each class's clean images held out to calibrate, default 0.3.
        per_class_min: calibration images a class needs for its own median and MAD (at least
            2), else the pooled ones; default None (:data:`DEFAULT_PER_CLASS_MIN`): always pooled.
        shrinkage: the covariance's shrinkage towards the scaled identity, 0..1, or None
            (default) for the Ledoit-Wolf estimate.
        false_alarm: the share of held-out clean images flagged, in %, default 5.
        seed: the fit/calibration split, default 0.
        batch_size: images per forward pass, default 1024.
        folds: K >= 2 (default 5, :data:`DEFAULT_FOLDS`): cross-fitted, each clean image scored
            by statistics of the K - 1 folds without it (folds dealt per class, :func:`fold_ids`),
            the normalisation and threshold on all N out-of-fold scores (a 5 % threshold then rests
            on N images, not 0.3 N), the statistics that score new inputs on all the clean images
            (``share`` unused); the threshold errs high (new inputs meet statistics of all N, nearer
            than the K - 1 folds' were), so fewer than ``false_alarm`` % of new clean inputs are
            flagged. None: the statistics on the fit part, the normalisation and threshold on the
            ``share`` held out.
        fold_correction: scale each cross-fitted distance to what the statistics of all the clean
            images would give a new input (:func:`fold_scale`: its class's mean made of more
            images, the covariance of more degrees of freedom), so the threshold no longer errs
            high where a class has few clean images; default False (:data:`DEFAULT_FOLD_CORRECTION`).
        splits: with ``folds = None``: 1 (default, :data:`DEFAULT_SPLITS`), the threshold of the
            one split; R >= 2, the mean of the thresholds of R fit/calibration splits
            (:func:`split_seeds`, the first is ``seed``'s), each in its own split's normalised
            units; the first split's statistics and normalisation score new inputs. Not with
            ``folds``.
    """

    name: ClassVar[str] = "feature-distance"
    summary: ClassVar[str] = ("B's penultimate features are far from its class's clean mean "
                              "(tied-covariance Mahalanobis; Lee et al. 2018, Beatrix 2023)")

    layer: str
    share: float
    per_class_min: int | None
    shrinkage: float | None
    seed: int
    batch_size: int
    folds: int | None
    fold_correction: bool
    splits: int

    def __init__(self, *, layer: str = "head", share: float = 0.3,
                 per_class_min: int | None = DEFAULT_PER_CLASS_MIN, shrinkage: float | None = None,
                 false_alarm: float = 5.0, seed: int = 0, batch_size: int = 1024,
                 folds: int | None = DEFAULT_FOLDS, fold_correction: bool = DEFAULT_FOLD_CORRECTION,
                 splits: int = DEFAULT_SPLITS) -> None:
        if not isinstance(layer, str) or not layer:
            raise ValueError(f"layer must be 'head', 'conv' or a layer's name, not {layer!r}")
        if not 0.0 < share < 1.0:
            raise ValueError(f"share must be between 0 and 1, not {share}")
        if per_class_min is not None and (int(per_class_min) != per_class_min or per_class_min < 2):
            raise ValueError(f"per_class_min must be a whole number >= 2 (a median and MAD need two), "
                             f"not {per_class_min}")
        if shrinkage is not None and not 0.0 <= shrinkage <= 1.0:
            raise ValueError(f"shrinkage must be between 0 and 1 (or None for Ledoit-Wolf), not {shrinkage}")
        checked_false_alarm(false_alarm)
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, not {batch_size}")
        if folds is not None and (int(folds) != folds or folds < 2):
            raise ValueError(f"folds must be a whole number >= 2 (or None for one held-out share), not {folds}")
        self.folds = None if folds is None else int(folds)
        if not isinstance(fold_correction, (bool, np.bool_)):
            raise ValueError(f"fold_correction must be True or False, not {fold_correction!r}")
        self.fold_correction = bool(fold_correction)
        self.splits = checked_splits(splits, self.folds)
        self.layer = layer
        self.share = float(share)
        self.per_class_min = None if per_class_min is None else int(per_class_min)
        self.shrinkage = None if shrinkage is None else float(shrinkage)
        self.false_alarm, self.seed, self.batch_size = float(false_alarm), int(seed), int(batch_size)
        self.model: Any = None
        self._features_model: Any = None
        self.means: np.ndarray | None = None  # (K, D); rows of classes without a fit image are 0
        self.has_mean: np.ndarray | None = None  # (K,) bool
        self.precision: np.ndarray | None = None  # (D, D)
        self.loc: np.ndarray | None = None  # (K,) median raw score per predicted class
        self.spread: np.ndarray | None = None  # (K,) its spread (> 0)
        self.shrinkage_used: float | None = None
        self.per_class: np.ndarray | None = None  # (K,) bool: normalised by the class's own statistics
        self.split_thresholds: np.ndarray | None = None  # (splits,) each split's threshold; the mean is used

    # ------------------------------------------------------------------ features

    def features(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """B's features at :attr:`layer` and predicted classes on file-pixel inputs.

        Returns:
            ((N, D) float64 features, (N,) int64 classes).
        """
        if self.model is None:
            raise RuntimeError("call fit(model, clean) first (FeatureDistance)")
        if self._features_model is None:  # fitted on features given (fit_features): built on first use
            self._features_model = self._features_of(self.model)
        (feats,), classes = run_features(self._features_model, x, self.batch_size)
        return feats, classes

    def _features_of(self, model: Any) -> Any:
        """A model from B's input to (the features of :attr:`layer`, its output)."""
        return features_model(model, [self.layer])

    # ------------------------------------------------------------------ fit

    def fit(self, model: Any, clean: Dataset) -> FeatureDistance:
        """Class means and the shrunk tied covariance on the fit part of the clean data; the
        normalisation and threshold on the held-out part."""
        _check_clean(model, clean)
        self.model, self._features_model = model, self._features_of(model)
        feats, pred = self.features(clean.x)
        return self.fit_features(model, feats, pred, np.asarray(clean.y, np.int64))

    def fit_features(self, model: Any, feats: np.ndarray, pred: np.ndarray, y: np.ndarray) -> FeatureDistance:
        """:meth:`fit` on the clean images' (N, D) features at :attr:`layer`, B's (N,) classes
        for them and their (N,) labels, already computed (the feature ensemble runs B once for
        all its layers)."""
        from ..nets.models import num_classes

        k = num_classes(model)
        if model is not self.model:
            self.model, self._features_model = model, None
        n_clean = len(feats)
        if self.folds is not None:
            stats = self._statistics(feats, y, k)
            raw_cal, pred_cal, calibrating = self._out_of_fold(feats, y, pred, k), pred, n_clean
        else:
            stats, raw_cal, pred_cal = self._split(feats, pred, y, k, self.seed)
            calibrating = len(raw_cal) if len(raw_cal) < n_clean else 0
        self.means, self.has_mean, self.precision, self.shrinkage_used = stats
        self.loc, self.spread, self.per_class = self._normalisation(raw_cal, pred_cal, k)
        log.info("feature distance at %s: %d features, %d classes with a mean, shrinkage %.3f, %d of %d clean "
                 "images calibrate, %d classes normalised on their own", self.layer, feats.shape[1],
                 int(self.has_mean.sum()), self.shrinkage_used, calibrating, n_clean, int(self.per_class.sum()))
        self.calibrate(self._normalised(raw_cal, pred_cal))
        if self.splits > 1:
            assert self.threshold is not None
            self.split_thresholds = split_thresholds(
                f"feature distance at {self.layer}", self.threshold, self.false_alarm,
                (self.split_calibration(feats, pred, y, s) for s in split_seeds(self.seed, self.splits)[1:]))
            self.threshold = float(self.split_thresholds.mean())
        return self

    def _split(self, feats: np.ndarray, pred: np.ndarray, y: np.ndarray, k: int,
               seed: int) -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray, float], np.ndarray, np.ndarray]:
        """(statistics of the fit part, raw distances and B's classes of the calibration part) of
        the fit/calibration split ``seed``; where no image is left to calibrate on, the fit
        images' cross-fitted distances."""
        fit_idx, cal_idx = calibration_split(y, self.share, seed)
        stats = self._statistics(feats[fit_idx], y[fit_idx], k)
        if len(cal_idx):
            return stats, _raw_distances(feats[cal_idx], pred[cal_idx], *stats[:3]), pred[cal_idx]
        return stats, self._cross_fitted(feats[fit_idx], y[fit_idx], pred[fit_idx], k, seed), pred[fit_idx]

    def _normalisation(self, raw_cal: np.ndarray, pred_cal: np.ndarray,
                       k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(loc (K,), spread (K,), per_class (K,) bool) from the calibration images' raw
        distances: pooled, or a class's own where it has ``per_class_min`` of them."""
        pooled_loc, pooled_spread = robust_location_scale(raw_cal)
        if pooled_spread <= 1e-12 * max(1.0, abs(pooled_loc)):
            pooled_spread = float(np.std(raw_cal)) or 1.0
        loc, spread, per_class = np.full(k, pooled_loc), np.full(k, pooled_spread), np.zeros(k, bool)
        cal_counts = np.bincount(pred_cal, minlength=k)
        own = np.zeros(k, bool) if self.per_class_min is None else cal_counts >= self.per_class_min
        for c in np.flatnonzero(own):
            c_loc, c_spread = robust_location_scale(raw_cal[pred_cal == c])
            if c_spread > 1e-12 * max(1.0, abs(c_loc)):  # else keep the pooled spread (ties)
                loc[c], spread[c], per_class[c] = c_loc, c_spread, True
        return loc, spread, per_class

    def split_calibration(self, feats: np.ndarray, pred: np.ndarray, y: np.ndarray, seed: int) -> np.ndarray:
        """The normalised calibration scores of the split ``seed``, each in that split's own
        units (its statistics and normalisation), from the clean images' (N, D) features, B's
        (N,) classes and their (N,) labels; the fitted detector is left as it is."""
        from ..nets.models import num_classes

        if self.model is None:
            raise RuntimeError("call fit(model, clean) first (FeatureDistance)")
        k = num_classes(self.model)
        _, raw_cal, pred_cal = self._split(feats, pred, y, k, seed)
        loc, spread, _ = self._normalisation(raw_cal, pred_cal, k)
        return _normalise(raw_cal, pred_cal, loc, spread)

    def _statistics(self, feats: np.ndarray, labels: np.ndarray,
                    k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
        """(means (K, D), has_mean (K,), precision (D, D), shrinkage) of labelled features."""
        counts = np.bincount(labels, minlength=k)
        sums = np.zeros((k, feats.shape[1]))
        np.add.at(sums, labels, feats)
        means = sums / np.maximum(counts, 1)[:, None]
        # Tied covariance from within-class deviations (Lee et al. 2018). A class with one fit
        # image deviates by exactly 0 and tells nothing, so only classes with two or more count.
        # Dividing by n rather than n - classes scales P by a constant, which the median/MAD
        # normalisation and the Ledoit-Wolf intensity (scale-free) both ignore.
        several = counts[labels] >= 2
        if several.any():
            resid = feats[several] - means[labels[several]]
        else:
            resid = feats - feats.mean(axis=0)
            log.info("no class has two fit images: the covariance is that of all fit features about their mean")
        if self.shrinkage is None:
            cov, shrink = ledoit_wolf(resid)
        else:
            s = resid.T @ resid / len(resid)
            shrink = self.shrinkage
            cov = shrink * np.trace(s) / len(s) * np.eye(len(s)) + (1.0 - shrink) * s
        return means, counts > 0, _psd_inverse(cov), float(shrink)

    def _cross_fitted(self, feats: np.ndarray, labels: np.ndarray, pred: np.ndarray, k: int,
                      seed: int) -> np.ndarray:
        """Raw distances of the fit images where none is left to calibrate on (one image a
        class), each from statistics without it: 5 folds, each scored by the others' means and
        covariance (its own classes then have no mean: the nearest class's). Scoring the images
        the statistics were made of would give 0 to each (its class's mean is itself)."""
        n = len(feats)
        if n < 2:
            log.warning("one clean image: nothing to calibrate on; every input with features unlike it is flagged")
            return np.zeros(n)
        folds = np.random.default_rng(seed).permutation(n) % min(5, n)
        raw = np.empty(n)
        for fold in range(min(5, n)):
            out = folds == fold
            means, has_mean, precision, _ = self._statistics(feats[~out], labels[~out], k)
            raw[out] = _raw_distances(feats[out], pred[out], means, has_mean, precision)
            if self.fold_correction:
                raw[out] *= fold_scale(pred[out], labels[~out], labels, k)
        log.info("no clean image left to calibrate on: cross-fitted distances of the fit images set the threshold")
        return raw

    def _out_of_fold(self, feats: np.ndarray, labels: np.ndarray, pred: np.ndarray, k: int) -> np.ndarray:
        """(N,) raw distances of all the clean images, each from the statistics of the other
        ``folds`` - 1 folds (:func:`fold_ids`); where the images fill fewer than two folds (a
        handful of images), the one-image-a-class cross-fitting (:meth:`_cross_fitted`)."""
        assert self.folds is not None
        ids = fold_ids(labels, self.folds, self.seed)
        if len(np.unique(ids)) < 2:
            return self._cross_fitted(feats, labels, pred, k, self.seed)
        raw = np.empty(len(feats))
        for fold in np.unique(ids):
            out = ids == fold
            means, has_mean, precision, _ = self._statistics(feats[~out], labels[~out], k)
            raw[out] = _raw_distances(feats[out], pred[out], means, has_mean, precision)
            if self.fold_correction:
                raw[out] *= fold_scale(pred[out], labels[~out], labels, k)
        return raw

    # ------------------------------------------------------------------ scores

    def _normalised(self, raw: np.ndarray, classes: np.ndarray) -> np.ndarray:
        assert self.loc is not None and self.spread is not None
        return _normalise(raw, classes, self.loc, self.spread)

    def _fitted(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(means, has_mean, precision), or the error that says to fit first."""
        if self.means is None or self.has_mean is None or self.precision is None:
            raise RuntimeError("call fit(model, clean) first (FeatureDistance)")
        return self.means, self.has_mean, self.precision

    def raw_scores(self, x: np.ndarray) -> np.ndarray:
        """(N,) squared Mahalanobis distances of the inputs' features to their class's clean mean."""
        stats = self._fitted()
        feats, classes = self.features(x)
        return _raw_distances(feats, classes, *stats)

    def scores(self, x: np.ndarray) -> np.ndarray:
        """(N,) float64 normalised distances: higher = more likely triggered."""
        self._fitted()
        return self.scores_of(*self.features(x))

    def scores_of(self, feats: np.ndarray, classes: np.ndarray) -> np.ndarray:
        """:meth:`scores` from (N, D) features at :attr:`layer` and B's (N,) classes."""
        stats = self._fitted()
        return self._normalised(_raw_distances(feats, classes, *stats), classes)

    # ------------------------------------------------------------------ Keras form

    def keras_flags(self, x: Any, *, prefix: str, scale: float = 1.0) -> Any:
        """(N,) 0/1 flags on G's input ``x`` (file pixels times ``scale``): a copy of B (its
        features and output) and a :class:`~badnet_repair.nets.layers.FeatureDistanceAlarm` holding
        the fitted statistics."""
        from ..nets.models import renamed_copy

        if self.threshold is None or self.model is None:
            raise RuntimeError("call fit(model, clean) before keras_flags() (FeatureDistance)")
        b = renamed_copy(detector_model(self.model, scale), f"{prefix}_badnet")
        feats, probs = self._features_of(b)(x)
        return self.keras_alarm(feats, probs, name=f"{prefix}_feature_distance", threshold=self.threshold)

    def keras_alarm(self, feats: Any, probs: Any, *, name: str, threshold: float | None = None) -> Any:
        """The fitted statistics as a :class:`~badnet_repair.nets.layers.FeatureDistanceAlarm`
        on Keras tensors of B's features at :attr:`layer` and its (N, K) output: (N,) float64
        :meth:`scores`, or 0/1 flags where ``threshold`` is given."""
        from ..nets.layers import FeatureDistanceAlarm

        if self.means is None:
            raise RuntimeError("call fit(model, clean) before keras_alarm() (FeatureDistance)")
        assert self.has_mean is not None and self.precision is not None
        assert self.loc is not None and self.spread is not None
        alarm = FeatureDistanceAlarm(num_classes=len(self.means), dim=self.means.shape[1],
                                     threshold=threshold, name=name)
        alarm.build([tuple(feats.shape), tuple(probs.shape)])
        alarm.set_weights([self.means, self.has_mean.astype(np.float64), self.precision, self.loc, self.spread])
        return alarm([feats, probs])

    def plain_score(self, feats: Any, top: Any, *, name: str) -> Any:
        """:meth:`scores` from Keras's own layers (:mod:`~badnet_repair.nets.plain`), for a model
        Keras 2 loads: on Keras tensors of B's (N, D) features at :attr:`layer` and the (N, K) mark
        of B's class (:func:`~badnet_repair.nets.plain.top_mark`), the (N, 1) normalised squared
        Mahalanobis distance to the mean of B's class (or of the nearest class with a mean, where
        B's has none).

        In float32: ``f - m`` first, then ``P = L L^T`` applied as ``(f - m) L`` (``L`` from the
        eigenvectors of ``P``), so the rounding stays about 1e-6 of the distance; the nearest class
        (only where some class has no mean) may differ from the float64 one on a near-tie.
        """
        from keras import layers

        from ..nets.plain import constant_dense, top_mark

        if self.means is None:
            raise RuntimeError("call fit(model, clean) before plain_score() (FeatureDistance)")
        assert self.has_mean is not None and self.precision is not None
        assert self.loc is not None and self.spread is not None
        k, d = self.means.shape
        vals, vecs = np.linalg.eigh((self.precision + self.precision.T) / 2.0)
        root = vecs * np.sqrt(np.maximum(vals, 0.0))  # P = root @ root.T
        if self.has_mean.all():
            mean = constant_dense(top, self.means, None, f"{name}_mean")
        else:
            # the nearest class with a mean: the largest of 2 f P m_k - m_k P m_k (classes without one far below)
            mp = self.means @ self.precision
            closeness = constant_dense(feats, 2.0 * mp.T, -np.sum(mp * self.means, axis=1) - 1e16 * ~self.has_mean,
                                       f"{name}_closeness")
            nearest = top_mark(closeness, k, f"{name}_nearest")
            own = constant_dense(top, self.means * self.has_mean[:, None], None, f"{name}_own_mean")
            lacks = constant_dense(top, -self.has_mean[:, None].astype(np.float64) @ np.ones((1, d)), np.ones(d),
                                   f"{name}_lacks_mean")
            borrowed = layers.Multiply(name=f"{name}_borrowed_mean")(
                [constant_dense(nearest, self.means, None, f"{name}_nearest_mean"), lacks])
            mean = layers.Add(name=f"{name}_mean")([own, borrowed])
        diff = layers.Subtract(name=f"{name}_diff")([feats, mean])
        z = constant_dense(diff, root, None, f"{name}_whiten")
        raw = constant_dense(layers.Multiply(name=f"{name}_square")([z, z]), np.ones((d, 1)), None, f"{name}_raw")
        loc = constant_dense(top, self.loc[:, None], None, f"{name}_loc")
        inverse_spread = constant_dense(top, 1.0 / self.spread[:, None], None, f"{name}_inverse_spread")
        return layers.Multiply(name=f"{name}_score")([layers.Subtract(name=f"{name}_centred")([raw, loc]),
                                                      inverse_spread])

    def plain_flags(self, graph: Any, top: Any, *, prefix: str, layer_prefix: str) -> Any:
        """(N, 1) 0/1 flags from Keras's own layers (:meth:`plain_score` above the threshold), on
        ``graph``, a flat copy of :attr:`model` whose layers are named ``layer_prefix + name``
        (:func:`~badnet_repair.nets.models.inline_model`), and ``top``, the mark of its class."""
        from ..nets.plain import step_above

        if self.threshold is None:
            raise RuntimeError("call fit(model, clean) before plain_flags() (FeatureDistance)")
        feats = feature_tensor(graph, _prefixed(self.layer, layer_prefix))
        return step_above(self.plain_score(feats, top, name=f"{prefix}_distance"), self.threshold, f"{prefix}_alarm")


class FeatureEnsemble(ThresholdDetector):
    """Feature distances at several layers of B, summed: Lee et al.'s feature ensemble.

    Lee et al., "A Simple Unified Framework for Detecting Out-of-Distribution Samples and
    Adversarial Attacks" (NeurIPS 2018), Section 2.2: the class-conditional Mahalanobis score
    at several layers combined. Each layer is a
    :class:`FeatureDistance` (its class means, tied shrunk covariance and per-class or pooled
    normalisation, on the same fit/calibration split); an input's score is the sum of its
    normalised scores, thresholded on the calibration images' sums (``false_alarm`` % above).
    A trigger that reaches the target through features the penultimate layer maps near the
    target's clean ones can still leave the last conv layer's channels unlike any clean image's.

    Deviations from the paper: Lee et al. weight the layers by a logistic regression fitted on
    out-of-distribution or adversarial examples; a defender has none of the poisoned kind, so
    the layers count equally (each score is already in units of its clean spread). They average
    each conv map over space; here small maps are flattened (:func:`feature_tensor`).

    Args:
        layers: the layers (:func:`feature_tensor`), each ``"head"`` (the classifier head's
            input), ``"conv"`` (the last conv layer's map) or a layer's name, default
            ``("head", "conv")``.
        share, per_class_min, shrinkage, seed, batch_size, folds, fold_correction: each layer's
            :class:`FeatureDistance` settings, the same defaults (0.3, None, None, 0, 1024, 5, False).
        splits: as :class:`FeatureDistance`'s, on the sums: the mean of R splits' thresholds,
            each on the sums of that split's normalised scores; default 1.
        false_alarm: the share of held-out clean images flagged, in %, default 5.
    """

    name: ClassVar[str] = "feature-ensemble"
    summary: ClassVar[str] = ("feature distances at several of B's layers, summed "
                              "(Lee et al. 2018's feature ensemble)")

    layers: tuple[str, ...]

    def __init__(self, *, layers: Sequence[str] = DEFAULT_LAYERS, share: float = 0.3,
                 per_class_min: int | None = DEFAULT_PER_CLASS_MIN, shrinkage: float | None = None,
                 false_alarm: float = 5.0, seed: int = 0, batch_size: int = 1024,
                 folds: int | None = DEFAULT_FOLDS, fold_correction: bool = DEFAULT_FOLD_CORRECTION,
                 splits: int = DEFAULT_SPLITS) -> None:
        if isinstance(layers, str):
            layers = (layers,)
        layers = tuple(layers)
        if not layers or len(set(layers)) != len(layers):
            raise ValueError(f"layers must name one or more distinct layers, not {list(layers)}")
        self.false_alarm = checked_false_alarm(false_alarm)
        # The members' own thresholds are never used (the sum is thresholded); at 100 % they
        # set none that could warn about its calibration, and with one split none is averaged.
        self.members = [FeatureDistance(layer=lyr, share=share, per_class_min=per_class_min, shrinkage=shrinkage,
                                        false_alarm=100.0, seed=seed, batch_size=batch_size, folds=folds,
                                        fold_correction=fold_correction)
                        for lyr in layers]
        self._features_model: Any = None
        first = self.members[0]
        self.layers, self.share, self.per_class_min = layers, first.share, first.per_class_min
        self.shrinkage, self.seed, self.batch_size = first.shrinkage, first.seed, first.batch_size
        self.folds, self.fold_correction = first.folds, first.fold_correction
        self.splits = checked_splits(splits, self.folds)
        self.split_thresholds: np.ndarray | None = None  # (splits,) each split's threshold; the mean is used

    def fit(self, model: Any, clean: Dataset) -> FeatureEnsemble:
        """Each layer's :meth:`FeatureDistance.fit` (one split or one set of folds for all), on
        features of one pass of B; the threshold on the sums of their calibration images'
        normalised scores."""
        _check_clean(model, clean)
        self._features_model = features_model(model, self.layers)
        feats, pred = run_features(self._features_model, clean.x, self.batch_size)
        y = np.asarray(clean.y, np.int64)
        for member, f in zip(self.members, feats, strict=True):
            member.fit_features(model, f, pred, y)
        cal = [np.asarray(m.calibration_scores) for m in self.members]
        assert all(c.shape == cal[0].shape for c in cal)  # one split: the same images in the same order
        self.calibrate(np.sum(cal, axis=0))
        if self.splits > 1:
            assert self.threshold is not None
            sums = (np.sum([m.split_calibration(f, pred, y, s) for m, f in zip(self.members, feats, strict=True)],
                           axis=0) for s in split_seeds(self.seed, self.splits)[1:])
            self.split_thresholds = split_thresholds("feature ensemble", self.threshold, self.false_alarm, sums)
            self.threshold = float(self.split_thresholds.mean())
        return self

    def scores(self, x: np.ndarray) -> np.ndarray:
        """(N,) float64 sums of the layers' normalised distances: higher = more likely triggered."""
        if self.threshold is None:
            raise RuntimeError("call fit(model, clean) first (FeatureEnsemble)")
        feats, classes = run_features(self._features_model, x, self.batch_size)
        return np.sum([m.scores_of(f, classes) for m, f in zip(self.members, feats, strict=True)], axis=0)

    def keras_flags(self, x: Any, *, prefix: str, scale: float = 1.0) -> Any:
        """(N,) 0/1 flags on G's input ``x`` (file pixels times ``scale``): one copy of B giving
        every layer's features, each layer's :meth:`FeatureDistance.keras_alarm` scores, summed
        and thresholded by a :class:`~badnet_repair.nets.layers.ScoreAlarm`."""
        from ..nets.layers import ScoreAlarm
        from ..nets.models import renamed_copy

        if self.threshold is None or self.members[0].model is None:
            raise RuntimeError("call fit(model, clean) before keras_flags() (FeatureEnsemble)")
        b = renamed_copy(detector_model(self.members[0].model, scale), f"{prefix}_badnet")
        *feats, probs = features_model(b, self.layers)(x)
        parts = [m.keras_alarm(f, probs, name=f"{prefix}_{i}_feature_distance")
                 for i, (m, f) in enumerate(zip(self.members, feats, strict=True))]
        return ScoreAlarm(threshold=self.threshold, name=f"{prefix}_feature_ensemble")(parts)

    def plain_flags(self, graph: Any, top: Any, *, prefix: str, layer_prefix: str) -> Any:
        """(N, 1) 0/1 flags from Keras's own layers, for a model Keras 2 loads: each layer's
        :meth:`FeatureDistance.plain_score` on ``graph`` (a flat copy of B whose layers are named
        ``layer_prefix + name``, :func:`~badnet_repair.nets.models.inline_model`) and ``top`` (the
        mark of its class), summed and stepped above the threshold, in float32."""
        from keras import layers

        from ..nets.plain import step_above

        if self.threshold is None or self.members[0].model is None:
            raise RuntimeError("call fit(model, clean) before plain_flags() (FeatureEnsemble)")
        parts = [m.plain_score(feature_tensor(graph, _prefixed(lyr, layer_prefix)), top, name=f"{prefix}_{i}_distance")
                 for i, (m, lyr) in enumerate(zip(self.members, self.layers, strict=True))]
        total = parts[0] if len(parts) == 1 else layers.Add(name=f"{prefix}_sum")(parts)
        return step_above(total, self.threshold, f"{prefix}_alarm")


#: the most values a feature detector reads from one layer: a (D, D) precision of 4096 features is
#: 134 MB in float64; larger conv maps are average-pooled over space until they fit.
MAX_FEATURES = 4096


def _check_clean(model: Any, clean: Dataset) -> None:
    """ValueError for no clean images or labels outside the model's classes."""
    from ..nets.models import num_classes

    y, k = np.asarray(clean.y, np.int64), num_classes(model)
    if len(y) == 0:
        raise ValueError("a feature detector needs clean images to fit on")
    if y.min() < 0 or y.max() >= k:
        raise ValueError(f"clean labels must be classes 0..{k - 1} of the model, got {y.min()}..{y.max()}")


def features_model(model: Any, layers: Sequence[str]) -> Any:
    """A model from B's input to the features of each of ``layers`` (:func:`feature_tensor`)
    and B's output: one pass of B for all of them."""
    import keras

    return keras.Model(model.inputs[0], [*(feature_tensor(model, lyr) for lyr in layers), model.outputs[0]],
                       name=f"{model.name}_features")


def run_features(features: Any, x: np.ndarray, batch_size: int) -> tuple[list[np.ndarray], np.ndarray]:
    """A :func:`features_model`'s (N, D_l) float64 features, one array a layer, and B's (N,)
    int64 classes on the file-pixel inputs ``x``, ``batch_size`` at a time."""
    import keras

    x = np.asarray(x, np.float32)
    dims = [int(np.prod(t.shape[1:])) for t in features.outputs[:-1]]
    feats = [np.empty((len(x), d), np.float64) for d in dims]
    classes = np.empty(len(x), np.int64)
    for i in range(0, len(x), batch_size):
        *fs, p = features(x[i : i + batch_size], training=False)
        for out, f, d in zip(feats, fs, dims, strict=True):
            out[i : i + batch_size] = keras.ops.convert_to_numpy(f).reshape(len(f), d)
        classes[i : i + batch_size] = np.argmax(keras.ops.convert_to_numpy(p), axis=-1)
    return feats, classes


def checked_splits(splits: int, folds: int | None) -> int:
    """``splits`` as an int, or the ValueError that names the problem."""
    if isinstance(splits, bool) or int(splits) != splits or splits < 1:
        raise ValueError(f"splits must be a whole number >= 1, not {splits}")
    if splits > 1 and folds is not None:
        raise ValueError(f"splits ({splits}) and folds ({folds}) are two ways to set the threshold; choose one "
                         "(splits needs folds=None)")
    return int(splits)


def split_thresholds(who: str, first: float, false_alarm: float, calibrations: Iterable[np.ndarray]) -> np.ndarray:
    """(R,) thresholds of R splits: ``first`` (the fitted split's) and, for each further split's
    normalised calibration scores, the threshold that flags ``false_alarm`` % of them; their
    mean is the threshold a detector with ``splits = R`` uses (logged for ``who``)."""
    out = np.array([first, *(threshold_at(c, false_alarm) for c in calibrations)])
    log.info("%s: the mean of %d splits' thresholds, %.3f (%.3f..%.3f)", who, len(out), out.mean(), out.min(),
             out.max())
    return out


def split_seeds(seed: int, splits: int) -> list[int]:
    """The seeds of ``splits`` fit/calibration splits: ``seed`` first (one split is the plain
    detector's), then seeds drawn from (``seed``, r), so that no two detector seeds share one."""
    return [int(seed)] + [int(np.random.SeedSequence([int(seed), r]).generate_state(1)[0]) for r in range(1, splits)]


def covariance_share(labels: np.ndarray, k: int) -> float:
    """The expected share of the true within-class covariance that :meth:`FeatureDistance._statistics`
    estimates from images of ``labels``: residuals about their own class's mean (classes of two or
    more images, m in all, in C classes) keep (m - C) / m of it; with no such class, residuals about
    the mean of all n images keep (n - 1) / n."""
    counts = np.bincount(np.asarray(labels, np.int64), minlength=k)
    several = counts >= 2
    m, c = int(counts[several].sum()), int(several.sum())
    if m:
        return (m - c) / m
    n = int(counts.sum())
    return (n - 1) / n if n > 1 else 1.0


def fold_scale(classes: np.ndarray, fit_labels: np.ndarray, all_labels: np.ndarray, k: int) -> np.ndarray:
    """(N,) factors that bring the squared distances of N held-out images, measured with statistics
    of the images of ``fit_labels``, to what statistics of all the images (``all_labels``) give a
    new input.

    Under the Gaussian model of the feature detectors, an input of class c minus a mean of n images
    of c varies as (1 + 1/n) times the class's covariance, and the covariance estimate keeps
    :func:`covariance_share` of the true one (its precision is the inverse). So each distance is
    multiplied by ``(1 + 1/n_all[c]) / (1 + 1/n_fit[c])`` for its class ``c`` of ``classes`` (1
    where the fit images have none of c: it was scored by another class's mean), times
    ``covariance_share(fit_labels) / covariance_share(all_labels)``.
    """
    c = np.asarray(classes, np.int64)
    n_fit = np.bincount(np.asarray(fit_labels, np.int64), minlength=k)[c].astype(np.float64)
    n_all = np.bincount(np.asarray(all_labels, np.int64), minlength=k)[c].astype(np.float64)
    mean_part = np.ones(len(c))
    has = n_fit > 0
    mean_part[has] = (1.0 + 1.0 / n_all[has]) / (1.0 + 1.0 / n_fit[has])
    return mean_part * (covariance_share(fit_labels, k) / covariance_share(all_labels, k))


def fold_ids(labels: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """(N,) int64 fold of each image, 0..folds-1, dealt per class: a class's images in a random
    order go round the folds from a random first fold, so every fold holds about 1 / folds of
    each class (a class with fewer images than folds leaves some folds without it)."""
    y = np.asarray(labels)
    rng = np.random.default_rng(seed)
    ids = np.empty(len(y), np.int64)
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        ids[idx] = (np.arange(len(idx)) + int(rng.integers(folds))) % folds
    return ids


def feature_tensor(model: Any, layer: str) -> Any:
    """The Keras tensor a feature detector reads from ``model``: ``"head"``, the input of its
    classifier head (the penultimate features); ``"conv"``, the output of its last conv layer
    (:func:`~badnet_repair.nets.models.default_conv_layer`); any other string, the output of
    the layer of that name.

    A (N, H, W, C) map is flattened, keeping where on the image a channel fires (a small
    trigger lights a few positions, which an average over the map dilutes); one with more than
    :data:`MAX_FEATURES` values is first average-pooled over s x s windows, ``s`` the smallest
    that brings it within (down to one value a channel, as Lee et al. 2018 take intermediate
    features). Other maps (1-D, 3-D convolutions) are averaged over space.

    Raises:
        ModelError: no layer of that name (naming the model's layers), or an output that is not
            (N, D) features or (N, ..., channels) maps.
    """
    import keras

    from ..nets.models import classifier_head, default_conv_layer

    tag = f"{model.name}_{layer}_features"  # B's own layers may hold the names Keras would pick
    if layer == "head":
        out = classifier_head(model).input
        return out if len(out.shape) == 2 else keras.layers.Flatten(name=f"{tag}_flat")(out)
    if layer == "conv":
        try:
            name = default_conv_layer(model)
        except ModelError as err:
            raise ModelError(f"model {model.name!r} has no conv layer to take 'conv' features from ({err}); name "
                             "another layer, or use only 'head' (e.g. --set feature-ensemble.layers=head)") from err
    else:
        name = layer
    names = [lyr.name for lyr in model.layers]
    if name not in names:
        raise ModelError(f"model {model.name!r} has no layer {name!r} to take features from "
                         f"(use 'head', 'conv' or one of: {', '.join(names)})")
    out = model.get_layer(name).output
    shape = tuple(out.shape)
    if len(shape) == 2:
        return out
    if len(shape) == 4 and None not in shape[1:]:
        h, w, c = (int(v) for v in shape[1:])
        side = 1
        while side < max(h, w) and math.ceil(h / side) * math.ceil(w / side) * c > MAX_FEATURES:
            side += 1
        if side > 1:
            out = keras.layers.AveragePooling2D(pool_size=side, padding="same", name=f"{tag}_pool")(out)
        return keras.layers.Flatten(name=f"{tag}_flat")(out)
    pooling = {3: keras.layers.GlobalAveragePooling1D, 4: keras.layers.GlobalAveragePooling2D,
               5: keras.layers.GlobalAveragePooling3D}
    if len(shape) not in pooling:
        raise ModelError(f"layer {name!r} of model {model.name!r} gives features of shape {shape}: "
                         f"a feature detector reads (N, D) features or (N, ..., channels) maps")
    return pooling[len(shape)](name=f"{tag}_mean")(out)


def _prefixed(layer: str, prefix: str) -> str:
    """The :func:`feature_tensor` name of ``layer`` in a copy whose layers are named ``prefix + name``."""
    return layer if layer in ("head", "conv") else f"{prefix}{layer}"


def _normalise(raw: np.ndarray, classes: np.ndarray, loc: np.ndarray, spread: np.ndarray) -> np.ndarray:
    """(N,) raw distances in units of their class's calibration spread about its median."""
    return (raw - loc[classes]) / spread[classes]


def _raw_distances(feats: np.ndarray, classes: np.ndarray, means: np.ndarray, has_mean: np.ndarray,
                   precision: np.ndarray) -> np.ndarray:
    """(N,) squared Mahalanobis distances of (N, D) features to the mean of each row's class, or
    of the nearest class with a mean where its own has none (the nearest under ``precision``)."""
    chosen = np.asarray(classes, np.int64).copy()
    rows = np.flatnonzero(~has_mean[chosen])
    if len(rows):
        fp = feats[rows] @ precision
        mp = means @ precision
        d_all = (np.sum(fp * feats[rows], axis=1)[:, None] - 2.0 * fp @ means.T
                 + np.sum(mp * means, axis=1)[None, :])
        chosen[rows] = np.argmin(np.where(has_mean[None, :], d_all, np.inf), axis=1)
    return mahalanobis_sq(feats, means[chosen], precision)
