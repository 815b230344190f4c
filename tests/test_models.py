from __future__ import annotations

import json
import zipfile

import h5py
import keras
import numpy as np
import pytest

import badnet_repair as br
from badnet_repair.errors import ModelError, UnsafeModelError
from badnet_repair.nets.models import (
    conv_layer,
    default_conv_layer,
    inference_call,
    predict_probabilities,
    with_trainable_names,
    zero_channels,
)

from .conftest import random_faces


def test_deepid_has_the_lab_layers_and_shapes():
    m = br.deepid(num_classes=11)
    names = [lyr.name for lyr in m.layers]
    for name in ("input", "conv_1", "pool_1", "conv_2", "pool_2", "conv_3", "pool_3", "conv_4",
                 "flatten_1", "flatten_2", "fc_1", "fc_2", "add_1", "activation_1", "output"):
        assert name in names
    assert m.get_layer("pool_3").output.shape[1:] == (5, 4, 60)
    assert m.get_layer("fc_1").kernel.shape == (1200, 160)
    assert m.get_layer("fc_2").kernel.shape == (960, 160)
    assert m.output.shape[1:] == (11,)


def test_prune_channels_zeroes_a_copy_and_leaves_the_original(small_deepid):
    before = [w.copy() for w in small_deepid.get_layer("conv_3").get_weights()]
    pruned = br.prune_channels(small_deepid, "conv_3", [4, 0, 4, 59])
    k, b = pruned.get_layer("conv_3").get_weights()
    assert np.all(k[..., [0, 4, 59]] == 0) and np.all(b[[0, 4, 59]] == 0)
    keep = [c for c in range(60) if c not in (0, 4, 59)]
    np.testing.assert_array_equal(k[..., keep], before[0][..., keep])
    for w, w0 in zip(small_deepid.get_layer("conv_3").get_weights(), before, strict=True):
        np.testing.assert_array_equal(w, w0)
    np.testing.assert_array_equal(pruned.get_layer("conv_1").get_weights()[0],
                                  small_deepid.get_layer("conv_1").get_weights()[0])
    with pytest.raises(ModelError, match=r"channel indices must be in \[0, 60\)"):
        br.prune_channels(small_deepid, "conv_3", [60])


def test_layer_errors_name_the_problem(small_deepid):
    with pytest.raises(ModelError, match="no layer named 'conv_9'; layers: input, conv_1"):
        br.prune_channels(small_deepid, "conv_9", [0])
    with pytest.raises(ModelError, match="'pool_3' .* is a MaxPooling2D, not a convolution layer"):
        br.prune_channels(small_deepid, "pool_3", [0])


def test_save_model_writes_three_formats_that_load_to_the_same_predictions(tmp_path, small_deepid):
    x = random_faces(16, seed=3)
    want = small_deepid.predict(x, verbose=0)
    paths = br.save_model(small_deepid, tmp_path, "bd_2")
    assert {p.name for p in paths.values()} == {"bd_2.h5", "bd_2_weights.h5", "bd_2.keras"}
    for p in paths.values():
        got = br.load_model(p).predict(x, verbose=0)
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    # the weights file has the Keras 2 layout of the lab's bd_weights.h5
    with h5py.File(paths["weights"]) as f:
        assert f["conv_3/conv_3/kernel:0"].shape == (3, 3, 40, 60)
        assert [n.decode() for n in f["conv_3"].attrs["weight_names"]] == ["conv_3/kernel:0", "conv_3/bias:0"]
        assert [n.decode() for n in f.attrs["layer_names"]][:2] == ["input", "conv_1"]
    assert not list(tmp_path.glob(".*partial*"))
    with pytest.raises(br.OutputExistsError, match="bd_2.h5"):
        br.save_model(small_deepid, tmp_path, "bd_2")
    br.save_model(small_deepid, tmp_path, "bd_2", overwrite=True)


