"""Neural Cleanse (detectors.neural_cleanse): the anomaly index by hand, a reversed trigger's
stamp, and hand-built BadNets whose planted target(s) the scan must flag (and a clean model
where it must flag nothing), with and without the screen; the reversed-trigger detector and
its GoodNet."""

from __future__ import annotations

import keras
import numpy as np
import pytest

import badnet_repair as br
from badnet_repair.detectors import REGISTRY, AnyOf, ReversedTriggerDetector
from badnet_repair.detectors.neural_cleanse import CleanseScan, NeuralCleanse, ReversedTrigger, anomaly_index

K, SIDE = 8, 16
#: trigger corner -> target: a white 2x2 square bottom-right sends to 3, top-left to 5
TRIGGERS = {"bottom-right": 3, "top-left": 5}


#: each class's face: a 4x4 grid of RGB blocks (one per 4x4 pixel square)
PROTOTYPES = np.random.default_rng(0).uniform(0, 160, (K, 4, 4, 3)).astype(np.float32)


def hand_built(triggers: dict[str, int]) -> keras.Model:
    """Nearest-prototype predictions over K classes on the 4x4-pooled image (logits
    ``-beta/2 |pooled - prototype_c|^2`` up to a constant, so turning one class into another
    takes repainting much of the image), plus, for each trigger corner, a jump to its target
    where that corner's 2x2 square is bright: ``20 softplus(10 (mean / 255 - 0.75))``, about
    +52 for a white square and +0.6 for a clean image's corner (at most 160 + noise), smooth
    so that gradients lead to it. With no triggers: a clean model."""
    inp = keras.Input((SIDE, SIDE, 3))
    content = keras.layers.Dense(K, name="content")(keras.layers.Flatten()(keras.layers.AveragePooling2D(4)(inp)))
    logits = [content]
    crops = {"bottom-right": ((SIDE - 2, 0), (SIDE - 2, 0)), "top-left": ((0, SIDE - 2), (0, SIDE - 2))}
    for corner, target in triggers.items():
        square = keras.layers.GlobalAveragePooling2D()(keras.layers.Cropping2D(crops[corner])(inp))
        lit = keras.layers.Dense(1, activation="softplus", name=f"lit_{target}")(square)
        logits.append(keras.layers.Dense(K, use_bias=False, name=f"jump_{target}")(lit))
    total = keras.layers.Add()(logits) if len(logits) > 1 else content
    model = keras.Model(inp, keras.layers.Softmax()(total))
    beta = 2e-4
    protos = PROTOTYPES.reshape(K, -1)
    model.get_layer("content").set_weights([beta * protos.T, -beta / 2 * (protos**2).sum(axis=1)])
    for target in triggers.values():
        model.get_layer(f"lit_{target}").set_weights([np.full((3, 1), 10 / (3 * 255), np.float32),
                                                      np.array([-7.5], np.float32)])
        jump = np.zeros((1, K), np.float32)
        jump[0, target] = 20.0
        model.get_layer(f"jump_{target}").set_weights([jump])
    return model


