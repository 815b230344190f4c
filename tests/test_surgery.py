"""Pruning surgery on any Keras CNN: BatchNormalization, separate activations, skip connections."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from keras import layers

import badnet_repair as br
from badnet_repair.nets.models import (
    channel_chain,
    classifier_head,
    crossing_tensors,
    default_conv_layer,
    reinitialize_head,
)


def _bn_net(*, separate_activation: bool = False, scale: bool = True, center: bool = True) -> keras.Model:
    """(6, 6, 2) -> conv "c1" (4) -> BN -> relu -> conv "c2" (5, 1x1) -> BN "bn2" -> relu
    -> 2x2 max pool -> flatten -> dense (3), with BN statistics far from identity."""
    keras.utils.set_random_seed(3)
    x = keras.Input((6, 6, 2), name="input")
    h = layers.Conv2D(4, 3, padding="same", activation="relu", name="c1")(x)
    h = layers.BatchNormalization(name="bn1")(h)
    if separate_activation:
        h = layers.Conv2D(5, 1, name="c2")(h)
        h = layers.BatchNormalization(name="bn2", scale=scale, center=center)(h)
        h = layers.Activation("relu", name="act2")(h)
    else:
        h = layers.Conv2D(5, 1, name="c2")(h)
        h = layers.BatchNormalization(name="bn2", scale=scale, center=center)(h)
        h = layers.ReLU(name="act2")(h)
    h = layers.MaxPooling2D(2, name="pool")(h)
    out = layers.Dense(3, activation="softmax", name="output")(layers.Flatten(name="flat")(h))
    m = keras.Model(x, out, name="bn_net")
    for bn in ("bn1", "bn2"):
        lyr = m.get_layer(bn)
        rng = np.random.default_rng(len(bn))
        n = lyr.moving_mean.shape[0]
        if lyr.gamma is not None:
            lyr.gamma.assign(rng.uniform(0.5, 2.0, n).astype("float32"))
        if lyr.beta is not None:
            lyr.beta.assign(rng.uniform(0.5, 1.5, n).astype("float32"))
        lyr.moving_mean.assign(rng.uniform(-1.0, 1.0, n).astype("float32"))
        lyr.moving_variance.assign(rng.uniform(0.5, 2.0, n).astype("float32"))
    return m


def _residual_net() -> keras.Model:
    """A ResNet-style block whose identity skip connection goes around the pruned conv "c2":
    conv "c1" -> BN -> relu "r1" -> conv "c2" -> BN "bn2" -> add(r1's output) -> relu ->
    global average pool -> dense."""
    keras.utils.set_random_seed(4)
    x = keras.Input((6, 6, 2), name="input")
    skip = layers.ReLU(name="r1")(layers.BatchNormalization(name="bn1")(layers.Conv2D(4, 3, padding="same",
                                                                                     name="c1")(x)))
    h = layers.BatchNormalization(name="bn2")(layers.Conv2D(4, 3, padding="same", name="c2")(skip))
    h = layers.ReLU(name="out_relu")(layers.Add(name="add")([h, skip]))
    out = layers.Dense(3, activation="softmax", name="output")(layers.GlobalAveragePooling2D(name="gap")(h))
    m = keras.Model(x, out, name="res_net")
    bn = m.get_layer("bn2")
    bn.beta.assign(np.full(4, 0.7, "float32"))
    bn.moving_mean.assign(np.full(4, -0.3, "float32"))
    # a classifier centred on the inputs' features, so they spread over the classes and
    # pruning can change answers
    feats = keras.ops.convert_to_numpy(keras.Model(x, m.get_layer("gap").output)(_inputs(60, seed=1)))
    w = np.random.default_rng(4).normal(0.0, 1.0, (4, 3)) / (feats.std(axis=0).mean() + 1e-6)
    m.get_layer("output").set_weights([w.astype("float32"), (-(feats @ w).mean(axis=0)).astype("float32")])
    return m


def _inputs(n: int = 40, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 6, 6, 2)).astype("float32")


def _chain_end_output(model: keras.Model, layer: str, x: np.ndarray) -> np.ndarray:
    end = channel_chain(model, layer).end
    return keras.ops.convert_to_numpy(keras.Model(model.inputs[0], end.output)(x, training=False))


def test_bn_chain_by_hand():
    """1x1 conv c then BN: pruning only the kernel and bias would leave the channel at
    beta - gamma * mean / sqrt(var + eps); the chain's BN is zeroed too, so it is 0."""
    x = keras.Input((1, 1, 1), name="input")
    c = layers.Conv2D(2, 1, name="c")(x)
    b = layers.BatchNormalization(name="bn", epsilon=0.0)(c)
    m = keras.Model(x, layers.Flatten()(b))
    m.get_layer("c").set_weights([np.array([[[[1.0, 2.0]]]], "float32"), np.array([1.0, 1.0], "float32")])
    bn = m.get_layer("bn")
    bn.set_weights([np.array([2.0, 3.0], "float32"), np.array([1.0, 1.0], "float32"),
                    np.array([0.5, 0.5], "float32"), np.array([4.0, 4.0], "float32")])
    one = np.ones((1, 1, 1, 1), "float32")
    # c = [2, 3]; bn = gamma * (c - 0.5) / 2 + 1 = [2 * 1.5 / 2 + 1, 3 * 2.5 / 2 + 1]
    np.testing.assert_allclose(m.predict(one, verbose=0), [[2.5, 4.75]])
    pruned = br.prune_channels(m, "c", [1])
    np.testing.assert_array_equal(pruned.predict(one, verbose=0), [[2.5, 0.0]])
    assert [lyr.name for lyr in channel_chain(m, "c").layers] == ["bn"]
    np.testing.assert_allclose(m.predict(one, verbose=0), [[2.5, 4.75]])  # caller's model untouched


@pytest.mark.parametrize(("separate", "scale", "center"), [(False, True, True), (True, True, True),
                                                           (True, False, True), (True, True, False)])
def test_pruned_channel_is_zero_after_bn_and_activation(separate, scale, center):
    m = _bn_net(separate_activation=separate, scale=scale, center=center)
    chain = channel_chain(m, "c2")
    assert [lyr.name for lyr in chain.layers] == ["bn2", "act2"]
    x = _inputs()
    before = _chain_end_output(m, "c2", x)
    assert np.all(before[..., [1, 3]].max(axis=(1, 2)) > 0)  # they were active
    pruned = br.prune_channels(m, "c2", [1, 3])
    after = _chain_end_output(pruned, "c2", x)
    assert np.all(after[..., [1, 3]] == 0.0)
    np.testing.assert_allclose(after[..., [0, 2, 4]], before[..., [0, 2, 4]], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(chain.pruned_value(), np.zeros(5, "float32"))


def test_pruned_channel_is_zero_in_training_mode_too():
    """Fine-tuning runs BN on batch statistics: the channel must stay zero there as well."""
    pruned = br.prune_channels(_bn_net(), "c2", [2])
    end = channel_chain(pruned, "c2").end
    out = keras.ops.convert_to_numpy(keras.Model(pruned.inputs[0], end.output)(_inputs(), training=True))
    assert np.all(out[..., 2] == 0.0)


def _fast_equals_plain(model: keras.Model, layer: str | None, x: np.ndarray, y: np.ndarray) -> br.SweepResult:
    valid = br.Dataset(x, y, "valid")
    fast = br.prune_sweep(model, valid, layer=layer, thresholds=[5], engine="fast")
    plain = br.prune_sweep(model, valid, layer=layer, thresholds=[5], engine="plain", ranking=fast.ranking)
    np.testing.assert_array_equal(fast.predictions["valid"], plain.predictions["valid"])
    return fast


@pytest.mark.parametrize("separate", [False, True])
def test_fast_sweep_equals_plain_on_a_bn_network(separate):
    m = _bn_net(separate_activation=separate)
    x = _inputs(60)
    y = br.predict_classes(m, x)
    fast = _fast_equals_plain(m, "c2", x, y)
    assert fast.ranking.measured_at == "pool"  # the pooling after the chain, as pool_3 in DeepID
    assert len(set(fast.predictions["valid"][-1].tolist())) >= 1
    assert np.any(fast.predictions["valid"][1:] != fast.predictions["valid"][0])  # pruning changed something


def test_fast_sweep_equals_plain_around_a_skip_connection():
    m = _residual_net()
    cut = channel_chain(m, "c2").end.output
    assert [t is m.get_layer("r1").output for t in crossing_tensors(m, cut)] == [True]
    x = _inputs(60, seed=1)
    y = br.predict_classes(m, x)
    fast = _fast_equals_plain(m, "c2", x, y)
    assert fast.ranking.measured_at == "bn2"  # no pooling after the chain: ranked at its end
    assert np.any(fast.predictions["valid"][1:] != fast.predictions["valid"][0])
    # the pruned channels' BN output is zero in the pruned model; the skip still flows
    pruned = br.prune_channels(m, "c2", fast.ranking.order[:3])
    assert np.all(_chain_end_output(pruned, "c2", x)[..., fast.ranking.order[:3]] == 0.0)


def test_default_layer_is_found_from_the_graph():
    assert default_conv_layer(br.deepid(num_classes=5)) == "conv_3"  # conv_3 -> pool_3; conv_4 is not pooled
    assert default_conv_layer(_bn_net()) == "c2"
    assert default_conv_layer(_residual_net()) == "c2"  # no pooled conv: the last one in graph order
    x = keras.Input((4, 4, 1))
    dense_only = keras.Model(x, layers.Dense(2)(layers.Flatten()(x)))
    with pytest.raises(br.ModelError, match="no convolution"):
        default_conv_layer(dense_only)


def test_sweep_default_layer_on_deepid_is_conv_3(small_deepid):
    x = np.random.default_rng(2).uniform(0, 255, (20, 55, 47, 3)).astype("float32")
    r = br.rank_channels(small_deepid, x)
    assert r.layer == "conv_3" and r.measured_at == "pool_3"


def test_shared_convs_are_refused():
    x = keras.Input((4, 4, 2))
    conv = layers.Conv2D(2, 1, padding="same", name="shared")
    m = keras.Model(x, layers.Flatten()(conv(conv(x))))
    with pytest.raises(br.ModelError, match="shared"):
        br.prune_channels(m, "shared", [0])


def _sampled_steps_equal(model: keras.Model, x: np.ndarray) -> str:
    """The fast sweep on the default layer, checked against plain pruned copies at sampled steps."""
    y = br.predict_classes(model, x)
    sweep = br.prune_sweep(model, br.Dataset(x, y, "valid"), thresholds=[5])
    order = sweep.ranking.order
    for k in (1, len(order) // 3, len(order) - 1, len(order)):
        pruned = br.prune_channels(model, sweep.layer, order[:k])
        np.testing.assert_array_equal(sweep.predictions["valid"][k], br.predict_classes(pruned, x), err_msg=f"{k}")
        end = _chain_end_output(pruned, sweep.layer, x)
        assert np.all(end[..., order[:k]] == 0.0)
    return sweep.layer


@pytest.mark.slow
def test_keras_applications_mobilenetv2_and_resnet50():
    x = np.random.default_rng(5).uniform(-1, 1, (6, 32, 32, 3)).astype("float32")
    keras.utils.set_random_seed(5)
    mobile = keras.applications.MobileNetV2(input_shape=(32, 32, 3), alpha=0.35, weights=None, classes=3)
    assert _sampled_steps_equal(mobile, x) == "Conv_1"  # Conv_1 -> BN -> ReLU6 -> global pooling
    resnet = keras.applications.ResNet50(input_shape=(32, 32, 3), weights=None, classes=3)
    assert _sampled_steps_equal(resnet, x) == "conv5_block3_3_conv"  # its BN output meets the skip in an Add


def test_the_classifier_head_is_found_from_the_graph(small_deepid):
    assert classifier_head(small_deepid).name == "output"
    # a separate softmax and dropout after the Dense layer, which is not the last layer made
    x = keras.Input((6, 6, 2))
    h = layers.Flatten()(layers.Conv2D(3, 3, name="c")(x))
    scores = layers.Dense(4, name="scores")(h)
    other = layers.Dense(4, name="unused_later")(h)
    out = layers.Softmax(name="soft")(layers.Dropout(0.1)(scores))
    net = keras.Model(x, [out])
    del other
    assert classifier_head(net).name == "scores"
    assert classifier_head(net, "scores").name == "scores"
    with pytest.raises(br.ModelError, match="'c' .* Conv2D, not the Dense layer"):
        classifier_head(net, "c")
    with pytest.raises(br.ModelError, match="no layer named 'nope'"):
        classifier_head(net, "nope")
    # a model whose output is made by a conv layer has no head to find
    conv_out = keras.Model(x, layers.GlobalAveragePooling2D()(layers.Conv2D(4, 3)(x)))
    with pytest.raises(br.ModelError, match="no Dense layer makes its output"):
        classifier_head(conv_out)


def test_reinitialize_head_draws_within_the_fan_in_bound(small_deepid):
    net = keras.models.clone_model(small_deepid)
    net.set_weights(small_deepid.get_weights())
    before = [w.copy() for w in net.get_layer("output").get_weights()]
    name, old = reinitialize_head(net, seed=3)
    assert name == "output"
    np.testing.assert_array_equal(old, before[0])
    kernel, bias = net.get_layer("output").get_weights()
    bound = 1 / np.sqrt(before[0].shape[0])
    assert np.abs(kernel).max() <= bound and np.abs(bias).max() <= bound
    assert not np.allclose(kernel, before[0]) and np.abs(kernel).max() > 0.9 * bound
    _, again = reinitialize_head(keras.models.clone_model(small_deepid), seed=3)
    np.testing.assert_array_equal(small_deepid.get_layer("output").get_weights()[0], before[0])  # caller's untouched
    del again