def test_weights_only_file_infers_classes_and_checks_shapes(tmp_path, small_deepid):
    p = br.save_model(small_deepid, tmp_path, "m", formats=["weights"])["weights"]
    assert br.num_classes(br.load_model(p)) == 7
    other = br.deepid(num_classes=7)
    kernel = other.get_layer("conv_2")
    other_p = tmp_path / "other_weights.h5"
    from badnet_repair.nets.models import save_weights_h5

    save_weights_h5(other, other_p)
    with h5py.File(other_p, "a") as f:
        del f["conv_2/conv_2/kernel:0"]
        f["conv_2"].create_dataset("conv_2/kernel:0", data=np.zeros((5, 5, 20, 40), np.float32))
    assert kernel is not None
    with pytest.raises(ModelError, match=r"weights of layer 'conv_2' have shapes \[\(5, 5, 20, 40\), \(40,\)\]"):
        br.load_model(other_p)


def test_missing_and_non_model_files(tmp_path):
    with pytest.raises(ModelError, match="no such file"):
        br.load_model(tmp_path / "x.h5")
    with pytest.raises(ModelError, match="is a folder"):
        br.load_model(tmp_path)
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"\x00" * 100)
    with pytest.raises(ModelError, match="not a Keras model file"):
        br.load_model(junk)
    badzip = tmp_path / "bad.keras"
    badzip.write_bytes(b"PK\x03\x04 nonsense")
    with pytest.raises(ModelError, match=r"bad\.keras"):
        br.load_model(badzip)


def lambda_model():
    x = keras.Input((4,))
    y = keras.layers.Lambda(lambda t: t * 2.0, name="doubler")(x)
    return keras.Model(x, keras.layers.Dense(2, name="out")(y))


@pytest.mark.parametrize("suffix", [".keras", ".h5"])
def test_models_with_lambda_layers_are_refused_unless_trusted(tmp_path, suffix):
    p = tmp_path / f"lam{suffix}"
    lambda_model().save(p)
    with pytest.raises(UnsafeModelError, match=r"'doubler' \(Lambda: runs Python code.*--trust-model"):
        br.load_model(p)
    m = br.load_model(p, trust=True)
    np.testing.assert_allclose(m.get_layer("doubler")(np.ones((1, 4), np.float32)), 2.0)


def test_unknown_custom_layers_are_refused(tmp_path, small_deepid):
    p = tmp_path / "m.keras"
    small_deepid.save(p)
    with zipfile.ZipFile(p) as z:
        config = json.loads(z.read("config.json"))
        members = {n: z.read(n) for n in z.namelist()}
    config["config"]["layers"][1]["class_name"] = "EvilConv"
    config["config"]["layers"][1]["registered_name"] = "evil>EvilConv"
    members["config.json"] = json.dumps(config).encode()
    with zipfile.ZipFile(p, "w") as z:
        for n, data in members.items():
            z.writestr(n, data)
    with pytest.raises(UnsafeModelError, match="unknown custom layer 'EvilConv'"):
        br.load_model(p)


def test_load_data_for_checks_the_file_against_the_model(small_deepid, tmp_path):
    x = random_faces(4, seed=2)
    ok, bad = tmp_path / "ok.h5", tmp_path / "bad.h5"
    br.save_h5(ok, x, np.array([0, 1, 6, 2]))
    br.save_h5(bad, x, np.array([0, 1, 7, 2]))  # class 7 does not exist in a 7-class model
    data = br.load_data_for(small_deepid, ok, name="valid")
    assert data.x.shape == (4, 55, 47, 3) and data.y.tolist() == [0, 1, 6, 2] and data.name == "valid"
    with pytest.raises(br.DataError, match="bad.h5"):
        br.load_data_for(small_deepid, bad)
    small = tmp_path / "small.h5"
    br.save_h5(small, x[:, :50], np.zeros(4, np.int64))
    with pytest.raises(br.DataError, match="small.h5"):
        br.load_data_for(small_deepid, small)


def _constant_softmax(bias: list[float], name: str):
    import keras

    x = keras.Input(shape=(3,))
    dense = keras.layers.Dense(len(bias), activation="softmax")
    m = keras.Model(x, dense(x), name=name)
    dense.set_weights([np.zeros((3, len(bias)), np.float32), np.asarray(bias, np.float32)])
    return m


