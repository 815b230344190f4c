"""Feature distance (detectors.features): Ledoit-Wolf and the Mahalanobis score against plain
numpy, a hand-built model whose features are its pixels, tiny clean sets, the Keras form, and
the small demo's BadNet, fitted on clean data only."""

from __future__ import annotations

import logging

import keras
import numpy as np
import pytest

import badnet_repair as br
from badnet_repair.detectors import features
from badnet_repair.detectors.base import calibration_split
from badnet_repair.detectors.features import (
    FeatureDistance,
    FeatureEnsemble,
    feature_tensor,
    ledoit_wolf,
    mahalanobis_sq,
    robust_location_scale,
)
from badnet_repair.nets.layers import FeatureDistanceAlarm

from .conftest import random_faces

D = 4  # the hand-built model's features (= pixels) and classes


def textbook_ledoit_wolf(x: np.ndarray) -> tuple[np.ndarray, float]:
    """Ledoit and Wolf (2004), Lemma 3.2 / Theorem 3.4, term by term: <A, B> = tr(A B^T) / p."""
    n, p = x.shape
    s = sum(np.outer(r, r) for r in x) / n
    norm2 = lambda a: np.trace(a @ a.T) / p  # noqa: E731
    m = np.trace(s) / p
    d2 = norm2(s - m * np.eye(p))
    bbar2 = sum(norm2(np.outer(r, r) - s) for r in x) / n**2
    b2 = min(bbar2, d2)
    return b2 / d2 * m * np.eye(p) + (1 - b2 / d2) * s, b2 / d2


@pytest.mark.parametrize(("n", "p"), [(12, 5), (6, 20), (400, 3)])
def test_ledoit_wolf_matches_the_textbook_formula(n, p):
    rng = np.random.default_rng(n + p)
    x = rng.normal(size=(n, p)) * rng.uniform(0.2, 3.0, p)
    x -= x.mean(axis=0)
    cov, shrink = ledoit_wolf(x)
    want_cov, want_shrink = textbook_ledoit_wolf(x)
    np.testing.assert_allclose(cov, want_cov, rtol=1e-10, atol=1e-12)
    assert shrink == pytest.approx(want_shrink, rel=1e-10) and 0.0 <= shrink <= 1.0
    if n < p:  # more features than rows: the plain covariance is singular, the shrunk one is not
        assert np.linalg.matrix_rank(x.T @ x) < p and np.all(np.linalg.eigvalsh(cov) > 0)


def test_ledoit_wolf_edge_cases():
    # a multiple of the identity already: nothing to shrink towards
    cov, shrink = ledoit_wolf(np.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]]))
    np.testing.assert_allclose(cov, 0.5 * np.eye(2))
    assert shrink == 0.0
    cov, shrink = ledoit_wolf(np.zeros((3, 4)))  # constant features
    assert shrink == 0.0 and not cov.any()
    with pytest.raises(ValueError, match="rows"):
        ledoit_wolf(np.zeros((0, 3)))


def test_mahalanobis_and_robust_scale_by_hand():
    p = np.array([[2.0, 0.0], [0.0, 0.5]])
    # (3, 4) - (1, 0) = (2, 4): 2*4 + 0.5*16 = 16
    np.testing.assert_allclose(mahalanobis_sq(np.array([[3.0, 4.0]]), np.array([1.0, 0.0]), p), [16.0])
    med, spread = robust_location_scale(np.array([1.0, 2.0, 3.0, 4.0, 100.0]))
    assert med == 3.0 and spread == pytest.approx(1.4826 * 1.0)


def pixel_model(k: int = D) -> keras.Model:
    """(1, 1, D) pixels -> flatten (the features: the pixels themselves) -> Dense "output"
    (softmax, weights 10 I, bias 0): B's class is the brightest pixel's index."""
    inp = keras.Input((1, 1, D), name="input")
    feats = keras.layers.Flatten(name="feat")(inp)
    out = keras.layers.Dense(k, activation="softmax", name="output")(feats)
    m = keras.Model(inp, out, name="pixels")
    w = np.zeros((D, k), np.float32)
    w[np.arange(min(D, k)), np.arange(min(D, k))] = 10.0
    m.get_layer("output").set_weights([w, np.zeros(k, np.float32)])
    return m


