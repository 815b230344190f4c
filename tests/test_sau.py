"""SAU, Shared Adversarial Unlearning (defenses/sau.py): the PGD loss, one PGD step and the
unlearning step checked against plain computations on tiny hand-built linear models; the
settings; and on the small demo, a lower attack success with no test or poisoned image read
while it repairs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import keras
import numpy as np
import pytest
import tensorflow as tf

import badnet_repair as br
from badnet_repair.defenses.finetuning import Member
from badnet_repair.defenses.sau import (
    SharedAdversarialStep,
    SharedAdversarialUnlearning,
    attack_loss,
    shared_adversarial_risk,
)
from badnet_repair.nets.trainer import Part, training_model
from badnet_repair.workflow.compare import compare_defenses

from .conftest import LoggedRepair, SpyArray

K = 3  # classes of the tiny models


def _linear(seed: int, scale: float = 1.5) -> keras.Model:
    """(2, 2, 1) images -> flatten -> softmax over 3 classes, weights drawn by hand: the class
    scores are ``flatten(x) @ W + b``."""
    rng = np.random.default_rng(seed)
    x = keras.Input((2, 2, 1))
    out = keras.layers.Dense(K, activation="softmax", name="output")(keras.layers.Flatten()(x))
    model = keras.Model(x, out)
    model.get_layer("output").set_weights([rng.normal(0, scale, (4, K)).astype(np.float32),
                                           rng.normal(0, 0.3, K).astype(np.float32)])
    return model


def _weights(model: keras.Model) -> tuple[np.ndarray, np.ndarray]:
    w, b = model.get_layer("output").get_weights()
    return w.astype(np.float64), b.astype(np.float64)


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _probs(model: keras.Model, x: np.ndarray) -> np.ndarray:
    w, b = _weights(model)
    return _softmax(x.reshape(len(x), -1) @ w + b)


def _plain_attack_loss(p: np.ndarray, q: np.ndarray, labels: np.ndarray, clean: np.ndarray, clean_ref: np.ndarray,
                       b1: float, b2: float) -> float:
    """BackdoorBench's Shared_PGD loss written out with boolean indexing."""
    n = len(p)
    fooled, fooled_ref = p.argmax(1) != clean, q.argmax(1) != clean_ref
    shared = fooled & fooled_ref & (p.argmax(1) == q.argmax(1))
    ce, ce_ref = -np.log(p[np.arange(n), labels]), -np.log(q[np.arange(n), labels])
    adv = -(ce[~fooled].sum() + ce_ref[~fooled_ref].sum()) / 2 / n
    a, b = np.maximum(p, 1e-8), np.maximum(q, 1e-8)
    m = (a + b) / 2
    js = 0.5 * (a * np.log(a) + b * np.log(b)) - 0.5 * (a * np.log(m) + b * np.log(m))
    return float(b1 * adv + b2 * js[~shared].sum(axis=1).sum() / n)


def _plain_attack_gradient(net: keras.Model, ref: keras.Model, x_adv: np.ndarray, labels: np.ndarray,
                           clean: np.ndarray, clean_ref: np.ndarray, b1: float, b2: float) -> np.ndarray:
    """d attack loss / d x_adv for the two linear softmax models, by hand: through the scores,
    d(-log p_y)/dz = p - onehot(y), dJS/dp_k = log(p_k / m_k) / 2, and softmax's Jacobian."""
    n = len(x_adv)
    (w, _), (w_ref, _) = _weights(net), _weights(ref)
    p, q = _probs(net, x_adv), _probs(ref, x_adv)
    hot = np.eye(K)[labels]
    fooled, fooled_ref = p.argmax(1) != clean, q.argmax(1) != clean_ref
    shared = fooled & fooled_ref & (p.argmax(1) == q.argmax(1))
    m = (p + q) / 2
    dz, dz_ref = np.zeros_like(p), np.zeros_like(q)
    for i in range(n):
        if not fooled[i]:
            dz[i] += -b1 / (2 * n) * (p[i] - hot[i])
        if not fooled_ref[i]:
            dz_ref[i] += -b1 / (2 * n) * (q[i] - hot[i])
        if not shared[i]:
            for probs, out in ((p, dz), (q, dz_ref)):
                g = b2 / n * 0.5 * np.log(probs[i] / m[i])
                out[i] += probs[i] * (g - probs[i] @ g)
    return (dz @ w.T + dz_ref @ w_ref.T).reshape(x_adv.shape)


