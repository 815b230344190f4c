"""TSBD (defenses/tsbd.py): the neuron weight changes and the weights zeroed, the zeroing surgery
(nets/models.py's zero_kernel_entries), the unlearning and gradient-norm steps by hand, the
settings, and the defense on the small demo."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import keras
import numpy as np
import pytest
import tensorflow as tf

import badnet_repair as br
from badnet_repair.defenses import REGISTRY, make_defense
from badnet_repair.defenses.tsbd import (
    GradientAscentStep,
    GradientNormStep,
    TwoStageBackdoorDefense,
    input_units,
    neuron_layers,
    weight_changes,
    zero_masks,
)
from badnet_repair.errors import ModelError
from badnet_repair.nets.models import zero_kernel_entries
from badnet_repair.nets.trainer import training_model

from .conftest import LoggedRepair, assert_no_test_or_poisoned_image_is_read_while_repairing


def _tiny(seed: int = 0, dtype: str = "float32") -> keras.Model:
    """(2, 2, 2) -> 1x1 conv "conv" (3 channels, ReLU) -> flatten (12) -> dense "hidden" (2, ReLU)
    -> dense "output" (3, softmax): 2 conv neurons' worth of weights per channel, 12 per hidden unit."""
    keras.utils.set_random_seed(seed)
    x = keras.Input((2, 2, 2), dtype=dtype, name="input")
    h = keras.layers.Conv2D(3, 1, activation="relu", name="conv", dtype=dtype)(x)
    h = keras.layers.Flatten(name="flat", dtype=dtype)(h)
    h = keras.layers.Dense(2, activation="relu", name="hidden", dtype=dtype)(h)
    out = keras.layers.Dense(3, activation="softmax", name="output", dtype=dtype)(h)
    model = keras.Model(x, out, name="tiny")
    rng = np.random.default_rng(seed)
    model.set_weights([rng.normal(0.5, 0.3, w.shape).astype(dtype) for w in model.get_weights()])
    return model


def _weights(model: keras.Model) -> list[np.ndarray]:
    return [w.copy() for w in model.get_weights()]


def _data(n: int = 24, seed: int = 1) -> br.Dataset:
    x = np.random.default_rng(seed).uniform(0, 1, (n, 2, 2, 2)).astype(np.float32)
    return br.Dataset(x, np.arange(n) % 3, "clean")


def test_the_ranked_layers_are_the_conv_and_hidden_dense_ones_and_the_pixel_fed_ones_are_scaled():
    model = _tiny()
    assert neuron_layers(model) == ("conv", "hidden")  # the head "output" is not ranked
    assert input_units(model, 255.0) == {"conv": 255.0}
    assert input_units(model, 1.0) == {}
    assert input_units(br.with_input_scale(model, "1/255"), 255.0) == {}  # its conv sees 0..1 already
    assert input_units(br.with_input_scale(model, 0.5), 255.0) == {"conv": 127.5}