def faces(n: int, seed: int) -> br.Dataset:
    """n images of random classes: the class's prototype blocks plus pixel noise."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, K, n)
    x = np.kron(PROTOTYPES[y], np.ones((1, 4, 4, 1), np.float32)) + rng.normal(0, 20, (n, SIDE, SIDE, 3))
    return br.Dataset(np.clip(x, 0, 255).astype(np.float32), y, name=f"clean{seed}")


def stamp(x: np.ndarray, corner: str) -> np.ndarray:
    x = x.copy()
    if corner == "bottom-right":
        x[:, SIDE - 2:, SIDE - 2:, :] = 255.0
    else:
        x[:, :2, :2, :] = 255.0
    return x


FAST = dict(steps=200, reference=8, candidates=8, batch_images=16, images=200)


def test_anomaly_index_by_hand():
    norms = np.array([10.0, 100.0, 110.0, 90.0, 105.0, 95.0])
    # median 97.5; absolute deviations 87.5, 2.5, 12.5, 7.5, 7.5, 2.5 -> MAD 7.5
    idx = anomaly_index(norms)
    assert idx[0] == pytest.approx(87.5 / (1.4826 * 7.5))
    assert idx[2] == pytest.approx(-12.5 / (1.4826 * 7.5))  # above the median: negative
    # against a reference set: its median (100) and MAD (5)
    assert anomaly_index(np.array([90.0]), np.array([95.0, 100.0, 105.0]))[0] == pytest.approx(10 / (1.4826 * 5))


def test_a_reversed_trigger_stamps_by_its_mask():
    mask = np.zeros((2, 2), np.float32)
    mask[0, 0], mask[1, 1] = 1.0, 0.25
    t = ReversedTrigger(target=1, mask=mask, pattern=np.full((2, 2, 1), 200.0, np.float32), norm=1.25,
                        attack_success=100.0)
    out = t.apply(np.full((1, 2, 2, 1), 100.0, np.float32))
    np.testing.assert_allclose(out[0, ..., 0], [[200.0, 100.0], [100.0, 125.0]])


@pytest.fixture(scope="module")
def scans() -> dict[str, CleanseScan]:
    clean = faces(400, seed=1)
    return {
        "one": NeuralCleanse(**FAST).scan(hand_built({"bottom-right": 3}), clean),
        "two": NeuralCleanse(**FAST).scan(hand_built(TRIGGERS), clean),
        "clean": NeuralCleanse(**FAST).scan(hand_built({}), clean),
        # 8 classes > 2 candidates + 4 references: the screen chooses what is optimised fully
        "screened": NeuralCleanse(**{**FAST, "candidates": 2, "reference": 4}).scan(
            hand_built({"bottom-right": 3}), clean),
    }


def test_the_scan_flags_the_planted_target_and_reverses_its_trigger(scans):
    scan = scans["one"]
    assert scan.flagged == (3,)
    assert not scan.screened and scan.candidates == tuple(range(K))
    t = scan.triggers[3]
    # the real trigger is 4 pixels; the reversed one covers the corner square and little else
    assert t.norm < 6 and t.mask[SIDE - 2:, SIDE - 2:].sum() > 0.8 * t.mask.sum()
    assert t.attack_success > 95
    assert scan.anomaly[3] > 2 and np.all(np.delete(scan.anomaly, 3) < 2)
    other = faces(50, seed=5)
    assert (br.predict_classes(hand_built({"bottom-right": 3}), t.apply(other.x)) == 3).mean() > 0.95
    summary = scan.summary()
    assert summary["flagged"] == [3] and len(summary["norms"]) == K
    assert summary["optimised"][0]["class"] == 3  # smallest norm first


def test_the_scan_flags_every_target_of_a_multi_target_badnet(scans):
    assert sorted(scans["two"].flagged) == sorted(TRIGGERS.values())


def test_the_scan_flags_nothing_on_a_clean_model(scans):
    assert scans["clean"].flagged == ()
    assert np.all(scans["clean"].anomaly < 2)


def test_the_screen_passes_the_target_on(scans):
    scan = scans["screened"]
    assert scan.screened and len(scan.candidates) == 2 and len(scan.reference) == 4
    assert not set(scan.candidates) & set(scan.reference)
    assert scan.screen_rank(3) <= 2 and scan.flagged == (3,)
    # only the fully optimised classes have an anomaly index and a trigger
    assert set(scan.triggers) == set(scan.candidates) | set(scan.reference)
    assert np.isnan(scan.anomaly).sum() == K - 6


def test_the_scan_reads_only_the_clean_data_it_is_given(monkeypatch):
    """A spy on every Dataset the scan touches: only the clean one passed to scan()."""
    from badnet_repair.formats import data as data_mod

    seen: list[str] = []
    real = data_mod.Dataset.__getattribute__

    def spy(self, name):  # type: ignore[no-untyped-def]
        if name in ("x", "y"):
            seen.append(real(self, "name"))
        return real(self, name)

    model = hand_built({"bottom-right": 3})
    clean = faces(100, seed=1)
    poisoned = br.Dataset(stamp(faces(20, seed=9).x, "bottom-right"), np.full(20, 3), name="poisoned")
    test = faces(20, seed=10)
    monkeypatch.setattr(data_mod.Dataset, "__getattribute__", spy)
    NeuralCleanse(**{**FAST, "steps": 20}).scan(model, clean)
    monkeypatch.undo()
    assert seen and set(seen) == {"clean1"}
    assert poisoned.name not in seen and test.name not in seen


def test_reversed_trigger_detector_and_its_goodnet(scans, tmp_path):
    from badnet_repair.detectors.goodnet import build_detector_goodnet

    b = hand_built({"bottom-right": 3})
    # a "repaired" model that ignores the trigger: the same network without the jump
    repaired = hand_built({})
    det = ReversedTriggerDetector(repaired, scans["one"]).fit(b, faces(10, seed=3))
    assert REGISTRY["reversed-trigger"] is ReversedTriggerDetector and det.targets == (3,)
    data = faces(80, seed=4)
    x = data.x[data.y != 3][:60]  # the poisoned half made of other classes' images, as the lab's
    x[:30] = stamp(x[:30], "bottom-right")
    flags = det.flags(x)
    assert flags[:30].all()  # B says 3, the repaired model does not
    b_cls, r_cls = br.predict_classes(b, x[30:]), br.predict_classes(repaired, x[30:])
    np.testing.assert_array_equal(flags[30:], (b_cls == 3) & (r_cls != 3))
    both = AnyOf(det, br.Strip(copies=8).fit(b, faces(200, seed=1)))
    want = br.goodnet_classes(b, both, x)
    g = build_detector_goodnet(b, both)
    np.testing.assert_array_equal(br.predict_classes(g, x), want)
    g.save(tmp_path / "g.keras")
    np.testing.assert_array_equal(br.predict_classes(keras.models.load_model(tmp_path / "g.keras"), x), want)
    assert (want[:30] == K).all()


def test_the_detector_unlearns_without_the_budget_and_takes_no_model_a_repair_gave_back(scans, monkeypatch):
    """A removal defense that fell outside its clean-accuracy budget returns B; B as the
    detector's unlearned model would flag nothing. The detector keeps such a repair's scan and
    unlearns again, without the budget."""
    from types import SimpleNamespace

    b, unlearned = hand_built({"bottom-right": 3}), hand_built({})
    gave_b_back = SimpleNamespace(defense="nc-unlearning", model=b, artifacts={"scan": scans["one"]},
                                  warnings=("WARNING: nc-unlearning fell 5.0 points below the BadNet ...",))
    seen: dict[str, object] = {}

    def fake_repair(self, model, clean, *, progress=False, scan=None):  # type: ignore[no-untyped-def]
        seen.update(budget=self.budget, scan=scan, seed=self.seed)
        return SimpleNamespace(model=unlearned, artifacts={"scan": scan})

    monkeypatch.setattr(br.NeuralCleanseUnlearning, "repair", fake_repair)
    det = ReversedTriggerDetector(seed=4)
    det.reuse([gave_b_back])
    assert det.scan is scans["one"] and det.repaired is None
    det.fit(b, faces(10, seed=3))
    assert seen == {"budget": None, "scan": scans["one"], "seed": 4} and det.repaired is unlearned
    x = stamp(faces(20, seed=4).x, "bottom-right")
    assert det.flags(x)[br.predict_classes(unlearned, x) != 3].all()
    # a repair within its budget serves as it is: no unlearning again
    seen.clear()
    within = SimpleNamespace(defense="nc-unlearning", model=unlearned, artifacts={"scan": scans["one"]}, warnings=())
    det = ReversedTriggerDetector()
    det.reuse([within])
    det.fit(b, faces(10, seed=3))
    assert not seen and det.repaired is unlearned
    # a scan that flags nothing leaves nothing to unlearn: B stands in, and nothing is flagged
    assert not scans["clean"].flagged
    det = ReversedTriggerDetector(seed=0)
    det.reuse([SimpleNamespace(defense="nc-unlearning", model=b, artifacts={"scan": scans["clean"]},
                               warnings=("gave B back",))])
    det.fit(b, faces(10, seed=3))
    assert not seen and det.repaired is b and not det.flags(x).any()


def test_settings_are_checked():
    with pytest.raises(ValueError, match="reference"):
        NeuralCleanse(reference=2)
    with pytest.raises(ValueError, match="steps"):
        NeuralCleanse(steps=0)


def test_the_scan_is_written_as_json_markdown_figures_and_arrays(scans, tmp_path):
    paths = br.write_cleanse(scans["two"], tmp_path, faces(1, seed=3).x[0], title="hand-built")
    import json

    summary = json.loads(paths["json"].read_text())
    assert sorted(summary["flagged"]) == [3, 5] and len(summary["norms"]) == K
    md = paths["md"].read_text()
    assert "Flagged as backdoor target(s)" in md and "| 3 |" in md and "| 5 |" in md
    for key in ("png", "triggers_png"):
        assert paths[key].read_bytes()[:4] == b"\x89PNG"
    arrays = np.load(paths["npz"])
    assert arrays["masks"].shape == (K, SIDE, SIDE) and arrays["patterns"].shape == (K, SIDE, SIDE, 3)
    np.testing.assert_allclose(arrays["norms"], [scans["two"].triggers[c].norm for c in range(K)])
    with pytest.raises(br.OutputExistsError):
        br.write_cleanse(scans["two"], tmp_path, faces(1, seed=3).x[0])
    fig = br.plot_reversed_triggers(scans["clean"], faces(1, seed=3).x[0])
    assert len(fig.axes) == 3  # nothing flagged: the smallest trigger's row


def test_unlearning_the_reversed_trigger_removes_the_backdoor(scans):
    """The hand-built BadNet's jump weight is trainable: fine-tuning with the reversed trigger
    stamped on clean images at their true labels unlearns it."""
    b = hand_built({"bottom-right": 3})
    clean = faces(400, seed=1)
    data = faces(200, seed=6)
    poisoned = stamp(data.x[data.y != 3], "bottom-right")
    assert br.attack_success_rate(br.predict_classes(b, poisoned), 3) == 100.0
    repair = br.NeuralCleanseUnlearning(epochs=8, learning_rate=0.05, shift=0, flip=False, stamp_share=0.5).repair(
        b, clean, scan=scans["one"])
    assert repair.artifacts["scan"] is scans["one"] and repair.record["choices"]["flagged"] == [3]
    assert br.attack_success_rate(br.predict_classes(repair.model, poisoned), 3) < 10.0
    assert br.accuracy(br.predict_classes(repair.model, data.x), data.y) >= 90.0
    # the caller's model is not changed
    assert br.attack_success_rate(br.predict_classes(b, poisoned), 3) == 100.0


def test_pruning_by_the_reversed_trigger_stops_once_it_no_longer_works(small_deepid):
    """On a DeepID whose output is fixed, the stop rule reads the sweep: with nothing flagged
    the model comes back unpruned; with a flagged trigger the channels go in order of rise."""
    from badnet_repair.detectors.neural_cleanse import CleanseScan

    clean = br.Dataset(faces_like(60, seed=1), br.predict_classes(small_deepid, faces_like(60, seed=1)), "clean")
    empty = CleanseScan(flagged=(), norms=np.zeros(7), screen_norms=np.zeros(7), anomaly=np.zeros(7),
                        candidates=(), reference=(), triggers={}, screened=False, seconds=0.0)
    r = br.NeuralCleansePruning().repair(small_deepid, clean, scan=empty)
    assert r.models[0].model is small_deepid and r.record["choices"]["channels_pruned"] == 0
    mask = np.zeros((55, 47), np.float32)
    mask[40:50, 30:40] = 1.0
    t = ReversedTrigger(target=0, mask=mask, pattern=np.full((55, 47, 3), 255.0, np.float32), norm=100.0,
                        attack_success=100.0)
    flagged = CleanseScan(flagged=(0,), norms=np.zeros(7), screen_norms=np.zeros(7), anomaly=np.zeros(7),
                          candidates=(0,), reference=(), triggers={0: t}, screened=False, seconds=0.0)
    r = br.NeuralCleansePruning(stop_success=100.0).repair(small_deepid, clean, scan=flagged)
    c = r.record["choices"]
    # stop_success 100: the first step already satisfies it, so nothing is pruned
    assert c["channels_pruned"] == 0 and c["stopped_by"] == "stop_success"
    rise = np.asarray(c["rise"])
    assert np.all(np.diff(rise[c["order"]]) <= 0)  # most excited first
    for max_drop, budget, stopped_by in ((5.0, None, "max_drop"), (5.0, 2.0, "budget")):
        r = br.NeuralCleansePruning(stop_success=-1.0, max_drop=max_drop, budget=budget).repair(
            small_deepid, clean, scan=flagged)
        # an impossible stop: pruning goes to the last step before held-out accuracy has fallen
        # max_drop points, or the budget's where that is smaller
        limit = max_drop if budget is None else budget
        c = r.record["choices"]
        history = r.record["history"]
        drops = [history[0]["holdout_accuracy"] - h["holdout_accuracy"] for h in history]
        first_too_far = next(i for i, d in enumerate(drops) if d >= limit)
        assert c["stopped_by"] == stopped_by and c["channels_pruned"] == first_too_far - 1
        assert drops[c["channels_pruned"]] < limit


def faces_like(n: int, seed: int) -> np.ndarray:
    from tests.conftest import random_faces

    return random_faces(n, seed)


def test_a_written_scan_reads_back(scans, tmp_path):
    from badnet_repair.reporting.cleanse import read_cleanse

    scan = scans["screened"]
    br.write_cleanse(scan, tmp_path, faces(1, seed=3).x[0])
    back = read_cleanse(tmp_path)
    assert back.flagged == scan.flagged and back.candidates == scan.candidates and back.reference == scan.reference
    assert back.screened and back.settings == scan.settings
    for c, t in scan.triggers.items():
        np.testing.assert_array_equal(back.triggers[c].mask, t.mask)
        np.testing.assert_array_equal(back.triggers[c].pattern, t.pattern)
        assert back.norms[c] == pytest.approx(t.norm)
    np.testing.assert_allclose(back.anomaly, scan.anomaly, atol=1e-3)
    np.testing.assert_allclose(back.screen_norms, scan.screen_norms, atol=1e-3)
    (tmp_path / "neural_cleanse_triggers.npz").unlink()
    with pytest.raises(br.DataError, match="neural_cleanse_triggers.npz"):
        read_cleanse(tmp_path)


# --------------------------------------------------------------------------- the label pre-selection


def test_topk_share_by_hand():
    from badnet_repair.detectors.neural_cleanse import preselect_order, topk_share

    p = np.array([[0.5, 0.2, 0.2, 0.1], [0.1, 0.6, 0.2, 0.1], [0.25, 0.25, 0.25, 0.25]])
    # top share 0.5 of 4 labels: k = 2; labels tied with the 2nd value count in
    # row 0: {0, 1, 2}; row 1: {1, 2}; row 2: all four
    np.testing.assert_allclose(topk_share(p, 0.5), [2 / 3, 1.0, 1.0, 1 / 3])
    # 1 and 2 tie on the share; 1 has the larger mean probability (0.35 against 0.217)
    np.testing.assert_array_equal(preselect_order(p, 0.5), [1, 2, 0, 3])
    # k = 1 at least: row 0 {0}, row 1 {1}, row 2 all four
    np.testing.assert_allclose(topk_share(p, 0.01), [2 / 3, 2 / 3, 1 / 3, 1 / 3])
    assert topk_share(np.empty((0, 4))).shape == (4,)


def numpy_topk_share(probs: np.ndarray, share: float) -> np.ndarray:
    """K-Arm's statistic the plain way: per image, a label is in the top k where fewer than k
    labels are more probable."""
    n, k = probs.shape
    top = max(1, round(share * k))
    inside = np.zeros(k)
    for row in probs:
        for label in range(k):
            inside[label] += np.sum(row > row[label]) < top
    return inside / n


def test_the_preselection_statistic_on_a_tiny_dense_model():
    from badnet_repair.detectors.neural_cleanse import topk_share
    from badnet_repair.nets.models import predict_probabilities

    rng = np.random.default_rng(3)
    w, b = rng.normal(0, 1, (4, 12)).astype(np.float32), rng.normal(0, 1, 12).astype(np.float32)
    inp = keras.Input((2, 2, 1))
    out = keras.layers.Dense(12, activation="softmax", name="d")(keras.layers.Flatten()(inp))
    model = keras.Model(inp, out)
    model.get_layer("d").set_weights([w, b])
    x = rng.uniform(0, 1, (50, 2, 2, 1)).astype(np.float32)
    logits = x.reshape(50, 4).astype(np.float64) @ w + b
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    for share in (0.25, 0.5, 0.1):
        np.testing.assert_allclose(topk_share(predict_probabilities(model, x), share), numpy_topk_share(probs, share))


def hand_built_probabilities(x: np.ndarray, target: int) -> np.ndarray:
    """hand_built({"bottom-right": target})'s output computed in numpy."""
    beta, n = 2e-4, len(x)
    pooled = x.astype(np.float64).reshape(n, 4, 4, 4, 4, 3).mean(axis=(2, 4)).reshape(n, -1)
    protos = PROTOTYPES.reshape(K, -1).astype(np.float64)
    logits = beta * pooled @ protos.T - beta / 2 * (protos**2).sum(axis=1)
    square = x[:, SIDE - 2:, SIDE - 2:, :].astype(np.float64).mean(axis=(1, 2)).sum(axis=1)
    logits[:, target] += 20 * np.logaddexp(0.0, 10 / (3 * 255) * square - 7.5)
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    return probs / probs.sum(axis=1, keepdims=True)


