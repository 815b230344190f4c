"""The training engine (nets/trainer.py): the loop, the epoch choice, the never-worse rule, and
parts supplied from outside."""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
import pytest

import badnet_repair as br
from badnet_repair.nets.trainer import Part, Step, Trainer, Warmup, accuracy, training_model

from .conftest import random_faces


def _linear(seed: int = 0, classes: int = 3) -> keras.Model:
    keras.utils.set_random_seed(seed)
    inp = keras.Input((2, 2, 1))
    out = keras.layers.Dense(classes, activation="softmax", name="output")(keras.layers.Flatten()(inp))
    return keras.Model(inp, out)


def _same(a: keras.Model, b: keras.Model) -> bool:
    return all(np.array_equal(u, v) for u, v in zip(a.get_weights(), b.get_weights(), strict=True))


def _data(n: int = 40, seed: int = 0) -> br.Dataset:
    x = np.random.default_rng(seed).uniform(0, 1, (n, 2, 2, 1)).astype(np.float32)
    return br.Dataset(x, np.arange(n) % 3)


def test_keeps_the_best_held_out_epoch_later_on_ties_and_repeats_itself(small_deepid):
    x = random_faces(42, seed=3)
    y = br.predict_classes(small_deepid, x)
    tune, hold = br.Dataset(x[:28], (y[:28] + np.arange(28) % 2) % 7), br.Dataset(x[28:], y[28:])
    trainer = Trainer(epochs=4, learning_rate=1e-2, shift=0, flip=False)
    got = trainer.train(small_deepid, tune, hold, progress=False)
    assert [h["epoch"] for h in got.history] == [0, 1, 2, 3, 4]
    assert got.start_accuracy == got.history[0]["holdout_accuracy"] == accuracy(small_deepid, hold)
    accs = [h["holdout_accuracy"] for h in got.history[1:]]
    assert got.kept_epoch == 1 + max(i for i, a in enumerate(accs) if a == max(accs))
    assert accuracy(got.model, hold) == got.holdout_accuracy
    again = trainer.train(small_deepid, tune, hold, progress=False)
    assert again.kept_epoch == got.kept_epoch and _same(got.model, again.model)
    with pytest.raises(ValueError, match="epochs"):
        Trainer(epochs=0)
    with pytest.raises(ValueError, match="schedule"):
        Trainer(schedule="linear")  # type: ignore[arg-type]


def test_the_start_wins_only_when_allowed_and_says_so(small_deepid, caplog):
    """Training on wrong labels lowers held-out accuracy at every epoch."""
    x = random_faces(40, seed=8)
    y = br.predict_classes(small_deepid, x)  # the start is 100% right on these
    hold = br.Dataset(x[:20], y[:20], "holdout")
    wrong = br.Dataset(x[20:], (y[20:] + 1) % 7, "tune")
    trainer = Trainer(epochs=3, learning_rate=1e-2, shift=0, flip=False)
    with caplog.at_level("WARNING", logger="badnet_repair"):
        kept = trainer.train(small_deepid, wrong, hold, keep_start=True, progress=False, desc="toy")
    assert kept.history[0]["holdout_accuracy"] == 100.0
    assert max(h["holdout_accuracy"] for h in kept.history[1:]) < 100.0
    assert kept.kept_epoch == 0 and _same(kept.model, small_deepid)
    assert "toy: no trained epoch matched" in caplog.text
    trained = trainer.train(small_deepid, wrong, hold, keep_start=False, progress=False)
    assert trained.kept_epoch >= 1 and not _same(trained.model, small_deepid)


def test_weight_decay_shrinks_unused_weights_by_the_adamw_factor_each_step():
    net = _linear()
    data = _data()
    x = data.x.copy()
    x[:, 0, 0, 0] = 0.0  # pixel 0 is always dark: its weights get no gradient, only the decay
    data = br.Dataset(x, data.y)
    row0 = net.get_layer("output").get_weights()[0][0]
    kw: dict[str, Any] = {"epochs": 3, "learning_rate": 0.01, "schedule": "constant", "batch_size": 16, "shift": 0,
                          "flip": False}
    plain = Trainer(**kw).train(net, data, data, progress=False)
    np.testing.assert_array_equal(plain.model.get_layer("output").get_weights()[0][0], row0)
    decayed = Trainer(weight_decay=2.0, **kw).train(net, data, data, progress=False)
    steps = decayed.kept_epoch * 3  # 40 images in batches of 16
    np.testing.assert_allclose(decayed.model.get_layer("output").get_weights()[0][0],
                               row0 * (1 - 0.01 * 2.0) ** steps, rtol=1e-5)
    np.testing.assert_array_equal(net.get_layer("output").get_weights()[0][0], row0)  # the caller's model unchanged
    with pytest.raises(ValueError, match="weight_decay"):
        Trainer(weight_decay=-1.0)


class _NoPenalty(Part):
    def penalty(self, network: Any) -> Any:
        return 0.0