def _plain_pgd(net: keras.Model, ref: keras.Model, x: np.ndarray, labels: np.ndarray, *, eps: float, step: float,
               steps: int, b1: float, b2: float, top: float) -> np.ndarray:
    """PGD from every pixel + eps: signed steps down the attack loss, each projected on the
    L-inf ball and the pixel range [0, top]."""
    clean, clean_ref = _probs(net, x).argmax(1), _probs(ref, x).argmax(1)
    x_adv = np.clip(x + eps, 0.0, top)
    for _ in range(steps):
        g = _plain_attack_gradient(net, ref, x_adv, labels, clean, clean_ref, b1, b2)
        x_adv = np.clip(np.clip(x_adv - step * np.sign(g), x - eps, x + eps), 0.0, top)
    return x_adv


def test_the_attack_loss_by_hand():
    """Images not yet fooled add their cross-entropy (negated), images not yet shared their JS
    divergence; one image in each state (fooled by neither, one, both differently, both alike)."""
    rng = np.random.default_rng(0)
    p, q = _softmax(rng.normal(0, 1.5, (6, 4))), _softmax(rng.normal(0, 1.5, (6, 4)))
    q[5] = p[5] * 0.5 + q[5] * 0.5  # a pair close enough to agree
    labels = rng.integers(0, 4, 6)
    pred, pred_ref = p.argmax(1), q.argmax(1)
    # clean classes chosen so that the images are fooled on neither, one, the other, both
    clean = np.array([pred[0], pred[1], (pred[2] + 1) % 4, (pred[3] + 1) % 4, (pred[4] + 1) % 4, (pred[5] + 1) % 4])
    clean_ref = np.array([pred_ref[0], (pred_ref[1] + 1) % 4, pred_ref[2], (pred_ref[3] + 1) % 4,
                          (pred_ref[4] + 1) % 4, (pred_ref[5] + 1) % 4])
    got = attack_loss(tf.constant(p, tf.float32), tf.constant(q, tf.float32),
                      tf.constant(np.eye(4)[labels], tf.float32), tf.constant(clean), tf.constant(clean_ref),
                      beta_adversarial=0.3, beta_shared=2.0)
    want = _plain_attack_loss(p, q, labels, clean, clean_ref, 0.3, 2.0)
    np.testing.assert_allclose(float(got), want, rtol=1e-5)
    # every image shared (both models fooled, into the same class): nothing left to push
    moved = (pred + 1) % 4
    zero = attack_loss(tf.constant(p, tf.float32), tf.constant(p, tf.float32),
                       tf.constant(np.eye(4)[labels], tf.float32), tf.constant(moved), tf.constant(moved),
                       beta_adversarial=0.3, beta_shared=2.0)
    assert float(zero) == 0.0


def test_the_shared_adversarial_risk_by_hand():
    """-log(1 - p[B's class]) on the candidates, the authors' two clamped forms averaged."""
    p = np.array([[0.2, 0.5, 0.3], [0.9995, 0.0003, 0.0002], [0.0004, 0.3, 0.6996], [0.1, 0.1, 0.8],
                  [0.6, 0.3, 0.1]], np.float64)
    ref_class = np.array([1, 0, 0, 2, 0])
    candidate = np.array([True, True, True, True, False])
    pos = p[np.arange(5), ref_class]
    neg = 1.0 - pos
    term = (-np.log(1e-6 + np.minimum(neg, 0.999)) - np.log(1 + 1e-6 - np.maximum(pos, 0.001))) / 2
    want = term[candidate].sum() / 5
    got = shared_adversarial_risk(tf.constant(p, tf.float32), tf.constant(ref_class), tf.constant(candidate))
    np.testing.assert_allclose(float(got), want, rtol=1e-5)
    # -log(1 - p[B's class]) but for the image where that p is below 0.001, held at -log(0.999)
    np.testing.assert_allclose(want, (-np.log(0.5) - np.log(0.0005) - np.log(0.999) - np.log(0.2)) / 5, rtol=1e-3)
    # its gradient moves probability away from B's class on candidates only
    pt = tf.Variable(tf.constant(p, tf.float32))
    with tf.GradientTape() as tape:
        risk = shared_adversarial_risk(pt, tf.constant(ref_class), tf.constant(candidate))
    g = tape.gradient(risk, pt).numpy()
    assert g[0, 1] > 0 and g[3, 2] > 0 and np.all(g[4] == 0)
    assert np.all(g[2] == 0)  # p[B's class] < 0.001: clamped, not shared