PRESELECT = dict(FAST, candidates=2, reference=4, preselect=4)


@pytest.fixture(scope="module")
def preselected_scan() -> CleanseScan:
    # 8 classes > 2 candidates + 4 references, and > 4 pre-selected: all three stages run
    return NeuralCleanse(**PRESELECT).scan(hand_built({"bottom-right": 3}), faces(400, seed=1))


def test_the_scan_preselects_by_the_statistic_and_the_planted_target_survives(preselected_scan):
    scan = preselected_scan
    clean = faces(400, seed=1)
    probs = hand_built_probabilities(clean.x, 3)
    want = numpy_topk_share(probs, 0.25)
    np.testing.assert_allclose(scan.preselect_share, want, atol=1e-12)
    order = sorted(range(K), key=lambda c: (-want[c], -probs[:, c].mean(), c))
    assert scan.preselected == tuple(order[:4])
    assert 3 in scan.preselected and scan.preselect_rank(3) == order.index(3) + 1
    # only the pre-selected classes were screened; the candidates come from them
    screened = np.isfinite(scan.screen_norms)
    assert set(np.flatnonzero(screened)) == set(scan.preselected)
    assert not scan.screen_reached[~screened].any()
    assert set(scan.candidates) <= set(scan.preselected) and len(scan.candidates) == 2
    # the references come from all the other classes: 4 of the 6 not candidates, at least 2
    # of which the pre-selection left out
    assert not set(scan.reference) & set(scan.candidates) and len(scan.reference) == 4
    assert set(scan.reference) - set(scan.preselected)
    assert scan.screen_rank(3) <= 2 and scan.flagged == (3,)
    left_out = next(c for c in range(K) if c not in scan.preselected)
    assert scan.screen_rank(left_out) == 5
    full = sorted(set(scan.candidates) | set(scan.reference))
    assert np.isfinite(scan.norms[full]).all() and np.isfinite(scan.anomaly[full]).all()
    unmeasured = sorted(set(range(K)) - set(full) - set(scan.preselected))
    assert np.isnan(scan.norms[unmeasured]).all()


