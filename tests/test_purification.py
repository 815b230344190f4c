"""The purification defenses without BatchNorm: I-BAU (defenses/ibau.py), FT-SAM, FST and FST
with fine-pruning (defenses/sam.py, defenses/fst.py: SharpnessAwareStep and FeatureShift on the trainer)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import keras
import numpy as np
import pytest
import tensorflow as tf

import badnet_repair as br
from badnet_repair.defenses import (
    IBAU,
    FeatureShiftFinePruning,
    FeatureShiftTuning,
    FinePruning,
    FineTuningSAM,
)
from badnet_repair.defenses.fst import FeatureShift
from badnet_repair.defenses.ibau import implicit_hypergradient
from badnet_repair.defenses.sam import SharpnessAwareStep
from badnet_repair.nets.trainer import training_model

from .conftest import LoggedRepair, assert_no_test_or_poisoned_image_is_read_while_repairing, random_faces


def _linear(seed: int = 0) -> keras.Model:
    """(2, 2, 1) images -> flatten -> softmax over 3 classes: 15 weights, small enough for
    explicit Jacobians."""
    keras.utils.set_random_seed(seed)
    x = keras.Input((2, 2, 1))
    out = keras.layers.Dense(3, activation="softmax", name="output")(keras.layers.Flatten()(x))
    return keras.Model(x, out)


def test_implicit_hypergradient_matches_the_explicit_jacobians():
    """The fixed-point hypergradient equals dL/dtheta + M^T sum_k (J^T)^k g computed from the
    explicit Jacobians J = dPhi/ddelta (4 x 4) and M = dPhi/dtheta (4 x 15)."""
    model = _linear()
    rng = np.random.default_rng(0)
    x_in, y_in = tf.constant(rng.normal(size=(6, 2, 2, 1)), tf.float32), tf.constant([0, 1, 2, 0, 1, 2])
    x_out, y_out = tf.constant(rng.normal(size=(5, 2, 2, 1)), tf.float32), tf.constant([2, 2, 1, 0, 0])
    delta = tf.constant(rng.normal(size=(1, 2, 2, 1)) * 0.3, tf.float32)
    scale, reg, a, steps = 2.0, 0.05, 0.3, 7
    theta = model.trainable_variables

    def outer_loss(d: Any) -> Any:
        p = model(x_out + scale * d)
        return tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(y_out, p))

    got = implicit_hypergradient(model, delta, outer_loss, x_in, y_in, scale=scale, regularization=reg,
                                 fixed_point_lr=a, fixed_point_steps=steps)

    def phi(d: Any) -> Any:
        with tf.GradientTape() as t:
            t.watch(d)
            p = model(x_in + scale * d)
            inner = -tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(y_in, p)) + reg * tf.reduce_sum(d * d)
        return d - a * t.gradient(inner, d)

    with tf.GradientTape(persistent=True) as t:
        t.watch(delta)
        mapped = tf.reshape(phi(delta), [-1])
    jac = t.jacobian(mapped, delta).numpy().reshape(4, 4)  # J[i, j] = dPhi_i / ddelta_j
    mixed = [t.jacobian(mapped, w).numpy().reshape(4, -1) for w in theta]
    with tf.GradientTape(persistent=True) as t:
        t.watch(delta)
        loss = outer_loss(delta)
    g = t.gradient(loss, delta).numpy().reshape(4)
    v = np.zeros(4)
    for _ in range(steps):
        v = jac.T @ v + g
    for w, m, mine in zip(theta, mixed, got, strict=True):
        want = t.gradient(loss, w).numpy().reshape(-1) + m.T @ v
        np.testing.assert_allclose(np.asarray(mine).reshape(-1), want, rtol=1e-4, atol=1e-6)


def test_a_sharpness_aware_step_by_hand():
    """One SGD step with SAM's step = the plain gradient taken at w + rho T^2 g / |T g|."""
    for adaptive in (False, True):
        net = _linear(seed=1)
        x = np.random.default_rng(2).normal(size=(8, 2, 2, 1)).astype(np.float32)
        y = np.eye(3, dtype=np.float32)[[0, 1, 2, 0, 1, 2, 0, 1]]
        w0 = [w.numpy() for w in net.trainable_variables]
        loss_fn = keras.losses.CategoricalCrossentropy()

        def grads_at(weights: list[np.ndarray], net: keras.Model, x: np.ndarray, y: np.ndarray,
                     loss_fn: Any) -> list[np.ndarray]:
            for v, w in zip(net.trainable_variables, weights, strict=True):
                v.assign(w)
            with tf.GradientTape() as t:
                loss = loss_fn(y, net(x))
            return [g.numpy() for g in t.gradient(loss, net.trainable_variables)]

        g = grads_at(w0, net, x, y, loss_fn)
        scale = [np.abs(w) if adaptive else np.ones_like(w) for w in w0]
        norm = np.sqrt(sum(float(np.sum((s * gi) ** 2)) for s, gi in zip(scale, g, strict=True)))
        worst = [w + 0.5 * s * s * gi / norm for w, s, gi in zip(w0, scale, g, strict=True)]
        want = [w - 0.1 * gi for w, gi in zip(w0, grads_at(worst, net, x, y, loss_fn), strict=True)]
        for v, w in zip(net.trainable_variables, w0, strict=True):
            v.assign(w)
        sam = training_model(net, step=SharpnessAwareStep(rho=0.5, adaptive=adaptive))
        sam.compile(optimizer=keras.optimizers.SGD(0.1), loss="categorical_crossentropy",
                    metrics=["categorical_accuracy"])
        h = sam.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
        assert "categorical_accuracy" in h.history and "loss" in h.history
        for v, w in zip(net.trainable_variables, want, strict=True):
            np.testing.assert_allclose(v.numpy(), w, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="rho"):
        SharpnessAwareStep(rho=0.0)