def pixel_data(per_class: int, seed: int, classes: range = range(D)) -> br.Dataset:
    """Clusters around 3 e_c with correlated noise; labels c."""
    rng = np.random.default_rng(seed)
    mix = rng.normal(0, 0.4, (D, D))
    y = np.repeat(np.asarray(classes), per_class)
    f = 3.0 * np.eye(D)[y] + rng.normal(size=(len(y), D)) @ mix
    return br.Dataset(f.reshape(-1, 1, 1, D).astype(np.float32), y.astype(np.int64))


def test_the_score_is_the_papers_formula_on_features_known_by_hand():
    clean = pixel_data(20, seed=0)
    det = FeatureDistance(folds=None).fit(pixel_model(), clean)  # one split (the cross-fitted default: below)
    f, y = clean.x.reshape(-1, D).astype(np.float64), clean.y
    fit, cal = calibration_split(y, 0.3, 0)
    means = np.stack([f[fit][y[fit] == c].mean(axis=0) for c in range(D)])
    resid = f[fit] - means[y[fit]]
    cov, shrink = textbook_ledoit_wolf(resid)
    prec = np.linalg.inv(cov)
    np.testing.assert_allclose(det.means, means, rtol=1e-6)
    np.testing.assert_allclose(det.precision, prec, rtol=1e-6)
    assert det.shrinkage_used == pytest.approx(shrink, rel=1e-6)

    def raw(feats: np.ndarray) -> np.ndarray:
        c = feats.argmax(axis=1)  # B's class: the brightest pixel
        return np.array([(v - means[k]) @ prec @ (v - means[k]) for v, k in zip(feats, c, strict=True)])

    # pooled (the default, None) and a count no class reaches flag the same way
    pooled = FeatureDistance(folds=None).fit(pixel_model(), clean)
    never_own = FeatureDistance(per_class_min=1000, folds=None).fit(pixel_model(), clean)
    np.testing.assert_array_equal(pooled.scores(clean.x), never_own.scores(clean.x))
    cal_raw = raw(f[cal])
    med = np.median(cal_raw)
    mad = 1.4826 * np.median(np.abs(cal_raw - med))
    probe = np.random.default_rng(1).normal(1.0, 2.0, (15, D))
    x = probe.reshape(-1, 1, 1, D).astype(np.float32)
    np.testing.assert_allclose(pooled.raw_scores(x), raw(probe), rtol=1e-6)
    np.testing.assert_allclose(pooled.scores(x), (raw(probe) - med) / mad, rtol=1e-6)
    want_threshold = np.quantile((cal_raw - med) / mad, 0.95, method="higher")
    assert pooled.threshold == pytest.approx(want_threshold, rel=1e-6)
    np.testing.assert_array_equal(pooled.flags(x), (raw(probe) - med) / mad > want_threshold)
    assert not pooled.per_class.any()

    # per class: each predicted class's own median and MAD where it has per_class_min calibration images
    det2 = FeatureDistance(per_class_min=2, folds=None).fit(pixel_model(), clean)
    pred_cal = f[cal].argmax(axis=1)
    for c in range(D):
        mine = cal_raw[pred_cal == c]
        if len(mine) >= 2:
            m = np.median(mine)
            assert det2.per_class[c]
            assert det2.loc[c] == pytest.approx(m, rel=1e-6)
            assert det2.spread[c] == pytest.approx(1.4826 * np.median(np.abs(mine - m)), rel=1e-6)


def test_fold_ids_deal_each_class_round_the_folds():
    y = np.repeat(np.arange(5), [1, 2, 7, 12, 3])
    ids = features.fold_ids(y, 4, seed=3)
    assert ids.min() >= 0 and ids.max() <= 3
    for c in range(5):
        counts = np.bincount(ids[y == c], minlength=4)
        assert counts.max() - counts.min() <= 1  # as even as the class's size allows
    np.testing.assert_array_equal(ids, features.fold_ids(y, 4, seed=3))  # seeded