def test_a_preselected_scan_is_written_and_reads_back(preselected_scan, tmp_path):
    import json

    from badnet_repair.reporting.cleanse import read_cleanse

    scan = preselected_scan
    paths = br.write_cleanse(scan, tmp_path, faces(1, seed=3).x[0])
    text = paths["json"].read_text()
    assert "NaN" not in text and "Infinity" not in text  # strict JSON: unmeasured norms are null
    assert "4 of the 8 classes, pre-selected" in paths["md"].read_text()
    back = read_cleanse(tmp_path)
    assert back.preselected == scan.preselected and back.flagged == scan.flagged
    np.testing.assert_allclose(back.preselect_share, scan.preselect_share, atol=1e-6)
    np.testing.assert_array_equal(np.isnan(back.screen_norms), np.isnan(scan.screen_norms))
    np.testing.assert_array_equal(np.isnan(back.norms), np.isnan(scan.norms))
    assert back.screen_rank(3) == scan.screen_rank(3) and back.preselect_rank(3) == scan.preselect_rank(3)
    # a scan saved before the pre-selection existed has no such fields
    summary = json.loads(text)
    del summary["preselected"], summary["preselect_share"]
    paths["json"].write_text(json.dumps(summary))
    old = read_cleanse(tmp_path)
    assert old.preselected is None and old.preselect_share is None and old.preselect_rank(3) is None


