"""BTI-DBF(U) (defenses/btidbf.py): the decoupling and inversion losses by hand, the generator's
bounds, the part on the trainer, the settings, and the defense on the demo."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import keras
import numpy as np
import pytest
import tensorflow as tf

import badnet_repair as br
from badnet_repair.defenses import REGISTRY, make_defense
from badnet_repair.defenses.btidbf import (
    BTIDBFUnlearning,
    GeneratedPoison,
    TriggerGenerator,
    benign_mask,
    generator_loss,
    mask_loss,
)
from badnet_repair.nets.trainer import Trainer
from badnet_repair.workflow.compare import compare_defenses

from .conftest import LoggedRepair, SpyArray


def _softmax_ce(scores: np.ndarray, labels: np.ndarray) -> float:
    z = scores - scores.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-np.mean(logp[np.arange(len(labels)), labels]))


def _two_layer(seed: int = 0) -> keras.Model:
    """(4, 4, 1) images -> flatten -> "fc" (3 features, ReLU) -> "output" (2 classes, softmax)."""
    keras.utils.set_random_seed(seed)
    x = keras.Input((4, 4, 1))
    f = keras.layers.Dense(3, activation="relu", name="fc")(keras.layers.Flatten()(x))
    return keras.Model(x, keras.layers.Dense(2, activation="softmax", name="output")(f))


def test_the_mask_loss_by_hand():
    """CE(head(m f), y) - CE(head((1 - m) f), y) + lambda mean(m), with m = tanh(w) / 2 + 1/2 and
    head(z) = z K + b, in numpy."""
    rng = np.random.default_rng(0)
    f = rng.uniform(0, 3, (5, 4)).astype(np.float32)
    y = np.array([0, 1, 2, 1, 0])
    w = rng.normal(size=4).astype(np.float32)
    kernel = rng.normal(size=(4, 3)).astype(np.float32)
    bias = rng.normal(size=3).astype(np.float32)
    m = np.tanh(w) / 2 + 0.5
    np.testing.assert_allclose(benign_mask(tf.constant(w)).numpy(), m, rtol=1e-6)
    for size, b in ((0.0, bias), (0.7, bias), (0.3, None)):
        bb = 0.0 if b is None else b
        want = _softmax_ce((m * f) @ kernel + bb, y) - _softmax_ce(((1 - m) * f) @ kernel + bb, y) + size * m.mean()
        got = mask_loss(tf.constant(f), tf.constant(y), tf.constant(w), tf.constant(kernel),
                        None if b is None else tf.constant(b), size)
        np.testing.assert_allclose(float(got), want, rtol=1e-5, atol=1e-6)


def test_the_generator_is_the_bounded_residual_and_stays_in_bounds():
    """With its convolutions zeroed, G(x) = clip(x + bound scale tanh(P), 0, scale); with any
    weights and map, every pixel moves at most bound x scale and stays in 0..scale."""
    rng = np.random.default_rng(1)
    x = rng.uniform(0, 255, (6, 5, 4, 3)).astype(np.float32)
    g = TriggerGenerator((5, 4, 3), width=4, bound=0.2, scale=255.0, seed=0)
    for layer in g.net.layers:
        layer.set_weights([np.zeros_like(v) for v in layer.get_weights()])
    p = rng.normal(0, 2, (5, 4, 3)).astype(np.float32)
    g.pattern.assign(p)
    np.testing.assert_allclose(g.apply(x), np.clip(x + 0.2 * 255 * np.tanh(p), 0, 255), rtol=1e-5, atol=1e-3)
    # at its start G is close to the identity (the last convolution starts near zero)
    fresh = TriggerGenerator((5, 4, 3), width=4, bound=0.2, scale=255.0, seed=3)
    assert np.abs(fresh.apply(x) - x).max() < 0.05 * 255
    for bound, scale in ((0.2, 255.0), (0.5, 1.0), (1.0, 255.0)):
        g = TriggerGenerator((5, 4, 3), width=4, bound=bound, scale=scale, seed=2)
        for layer in g.net.layers:
            layer.set_weights([rng.normal(0, 5, v.shape).astype(np.float32) for v in layer.get_weights()])
        g.pattern.assign(rng.normal(0, 10, (5, 4, 3)).astype(np.float32))
        xs = x * scale / 255
        out = g.apply(xs)
        assert out.min() >= 0.0 and out.max() <= scale
        assert np.abs(out - xs).max() <= bound * scale * (1 + 1e-6)
        assert np.abs(out - xs).max() > 0.5 * bound * scale  # it does move the pixels


def test_the_generator_loss_by_hand():
    """The loss on a hand-built network, in numpy: features f = relu(flat(x) W + c) (the head's
    input), d = f(G(x)) - f(x); benign = mean((m d)^2) / S, backdoor = mean(((1 - m) d)^2) / S,
    distance = mean(((G(x) - x) / 255)^2); the loss is distance where G went too far (either
    bound), else -backdoor + w benign."""
    net = _two_layer(seed=2)
    w, c = net.get_layer("fc").get_weights()
    features = keras.Model(net.inputs, net.get_layer("output").input)
    rng = np.random.default_rng(3)
    x = rng.uniform(0, 255, (7, 4, 4, 1)).astype(np.float32)
    g = TriggerGenerator((4, 4, 1), width=3, bound=0.3, scale=255.0, seed=1)
    g.pattern.assign(rng.normal(0, 1, (4, 4, 1)).astype(np.float32))
    made = g.apply(x)

    def feats(images: np.ndarray) -> np.ndarray:
        return np.maximum(images.reshape(len(images), -1) @ w + c, 0)

    d = feats(made) - feats(x)
    mask = np.array([0.9, 0.2, 0.5], np.float32)
    scale = 2.5
    benign = np.mean((mask * d) ** 2) / scale
    backdoor = np.mean(((1 - mask) * d) ** 2) / scale
    distance = np.mean(((made - x) / 255) ** 2)
    assert benign > 0 and backdoor > 0
    cases = {"inside": (1.0, 1e6, -backdoor + 0.01 * benign),  # bounds far away: the feature objective
             "image too far": (0.5 * np.sqrt(distance), 1e6, distance),
             "benign too far": (1.0, 0.5 * benign, distance)}
    for case, (norm_bound, feature_bound, want) in cases.items():
        loss, b, bd, dist = generator_loss(features, g, tf.constant(x), tf.constant(mask), feature_scale=scale,
                                           norm_bound=norm_bound, feature_bound=feature_bound, benign_weight=0.01)
        np.testing.assert_allclose([float(b), float(bd), float(dist)], [benign, backdoor, distance], rtol=1e-4)
        np.testing.assert_allclose(float(loss), want, rtol=1e-4, err_msg=case)


def test_the_part_inverts_each_round_on_the_tuning_images_and_replaces_a_share():
    """Rounds start at epochs 1, 1 + E/R, ...; the transform replaces about ``share`` of the images by
    G's (within its bounds), leaves the rest and the trainer's array as they were, and the
    inversion sees the tuning images only."""
    assert GeneratedPoison(_settings(), rounds=5, epochs=50, share=0.1).starts == {1, 11, 21, 31, 41}
    assert GeneratedPoison(_settings(), rounds=5, epochs=3, share=0.1).starts == {1, 2, 3}
    assert GeneratedPoison(_settings(), rounds=2, epochs=5, share=0.1).starts == {1, 3}
    net = _two_layer(seed=4)
    x = np.random.default_rng(5).uniform(0, 255, (64, 4, 4, 1)).astype(np.float32)
    tune, holdout = br.Dataset(x[:48], np.arange(48) % 2), br.Dataset(x[48:], np.arange(16) % 2)

    seen: list[int] = []

    class Watched(GeneratedPoison):
        def invert(self, x: np.ndarray, labels: np.ndarray) -> dict[str, float]:
            seen.append(len(x))
            return super().invert(x, labels)

    part = Watched(_settings(), rounds=2, epochs=4, share=0.5, seed=1)
    got = Trainer(epochs=4, learning_rate=1e-3, batch_size=16, shift=0, flip=False).train(
        net, tune, holdout, parts=[part], progress=False)
    assert seen == [48, 48] and part.round == 2
    assert [h["inversion_round"] for h in got.history[1:]] == [1.0, 1.0, 2.0, 2.0]
    original = x[:48].copy()
    out = part.transform(x[:48], tune.y, np.random.default_rng(0))
    np.testing.assert_array_equal(x[:48], original)  # the trainer's images are not changed
    changed = np.any(out != original, axis=(1, 2, 3))
    assert 10 <= changed.sum() <= 38
    assert np.abs(out - original).max() <= 0.5 * 255 + 1e-3 and out.min() >= 0 and out.max() <= 255


def _settings(**changes: Any) -> Any:
    return BTIDBFUnlearning(mask_epochs=2, generator_epochs=2, generator_width=2, batch_size=16,
                            **changes).inversion()


def test_settings_are_checked():
    for bad in ({"rounds": 0}, {"mask_epochs": 0}, {"generator_epochs": 0}, {"generator_width": 0},
                {"mask_lr": 0.0}, {"generator_lr": -1.0}, {"norm_bound": 0.0}, {"feature_bound": 0.0},
                {"mask_size": -0.1}, {"benign_weight": -1.0}, {"perturbation_bound": 0.0},
                {"perturbation_bound": 1.5}, {"generated_share": 1.2}, {"generated_share": -0.1}, {"epochs": 0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            BTIDBFUnlearning(**bad)
    with pytest.raises(ValueError, match="generated_share"):
        GeneratedPoison(_settings(), rounds=1, epochs=1, share=2.0)
    # more rounds than epochs: one per epoch
    assert BTIDBFUnlearning(epochs=2, rounds=5).step_cost() == BTIDBFUnlearning(epochs=2, rounds=2).step_cost()
    assert BTIDBFUnlearning().step_cost() > BTIDBFUnlearning(generator_epochs=1).step_cost() > 1.0


@pytest.fixture
def registered():
    assert REGISTRY[BTIDBFUnlearning.name] is BTIDBFUnlearning  # registered with the package's defenses
    yield BTIDBFUnlearning


def test_made_by_name_with_its_settings(registered):
    d = BTIDBFUnlearning(rounds=3, generated_share=0.2)
    assert make_defense("bti-dbf", **d.get_params()) == d
    with pytest.raises(ValueError, match="unknown setting"):
        make_defense("bti-dbf", strength=1.0)


@dataclass(frozen=True)
class _LoggedBTIDBF(LoggedRepair, BTIDBFUnlearning):
    pass


@pytest.mark.slow
def test_bti_dbf_lowers_attack_success_on_the_demo_reading_no_test_image_while_it_repairs(small_demo):
    b = br.load_model(small_demo.model)
    valid = br.load_h5(small_demo.valid)
    test, bd = br.load_h5(small_demo.test), br.load_h5(small_demo.bd_test)
    test = br.Dataset(np.asarray(test.x).view(SpyArray), test.y, "test")
    bd = br.Dataset(np.asarray(bd.x).view(SpyArray), bd.y, "bd_test")
    weights = [w.copy() for w in b.get_weights()]
    SpyArray.log.clear()
    comparison = compare_defenses(b, valid, test, bd, defenses=[_LoggedBTIDBF(epochs=10, holdout_fraction=0.34)])
    log = SpyArray.log
    assert log[:2] == ["start", "end"] and "read" in log[2:]
    rows = {e.model: e for e in comparison.evaluations}
    before, after = rows["no defense"].attack_success_rate, rows["bti-dbf"].attack_success_rate
    assert before is not None and after is not None
    assert before > 50.0 and after < before
    for w, w0 in zip(b.get_weights(), weights, strict=True):
        np.testing.assert_array_equal(w, w0)  # the caller's BadNet is untouched