def test_geometric_average_is_the_normalised_product_and_saves(tmp_path):
    from badnet_repair.nets.models import average_models, save_model

    a = _constant_softmax([0.0, 0.0], "a")  # [1/2, 1/2]
    b = _constant_softmax([float(np.log(3.0)), 0.0], "b")  # [3/4, 1/4]
    geo = average_models([a, b], mean="geometric")
    x = np.ones((2, 3), np.float32)
    # sqrt(1/2 * 3/4) : sqrt(1/2 * 1/4) = sqrt(3) : 1
    want = [[np.sqrt(3) / (np.sqrt(3) + 1), 1 / (np.sqrt(3) + 1)]] * 2
    np.testing.assert_allclose(geo.predict(x, verbose=0), want, rtol=1e-6)
    paths = save_model(geo, tmp_path, "geo", formats=("h5", "keras"))
    for p in paths.values():
        np.testing.assert_allclose(br.load_model(p).predict(x, verbose=0), want, rtol=1e-6)
    # one member still sure of class 0 (a kept backdoor) and two that give it 1e-3 and lean,
    # unsurely, to class 1: the arithmetic mean follows the sure one, the geometric mean the two
    sure = _constant_softmax([0.0, -9.21, -9.21, -9.21], "sure")
    unsure = [_constant_softmax(np.log([1e-3, 0.45, 0.275, 0.274]).tolist(), f"unsure{i}") for i in range(2)]
    assert br.predict_classes(average_models([sure, *unsure]), x).tolist() == [0, 0]
    assert br.predict_classes(average_models([sure, *unsure], mean="geometric"), x).tolist() == [1, 1]


def test_average_models_means_the_probabilities_and_saves(tmp_path):
    from badnet_repair.nets.models import average_models, save_model

    a = _constant_softmax([0.0, 0.0], "a")  # softmax -> [1/2, 1/2]
    b = _constant_softmax([float(np.log(3.0)), 0.0], "b")  # -> [3/4, 1/4]
    avg = average_models([a, b])
    x = np.ones((2, 3), np.float32)
    np.testing.assert_allclose(avg.predict(x, verbose=0), [[0.625, 0.375]] * 2, rtol=1e-6)
    # copies: changing a member afterwards does not change the average
    a.layers[-1].set_weights([np.zeros((3, 2), np.float32), np.array([0.0, 5.0], np.float32)])
    np.testing.assert_allclose(avg.predict(x, verbose=0), [[0.625, 0.375]] * 2, rtol=1e-6)
    paths = save_model(avg, tmp_path, "avg", formats=("h5", "keras"))
    for p in paths.values():
        np.testing.assert_allclose(br.load_model(p).predict(x, verbose=0), [[0.625, 0.375]] * 2, rtol=1e-6)
    with pytest.raises(br.ModelError, match="shapes differ"):
        average_models([a, _constant_softmax([0.0, 0.0, 0.0], "c")])
    with pytest.raises(ValueError, match="geometric"):
        average_models([a, b], mean="harmonic")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least one"):
        average_models([])


def test_full_h5_loads_in_keras_2_and_predicts_the_same(tmp_path, small_deepid):
    """The lab grades with a Keras 2 eval.py: bd_X.h5 must load there (tf-keras) as in Keras 3."""
    tf_keras = pytest.importorskip("tf_keras", reason="tf-keras (Keras 2) is not installed; .ci/run installs it")
    from badnet_repair.nets.models import save_model

    from .conftest import random_faces

    pruned = br.prune_channels(small_deepid, "conv_3", range(30))
    paths = save_model(pruned, tmp_path, "bd_2", formats=("h5",))
    x = random_faces(32, seed=9)
    k2 = tf_keras.models.load_model(paths["h5"], compile=False)
    k3 = keras.models.load_model(paths["h5"], compile=False)
    assert [lyr.name for lyr in k2.layers] == [lyr.name for lyr in pruned.layers]
    np.testing.assert_array_equal(k2.predict(x, verbose=0), k3.predict(x, verbose=0))
    np.testing.assert_array_equal(k3.predict(x, verbose=0), pruned.predict(x, verbose=0))
    assert not br.load_model(paths["h5"]).get_layer("conv_3").get_weights()[0][..., :30].any()