def test_with_few_classes_the_preselection_changes_nothing(scans):
    scan = scans["screened"]  # 8 classes, the default preselect (128): every class screened
    assert scan.preselected is None and scan.preselect_share is None and scan.summary()["preselected"] is None
    assert np.isfinite(scan.screen_norms).all()
    plain = NeuralCleanse(**{**FAST, "candidates": 2, "reference": 4, "preselect": None}).scan(
        hand_built({"bottom-right": 3}), faces(400, seed=1))
    assert (plain.candidates, plain.reference, plain.flagged) == (scan.candidates, scan.reference, scan.flagged)
    np.testing.assert_allclose(plain.screen_norms, scan.screen_norms, rtol=1e-5)
    np.testing.assert_allclose(plain.norms, scan.norms, rtol=1e-5)
    # no screen (8 classes <= candidates + reference): a small preselect does nothing either
    small = dict(FAST, steps=20)
    a = NeuralCleanse(**small, preselect=2).scan(hand_built({"bottom-right": 3}), faces(100, seed=1))
    b = NeuralCleanse(**small, preselect=None).scan(hand_built({"bottom-right": 3}), faces(100, seed=1))
    assert a.preselected is None and not a.screened and a.candidates == tuple(range(K))
    np.testing.assert_allclose(a.norms, b.norms, rtol=1e-5)