def test_one_pgd_step_by_hand():
    """From every pixel + eps (clipped to the pixel range), one signed step down the attack loss,
    projected: the step's perturb equals the hand-written gradient's step, and the loss it
    descends is the plain one."""
    net, ref = _linear(1), _linear(2)
    rng = np.random.default_rng(3)
    x = rng.uniform(0, 1, (8, 2, 2, 1)).astype(np.float32)
    x[0, 0, 0, 0], x[1, 1, 1, 0] = 0.95, 0.02  # pixels the range clips
    labels = rng.integers(0, K, 8)
    y = np.eye(K, dtype=np.float32)[labels]
    for steps in (1, 3):
        step = SharedAdversarialStep(ref, epsilon=0.3, step_size=0.2, steps=steps, beta_adversarial=0.5,
                                     beta_shared=1.0, pixel_max=1.0)
        got, clean_ref = step.perturb(net, tf.constant(x), tf.constant(y))
        want = _plain_pgd(net, ref, x.astype(np.float64), labels, eps=0.3, step=0.2, steps=steps, b1=0.5, b2=1.0,
                          top=1.0)
        np.testing.assert_allclose(got.numpy(), want, atol=1e-5)
        np.testing.assert_array_equal(clean_ref.numpy(), _probs(ref, x).argmax(1))
        assert np.all(np.abs(got.numpy() - x) <= 0.3 + 1e-6) and got.numpy().min() >= 0 and got.numpy().max() <= 1
    # the loss the step descends is the plain one
    clean, clean_ref_np = _probs(net, x).argmax(1), _probs(ref, x).argmax(1)
    loss = attack_loss(net(x), ref(x), tf.constant(y), tf.constant(clean), tf.constant(clean_ref_np),
                       beta_adversarial=0.5, beta_shared=1.0)
    np.testing.assert_allclose(float(loss), _plain_attack_loss(_probs(net, x), _probs(ref, x), labels, clean,
                                                               clean_ref_np, 0.5, 1.0), rtol=1e-4)
    zero = SharedAdversarialStep(ref, epsilon=0.3, step_size=0.2, steps=1, init="zero", pixel_max=1.0)
    assert np.abs(zero.perturb(net, tf.constant(x), tf.constant(y))[0].numpy() - x).max() <= 0.2 + 1e-6


class _L2(Part):
    """A penalty from outside, to check that it is added unweighted."""

    def penalty(self, network: Any) -> Any:
        return 0.05 * tf.reduce_sum(tf.square(network.get_layer("output").kernel))