def test_cross_fitted_calibration_is_the_plain_out_of_fold_computation():
    clean = pixel_data(9, seed=6)
    det = FeatureDistance(folds=3, false_alarm=10.0).fit(pixel_model(), clean)
    f, y = clean.x.reshape(-1, D).astype(np.float64), clean.y
    ids = features.fold_ids(y, 3, 0)

    def stats(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        means = np.stack([f[rows][y[rows] == c].mean(axis=0) for c in range(D)])
        cov, _ = textbook_ledoit_wolf(f[rows] - means[y[rows]])
        return means, np.linalg.inv(cov)

    raw = np.empty(len(f))
    for fold in range(3):
        means, prec = stats(ids != fold)
        for i in np.flatnonzero(ids == fold):
            m = means[f[i].argmax()]  # B's class: the brightest pixel
            raw[i] = (f[i] - m) @ prec @ (f[i] - m)
    med = np.median(raw)
    mad = 1.4826 * np.median(np.abs(raw - med))
    # every clean image calibrates, out of fold; the statistics that score new inputs use them all
    np.testing.assert_allclose(det.calibration_scores, (raw - med) / mad, rtol=1e-6)
    assert det.threshold == pytest.approx(np.quantile((raw - med) / mad, 0.90, method="higher"), rel=1e-6)
    means, prec = stats(np.ones(len(f), bool))
    np.testing.assert_allclose(det.means, means, rtol=1e-6)
    np.testing.assert_allclose(det.precision, prec, rtol=1e-6)
    # one image a class: too few to fill two folds' statistics, still a finite threshold
    tiny = FeatureDistance(folds=5).fit(pixel_model(), pixel_data(1, seed=4))
    assert np.isfinite(tiny.threshold) and tiny.calibration_scores.shape == (D,)


def test_the_fold_scale_by_hand():
    # classes 0..2 with 2, 3 and 1 images in all; a fold left out one image of class 0 and one of class 1
    all_labels = np.array([0, 0, 1, 1, 1, 2])
    fit_labels = np.array([0, 1, 1, 2])
    # covariance kept: all: classes 0 and 1 (5 images, 2 classes) -> 3/5; fit: class 1 only (2 images) -> 1/2
    assert features.covariance_share(all_labels, 3) == pytest.approx(3 / 5)
    assert features.covariance_share(fit_labels, 3) == pytest.approx(1 / 2)
    # no class of two: about the mean of all n images, (n - 1) / n; one image: 1
    assert features.covariance_share(np.array([0, 1, 2]), 3) == pytest.approx(2 / 3)
    assert features.covariance_share(np.array([1]), 3) == 1.0
    got = features.fold_scale(np.array([0, 1, 2]), fit_labels, all_labels, 3)
    cov = (1 / 2) / (3 / 5)
    # class 0: mean of 1 image in the fold, of 2 in all; class 1: 2 and 3; class 2: 1 and 1
    np.testing.assert_allclose(got, [(1 + 1 / 2) / (1 + 1) * cov, (1 + 1 / 3) / (1 + 1 / 2) * cov, cov])
    # a class the fold's images lack was scored by another class's mean: only the covariance's part
    assert features.fold_scale(np.array([2]), np.array([0, 0, 1, 1]), all_labels, 3)[0] == pytest.approx(
        features.covariance_share(np.array([0, 0, 1, 1]), 3) / (3 / 5))


@pytest.mark.parametrize("folds", [3, None])
def test_the_fold_correction_scales_each_cross_fitted_distance_and_nothing_else(folds):
    clean = pixel_data(3, seed=6) if folds else pixel_data(1, seed=6)
    plain = FeatureDistance(folds=folds, false_alarm=10.0).fit(pixel_model(), clean)
    fixed = FeatureDistance(folds=folds, false_alarm=10.0, fold_correction=True).fit(pixel_model(), clean)
    # the statistics that score new inputs are the same; the calibration distances are each scaled
    np.testing.assert_array_equal(fixed.means, plain.means)
    np.testing.assert_array_equal(fixed.precision, plain.precision)
    y, k = clean.y, D
    pred = clean.x.reshape(-1, D).argmax(axis=1)
    if folds:
        ids = features.fold_ids(y, folds, 0)
    else:  # one image a class: the fit images cross-fitted over min(5, n) folds
        ids = np.random.default_rng(0).permutation(len(y)) % min(5, len(y))
    raw_plain = plain.calibration_scores * plain.spread[0] + plain.loc[0]
    raw_fixed = fixed.calibration_scores * fixed.spread[0] + fixed.loc[0]
    want = np.empty(len(y))
    for fold in np.unique(ids):
        out = ids == fold
        want[out] = features.fold_scale(pred[out], y[~out], y, k)
    np.testing.assert_allclose(raw_fixed, raw_plain * want, rtol=1e-9)
    assert (want < 1).any()  # the correction did something here


def test_split_seeds_start_at_the_seed_and_differ_between_seeds():
    assert features.split_seeds(4, 1) == [4]
    three = features.split_seeds(4, 3)
    assert three[0] == 4 and len(set(three)) == 3 and features.split_seeds(4, 3) == three  # seeded
    assert not set(three[1:]) & set(features.split_seeds(5, 3))  # seed 4's extra splits are not seed 5's


def test_the_threshold_of_several_splits_is_the_mean_of_their_plain_thresholds():
    clean = pixel_data(15, seed=3)
    det = FeatureDistance(splits=4, folds=None, false_alarm=10.0).fit(pixel_model(), clean)
    f, y = clean.x.reshape(-1, D).astype(np.float64), clean.y

    def plain_threshold(seed: int) -> float:
        """One split by hand: statistics on its fit part, the pooled median / MAD and the 90 %
        quantile of its calibration part's distances."""
        fit, cal = calibration_split(y, 0.3, seed)
        means = np.stack([f[fit][y[fit] == c].mean(axis=0) for c in range(D)])
        cov, _ = textbook_ledoit_wolf(f[fit] - means[y[fit]])
        prec = np.linalg.inv(cov)
        raw = np.array([(v - means[v.argmax()]) @ prec @ (v - means[v.argmax()]) for v in f[cal]])
        med = np.median(raw)
        return float(np.quantile((raw - med) / (1.4826 * np.median(np.abs(raw - med))), 0.90, method="higher"))

    want = [plain_threshold(s) for s in features.split_seeds(0, 4)]
    np.testing.assert_allclose(det.split_thresholds, want, rtol=1e-6)
    assert det.threshold == pytest.approx(np.mean(want), rel=1e-6)
    assert np.ptp(want) > 0  # the splits differ, so the mean is not any one of them
    # new inputs are scored as by the first split's detector alone; only the threshold moves
    one = FeatureDistance(folds=None, false_alarm=10.0).fit(pixel_model(), clean)
    probe = np.random.default_rng(1).normal(1.0, 2.0, (40, 1, 1, D)).astype(np.float32)
    np.testing.assert_allclose(det.scores(probe), one.scores(probe), rtol=1e-12)
    np.testing.assert_array_equal(det.flags(probe), one.scores(probe) > np.mean(want))
    assert one.split_thresholds is None and one.threshold == pytest.approx(want[0], rel=1e-6)
    # one image a class (no calibration part): every split cross-fits, still finite
    tiny = FeatureDistance(splits=3, folds=None).fit(pixel_model(), pixel_data(1, seed=4))
    assert np.all(np.isfinite(tiny.split_thresholds)) and len(tiny.split_thresholds) == 3


def test_fixed_shrinkage_and_the_class_without_a_mean():
    clean = pixel_data(10, seed=2, classes=range(3))  # no clean image of class 3
    det = FeatureDistance(shrinkage=0.25, folds=None).fit(pixel_model(), clean)
    f, y = clean.x.reshape(-1, D).astype(np.float64), clean.y
    fit, _ = calibration_split(y, 0.3, 0)
    means = np.stack([f[fit][y[fit] == c].mean(axis=0) for c in range(3)])
    resid = f[fit] - means[y[fit]]
    s = resid.T @ resid / len(resid)
    prec = np.linalg.inv(0.25 * np.trace(s) / D * np.eye(D) + 0.75 * s)
    np.testing.assert_allclose(det.precision, prec, rtol=1e-6)
    assert list(det.has_mean) == [True, True, True, False]
    # B says class 3 (pixel 3 brightest): scored by the nearest class mean under P
    v = np.array([2.5, 0.2, 0.1, 3.0])
    want = min((v - m) @ prec @ (v - m) for m in means)
    assert det.raw_scores(v.reshape(1, 1, 1, D).astype(np.float32))[0] == pytest.approx(want, rel=1e-6)
    # the Keras form does the same
    inp = keras.Input((1, 1, D))
    g = keras.Model(inp, det.keras_flags(inp, prefix="d"))
    probe = np.concatenate([v[None], np.random.default_rng(3).normal(1.0, 2.0, (30, D))]).reshape(-1, 1, 1, D)
    probe = probe.astype(np.float32)
    np.testing.assert_array_equal(np.asarray(g(probe)) > 0.5, det.flags(probe))


def fitted_on_small_deepid(small_deepid: keras.Model, per_class: int = 12, **settings: float) -> FeatureDistance:
    x = random_faces(7 * per_class, seed=5)
    y = br.predict_classes(small_deepid, x)
    return FeatureDistance(**settings).fit(small_deepid, br.Dataset(x, y))


def mixed_probe() -> np.ndarray:
    """Face-like images and pure noise: inputs on both sides of a threshold."""
    noise = np.random.default_rng(7).uniform(0, 255, (8, 55, 47, 3)).astype(np.float32)
    return np.concatenate([random_faces(40, seed=8), noise])


def keras_form_after_save_and_load(det: FeatureDistance | FeatureEnsemble, probe: np.ndarray, path, prefix: str):
    """G's alarm alone, built from ``det``'s Keras form, checked to flag ``probe`` as ``det``
    does before and after a save and load; returns the loaded model."""
    want = det.flags(probe)
    assert 0 < want.sum() < len(want)  # both answers occur, so agreement means something
    x = keras.Input((55, 47, 3))
    g = keras.Model(x, det.keras_flags(x, prefix=prefix))
    np.testing.assert_array_equal(np.asarray(g(probe)) > 0.5, want)
    g.save(path)
    again = keras.models.load_model(path)
    np.testing.assert_array_equal(np.asarray(again(probe)) > 0.5, want)
    return again


def test_keras_form_equals_flags_and_survives_save_and_load(small_deepid, tmp_path):
    det = fitted_on_small_deepid(small_deepid, false_alarm=30.0)
    probe = mixed_probe()
    again = keras_form_after_save_and_load(det, probe, tmp_path / "g.keras", "d")
    assert {lyr.name for lyr in again.layers} >= {"d_feature_distance"}
    # the layer's scores (threshold None) are the detector's scores
    feats, classes = det.features(probe)
    layer = FeatureDistanceAlarm(num_classes=7, dim=160)
    probs = np.eye(7, dtype=np.float32)[classes]
    layer.build([feats.shape, probs.shape])
    layer.set_weights(again.get_layer("d_feature_distance").get_weights())
    np.testing.assert_allclose(np.asarray(layer([feats.astype(np.float32), probs])), det.scores(probe),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("detector", ["distance at conv_3", "ensemble, a class without a mean"])
def test_the_plain_layer_form_is_the_detectors_scores_in_float32(small_deepid, detector):
    """``plain_score`` / ``plain_flags`` (Keras's own layers, float32, on a flat copy of B) against
    the float64 numpy scores: equal to float32 rounding, and the same flags away from the threshold."""
    from badnet_repair.nets.models import inline_model
    from badnet_repair.nets.plain import top_mark

    x = random_faces(60, seed=5)
    labels = np.arange(60) % (7 if detector.startswith("distance") else 6)  # class 6: no clean image
    clean = br.Dataset(x, labels, "valid")
    det = (FeatureDistance(layer="conv_3", false_alarm=30.0) if detector.startswith("distance")
           else FeatureEnsemble(false_alarm=30.0)).fit(small_deepid, clean)
    members = [det] if isinstance(det, FeatureDistance) else det.members
    def plain(build):  # a model of one flat copy of B (layers "b_*") and its class's mark
        inp = keras.Input((55, 47, 3))
        graph = inline_model(small_deepid, inp, "b_")
        return keras.Model(inp, build(graph, top_mark(graph.outputs[0], 7, "top")))

    model = plain(lambda graph, top: [
        m.plain_score(features.feature_tensor(graph, m.layer if m.layer in ("head", "conv") else f"b_{m.layer}"),
                      top, name=f"m{i}") for i, m in enumerate(members)])
    flagger = plain(lambda graph, top: det.plain_flags(graph, top, prefix="p", layer_prefix="b_"))
    probe = mixed_probe()
    scores, got_flags = model.predict(probe, verbose=0), flagger.predict(probe, verbose=0)
    want = det.scores(probe)
    np.testing.assert_allclose(np.reshape(scores, (len(members), len(probe))).sum(axis=0), want, rtol=1e-4, atol=1e-4)
    away = np.abs(want - det.threshold) > 1e-3
    assert away.sum() > len(probe) // 2 and 0 < det.flags(probe).mean() < 1
    np.testing.assert_array_equal(got_flags[away, 0] > 0.5, det.flags(probe)[away])


def test_keras_form_of_a_model_with_an_input_scale(small_deepid):
    scaled = br.with_input_scale(small_deepid, 1 / 255)
    x = random_faces(70, seed=5)
    det = FeatureDistance(false_alarm=30.0).fit(scaled, br.Dataset(x, br.predict_classes(scaled, x)))
    probe = random_faces(30, seed=9)
    inp = keras.Input((55, 47, 3))
    g = keras.Model(inp, det.keras_flags(inp, prefix="d", scale=1 / 255))
    np.testing.assert_array_equal(np.asarray(g(probe / 255.0)) > 0.5, det.flags(probe))
    with pytest.raises(br.ModelError, match="input scale"):
        det.keras_flags(inp, prefix="e", scale=1.0)


def test_the_ensemble_on_a_model_that_takes_inputs_in_0_to_1(small_deepid):
    scaled = br.with_input_scale(small_deepid, 1 / 255)
    x = random_faces(70, seed=5)
    clean = br.Dataset(x, br.predict_classes(scaled, x))
    ens = FeatureEnsemble(false_alarm=30.0).fit(scaled, clean)
    plain = FeatureEnsemble(false_alarm=30.0).fit(small_deepid, clean)
    probe = random_faces(30, seed=9)
    # the scale is inside the model: the same features as the unscaled model on 0..255 pixels
    np.testing.assert_allclose(ens.scores(probe), plain.scores(probe), rtol=1e-4, atol=1e-4)  # float32 pixels
    inp = keras.Input((55, 47, 3))
    g = keras.Model(inp, ens.keras_flags(inp, prefix="s", scale=1 / 255))
    np.testing.assert_array_equal(np.asarray(g(probe / 255.0)) > 0.5, ens.flags(probe))


@pytest.mark.parametrize("per_class", [1, 2])
def test_tiny_clean_sets_do_not_crash(small_deepid, per_class):
    det = fitted_on_small_deepid(small_deepid, per_class=per_class)
    probe = random_faces(10, seed=11)
    s = det.scores(probe)
    assert s.shape == (10,) and np.all(np.isfinite(s)) and np.isfinite(det.threshold)
    assert np.all(np.isfinite(det.precision)) and len(det.calibration_scores) >= 1
    x = keras.Input((55, 47, 3))
    g = keras.Model(x, det.keras_flags(x, prefix="t"))
    np.testing.assert_array_equal(np.asarray(g(probe)) > 0.5, det.flags(probe))


def test_one_image_per_class_calibrates_on_cross_fitted_distances():
    # one image a class: each is scored without its own class's mean, so not all 0
    clean = pixel_data(1, seed=4)
    det = FeatureDistance().fit(pixel_model(), clean)
    assert det.has_mean.all() and det.calibration_scores.shape == (D,)
    assert np.ptp(det.calibration_scores) > 0
    one = br.Dataset(clean.x[:1], clean.y[:1])
    assert np.isfinite(FeatureDistance().fit(pixel_model(), one).scores(clean.x)).all()


def test_threshold_keeps_the_calibration_false_alarm(small_deepid):
    for rate in (5.0, 20.0):
        det = fitted_on_small_deepid(small_deepid, false_alarm=rate)
        assert 100.0 * np.mean(det.calibration_scores > det.threshold) <= rate


def test_settings_and_their_validation():
    assert FeatureDistance.name == "feature-distance" and FeatureDistance.summary
    assert list(FeatureDistance.settings()) == ["layer", "share", "per_class_min", "shrinkage", "false_alarm",
                                                "seed", "batch_size", "folds", "fold_correction", "splits"]
    assert FeatureDistance().get_params() == {"layer": "head", "share": 0.3, "per_class_min": None, "shrinkage": None,
                                              "false_alarm": 5.0, "seed": 0, "batch_size": 1024, "folds": 5,
                                              "fold_correction": False, "splits": 1}
    for bad, match in [({"share": 0.0}, "share"), ({"share": 1.0}, "share"), ({"per_class_min": 1}, "per_class_min"),
                       ({"per_class_min": 2.5}, "per_class_min"), ({"shrinkage": 1.5}, "shrinkage"),
                       ({"shrinkage": -0.1}, "shrinkage"), ({"false_alarm": 101.0}, "percentage"),
                       ({"batch_size": 0}, "batch_size"), ({"layer": ""}, "layer"), ({"folds": 1}, "folds"),
                       ({"folds": 2.5}, "folds"), ({"splits": 0}, "splits"), ({"splits": 1.5, "folds": None}, "splits"),
                       ({"splits": 3}, "splits needs folds=None"), ({"splits": 3, "folds": 5}, "choose one"),
                       ({"fold_correction": "yes"}, "fold_correction")]:
        with pytest.raises(ValueError, match=match):
            FeatureDistance(**bad)  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="fit"):
        FeatureDistance().scores(np.zeros((1, 1, 1, D), np.float32))
    with pytest.raises(ValueError, match="labels"):
        FeatureDistance().fit(pixel_model(), br.Dataset(np.zeros((2, 1, 1, D), np.float32), np.array([0, 9])))


def test_feature_layers_head_conv_and_by_name(small_deepid, monkeypatch):
    x = random_faces(6, seed=3)
    conv = small_deepid.get_layer(br.default_conv_layer(small_deepid))
    maps = keras.ops.convert_to_numpy(keras.Model(small_deepid.inputs[0], conv.output)(x))
    n, (h, w, c) = len(x), maps.shape[1:]
    assert (h % 2, w % 2) == (0, 0)  # 2 x 2 windows tile the map (the expected values below assume it)

    def conv_features() -> np.ndarray:
        return keras.ops.convert_to_numpy(keras.Model(small_deepid.inputs[0], feature_tensor(small_deepid, "conv"))(x))

    monkeypatch.setattr(features, "MAX_FEATURES", maps[0].size)  # fits: flattened
    np.testing.assert_allclose(conv_features(), maps.reshape(n, -1), rtol=1e-6)
    assert tuple(feature_tensor(small_deepid, conv.name).shape) == (None, maps[0].size)
    # too large by a little: averaged over the smallest s x s windows that fit (s = 2)
    monkeypatch.setattr(features, "MAX_FEATURES", maps[0].size // 4)
    want = [maps[:, i:i + 2, j:j + 2].mean(axis=(1, 2)) for i in range(0, h, 2) for j in range(0, w, 2)]
    np.testing.assert_allclose(conv_features(), np.stack(want, axis=1).reshape(n, -1), rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(features, "MAX_FEATURES", c - 1)  # even one value a channel is too many: the average
    np.testing.assert_allclose(conv_features(), maps.mean(axis=(1, 2)), rtol=1e-5, atol=1e-5)
    assert tuple(feature_tensor(small_deepid, "head").shape) == (None, 160)
    with pytest.raises(br.ModelError, match="no layer 'sunglasses'.*'conv'"):
        feature_tensor(small_deepid, "sunglasses")
    with pytest.raises(br.ModelError, match="no conv layer to take 'conv' features.*'head'"):
        FeatureEnsemble().fit(pixel_model(), pixel_data(5, seed=1))  # a model without convolutions
    assert np.isfinite(FeatureEnsemble(layers=["head"]).fit(pixel_model(), pixel_data(5, seed=1)).threshold)


@pytest.mark.parametrize("folds", [None, 3])
def test_the_ensemble_is_the_sum_of_its_layers_distances(small_deepid, tmp_path, folds):
    x = random_faces(7 * 12, seed=5)
    clean = br.Dataset(x, br.predict_classes(small_deepid, x))
    ens = FeatureEnsemble(layers=("head", "conv"), false_alarm=30.0, folds=folds).fit(small_deepid, clean)
    assert ens.split_thresholds is None
    # the plain computation: each layer's detector on its own, the same split, scores added
    head = FeatureDistance(layer="head", folds=folds).fit(small_deepid, clean)
    conv = FeatureDistance(layer="conv", folds=folds).fit(small_deepid, clean)
    assert conv.means is not None and conv.means.shape[1] == feature_tensor(small_deepid, "conv").shape[-1]
    probe = mixed_probe()
    np.testing.assert_allclose(ens.scores(probe), head.scores(probe) + conv.scores(probe), rtol=1e-9)
    cal = head.calibration_scores + conv.calibration_scores
    assert ens.threshold == pytest.approx(np.quantile(cal, 0.70, method="higher"), rel=1e-9)
    assert 100.0 * np.mean(ens.calibration_scores > ens.threshold) <= 30.0
    keras_form_after_save_and_load(ens, probe, tmp_path / "g.keras", "e")
    # one layer: the feature distance itself
    one = FeatureEnsemble(layers=["head"], folds=folds).fit(small_deepid, clean)
    np.testing.assert_allclose(one.scores(probe), head.scores(probe), rtol=1e-12)


def test_the_ensembles_threshold_of_several_splits_is_the_mean_of_each_splits_ensemble(small_deepid, tmp_path):
    x = random_faces(7 * 12, seed=5)
    clean = br.Dataset(x, br.predict_classes(small_deepid, x))
    ens = FeatureEnsemble(false_alarm=20.0, splits=3, folds=None).fit(small_deepid, clean)
    # the plain computation: one ensemble per split seed, each its own threshold, averaged
    each = [FeatureEnsemble(false_alarm=20.0, seed=s, folds=None).fit(small_deepid, clean)
            for s in features.split_seeds(0, 3)]
    np.testing.assert_allclose(ens.split_thresholds, [e.threshold for e in each], rtol=1e-9)
    assert ens.threshold == pytest.approx(np.mean([e.threshold for e in each]), rel=1e-9)
    probe = mixed_probe()
    np.testing.assert_allclose(ens.scores(probe), each[0].scores(probe), rtol=1e-9)  # the first split scores
    keras_form_after_save_and_load(ens, probe, tmp_path / "g.keras", "m")  # the mean is G's threshold
    assert ens.get_params()["splits"] == 3 and all(m.splits == 1 for m in ens.members)


def test_the_ensembles_settings_and_registry_entry():
    assert br.make_detector("feature-ensemble").get_params() == {
        "layers": ["head", "conv"], "share": 0.3, "per_class_min": None, "shrinkage": None, "false_alarm": 5.0,
        "seed": 0, "batch_size": 1024, "folds": 5, "fold_correction": False, "splits": 1}
    det = br.make_detector("feature-ensemble", layers="head", per_class_min=3, folds=4, fold_correction=True)
    assert det.get_params()["fold_correction"] is True and det.members[0].fold_correction  # type: ignore[attr-defined]
    assert det.get_params()["layers"] == ["head"] and det.members[0].per_class_min == 3  # type: ignore[attr-defined]
    assert det.get_params()["folds"] == 4 and det.members[0].folds == 4  # type: ignore[attr-defined]
    for bad, match in [({"layers": []}, "layers"), ({"layers": ["head", "head"]}, "distinct"),
                       ({"share": 1.0}, "share"), ({"false_alarm": -1.0}, "percentage"),
                       ({"splits": 0, "folds": None}, "splits"), ({"splits": 2, "folds": 3}, "choose one")]:
        with pytest.raises(ValueError, match=match):
            FeatureEnsemble(**bad)  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="fit"):
        FeatureEnsemble().scores(np.zeros((1, 55, 47, 3), np.float32))


def auroc(negative: np.ndarray, positive: np.ndarray) -> float:
    """P(a positive scores above a negative), ties counting half (Mann-Whitney)."""
    diff = positive[:, None] - negative[None, :]
    return float(np.mean(diff > 0) + 0.5 * np.mean(diff == 0))


@pytest.mark.slow
def test_triggered_inputs_score_above_clean_ones_on_the_small_demo(small_demo):
    b = br.load_model(small_demo.model)
    det = FeatureDistance().fit(b, br.load_h5(small_demo.valid))
    # only now is the poisoned set read
    clean, bd = br.load_h5(small_demo.test), br.load_h5(small_demo.bd_test)
    s_clean, s_bd = det.scores(clean.x), det.scores(bd.x)
    logging.getLogger(__name__).info("feature distance on the small demo: AUROC %.3f, flagged %.0f%% of "
                                     "triggered and %.0f%% of clean test inputs", auroc(s_clean, s_bd),
                                     100 * np.mean(s_bd > det.threshold), 100 * np.mean(s_clean > det.threshold))
    # seen: AUROC 1.00 (0.99-1.00 over split seeds 0-2), every triggered input flagged, 1 of
    # 30 clean test inputs. 0.75 leaves room for the demo's training to land elsewhere while
    # still saying far more often than not (chance is 0.5).
    assert auroc(s_clean, s_bd) > 0.75
    assert np.mean(s_bd > det.threshold) > np.mean(s_clean > det.threshold)
