from __future__ import annotations

import logging

import numpy as np
import pytest

import badnet_repair as br
from badnet_repair.defenses.sweep import select_threshold

from .conftest import random_faces, square_trigger, tiny_conv_model


def constant_images(values, channels=1):
    return np.stack([np.full((4, 4, channels), v, np.float32) for v in values])


def hand_model():
    """Kernel [1, 2, 3]: on a constant image v the channels output v, 2v, 3v everywhere.

    After 2x2 pooling the flattened features are (position p, channel c) = p*3 + c. Class
    1's score is 2 * channel 0 summed over the 4 positions; class 0's is channel 2 minus
    channel 1, summed. Per step, for v > 0:
      step 0: class0 = 4*(3v - 2v) = 4v, class1 = 4*(v)*2 = 8v  -> 1 (for v > 0)
      step 1 (channel 0 pruned): class0 = 4v, class1 = 0          -> 0
      step 2 (channel 1 pruned): class0 = 12v, class1 = 0         -> 0
      step 3 (all pruned): both 0, a tie                          -> 0 (argmax picks 0)
    An all-zero image ties at every step -> 0.
    """
    dense = np.zeros((12, 2), np.float32)
    for pos in range(4):
        dense[pos * 3 + 0, 1] = 2.0
        dense[pos * 3 + 1, 0] = -1.0
        dense[pos * 3 + 2, 0] = 1.0
    return tiny_conv_model([[1.0, 2.0, 3.0]], dense)


def test_ranking_by_hand():
    m = hand_model()
    x = constant_images([0, 1, 2, 3])
    r = br.rank_channels(m, x, layer="conv")
    np.testing.assert_allclose(r.mean_activation, [1.5, 3.0, 4.5])
    assert r.order.tolist() == [0, 1, 2] and r.measured_at == "pool"
    d = br.rank_channels(m, x, layer="conv", descending=True)
    assert d.order.tolist() == [2, 1, 0]


def test_pooled_and_conv_rankings_differ_where_they_should():
    # channel a reads input 0: one hot pixel of 4 -> conv mean 4/16 = 0.25, pooled mean 4/4 = 1
    # channel b reads input 1: 0.5 everywhere -> conv and pooled mean 0.5
    x = np.zeros((1, 4, 4, 2), np.float32)
    x[0, 0, 0, 0] = 4.0
    x[0, :, :, 1] = 0.5
    m = tiny_conv_model(np.eye(2), np.ones((8, 2)))
    pooled = br.rank_channels(m, x, layer="conv", at="pooled")
    conv = br.rank_channels(m, x, layer="conv", at="conv")
    np.testing.assert_allclose(pooled.mean_activation, [1.0, 0.5])
    np.testing.assert_allclose(conv.mean_activation, [0.25, 0.5])
    assert pooled.order.tolist() == [1, 0] and conv.order.tolist() == [0, 1]
    assert conv.measured_at == "conv"


def test_no_pooling_layer_falls_back_to_the_conv_output(caplog):
    m = tiny_conv_model(np.eye(2), np.ones((32, 2)), pool=False)
    with caplog.at_level(logging.WARNING):
        r = br.rank_channels(m, constant_images([1], channels=2), layer="conv")
    assert r.measured_at == "conv" and "not followed by a pooling layer" in caplog.text