def test_a_feature_shift_step_by_hand():
    """One SGD step: K <- K - lr (dCE/dK + alpha / C K0) with C = 3 classes, then K rescaled to
    |K0|; the bias takes a plain step (the penalty is on the kernel only)."""
    net = _linear(seed=4)
    x = np.random.default_rng(5).normal(size=(8, 2, 2, 1)).astype(np.float32)
    y = np.eye(3, dtype=np.float32)[[0, 1, 2, 0, 1, 2, 0, 1]]
    k0 = net.get_layer("output").kernel.numpy()
    lr, alpha = 0.1, 0.7
    fst = FeatureShift("output", alpha, seed=0)
    fst.begin(net)  # the head drawn anew; k0 kept
    np.testing.assert_array_equal(fst.original, k0)
    assert not np.allclose(net.get_layer("output").kernel.numpy(), k0)
    kernel, bias = (v.numpy() for v in net.trainable_variables)
    with tf.GradientTape() as t:
        loss = keras.losses.CategoricalCrossentropy()(y, net(x))
    gk, gb = (g.numpy() for g in t.gradient(loss, net.trainable_variables))
    stepped = kernel - lr * (gk + alpha / 3 * k0)
    want_kernel = stepped * np.linalg.norm(k0) / np.linalg.norm(stepped)
    want_bias = bias - lr * gb
    model = training_model(net, [fst])
    model.compile(optimizer=keras.optimizers.SGD(lr), loss="categorical_crossentropy", metrics=["categorical_accuracy"])
    h = model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    np.testing.assert_allclose(net.get_layer("output").kernel.numpy(), want_kernel, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(net.get_layer("output").bias.numpy(), want_bias, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(h.history["loss"][0], float(loss), rtol=1e-5)  # the task's loss, as fine-tuning's
    with pytest.raises(ValueError, match="alpha"):
        FeatureShift("output", -0.5, seed=0)


def test_settings_are_checked(small_deepid):
    clean = br.Dataset(random_faces(10, seed=1), np.arange(10) % 7, "clean")
    for bad, match in (({"rounds": 0}, "rounds"), ({"portion": 2.0}, "portion"),
                       ({"fixed_point_steps": 0}, "fixed_point_steps")):
        with pytest.raises(ValueError, match=match):
            br.ibau_unlearn(small_deepid, clean, **bad)


@pytest.mark.slow
def test_each_purification_defense_lowers_attack_success(small_demo):
    b = br.load_model(small_demo.model)
    valid = br.load_h5(small_demo.valid)
    bd = br.load_h5(small_demo.bd_test)
    before = br.attack_success_rate(br.predict_classes(b, bd.x), bd.y)
    assert before > 50.0
    weights = [w.copy() for w in b.get_weights()]
    # the algorithms themselves, without the clean-accuracy budget's fallback to B
    off = {"holdout_fraction": 0.34, "budget": None}
    for d in (IBAU(rounds=3, **off), FineTuningSAM(epochs=8, **off), FeatureShiftTuning(epochs=8, **off),
              FeatureShiftFinePruning(epochs=8, members=1, **off)):
        r = d.repair(b, valid)
        after = br.attack_success_rate(br.predict_classes(r.model, bd.x), bd.y)
        assert after < before, d.name
        assert r.model is not b and r.defense == d.name
        choices = r.record["choices"]
        assert {"i-bau": "holdout_accuracy", "fst-fp": "fst"}.get(d.name, "members") in choices
    for w, w0 in zip(b.get_weights(), weights, strict=True):
        np.testing.assert_array_equal(w, w0)  # the caller's BadNet is untouched


@dataclass(frozen=True)
class _LoggedIBAU(LoggedRepair, IBAU):
    pass


@dataclass(frozen=True)
class _LoggedSAM(LoggedRepair, FineTuningSAM):
    pass


@dataclass(frozen=True)
class _LoggedFST(LoggedRepair, FeatureShiftTuning):
    pass


@dataclass(frozen=True)
class _LoggedFSTFP(LoggedRepair, FeatureShiftFinePruning):
    pass


def test_no_test_or_poisoned_image_is_read_while_a_purification_defense_repairs(small_deepid):
    assert_no_test_or_poisoned_image_is_read_while_repairing(
        small_deepid, [_LoggedIBAU(rounds=1, fixed_point_steps=1), _LoggedSAM(epochs=1, shift=0),
                       _LoggedFST(epochs=1, shift=0), _LoggedFSTFP(epochs=1, shift=0, members=1)])


@pytest.mark.slow
def test_fst_with_fine_pruning_is_the_geometric_mean_of_the_two_defenses_networks(small_deepid):
    """FST-FP's parts are exactly FST's and fine-pruning's networks with the same settings, and
    its output is their normalised product, computed here in numpy."""
    x = random_faces(42, seed=8)
    clean = br.Dataset(x, np.arange(42) % 7, "valid")
    common = {"epochs": 1, "shift": 0, "members": 2, "seed": 3, "holdout_fraction": 0.34}
    weights = [w.copy() for w in small_deepid.get_weights()]
    r = FeatureShiftFinePruning(head_epochs=1, **common).repair(small_deepid, clean)
    shifted = FeatureShiftTuning(head_epochs=1, **common).repair(small_deepid, clean)
    pruned = FinePruning(distill=0.3, weight_decay=1.0, **common).repair(small_deepid, clean)
    assert r.record["choices"]["fst"] == shifted.record["choices"]["members"]
    assert r.record["choices"]["fine-pruning"] == pruned.record["choices"]["members"]
    probe = random_faces(9, seed=9)
    parts = [m.model for part in ("fst", "fine-pruning") for m in r.artifacts[part].members]
    assert len(parts) == 4
    # floored as the layer floors them: a random DeepID on 0..255 pixels gives exact zeros
    log_p = sum(np.log(np.maximum(np.asarray(m.predict(probe, verbose=0), np.float64), 1e-12)) for m in parts) / 4
    expected = np.exp(log_p - log_p.max(axis=1, keepdims=True))
    expected /= expected.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(r.model.predict(probe, verbose=0), expected, rtol=1e-4, atol=1e-6)
    # the separate defenses' ensembles are the same networks: the same answers
    for part, alone in (("fst", shifted), ("fine-pruning", pruned)):
        np.testing.assert_allclose(r.artifacts[part].model.predict(probe, verbose=0),
                                   alone.model.predict(probe, verbose=0), rtol=1e-5, atol=1e-6)
    assert r.models[0].channels_pruned == pruned.models[0].channels_pruned
    for w, w0 in zip(small_deepid.get_weights(), weights, strict=True):
        np.testing.assert_array_equal(w, w0)


def test_ibau_returns_the_last_round_within_the_budget(small_deepid, caplog):
    """A learning rate far too high wrecks every round: with the budget the result is B itself
    (round 0), with the line in Repair.warnings; without it, the last round, as in the paper."""
    x = random_faces(42, seed=11)
    clean = br.Dataset(x, br.predict_classes(small_deepid, x), "valid")  # B is right on all of them
    kw = {"rounds": 2, "fixed_point_steps": 1, "learning_rate": 5.0, "holdout_fraction": 0.34}
    with caplog.at_level("WARNING", logger="badnet_repair"):
        r = IBAU(**kw).repair(small_deepid, clean)
    c = r.record["choices"]
    rounds = [h["holdout_accuracy"] for h in r.record["history"]]
    assert rounds[0] == 100.0 and rounds[-1] < 97.0  # the last round fell more than 3 points
    assert c["fallback"] is not None and r.warnings and r.warnings[0] in caplog.text
    kept = c["kept_round"]
    assert rounds[kept] >= 97.0 and all(a < 97.0 for a in rounds[kept + 1:])
    if kept == 0:
        assert r.model is small_deepid
    off = IBAU(budget=None, **kw).repair(small_deepid, clean)
    assert off.warnings == () and off.record["choices"]["kept_round"] == len(rounds) - 1


def test_fst_fp_refuses_a_soup_of_two_methods_networks():
    with pytest.raises(ValueError, match="fst-fp averages two methods"):
        FeatureShiftFinePruning(ensemble_mean="soup")
    assert FeatureShiftFinePruning(ensemble_mean="arithmetic").ensemble_mean == "arithmetic"
