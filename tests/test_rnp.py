"""RNP (defenses/rnp.py): the masked forward pass, one recovering step against a finite
difference, the thresholds and the budget's fallback, the settings, and the defense on the small
demo (it lowers attack success and reads no test or poisoned image)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import keras
import numpy as np
import pytest

import badnet_repair as br
from badnet_repair.defenses import REGISTRY, make_defense
from badnet_repair.defenses.rnp import (
    ReconstructiveNeuronPruning,
    conv_neuron_layers,
    masked_values,
    neurons_at_most,
    recover_masks,
)
from badnet_repair.defenses.tsbd import TwoStageBackdoorDefense, clean_unlearning

from .conftest import LoggedRepair, assert_no_test_or_poisoned_image_is_read_while_repairing, random_faces


def _tiny(seed: int = 0) -> keras.Model:
    """(3, 3, 2) -> 2x2 conv "c1" (3 channels, ReLU) -> 2x2 conv "c2" (2, ReLU) -> flatten (2)
    -> dense "output" (3, softmax)."""
    keras.utils.set_random_seed(seed)
    x = keras.Input((3, 3, 2), name="input")
    h = keras.layers.Conv2D(3, 2, activation="relu", name="c1")(x)
    h = keras.layers.Conv2D(2, 2, activation="relu", name="c2")(h)
    h = keras.layers.Flatten(name="flat")(h)
    out = keras.layers.Dense(3, activation="softmax", name="output")(h)
    model = keras.Model(x, out, name="tiny")
    rng = np.random.default_rng(seed)
    model.set_weights([rng.normal(0.3, 0.4, w.shape).astype("float32") for w in model.get_weights()])
    return model


def _data(n: int = 12, seed: int = 1) -> br.Dataset:
    x = np.random.default_rng(seed).uniform(0, 1, (n, 3, 3, 2)).astype(np.float32)
    return br.Dataset(x, np.arange(n) % 3, "clean")


def _scaled(model: keras.Model, layer: str, unit: int, factor: float) -> keras.Model:
    """A copy of ``model`` with one neuron's kernel slice and bias times ``factor`` (the plain way)."""
    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    kernel, bias = copy.get_layer(layer).get_weights()
    kernel[..., unit] *= factor
    bias[unit] *= factor
    copy.get_layer(layer).set_weights([kernel, bias])
    return copy


def _mean_ce(model: keras.Model, data: br.Dataset) -> float:
    p = np.asarray(model.predict(data.x, verbose=0), np.float64)
    return float(-np.mean(np.log(p[np.arange(len(data)), data.y])))


def test_the_masked_layers_are_the_convolutions():
    assert conv_neuron_layers(_tiny()) == ("c1", "c2")


def test_the_masked_forward_pass_is_the_plain_network_with_each_neuron_scaled():
    import tensorflow as tf

    model, data = _tiny(), _data()
    m1 = np.array([1.0, 0.0, 0.5], np.float32)
    m2 = np.array([0.25, 1.0], np.float32)
    masks = {id(model.get_layer("c1").kernel): tf.constant(m1), id(model.get_layer("c1").bias): tf.constant(m1),
             id(model.get_layer("c2").kernel): tf.constant(m2), id(model.get_layer("c2").bias): tf.constant(m2)}
    probs, _ = model.stateless_call(masked_values(model.trainable_variables, masks),
                                    [v.value for v in model.non_trainable_variables], data.x, training=False)
    plain = model
    for layer, m in (("c1", m1), ("c2", m2)):
        for unit, factor in enumerate(m):
            plain = _scaled(plain, layer, unit, float(factor))
    np.testing.assert_allclose(np.asarray(probs), plain.predict(data.x, verbose=0), rtol=1e-5, atol=1e-6)


def test_one_recovering_step_descends_the_weighted_loss_by_its_finite_difference_gradient():
    model, data = _tiny(), _data()
    rate, alpha, eps = 0.5, 0.2, 1e-3
    masks, history = recover_masks(model, data, ("c1", "c2"), rate=rate, epochs=1, alpha=alpha,
                                   batch_size=len(data), shift=0, flip=False)
    assert len(history) == 1 and history[0]["loss"] == pytest.approx(alpha * _mean_ce(model, data), rel=1e-4)
    for layer in ("c1", "c2"):
        for unit in range(len(masks[layer])):
            # d(mean CE)/dm at m = 1, by central differences on the plain network
            grad = (_mean_ce(_scaled(model, layer, unit, 1 + eps), data)
                    - _mean_ce(_scaled(model, layer, unit, 1 - eps), data)) / (2 * eps)
            # SGD's first step (momentum starts at 0), then the clip to [0, 1]
            expected = float(np.clip(1.0 - rate * alpha * grad, 0.0, 1.0))
            assert masks[layer][unit] == pytest.approx(expected, abs=2e-3)
    assert any(m.min() < 1.0 for m in masks.values())  # the step moved something