@pytest.mark.parametrize("engine", ["fast", "plain"])
def test_sweep_by_hand(engine):
    m = hand_model()
    valid = br.Dataset(constant_images([0, 1, 2, 3]), np.array([0, 1, 1, 1]), "valid")
    bd = br.Dataset(constant_images([1, 5]), np.array([1, 1]), "bd")
    s = br.prune_sweep(m, valid, others={"bd": bd}, poisoned=["bd"], layer="conv",
                       thresholds=[2, 75, 80], engine=engine)
    assert s.ranking.order.tolist() == [0, 1, 2]
    assert s.predictions["valid"].tolist() == [[0, 1, 1, 1], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    np.testing.assert_allclose(s.metric("valid"), [100, 25, 25, 25])
    np.testing.assert_allclose(s.metric("bd"), [100, 0, 0, 0])
    assert [st.channel for st in s.steps] == [None, 0, 1, 2]
    assert [st.fraction_pruned for st in s.steps] == pytest.approx([0, 1 / 3, 2 / 3, 1])
    assert s.selections[2.0].channels_pruned == 1 and s.selections[2.0].channels == (0,)
    assert s.selections[75.0].channels_pruned == 1  # a drop of exactly 75 points counts
    assert s.selections[80.0] is None
    assert s.channels_at(2) == (0,) and s.channels_at(80) == (0, 1, 2)  # never that far: every channel
    with pytest.raises(ValueError, match="no threshold 3"):
        s.channels_at(3)
    assert s.kinds == {"valid": "clean", "bd": "poisoned"}
    # G = B's class where B and B' agree, else 2: on bd, B says 1 and B'_1 says 0 -> all flagged
    np.testing.assert_allclose(s.goodnet_metric("bd", what="alarm"), [0, 100, 100, 100])


def test_stop_rule_boundaries():
    labels = np.zeros(50, np.int64)
    correct = [50, 49, 47, 40]  # drops of 0, 2, 6, 20 points
    preds = np.array([[0] * c + [1] * (50 - c) for c in correct])
    order = np.array([7, 8, 9])
    assert select_threshold(preds, labels, order, 2).channels_pruned == 1
    assert select_threshold(preds, labels, order, 2.0001).channels_pruned == 2
    assert select_threshold(preds, labels, order, 6).channels == (7, 8)
    sel = select_threshold(preds, labels, order, 10)
    assert (sel.channels_pruned, sel.valid_accuracy, sel.accuracy_drop) == (3, 80.0, 20.0)
    assert select_threshold(preds, labels, order, 20.5) is None
    assert select_threshold(preds, labels, order, 0).channels_pruned == 1
    for bad in (-1, float("nan"), "two"):
        with pytest.raises((ValueError, TypeError)):
            select_threshold(preds, labels, order, bad)


def assert_same_up_to_ties(fast, plain, tolerance=1e-4):
    for name in plain.predictions:
        a, b = fast.predictions[name], plain.predictions[name]
        assert a.shape == b.shape
        assert np.count_nonzero(a != b) <= tolerance * a.size, name


def test_fast_engine_equals_plain_at_every_step_on_deepid(small_deepid):
    x = random_faces(120, seed=21)
    y = br.predict_classes(small_deepid, x)
    valid = br.Dataset(x, y, "valid")
    bd = br.poison(valid, square_trigger(), target=0)
    weights = [w.copy() for w in small_deepid.get_weights()]
    fast = br.prune_sweep(small_deepid, valid, others={"bd": bd}, poisoned=["bd"], batch_size=50)
    plain = br.prune_sweep(small_deepid, valid, others={"bd": bd}, poisoned=["bd"], engine="plain")
    np.testing.assert_array_equal(fast.ranking.order, plain.ranking.order)
    np.testing.assert_allclose(fast.ranking.mean_activation, plain.ranking.mean_activation, rtol=1e-5)
    assert_same_up_to_ties(fast, plain)
    # the sweep moved through many distinct predictions, so the comparison means something
    assert len({tuple(p) for p in plain.predictions["valid"]}) > 20
    assert fast.selections == plain.selections
    for w, w0 in zip(small_deepid.get_weights(), weights, strict=True):
        np.testing.assert_array_equal(w, w0)


def test_sweep_rejects_bad_arguments(small_deepid):
    valid = br.Dataset(random_faces(4, seed=1), np.zeros(4, np.int64), "valid")
    with pytest.raises(ValueError, match="threshold"):
        br.prune_sweep(small_deepid, valid, thresholds=[-2])
    with pytest.raises(ValueError, match="not in others"):
        br.prune_sweep(small_deepid, valid, poisoned=["bd"])
    with pytest.raises(br.ModelError, match="not a convolution layer"):
        br.prune_sweep(small_deepid, valid, layer="fc_1")
    with pytest.raises(ValueError, match="engine"):
        br.prune_sweep(small_deepid, valid, engine="turbo")


@pytest.mark.parametrize("engine", ["fast", "plain"])
def test_extend_sweep_equals_one_sweep_over_every_set(engine):
    m = hand_model()
    valid = br.Dataset(constant_images([1, 2, 3]), np.array([1, 1, 0]), "valid")
    bd = br.Dataset(constant_images([0, 4]), np.array([0, 0]), "bd")
    test = br.Dataset(constant_images([5, 0]), np.array([1, 0]), "test")
    whole = br.prune_sweep(m, valid, others={"bd": bd, "test": test}, poisoned=["bd"], layer="conv",
                           thresholds=[30], engine=engine)
    first = br.prune_sweep(m, valid, layer="conv", thresholds=[30], engine=engine)
    joined = br.extend_sweep(m, first, {"bd": bd, "test": test}, poisoned=["bd"])
    assert joined.kinds == {"valid": "clean", "bd": "poisoned", "test": "clean"}
    for name in whole.kinds:
        np.testing.assert_array_equal(joined.predictions[name], whole.predictions[name])
    assert [s.metrics for s in joined.steps] == [s.metrics for s in whole.steps]
    assert joined.selections == whole.selections == first.selections
    # by hand (hand_model): the test set's v=5 image is class 1 only at step 0
    assert joined.metric("test").tolist() == [100.0, 50.0, 50.0, 50.0]
    with pytest.raises(ValueError, match="measured by the sweep already"):
        br.extend_sweep(m, first, {"valid": test})
    with pytest.raises(ValueError, match="not in others"):
        br.extend_sweep(m, first, {"test": test}, poisoned=["bd"])