def test_neuron_weight_changes_and_the_weights_zeroed_by_hand():
    """Five neurons: conv channels c0, c1, c2 (2 weights each) and hidden units h0, h1 (12 each).

    |dW| of conv: input 0 -> [0.1, 0.01, 0.4], input 1 -> [0.3, 0.02, 0.05]: c0 0.4, c1 0.03, c2 0.45;
    hidden: h0 0.01 on each of 12 weights (0.12), h1 0.5 on one weight (0.5). The head changes most
    but is not ranked. n = 0.6: int(3.0) = 3 neurons, h1, c2, c0. Their 16 weights' changes pooled:
    0.5, eleven 0, 0.4, 0.05, 0.1, 0.3; m = 0.25: int(4.0) = 4, the threshold is the 4th largest, 0.1:
    h1's 0.5, c2's 0.4 (input 0), c0's 0.3 (input 1) and 0.1 (input 0) are zeroed.
    """
    before = _tiny()
    original = _weights(before)
    after = keras.models.clone_model(before)
    after.set_weights(before.get_weights())
    d_conv = np.array([[0.1, 0.01, 0.4], [0.3, 0.02, 0.05]], np.float32)
    d_hidden = np.zeros((12, 2), np.float32)
    d_hidden[:, 0] = 0.01
    d_hidden[5, 1] = 0.5
    conv, hidden, head = (after.get_layer(n).kernel for n in ("conv", "hidden", "output"))
    conv.assign(conv.numpy() - d_conv.reshape(1, 1, 2, 3))  # the sign does not matter
    hidden.assign(hidden.numpy() + d_hidden)
    head.assign(head.numpy() + 1.0)

    changes = weight_changes(before, after, neuron_layers(before))
    assert set(changes) == {"conv", "hidden"}
    np.testing.assert_allclose(changes["conv"].reshape(2, 3), d_conv, atol=1e-6)
    np.testing.assert_allclose(changes["hidden"], d_hidden, atol=1e-6)
    doubled = weight_changes(before, after, ["conv"], {"conv": 2.0})
    np.testing.assert_allclose(doubled["conv"], 2 * changes["conv"])

    choice = zero_masks(changes, neuron_ratio=0.6, weight_ratio=0.25)
    np.testing.assert_allclose(choice.scores["conv"], [0.4, 0.03, 0.45], atol=1e-6)
    np.testing.assert_allclose(choice.scores["hidden"], [0.12, 0.5], atol=1e-6)
    assert choice.neurons == (("hidden", 1), ("conv", 2), ("conv", 0))
    assert choice.threshold == pytest.approx(0.1, abs=1e-6)
    want_conv = np.zeros((1, 1, 2, 3), bool)
    want_conv[0, 0, 0, 2] = want_conv[0, 0, 1, 0] = want_conv[0, 0, 0, 0] = True
    want_hidden = np.zeros((12, 2), bool)
    want_hidden[5, 1] = True
    np.testing.assert_array_equal(choice.masks["conv"], want_conv)
    np.testing.assert_array_equal(choice.masks["hidden"], want_hidden)
    assert choice.zeroed == 4
    assert choice.summary() == {"neurons": {"hidden": 1, "conv": 2}, "neurons_total": 5, "weights_zeroed": 4,
                                "threshold": choice.threshold}

    fixed = zero_kernel_entries(before, choice.masks)
    for name, mask in (("conv", want_conv), ("hidden", want_hidden)):
        old, new = before.get_layer(name).kernel.numpy(), fixed.get_layer(name).kernel.numpy()
        assert np.all(new[mask] == 0.0) and np.all(old[mask] != 0.0)
        np.testing.assert_array_equal(new[~mask], old[~mask])
    for name in ("conv", "hidden", "output"):
        np.testing.assert_array_equal(fixed.get_layer(name).bias.numpy(), before.get_layer(name).bias.numpy())
    np.testing.assert_array_equal(fixed.get_layer("output").kernel.numpy(), before.get_layer("output").kernel.numpy())
    for w, w0 in zip(before.get_weights(), original, strict=True):
        np.testing.assert_array_equal(w, w0)  # the caller's model is untouched

    # nothing chosen: no neuron (int(5 x 0.1) = 0) or no weight (int(16 x 0.01) = 0)
    assert zero_masks(changes, 0.1, 0.7).masks == {} and zero_masks(changes, 0.6, 0.01).threshold is None
    with pytest.raises(ValueError, match="tsbd_neuron_ratio"):
        zero_masks(changes, 1.5, 0.7)