def test_keras2_config_by_hand():
    from badnet_repair.nets.models import keras2_config

    tensor = {"class_name": "__keras_tensor__", "config": {"keras_history": ["a", 0, 0]}}
    cfg = {"class_name": "Functional", "config": {"name": "m", "input_layers": ["a", 0, 0],
                                                   "output_layers": ["b", 0, 0], "layers": [
        {"class_name": "InputLayer", "name": "a", "inbound_nodes": [],
         "config": {"batch_shape": [None, 2], "dtype": "float32", "name": "a", "optional": False}},
        {"class_name": "Dense", "name": "b", "inbound_nodes": [{"args": [tensor], "kwargs": {}}],
         "config": {"name": "b", "units": 1, "lora_rank": None,
                    "dtype": {"class_name": "DTypePolicy", "config": {"name": "float32"}}}}]}}
    out = keras2_config(cfg)["config"]
    assert out["input_layers"] == [["a", 0, 0]] and out["output_layers"] == [["b", 0, 0]]
    assert out["layers"][0]["config"] == {"batch_input_shape": [None, 2], "dtype": "float32", "name": "a"}
    assert out["layers"][1]["config"] == {"name": "b", "units": 1, "dtype": "float32"}
    assert out["layers"][1]["inbound_nodes"] == [[["a", 0, 0, {}]]]
    with pytest.raises(br.ModelError, match="functional"):
        keras2_config({"class_name": "Sequential", "config": {}})


@pytest.mark.parametrize("suffix", [".h5", ".keras"])
def test_a_saved_sequential_model_loads_as_a_graph_the_pruning_defense_can_cut(tmp_path, suffix):
    # a loaded Keras 3 Sequential model's layers carry one call per rebuild of its graph, which
    # made every conv look shared and the model look conv-less to the pruning defense
    keras.utils.set_random_seed(3)
    seq = keras.Sequential([keras.Input((12, 10, 3)), keras.layers.Conv2D(4, 3, activation="relu", name="c1"),
                            keras.layers.MaxPooling2D(name="p1"), keras.layers.Dropout(0.1, name="drop"),
                            keras.layers.Conv2D(6, 3, activation="relu", name="c2"),
                            keras.layers.MaxPooling2D(name="p2"), keras.layers.Flatten(name="flat"),
                            keras.layers.Dense(3, activation="softmax", name="head")])
    seq.save(tmp_path / f"seq{suffix}")
    with pytest.raises(ModelError, match="Sequential model; pass badnet_repair.nets.models.as_functional"):
        default_conv_layer(keras.models.load_model(tmp_path / f"seq{suffix}", compile=False))
    model = br.load_model(tmp_path / f"seq{suffix}")
    x = np.random.default_rng(0).uniform(0, 255, (40, 12, 10, 3)).astype(np.float32)
    np.testing.assert_allclose(model.predict(x, verbose=0), seq.predict(x, verbose=0), rtol=1e-5, atol=1e-6)
    assert default_conv_layer(model) == "c2" and conv_layer(model, "c1").name == "c1"
    sweep = br.prune_sweep(model, br.Dataset(x, br.predict_classes(model, x), "valid"))
    assert len(sweep.ranking.order) == 6


def test_a_model_built_from_a_list_of_one_input_is_inlined_onto_a_single_tensor():
    from badnet_repair.nets.models import inline_model

    keras.utils.set_random_seed(5)
    x = keras.Input((8, 6, 3))
    listed = keras.Model([x], [keras.layers.Dense(4, name="d")(keras.layers.Flatten(name="f")(x))])
    new = keras.Input((8, 6, 3))
    copy = inline_model(listed, new, "p_")
    data = np.random.default_rng(0).uniform(0, 1, (5, 8, 6, 3)).astype(np.float32)
    want = listed.predict(data, verbose=0)
    np.testing.assert_allclose(copy.predict(data, verbose=0), want[0] if isinstance(want, list) else want, rtol=1e-6)
    assert [lyr.name for lyr in copy.layers[1:]] == ["p_f", "p_d"]