def test_neurons_at_or_below_a_threshold_and_the_fallback_thresholds():
    masks = {"a": np.array([0.0, 0.3, 0.15]), "b": np.array([0.9, 0.2])}
    assert neurons_at_most(masks, 0.2) == {"a": (0, 2), "b": (1,)}
    assert neurons_at_most(masks, 0.1) == {"a": (0,)}
    assert neurons_at_most(masks, -0.1) == {}
    assert ReconstructiveNeuronPruning().thresholds() == pytest.approx((0.2, 0.15, 0.1, 0.05, 0.0))
    assert ReconstructiveNeuronPruning(rnp_threshold=0.12).thresholds() == pytest.approx((0.12, 0.1, 0.05, 0.0))


def test_the_shared_unlearning_is_tsbds_own():
    model, data = _tiny(), _data(24)
    d = TwoStageBackdoorDefense(tsbd_unlearn_epochs=2, shift=0, flip=False, batch_size=8)
    a, rec_a = d.unlearn(model, data, seed=3)
    b, rec_b = clean_unlearning(model, data, rate=d.tsbd_unlearn_rate, stop_accuracy=d.tsbd_unlearn_accuracy,
                                max_epochs=2, clipnorm=d.clipnorm, batch_size=8, shift=0, flip=False,
                                scales=d.scales(model, data), seed=3)
    for wa, wb in zip(a.get_weights(), b.get_weights(), strict=True):
        np.testing.assert_array_equal(wa, wb)
    assert rec_a == rec_b and rec_a["unlearn_epochs"] >= 1


@dataclass(frozen=True)
class _FixedMasks(ReconstructiveNeuronPruning):
    """RNP with its masks given (steps 2 and 3 skipped), to test the pruning and the budget alone."""

    def masks(self, model, tune, *, progress=False):  # type: ignore[no-untyped-def]
        masks = {name: np.ones(int(model.get_layer(name).kernel.shape[-1])) for name in conv_neuron_layers(model)}
        masks["conv_1"][:] = 0.15  # every conv_1 neuron: pruning them all breaks the network
        masks["conv_3"][7] = 0.05  # one conv_3 neuron
        return masks, {"unlearning": [], "recovering": []}


def test_pruning_falls_back_to_a_lower_threshold_within_the_budget_and_says_so(small_deepid):
    x = random_faces(60, seed=5)
    y = br.predict_classes(small_deepid, x)
    from badnet_repair.nets.models import zero_channels

    broken = keras.models.clone_model(small_deepid)
    broken.set_weights(small_deepid.get_weights())
    zero_channels(broken, "conv_1", range(20))
    keep = br.predict_classes(broken, x) != y  # images the broken network gets wrong, B right
    clean = br.Dataset(x[keep], y[keep], "valid")
    assert len(clean) >= 20
    weights = [w.copy() for w in small_deepid.get_weights()]
    r = _FixedMasks(budget=3.0).repair(small_deepid, clean)
    choices = r.record["choices"]
    # 0.2 and 0.15 prune the same 21 neurons (tried once), far below B; 0.1 prunes the conv_3 neuron alone
    assert [t["threshold"] for t in choices["tried"]][:2] == pytest.approx([0.2, 0.1])
    assert choices["tried"][0]["neurons"] == 21 and choices["tried"][0]["holdout_accuracy"] == 0.0
    if choices["fallback"] == "pruning at mask <= 0.1":
        assert choices["threshold"] == pytest.approx(0.1) and choices["neurons_pruned"] == {"conv_3": [7]}
        assert r.models[0].channels_pruned == 1
        kernel = r.model.get_layer("conv_3").get_weights()[0]
        assert not kernel[..., 7].any() and kernel[..., 6].any()
        # a fallback chosen on a dozen held-out images: the bound on its drop says they are too few
        assert len(r.warnings) == 2 and r.warnings[1].startswith("CAUTION: the pruning at mask <= 0.1 that rnp")
    else:  # the one neuron also fell past the budget on these images: B comes back
        assert choices["fallback"] == "B" and r.model is small_deepid
        assert len(r.warnings) == 1
    assert "rnp fell" in r.warnings[0] and "budget of 3" in r.warnings[0]
    for w, w0 in zip(small_deepid.get_weights(), weights, strict=True):
        np.testing.assert_array_equal(w, w0)  # the caller's BadNet is untouched