def test_zero_kernel_entries_zeroes_exactly_the_masked_entries_of_a_copy():
    model = _tiny()
    original = _weights(model)
    mask = np.zeros((12, 2), bool)
    mask[[0, 3, 11], [1, 0, 1]] = True
    out = zero_kernel_entries(model, {"hidden": mask})
    assert out is not model
    kernel = out.get_layer("hidden").kernel.numpy()
    assert np.all(kernel[mask] == 0.0)
    np.testing.assert_array_equal(kernel[~mask], original[2][~mask])
    for i, (w, w0) in enumerate(zip(out.get_weights(), original, strict=True)):
        if i != 2:  # every other weight is copied as it is
            np.testing.assert_array_equal(w, w0)
    for w, w0 in zip(model.get_weights(), original, strict=True):
        np.testing.assert_array_equal(w, w0)
    assert [w.shape for w in zero_kernel_entries(model, {}).get_weights()] == [w.shape for w in original]
    with pytest.raises(ModelError, match="no layer named 'nope'"):
        zero_kernel_entries(model, {"nope": mask})
    with pytest.raises(ModelError, match="no kernel"):
        zero_kernel_entries(model, {"flat": mask})
    with pytest.raises(ModelError, match="kernel's shape"):
        zero_kernel_entries(model, {"hidden": mask.T})
    with pytest.raises(ModelError, match="boolean"):
        zero_kernel_entries(model, {"hidden": mask.astype(np.float32)})


def _one_hot(n: int) -> np.ndarray:
    return np.eye(3, dtype=np.float32)[np.arange(n) % 3]


def _grads(model: keras.Model, x: np.ndarray, y: np.ndarray) -> tuple[float, list[np.ndarray]]:
    with tf.GradientTape() as tape:
        loss = keras.losses.CategoricalCrossentropy()(y, model(x, training=True))
    return float(loss), [g.numpy() for g in tape.gradient(loss, model.trainable_variables)]


def test_the_unlearning_step_by_hand():
    """One SGD step climbs: w + lr g, the pixel-fed kernel (scale s) w + lr g / s^2; with clipping,
    the gradient in the 0..1-pixel units (g / s for that kernel) is scaled to the clip norm first."""
    x = _data(8).x
    y = _one_hot(8)
    for clip in (None, 0.05):
        net = _tiny(seed=2)
        w0 = _weights(net)
        _, g = _grads(net, x, y)
        s = [2.0 if v is net.get_layer("conv").kernel else 1.0 for v in net.trainable_variables]
        scaled = [gi / si for gi, si in zip(g, s, strict=True)]
        norm = np.sqrt(sum(float(np.sum(gi ** 2)) for gi in scaled))
        factor = min(1.0, clip / norm) if clip else 1.0
        assert factor < 1.0 or clip is None
        want = [w + 0.1 * factor * gi / si for w, gi, si in zip(w0, scaled, s, strict=True)]
        work = training_model(net, step=GradientAscentStep({"conv": 2.0}, clipnorm=clip))
        work.compile(optimizer=keras.optimizers.SGD(0.1), loss="categorical_crossentropy",
                     metrics=["categorical_accuracy"])
        work.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
        for v, w in zip(net.trainable_variables, want, strict=True):
            np.testing.assert_allclose(v.numpy(), w, rtol=1e-5, atol=1e-6)


def test_the_gradient_norm_step_by_hand():
    """One SGD step: w - lr ((1 - alpha) g(w) + alpha g(w + e)), e = r / s g_l / |g_l| per tensor
    (s = 2 for the pixel-fed kernel, else 1); the history's loss is the loss at w."""
    x, y = _data(8).x, _one_hot(8)
    net = _tiny(seed=3)
    w0 = _weights(net)
    lr, r, alpha = 0.1, 0.05, 0.7
    loss0, g1 = _grads(net, x, y)
    s = [2.0 if v is net.get_layer("conv").kernel else 1.0 for v in net.trainable_variables]
    for v, w, gi, si in zip(net.trainable_variables, w0, g1, s, strict=True):
        v.assign(w + r / si * gi / np.linalg.norm(gi))
    _, g2 = _grads(net, x, y)
    want = [w - lr * ((1 - alpha) * a + alpha * b) for w, a, b in zip(w0, g1, g2, strict=True)]
    net.set_weights(w0)
    work = training_model(net, step=GradientNormStep(r, alpha, {"conv": 2.0}))
    work.compile(optimizer=keras.optimizers.SGD(lr), loss="categorical_crossentropy",
                 metrics=["categorical_accuracy"])
    h = work.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    for v, w in zip(net.trainable_variables, want, strict=True):
        np.testing.assert_allclose(v.numpy(), w, rtol=1e-5, atol=1e-6)
    assert h.history["loss"][0] == pytest.approx(loss0, rel=1e-5)
    with pytest.raises(ValueError, match="tsbd_radius"):
        GradientNormStep(0.0, 0.7)
    with pytest.raises(ValueError, match="tsbd_alpha"):
        GradientNormStep(0.05, 1.5)


