from __future__ import annotations

import keras
import numpy as np

import badnet_repair as br

from .conftest import random_faces


def test_goodnet_predict_by_hand():
    got = br.goodnet_predict(np.array([0, 1, 2, 3]), np.array([0, 2, 2, 1]), 4)
    assert got.tolist() == [0, 4, 2, 4]


def test_goodnet_model_follows_the_rule_and_round_trips(tmp_path, small_deepid):
    x = random_faces(64, seed=5)
    b_pred = br.predict_classes(small_deepid, x)
    # a B' that disagrees with B on some inputs: prune most of conv_3
    repaired = br.prune_channels(small_deepid, "conv_3", range(50))
    r_pred = br.predict_classes(repaired, x)
    assert 0 < np.count_nonzero(b_pred != r_pred) < len(x)
    g = br.build_goodnet(small_deepid, repaired)
    probs = keras.ops.convert_to_numpy(g(x))
    assert probs.shape == (64, 8)
    want = br.goodnet_predict(b_pred, r_pred, 7)
    np.testing.assert_array_equal(probs.argmax(1), want)
    agree = b_pred == r_pred
    # a subset runs at another batch shape: float32 rounding differs by a few 1e-6
    np.testing.assert_allclose(probs[agree, :7], small_deepid.predict(x[agree], verbose=0), rtol=1e-5, atol=1e-5)
    assert np.all(probs[agree, 7] == 0)
    np.testing.assert_array_equal(probs[~agree], np.eye(8)[np.full((~agree).sum(), 7)])
    p = tmp_path / "goodnet_2.keras"
    g.save(p)
    for loaded in (keras.models.load_model(p, compile=False), br.load_model(p)):
        np.testing.assert_allclose(keras.ops.convert_to_numpy(loaded(x)), probs, rtol=1e-5, atol=1e-6)
    # the caller's models are untouched
    np.testing.assert_array_equal(br.predict_classes(small_deepid, x), b_pred)