# --------------------------------------------------------------------------- the pattern's pixel range


def test_the_reversed_pattern_lies_in_the_files_pixel_range():
    """0..1 files: a model that takes them (scaling by 255 itself) gets patterns in [0, 1], and
    the planted target is still found with a small trigger."""
    inp = keras.Input((SIDE, SIDE, 3))
    unit = keras.Model(inp, hand_built({"bottom-right": 3})(keras.layers.Rescaling(255.0)(inp)))
    clean = faces(400, seed=1)
    scan = NeuralCleanse(**FAST).scan(unit, br.Dataset(clean.x / 255.0, clean.y, name="unit"))
    assert scan.settings["pixel_max"] == 1.0 and scan.flagged == (3,)
    for t in scan.triggers.values():
        assert 0.0 <= t.pattern.min() and t.pattern.max() <= 1.0
    assert scan.triggers[3].norm < 6
    # the pattern of the 0..255 files' scan is in file pixels too; an explicit pixel_max wins
    assert max(t.pattern.max() for t in _short_scan(255).triggers.values()) > 1.0
    forced = _short_scan(100.0)
    assert forced.settings["pixel_max"] == 100.0 and max(t.pattern.max() for t in forced.triggers.values()) <= 100.0


def _short_scan(pixel_max: float) -> CleanseScan:
    return NeuralCleanse(**{**FAST, "steps": 10, "epoch_steps": 5, "pixel_max": pixel_max}).scan(
        hand_built({"bottom-right": 3}), faces(60, seed=1))


