from __future__ import annotations

import keras
import numpy as np
import pytest

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


def test_portable_goodnet_equals_the_rule_and_loads_in_keras_2_and_3(tmp_path, small_deepid):
    from badnet_repair.detectors.goodnet import build_portable_goodnet
    from badnet_repair.workflow.run import save_repair

    x = random_faces(64, seed=11)
    repaired = br.prune_channels(small_deepid, "conv_3", range(50))
    b_pred, r_pred = br.predict_classes(small_deepid, x), br.predict_classes(repaired, x)
    assert 0 < np.count_nonzero(b_pred != r_pred) < len(x)  # both branches of the rule are used
    exact = keras.ops.convert_to_numpy(br.build_goodnet(small_deepid, repaired)(x))
    portable = build_portable_goodnet(small_deepid, repaired)
    assert not any(isinstance(lyr, keras.Model) for lyr in portable.layers), "one flat graph"
    assert all(type(lyr).__module__.startswith("keras.") for lyr in portable.layers), "standard layers only"
    got = keras.ops.convert_to_numpy(portable(x))
    np.testing.assert_array_equal(got.argmax(1), br.goodnet_predict(b_pred, r_pred, 7))
    np.testing.assert_allclose(got, exact, rtol=1e-5, atol=1e-6)
    saved = save_repair(small_deepid, repaired, tmp_path, "bd_2", formats=(), goodnet_h5=tmp_path / "goodnet_2.h5")
    k3 = keras.models.load_model(saved["goodnet_h5"], compile=False)
    np.testing.assert_allclose(k3.predict(x, verbose=0), got, rtol=1e-5, atol=1e-6)
    # eval knows the saved file for a GoodNet (its false alarms and detection), as it knows the .keras one
    from badnet_repair.detectors.goodnet import is_goodnet

    assert is_goodnet(br.load_model(saved["goodnet_h5"])) and is_goodnet(br.build_goodnet(small_deepid, repaired))
    assert not is_goodnet(small_deepid) and not is_goodnet(repaired)
    tf_keras = pytest.importorskip("tf_keras", reason="tf-keras (Keras 2) is not installed; .ci/run installs it")
    k2 = tf_keras.models.load_model(saved["goodnet_h5"], compile=False)
    np.testing.assert_allclose(k2.predict(x, verbose=0), got, rtol=1e-5, atol=1e-6)


def test_portable_goodnet_marks_only_exact_top_classes():
    """The top-class mark by hand: a gap of one float32 step below a small maximum is not top."""
    from badnet_repair.detectors.goodnet import build_portable_goodnet

    def fixed(probs, name):
        inp = keras.Input((2,))
        out = keras.layers.Dense(3, name=f"{name}_out")(inp)  # constant output: zero kernel, bias = probs
        m = keras.Model(inp, out, name=name)
        m.get_layer(f"{name}_out").set_weights([np.zeros((2, 3), np.float32), np.asarray(probs, np.float32)])
        return m

    top = np.float32(0.4)
    below = np.nextafter(top, np.float32(0))
    b = fixed([top, below, 1 - top - below], "b")
    same = fixed([top, below, 1 - top - below], "r")
    other = fixed([below, top, 1 - top - below], "r2")
    x = np.zeros((1, 2), np.float32)
    agree = keras.ops.convert_to_numpy(build_portable_goodnet(b, same)(x))[0]
    differ = keras.ops.convert_to_numpy(build_portable_goodnet(b, other)(x))[0]
    np.testing.assert_array_equal(agree, [top, below, 1 - top - below, 0.0])
    np.testing.assert_array_equal(differ, [0.0, 0.0, 0.0, 1.0])


@pytest.mark.parametrize("names", [("scale", "column", "top"),
                                   ("goodnet_badnet_scale", "goodnet_agree", "repaired_conv")])
def test_prune_saves_the_goodnets_of_a_model_whose_layer_names_collide_with_gs_own(tmp_path, names):
    """A small residual CNN whose layers bear the names G's own layers once had (``badnet_scale``
    was used twice): every layer name of B must work."""
    from badnet_repair.workflow.prune import repaired_models, save_lab_models

    first, second, third = names
    keras.utils.set_random_seed(3)
    x_in = keras.Input((8, 8, 3), name="input")
    h = keras.layers.Rescaling(1 / 255, name=first)(x_in)
    h = keras.layers.Conv2D(6, 3, padding="same", activation="relu", name="conv")(h)
    skip = keras.layers.Conv2D(6, 1, name=second)(h)
    h = keras.layers.Add(name=third)([h, skip])
    h = keras.layers.MaxPooling2D(2, name="pool")(h)
    out = keras.layers.Dense(4, activation="softmax", name="output")(keras.layers.Flatten(name="flat")(h))
    b = keras.Model(x_in, out, name="residual")
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (40, 8, 8, 3)).astype(np.float32)
    valid = br.Dataset(x, br.predict_classes(b, x), "valid")
    sweep = br.prune_sweep(b, valid, layer="conv", thresholds=[2])
    repaired = repaired_models(b, sweep)
    saved = save_lab_models(b, repaired, tmp_path)
    g = keras.models.load_model(saved[2.0]["goodnet_h5"], compile=False)
    want = br.goodnet_predict(br.predict_classes(b, x), br.predict_classes(repaired[2.0].model, x), 4)
    np.testing.assert_array_equal(g.predict(x, verbose=0).argmax(1), want)