def test_a_model_with_two_outputs_is_refused_in_one_line(tmp_path):
    x = keras.Input((8, 8, 3))
    f = keras.layers.Flatten()(keras.layers.Conv2D(2, 3)(x))
    two = keras.Model(x, [keras.layers.Dense(5, activation="softmax")(f), keras.layers.Dense(2)(f)])
    two.save(tmp_path / "two.keras")
    with pytest.raises(ModelError, match=r"two.keras: the model has 1 input\(s\) and 2 output\(s\)"):
        br.load_model(tmp_path / "two.keras")


def test_parallel_last_conv_layers_are_named_when_one_is_chosen(caplog, small_deepid):
    x = keras.Input((12, 10, 3))
    a = keras.layers.MaxPooling2D(name="pa")(keras.layers.Conv2D(3, 3, name="brA_conv")(x))
    b = keras.layers.MaxPooling2D(name="pb")(keras.layers.Conv2D(4, 3, name="brB_conv")(x))
    f = keras.layers.Concatenate()([keras.layers.Flatten()(a), keras.layers.Flatten()(b)])
    model = keras.Model(x, keras.layers.Dense(3, activation="softmax")(f), name="two_branches")
    with caplog.at_level("WARNING", logger="badnet_repair"):
        chosen = default_conv_layer(model)
    assert chosen in ("brA_conv", "brB_conv")
    assert "2 last conv layers in parallel branches" in caplog.text and "choose with --layer" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="badnet_repair"):
        assert default_conv_layer(small_deepid) == "conv_3"  # conv_1 and conv_2 lead into it: no peers
    assert caplog.text == ""


def test_a_conv_layer_that_another_branch_conv_follows_is_no_peer(caplog):
    # branch A: a1 -> pool -> a2 -> pool; branch B: b -> pool. a1 leads into a2, so the last
    # ones are a2 and b (the plain rule: no other candidate lies downstream of a peer)
    x = keras.Input((16, 14, 3))
    a = keras.layers.MaxPooling2D(name="pa1")(keras.layers.Conv2D(3, 3, padding="same", name="a1")(x))
    a = keras.layers.MaxPooling2D(name="pa2")(keras.layers.Conv2D(3, 3, padding="same", name="a2")(a))
    b = keras.layers.MaxPooling2D(name="pb")(keras.layers.Conv2D(4, 3, padding="same", name="b")(x))
    f = keras.layers.Concatenate()([keras.layers.Flatten()(a), keras.layers.Flatten()(b)])
    model = keras.Model(x, keras.layers.Dense(3, activation="softmax")(f), name="three_convs")
    with caplog.at_level("WARNING", logger="badnet_repair"):
        chosen = default_conv_layer(model)
    assert chosen in ("a2", "b")
    named = caplog.text.split("(")[1].split(")")[0]
    assert "2 last conv layers" in caplog.text and sorted(named.split(", ")) == ["a2", "b"]


def _dense_net(seed: int, units: int = 4, name: str = "net"):
    import keras

    rng = np.random.default_rng(seed)
    x = keras.Input(shape=(3,), name="input")
    h = keras.layers.Dense(units, activation="relu", name="hidden")(x)
    y = keras.layers.Dense(2, activation="softmax", name="output")(h)
    m = keras.Model(x, y, name=name)
    m.set_weights([rng.normal(size=w.shape).astype(np.float32) for w in m.get_weights()])
    return m