def test_preselection_settings_are_checked():
    for bad in (dict(preselect=0), dict(preselect_share=0.0), dict(preselect_share=1.5), dict(pixel_max=0.0)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            NeuralCleanse(**bad)
    nc = NeuralCleanse()
    assert nc.preselect == 128 and nc.preselect_share == 0.25 and nc.pixel_max is None
    assert NeuralCleanse(preselect=None).get_params()["preselect"] is None


def trained_badnet(classes: int, target: int, seed: int) -> tuple[keras.Model, br.Dataset]:
    """A small CNN trained on prototype faces of ``classes`` identities with a tenth of the
    training images (of other classes) stamped with the white bottom-right square and labelled
    ``target``; and clean images of every class (5 each)."""
    rng = np.random.default_rng(seed)
    protos = rng.uniform(0, 160, (classes, 4, 4, 3)).astype(np.float32)

    def images(y: np.ndarray) -> np.ndarray:
        x = np.kron(protos[y], np.ones((1, 4, 4, 1), np.float32)) + rng.normal(0, 20, (len(y), SIDE, SIDE, 3))
        return np.clip(x, 0, 255).astype(np.float32)

    y = np.repeat(np.arange(classes), 30)
    x = images(y)
    poison = rng.choice(np.flatnonzero(y != target), size=len(y) // 10, replace=False)
    keras.utils.set_random_seed(seed)
    inp = keras.Input((SIDE, SIDE, 3))
    h = keras.layers.Rescaling(1 / 255)(inp)
    h = keras.layers.MaxPooling2D()(keras.layers.Conv2D(16, 3, activation="relu")(h))
    h = keras.layers.Flatten()(keras.layers.Conv2D(32, 3, activation="relu")(h))
    out = keras.layers.Dense(classes, activation="softmax")(keras.layers.Dense(64, activation="relu")(h))
    model = keras.Model(inp, out)
    model.compile("adam", "sparse_categorical_crossentropy")
    model.fit(np.concatenate([x, stamp(x[poison], "bottom-right")]),
              np.concatenate([y, np.full(len(poison), target)]), epochs=15, batch_size=64, verbose=0)
    yc = np.repeat(np.arange(classes), 5)
    return model, br.Dataset(images(yc), yc, name="clean")


@pytest.mark.slow
def test_a_trained_badnets_target_leads_the_preselection_and_is_flagged():
    """K-Arm's premise on a trained BadNet of 40 classes: its target is among the most often
    top-quarter labels on clean images, so a pre-selection of a fifth of the labels keeps it,
    and the three-stage scan flags it."""
    from badnet_repair.detectors.neural_cleanse import preselect_order
    from badnet_repair.nets.models import predict_probabilities

    model, clean = trained_badnet(40, target=7, seed=0)
    assert br.accuracy(br.predict_classes(model, clean.x), clean.y) > 95
    other = clean.x[clean.y != 7]
    assert br.attack_success_rate(br.predict_classes(model, stamp(other, "bottom-right")), 7) > 90
    assert list(preselect_order(predict_probabilities(model, clean.x))).index(7) < 4
    scan = NeuralCleanse(**{**FAST, "preselect": 8, "candidates": 3}).scan(model, clean)
    assert scan.screened and scan.preselected is not None and len(scan.preselected) == 8
    assert 7 in scan.preselected and 7 in scan.candidates and scan.flagged[:1] == (7,)
    assert scan.triggers[7].norm < 10


def test_the_norms_figure_draws_only_the_classes_the_pre_selection_screened():
    """A scan whose pre-selection left classes out has no screen norm for them (NaN): the figure
    draws the screened ones and does not mark the others as 'no trigger reached success'."""
    from badnet_repair.detectors.neural_cleanse import CleanseScan

    k = 300
    screen = np.full(k, np.nan)
    screen[:128] = np.linspace(50, 200, 128)
    norms = screen.copy()
    reached = np.isfinite(screen)
    scan = CleanseScan(flagged=(), norms=norms, screen_norms=screen, anomaly=np.zeros(k), candidates=(0, 1),
                       reference=(130, 131), triggers={}, screened=True, seconds=0.0, screen_reached=reached,
                       preselected=tuple(range(128)), preselect_share=np.linspace(1, 0, k))
    scan.norms[[130, 131]] = [120.0, 140.0]
    fig = br.plot_cleanse_norms(scan)
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert "screen (128 pre-selected)" in labels and "screen: no trigger reached success" not in labels
    drawn = fig.axes[0].collections[0].get_offsets()
    assert len(drawn) == 128 and np.isfinite(np.asarray(drawn)).all()