def test_the_gradient_norm_step_is_the_penalised_loss_gradient_to_first_order():
    """For a small r, the step's gradient is the gradient of L + alpha r sum_l |dL/dW_l| / s_l
    (double back-propagation, in float64) up to O(r^2): here the penalty adds ~7 r to it, the
    finite difference misses ~0.2 r^2."""
    x, y = _data(8).x.astype(np.float64), _one_hot(8).astype(np.float64)
    net = _tiny(seed=4, dtype="float64")
    r, alpha, scales = 1e-5, 0.7, {"conv": 2.0}
    work = training_model(net, step=GradientNormStep(r, alpha, scales))
    work.compile(optimizer=keras.optimizers.SGD(0.1), loss=keras.losses.CategoricalCrossentropy(dtype="float64"))
    _, _, got = work.step.gradients(work, tf.constant(x), tf.constant(y))
    weights = net.trainable_variables
    s = [scales["conv"] if v is net.get_layer("conv").kernel else 1.0 for v in weights]
    with tf.GradientTape() as outer:
        with tf.GradientTape() as inner:
            loss = tf.reduce_mean(keras.losses.categorical_crossentropy(y, net(x, training=True)))
        g = inner.gradient(loss, weights)
        penalised = loss + alpha * r * tf.add_n([tf.norm(gi) / si for gi, si in zip(g, s, strict=True)])
    exact = outer.gradient(penalised, weights)
    penalty = max(float(np.max(np.abs(b.numpy() - p.numpy()))) for b, p in zip(exact, g, strict=True))
    missed = max(float(np.max(np.abs(a.numpy() - b.numpy()))) for a, b in zip(got, exact, strict=True))
    assert penalty > 1e-5 and missed < 1e-3 * penalty


def test_stage_one_zeroes_what_the_unlearned_copy_changed_most():
    model = _tiny(seed=5)
    original = _weights(model)
    clean = _data(24)
    d = TwoStageBackdoorDefense(tsbd_neuron_ratio=0.4, tsbd_unlearn_epochs=3, tsbd_unlearn_rate=0.05, shift=0,
                                flip=False, batch_size=8)
    net, record = d.reinitialize(model, clean, seed=3)
    unlearned, again = d.unlearn(model, clean, seed=3)
    assert 1 <= record["unlearn_epochs"] == again["unlearn_epochs"] == len(record["unlearning"]) <= 3
    assert record["unlearned_accuracy"] == again["unlearned_accuracy"]  # seeded: the same unlearning
    if record["unlearn_epochs"] < 3:
        assert record["unlearned_accuracy"] <= 10.0  # stopped by the accuracy, not the cap
    # pixels in 0..1 here: no layer is scaled
    choice = zero_masks(weight_changes(model, unlearned, neuron_layers(model)), 0.4, 0.7)
    assert choice.masks and record["weights_zeroed"] == choice.zeroed > 0
    assert record["neurons"] == choice.summary()["neurons"] and record["neurons_total"] == 5
    for name in ("conv", "hidden"):
        mask = choice.masks.get(name, np.zeros(model.get_layer(name).kernel.shape, bool))
        kernel = net.get_layer(name).kernel.numpy()
        assert np.all(kernel[mask] == 0.0)
        np.testing.assert_array_equal(kernel[~mask], model.get_layer(name).kernel.numpy()[~mask])
    np.testing.assert_array_equal(net.get_layer("output").kernel.numpy(), model.get_layer("output").kernel.numpy())
    for w, w0 in zip(model.get_weights(), original, strict=True):
        np.testing.assert_array_equal(w, w0)