def test_weight_soup_is_one_network_with_the_mean_weights():
    from badnet_repair.nets.models import average_models, input_scale_of, weight_soup, with_input_scale

    nets = [_dense_net(s, name=f"n{s}") for s in range(3)]
    soup = weight_soup(nets, name="soup")
    assert [layer.name for layer in soup.layers] == [layer.name for layer in nets[0].layers]
    (w1, b1, w2, b2) = (np.mean([n.get_weights()[i] for n in nets], axis=0) for i in range(4))
    x = np.random.default_rng(9).normal(size=(5, 3)).astype(np.float32)
    # the plain forward pass with the averaged weights
    logits = np.maximum(x @ w1 + b1, 0.0) @ w2 + b2
    want = np.exp(logits - logits.max(axis=1, keepdims=True))
    want /= want.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(soup.predict(x, verbose=0), want, rtol=1e-5, atol=1e-6)
    # average_models's "soup" is the same network; the members are not shared or changed
    np.testing.assert_allclose(average_models(nets, mean="soup").predict(x, verbose=0), want, rtol=1e-5, atol=1e-6)
    before = nets[0].get_weights()
    soup.get_layer("hidden").set_weights([np.zeros((3, 4), np.float32), np.zeros(4, np.float32)])
    assert all(np.array_equal(u, v) for u, v in zip(before, nets[0].get_weights(), strict=True))
    # members with an input scale: the soup takes it in front, once
    scaled = weight_soup([with_input_scale(n, 0.5) for n in nets])
    assert input_scale_of(scaled) == 0.5
    np.testing.assert_allclose(scaled.predict(2 * x, verbose=0), want, rtol=1e-5, atol=1e-6)
    with pytest.raises(br.ModelError, match="architecture"):
        weight_soup([nets[0], _dense_net(5, units=6)])
    with pytest.raises(ValueError, match="at least one"):
        weight_soup([])


def test_the_traced_inference_call_gives_the_eager_calls_numbers_and_sees_changed_weights(monkeypatch):
    import gc
    import weakref

    from badnet_repair.nets import models

    monkeypatch.setattr(models, "TRACE_AFTER", 100)
    keras.utils.set_random_seed(3)
    model = br.deepid(num_classes=9)
    x = random_faces(70, seed=8).astype(np.float64)  # the call casts to the model's float32, as Keras does
    eager = np.concatenate([keras.ops.convert_to_numpy(model(x[i:i + 32], training=False)) for i in range(0, 70, 32)])
    first = predict_probabilities(model, x, batch_size=32)  # 70 images: still the eager call
    assert models._COMPILED[model][1] is None
    np.testing.assert_array_equal(first, eager)
    np.testing.assert_array_equal(predict_probabilities(model, x, batch_size=32), eager)  # traced: same bits
    assert models._COMPILED[model][1] is not None and inference_call(model) is inference_call(model)
    assert (br.predict_classes(model, x, batch_size=32) == eager.argmax(axis=1)).all()
    zero_channels(model, "conv_3", range(60))  # weights changed in place
    changed = keras.ops.convert_to_numpy(model(x, training=False))
    np.testing.assert_array_equal(predict_probabilities(model, x), changed)
    assert not np.array_equal(changed, eager)
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None  # the cache does not keep the model alive


def test_layer_names_tensorflow_cannot_train_under_are_renamed_at_load(tmp_path, caplog):
    inp = keras.Input((12, 10, 3))
    h = keras.layers.Conv2D(4, 3, activation="relu", name="Conv 1!")(inp)
    h = keras.layers.Flatten(name="flat")(h)
    h = keras.layers.Dense(5, activation="relu", name="hidden dense")(h)
    h = keras.layers.Dense(3, activation="softmax", name="Conv_1_")(h)  # the sanitised name is taken
    model = keras.Model(inp, h)
    path = tmp_path / "odd.keras"
    model.save(path)
    with caplog.at_level("WARNING", logger="badnet_repair"):
        loaded = br.load_model(path)
    names = [lyr.name for lyr in loaded.layers]
    assert "Conv_1__2" in names and "hidden_dense" in names and "Conv_1_" in names and "flat" in names
    assert "'Conv 1!' -> 'Conv_1__2'" in caplog.text and str(path) in caplog.text
    x = np.random.default_rng(0).random((6, 12, 10, 3)).astype(np.float32)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), np.asarray(model(x)), rtol=1e-6)  # eager: no scope
    # trainable now: one step of fine-tuning on the renamed copy runs (the original name stops TensorFlow)
    loaded.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    loaded.fit(x, np.arange(6) % 3, epochs=1, verbose=0)
    fine = keras.Model(inp, keras.layers.Dense(3, name="fine.name-1")(keras.layers.Flatten()(inp)))
    assert with_trainable_names(fine) is fine  # valid names: the model itself