def test_the_wrapped_step_equals_keras_own_step():
    """A part that works inside the step switches the trainer from Keras's own training step to
    its wrapper; with a zero penalty the weights must be exactly those of the plain run."""
    net, data = _linear(seed=2), _data(seed=1)
    trainer = Trainer(epochs=2, learning_rate=0.05, batch_size=8, shift=0, flip=False)
    assert training_model(net) is net and training_model(net, [_NoPenalty()]) is not net
    plain = trainer.train(net, data, data, progress=False)
    wrapped = trainer.train(net, data, data, parts=[_NoPenalty()], progress=False)
    assert plain.kept_epoch == wrapped.kept_epoch
    for u, v in zip(plain.model.get_weights(), wrapped.model.get_weights(), strict=True):
        np.testing.assert_allclose(u, v, rtol=1e-6, atol=1e-7)
    assert [h["loss"] for h in plain.history[1:]] == pytest.approx([h["loss"] for h in wrapped.history[1:]])


class _Shrink(Part):
    """Toy parts from outside the package: an L2 penalty on the kernel, a kernel kept at a norm,
    a transform that blanks the images, and targets that record a value."""

    def __init__(self, weight: float = 0.0, max_norm: float | None = None, blank: bool = False) -> None:
        self.weight, self.max_norm, self.blank = weight, max_norm, blank
        self.seen: list[float] = []

    def penalty(self, network: Any) -> Any:
        import tensorflow as tf

        return self.weight * tf.reduce_sum(tf.square(network.get_layer("output").kernel)) if self.weight else None

    def after_step(self, network: Any) -> None:
        import tensorflow as tf

        if self.max_norm is not None:
            k = network.get_layer("output").kernel
            k.assign(k * tf.minimum(1.0, self.max_norm / (tf.norm(k) + 1e-12)))

    def transform(self, x: np.ndarray, labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        self.seen.append(float(np.abs(x).sum()))
        return np.zeros_like(x) if self.blank else x

    def targets(self, x: np.ndarray, labels: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, dict[str, float]]:
        return targets, {"blank": float(not x.any())}


def test_parts_from_outside_shape_the_training():
    net, data = _linear(seed=3), _data(seed=2)
    trainer = Trainer(epochs=3, learning_rate=0.05, batch_size=8, shift=0, flip=False)
    plain = trainer.train(net, data, data, progress=False).model
    shrunk = trainer.train(net, data, data, parts=[_Shrink(weight=1.0)], progress=False).model
    norm = lambda m: float(np.linalg.norm(m.get_layer("output").kernel.numpy()))  # noqa: E731
    assert norm(shrunk) < norm(plain)
    capped = trainer.train(net, data, data, parts=[_Shrink(max_norm=0.1)], progress=False)
    assert norm(capped.model) <= 0.1 + 1e-5
    blank = _Shrink(blank=True)
    got = trainer.train(net, data, data, parts=[blank], progress=False)
    assert len(blank.seen) == 3 and all(s > 0 for s in blank.seen)  # the transform saw the real images
    assert [h["blank"] for h in got.history[1:]] == [1.0, 1.0, 1.0]  # and the targets the transformed ones
    # on blank images only the bias learns: the kernel never moves
    assert np.array_equal(got.model.get_layer("output").kernel.numpy(), net.get_layer("output").kernel.numpy())


class _Frozen(Step):
    """A step that returns zero gradients: Adam then never moves a weight."""

    def gradients(self, trainer: Any, x: Any, y: Any) -> tuple[Any, Any, list[Any]]:
        import tensorflow as tf

        loss, _, y_pred = trainer.objective(x, y)
        return loss, y_pred, [tf.zeros_like(w) for w in trainer.trainable_variables]


def test_a_step_from_outside_replaces_the_gradient():
    net, data = _linear(seed=4), _data(seed=3)
    got = Trainer(epochs=2, shift=0, flip=False).train(net, data, data, step=_Frozen(), progress=False)
    assert _same(got.model, net)


def test_warmup_trains_only_the_named_layers_first(small_deepid):
    x = random_faces(30, seed=9)
    data = br.Dataset(x, (br.predict_classes(small_deepid, x) + 1) % 7)  # wrong labels: every layer would move

    class Watch(Part):
        """Keeps the network's weights at the start and when the first main epoch begins."""

        def begin(self, network: Any) -> None:
            self.network, self.before, self.after = network, network.get_weights(), None

        def targets(self, x: np.ndarray, labels: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, dict]:
            if self.after is None:
                self.after = {lyr.name: lyr.get_weights() for lyr in self.network.layers}
            return targets, {}

    watch = Watch()
    trainer = Trainer(epochs=1, learning_rate=1e-2, shift=0, flip=False)
    trainer.train(small_deepid, data, data, parts=[watch], warmup=Warmup(2, ("output",)), progress=False)
    assert watch.after is not None
    for layer in small_deepid.layers:
        if not layer.get_weights():
            continue
        moved = not all(np.array_equal(u, v) for u, v in zip(layer.get_weights(), watch.after[layer.name],
                                                             strict=True))
        assert moved == (layer.name == "output"), layer.name
    with pytest.raises(ValueError, match="not in the network"):
        trainer.train(small_deepid, data, data, warmup=Warmup(1, ("nope",)), progress=False)