def test_without_a_budget_the_threshold_is_kept_whatever_it_costs(small_deepid):
    x = random_faces(30, seed=6)
    clean = br.Dataset(x, br.predict_classes(small_deepid, x), "valid")
    r = _FixedMasks(budget=None).repair(small_deepid, clean)
    choices = r.record["choices"]
    assert choices["threshold"] == pytest.approx(0.2) and r.warnings == ()
    assert choices["neurons_pruned"] == {"conv_1": list(range(20)), "conv_3": [7]}
    assert not r.model.get_layer("conv_1").get_weights()[0].any()


def test_where_no_mask_is_low_enough_b_comes_back_with_a_loud_line(small_deepid):
    x = random_faces(30, seed=6)
    clean = br.Dataset(x, br.predict_classes(small_deepid, x), "valid")
    r = _FixedMasks(rnp_threshold=0.01).repair(small_deepid, clean)  # the lowest mask is 0.05
    assert r.model is small_deepid and r.models[0].channels_pruned == 0
    assert r.record["choices"]["threshold"] == pytest.approx(0.01) and r.record["choices"]["neurons_pruned"] == {}
    assert len(r.warnings) == 1 and "nothing pruned" in r.warnings[0] and "NOT removed" in r.warnings[0]


def test_settings_are_checked_and_the_defense_is_registered():
    for bad in (dict(rnp_threshold=1.5), dict(rnp_alpha=0), dict(rnp_recover_epochs=0), dict(holdout_fraction=1.0),
                dict(rnp_unlearn_accuracy=101), dict(budget=-1), dict(shift=-1), dict(rnp_threshold_step=0)):
        with pytest.raises(ValueError):
            ReconstructiveNeuronPruning(**bad)
    assert REGISTRY["rnp"] is ReconstructiveNeuronPruning
    d = make_defense("rnp", rnp_threshold=0.3)
    assert isinstance(d, ReconstructiveNeuronPruning) and d.rnp_threshold == 0.3
    with pytest.raises(ValueError, match="unknown setting"):
        make_defense("rnp", epochs=3)  # a fine-tuning setting, not RNP's


@dataclass(frozen=True)
class _LoggedRNP(LoggedRepair, ReconstructiveNeuronPruning):
    pass


def test_no_test_or_poisoned_image_is_read_while_rnp_repairs(small_deepid):
    assert_no_test_or_poisoned_image_is_read_while_repairing(
        small_deepid, [_LoggedRNP(rnp_unlearn_epochs=1, rnp_recover_epochs=1, shift=0)])


@pytest.mark.slow
def test_rnp_lowers_attack_success_on_the_small_demo(small_demo):
    b = br.load_model(small_demo.model)
    valid = br.load_h5(small_demo.valid)
    weights = [w.copy() for w in b.get_weights()]
    # a few images: one batch an epoch, so a faster unlearning than the default's
    d = ReconstructiveNeuronPruning(holdout_fraction=0.34, budget=None, rnp_unlearn_rate=1e-2)
    r = d.repair(b, valid)
    # only now is the poisoned set read
    bd = br.load_h5(small_demo.bd_test)
    before = br.attack_success_rate(br.predict_classes(b, bd.x), bd.y)
    after = br.attack_success_rate(br.predict_classes(r.model, bd.x), bd.y)
    assert before > 50.0 and after < before
    choices = r.record["choices"]
    assert r.defense == "rnp" and r.models[0].channels_pruned > 0 and choices["unlearned_accuracy"] <= 20.0
    assert set(choices["masks"]) == {"conv_1", "conv_2", "conv_3", "conv_4"}
    for w, w0 in zip(b.get_weights(), weights, strict=True):
        np.testing.assert_array_equal(w, w0)  # the caller's BadNet is untouched
    assert dataclasses.asdict(d) == dataclasses.asdict(
        ReconstructiveNeuronPruning(holdout_fraction=0.34, budget=None, rnp_unlearn_rate=1e-2))