def test_the_unlearning_step_matches_a_plain_computation():
    """One SGD step of the wrapper = w - lr * d/dw [l1 CE(clean) + penalty + l2 CE(adv, labels)
    + l3 L_sar(adv)], written here with plain TensorFlow ops on the plain PGD's images; the history's
    loss is the clean cross-entropy."""
    net, ref = _linear(4), _linear(5)
    rng = np.random.default_rng(6)
    x = rng.uniform(0, 1, (10, 2, 2, 1)).astype(np.float32)
    labels = rng.integers(0, K, 10)
    y = np.eye(K, dtype=np.float32)[labels]
    eps, size, steps, l1, l2, l3, lr = 0.4, 0.25, 2, 0.7, 0.4, 1.5, 0.1
    x_adv = _plain_pgd(net, ref, x.astype(np.float64), labels, eps=eps, step=size, steps=steps, b1=0.01, b2=1.0,
                       top=1.0).astype(np.float32)
    ref_class, clean_ref = _probs(ref, x_adv).argmax(1), _probs(ref, x).argmax(1)
    candidate = (ref_class != labels) & (ref_class != clean_ref)
    assert candidate.any() and not candidate.all()  # both kinds of image in the batch
    w0 = [v.numpy() for v in net.trainable_variables]
    ref0 = [u.copy() for u in ref.get_weights()]
    with tf.GradientTape() as tape:
        def scores(images: np.ndarray) -> Any:
            kernel, bias = net.trainable_variables
            return tf.matmul(tf.reshape(tf.constant(images), (len(images), -1)), kernel) + bias

        log_clean, log_adv = tf.nn.log_softmax(scores(x)), tf.nn.log_softmax(scores(x_adv))
        ce = -tf.reduce_mean(tf.reduce_sum(y * log_clean, axis=1))
        ce_adv = -tf.reduce_mean(tf.reduce_sum(y * log_adv, axis=1))
        agree = tf.gather(tf.exp(log_adv), ref_class, axis=1, batch_dims=1)
        sar = tf.reduce_sum(tf.boolean_mask(-tf.math.log(1.0 - agree), candidate)) / len(x)
        penalty = 0.05 * tf.reduce_sum(tf.square(net.trainable_variables[0]))
        objective = l1 * ce + penalty + l2 * ce_adv + l3 * sar
    grads = [g.numpy() for g in tape.gradient(objective, net.trainable_variables)]
    assert np.max(np.abs(_probs(net, x_adv)[np.arange(10), ref_class][candidate])) < 0.99  # far from the clamps
    want = [w - lr * g for w, g in zip(w0, grads, strict=True)]
    step = SharedAdversarialStep(ref, epsilon=eps, step_size=size, steps=steps, clean_weight=l1,
                                 adversarial_weight=l2, shared_weight=l3, pixel_max=1.0)
    model = training_model(net, [_L2()], step)
    model.compile(optimizer=keras.optimizers.SGD(lr), loss="categorical_crossentropy",
                  metrics=["categorical_accuracy"])
    h = model.fit(x, y, batch_size=10, epochs=1, shuffle=False, verbose=0)
    for v, w in zip(net.trainable_variables, want, strict=True):
        np.testing.assert_allclose(v.numpy(), w, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(h.history["loss"][0], float(ce), rtol=1e-5)
    for u, u0 in zip(ref.get_weights(), ref0, strict=True):
        np.testing.assert_array_equal(u, u0)  # B is only read


def test_settings_are_checked():
    for bad, match in (({"sau_epsilon": 0.0}, "sau_epsilon"), ({"sau_step": -0.1}, "sau_step"),
                       ({"sau_steps": 0}, "sau_steps"), ({"sau_init": "random"}, "sau_init"),
                       ({"sau_beta_adversarial": -1.0}, "sau_beta_adversarial"),
                       ({"sau_beta_shared": -1.0}, "sau_beta_shared"), ({"sau_clean_weight": -1.0}, "sau_clean_weight"),
                       ({"sau_adversarial_weight": -0.5}, "sau_adversarial_weight"),
                       ({"sau_shared_weight": float("nan")}, "sau_shared_weight"),
                       ({"pixel_scale": 0.0}, "pixel_scale"), ({"epochs": 0}, "epochs"), ({"budget": -1.0}, "budget")):
        with pytest.raises(ValueError, match=match):
            SharedAdversarialUnlearning(**bad)
    d = SharedAdversarialUnlearning()
    assert d.name == "sau" and d.step_cost() == 12.0 and SharedAdversarialUnlearning(sau_steps=2).step_cost() == 6.0
    assert (d.epochs, d.learning_rate, d.sau_epsilon, d.sau_step, d.sau_steps) == (7, 1e-4, 0.05, 0.2, 5)
    # the perturbation is in units of the pixel range: 0.05 of 0..255 images is 12.75 gray levels
    data = br.Dataset(np.zeros((2, 2, 2, 1), np.float32), np.zeros(2, np.int64))
    for fixed, data_range, want in ((None, 255.0, 255.0), (None, 1.0, 1.0), (255.0, 1.0, 255.0)):
        member = Member(badnet=_linear(0), tune=data, holdout=data, layer="", seed=0, index=0,
                        pixel_scale=data_range)
        step = SharedAdversarialUnlearning(pixel_scale=fixed).plan(member, None, ()).step
        assert isinstance(step, SharedAdversarialStep) and step.epsilon == pytest.approx(0.05 * want)
        assert step.step_size == pytest.approx(0.2 * want) and step.pixel_max == want
        assert member.notes["pixel_scale"] == want


@dataclass(frozen=True)
class _LoggedSAU(LoggedRepair, SharedAdversarialUnlearning):
    pass


@pytest.mark.slow
def test_sau_lowers_attack_success_on_the_demo_reading_no_test_image_while_it_repairs(small_demo):
    b = br.load_model(small_demo.model)
    valid = br.load_h5(small_demo.valid)
    test, bd = br.load_h5(small_demo.test), br.load_h5(small_demo.bd_test)
    before = br.attack_success_rate(br.predict_classes(b, bd.x), bd.y)
    assert before > 50.0
    weights = [w.copy() for w in b.get_weights()]
    spy_test = br.Dataset(np.asarray(test.x).view(SpyArray), test.y, "test")
    spy_bd = br.Dataset(np.asarray(bd.x).view(SpyArray), bd.y, "bd_test")
    SpyArray.log.clear()
    # the defaults but for the epochs: the tiny demo's ~20 tuning images make one step per epoch
    result = compare_defenses(b, valid, spy_test, spy_bd, defenses=[_LoggedSAU(epochs=30, holdout_fraction=0.34)])
    log = SpyArray.log
    assert log[:2] == ["start", "end"] and "read" in log[2:]
    row = next(e for e in result.evaluations if e.model == "sau" and e.kind == "repaired")
    assert row.attack_success_rate is not None and row.attack_success_rate < before
    for w, w0 in zip(b.get_weights(), weights, strict=True):
        np.testing.assert_array_equal(w, w0)  # the caller's BadNet is untouched