def test_settings_are_checked():
    for bad, match in (({"tsbd_neuron_ratio": 1.5}, "tsbd_neuron_ratio"), ({"tsbd_neuron_ratio": -0.1},
                       "tsbd_neuron_ratio"), ({"tsbd_weight_ratio": 2.0}, "tsbd_weight_ratio"),
                       ({"tsbd_unlearn_rate": 0.0}, "tsbd_unlearn_rate"),
                       ({"tsbd_unlearn_accuracy": 120.0}, "tsbd_unlearn_accuracy"),
                       ({"tsbd_unlearn_epochs": 0}, "tsbd_unlearn_epochs"), ({"tsbd_radius": -1.0}, "tsbd_radius"),
                       ({"tsbd_alpha": 1.5}, "tsbd_alpha"), ({"pixel_scale": 0.0}, "pixel_scale"),
                       ({"epochs": 0}, "epochs"), ({"budget": -1.0}, "budget")):
        with pytest.raises(ValueError, match=match):
            TwoStageBackdoorDefense(**bad)
    d = TwoStageBackdoorDefense()
    assert TwoStageBackdoorDefense(**d.get_params()) == d
    assert d.step_cost() == 2.0 and TwoStageBackdoorDefense(tsbd_alpha=0.0).step_cost() == 1.0
    assert d.fixed_cost() == d.tsbd_unlearn_epochs  # stage 1's passes, at most


@pytest.fixture
def tsbd_registered():
    assert REGISTRY[TwoStageBackdoorDefense.name] is TwoStageBackdoorDefense  # registered with the package's defenses
    yield TwoStageBackdoorDefense


def test_the_registered_defense_is_made_by_name(tsbd_registered):
    d = make_defense("tsbd", tsbd_alpha=0.5, epochs=3)
    assert isinstance(d, TwoStageBackdoorDefense) and d.tsbd_alpha == 0.5 and d.epochs == 3
    with pytest.raises(ValueError, match="unknown setting"):
        make_defense("tsbd", alpha=0.5)  # FST's setting, not TSBD's


@dataclass(frozen=True)
class _LoggedTSBD(LoggedRepair, TwoStageBackdoorDefense):
    pass


def test_no_test_or_poisoned_image_is_read_while_tsbd_repairs(small_deepid):
    assert_no_test_or_poisoned_image_is_read_while_repairing(
        small_deepid, [_LoggedTSBD(epochs=1, shift=0, tsbd_unlearn_epochs=1)])


@pytest.mark.slow
def test_tsbd_lowers_attack_success_on_the_small_demo(small_demo):
    b = br.load_model(small_demo.model)
    valid = br.load_h5(small_demo.valid)
    weights = _weights(b)
    d = TwoStageBackdoorDefense(holdout_fraction=0.34)
    r = d.repair(b, valid)
    # only now is the poisoned set read
    bd = br.load_h5(small_demo.bd_test)
    before = br.attack_success_rate(br.predict_classes(b, bd.x), bd.y)
    after = br.attack_success_rate(br.predict_classes(r.model, bd.x), bd.y)
    assert before > 50.0 and after < before
    assert r.model is not b and r.defense == "tsbd"
    choices = r.record["choices"]
    (member,) = choices["members"]
    assert member["stage1"]["pixel_scale"] == 255.0 and member["fallback"] is None
    assert member["stage1"]["weights_zeroed"] > 0 and "conv_1" not in member["stage1"]["neurons"]
    for w, w0 in zip(b.get_weights(), weights, strict=True):
        np.testing.assert_array_equal(w, w0)  # the caller's BadNet is untouched
    assert dataclasses.asdict(d) == dataclasses.asdict(TwoStageBackdoorDefense(holdout_fraction=0.34))
