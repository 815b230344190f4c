"""I-BAU: adversarial unlearning of backdoors via the implicit hypergradient.

Zeng, Chen, Park, Mao, Jin and Jia, "Adversarial Unlearning of Backdoors via Implicit
Hypergradient" (ICLR 2022). The repair is a minimax problem on clean data alone::

    min_theta  max_delta  L(f_theta(x + delta), y)

where ``delta`` is one perturbation shared by every image (a universal adversarial
perturbation). A backdoor is exactly such a perturbation that works on almost every input,
so the inner maximisation finds something close to it, and the outer minimisation teaches the
network to ignore it. The outer step differentiates through the inner solution ``delta*(theta)``
with the implicit function theorem (the "hypergradient"), solved by ``K`` fixed-point
iterations, instead of treating ``delta`` as a constant.

It needs no BatchNorm (unlike ANP, CLP and RNP) and no trigger scan (unlike Neural Cleanse's
unlearning), so it applies to DeepID as it is. Perturbations are measured in units of the
pixel range (``pixel_scale``), so the paper's settings, made for images in 0..1, carry over to
images in 0..255.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from ..defaults import BUDGET_HELP, setting
from ..formats.data import Dataset, pixel_range
from .base import Defense, Repair, Repaired

__all__ = ["IBAU", "ibau_unlearn", "implicit_hypergradient"]

log = logging.getLogger(__name__)


def _inner_loss(model: Any, x: Any, y: Any, delta: Any, scale: float, regularization: float) -> Any:
    """I-BAU's inner objective (to be minimised): minus the cross-entropy of the perturbed
    images plus ``regularization * |delta|^2``."""
    import keras
    import tensorflow as tf

    p = model(x + scale * delta, training=False)
    ce = keras.losses.sparse_categorical_crossentropy(y, p)
    return -tf.reduce_mean(ce) + regularization * tf.reduce_sum(tf.square(delta))


def implicit_hypergradient(model: Any, delta: Any, outer_loss: Any, inner_x: Any, inner_y: Any, *,
                           scale: float, regularization: float, fixed_point_lr: float,
                           fixed_point_steps: int) -> list[Any]:
    """The gradient of the outer loss with respect to the model's weights, through the inner
    solution (Zeng et al. 2022, Algorithm 1; Grazzi et al. 2020's fixed-point method).

    The inner solution is a fixed point of ``Phi(delta, theta) = delta - a * d L_in / d delta``.
    With ``g = dL_out/ddelta``, ``v`` solves ``v = (dPhi/ddelta)^T v + g`` (by
    ``fixed_point_steps`` iterations from 0), and the hypergradient is
    ``dL_out/dtheta + (dPhi/dtheta)^T v``.

    Args:
        model: the network being repaired (its trainable weights are theta).
        delta: (1, H, W, C) the inner solution, in units of ``scale``.
        outer_loss: ``f(delta) -> scalar`` the outer loss (uses the model).
        inner_x, inner_y: the images and labels the inner loss is measured on.
        scale: pixel units per unit of ``delta``.
        regularization: the inner loss's weight on ``|delta|^2``.
        fixed_point_lr: ``a``, the step of the fixed-point map.
        fixed_point_steps: iterations for ``v``.

    Returns:
        one gradient per trainable weight of ``model``.
    """
    import tensorflow as tf

    theta = model.trainable_variables
    delta = tf.convert_to_tensor(delta)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(delta)
        loss = outer_loss(delta)
    g_delta = tape.gradient(loss, delta)
    g_theta = tape.gradient(loss, theta)
    del tape

    def mapped_dot(v: Any) -> tuple[Any, Any]:
        # (Phi(delta, theta) . v) and the tape that recorded it, for vector-Jacobian products
        with tf.GradientTape(persistent=True) as outer:
            outer.watch(delta)
            with tf.GradientTape() as inner:
                inner.watch(delta)
                l_in = _inner_loss(model, inner_x, inner_y, delta, scale, regularization)
            phi = delta - fixed_point_lr * inner.gradient(l_in, delta)
            dot = tf.reduce_sum(phi * tf.stop_gradient(v))
        return dot, outer

    v = tf.zeros_like(delta)
    for _ in range(fixed_point_steps):
        dot, outer = mapped_dot(v)
        v = outer.gradient(dot, delta) + g_delta
        del outer
    dot, outer = mapped_dot(v)
    g_hyper = outer.gradient(dot, theta)
    del outer
    return [a if b is None else (b if a is None else a + b) for a, b in zip(g_theta, g_hyper, strict=True)]


def ibau_unlearn(
    model: Any,
    clean: Dataset,
    *,
    rounds: int = 5,
    fixed_point_steps: int = 5,
    learning_rate: float = 1e-3,
    batch_size: int = 100,
    perturbation_lr: float = 10.0,
    fixed_point_lr: float = 0.1,
    regularization: float = 1e-3,
    portion: float = 0.01,
    max_norm: float | None = None,
    pixel_scale: float | None = None,
    seed: int = 0,
    holdout: Dataset | None = None,
    floor: float | None = None,
    progress: bool = False,
) -> tuple[Any, list[dict[str, float]]]:
    """Unlearn a backdoor from ``model`` by I-BAU (Zeng et al., ICLR 2022) on clean data.

    Each round: (1) one pass of gradient ascent over the clean batches finds a universal
    perturbation ``delta`` that changes the network's own answers most (SGD at
    ``perturbation_lr``, ``regularization * |delta|^2`` keeping it small; projected on the
    L2 ball of radius ``max_norm`` if given); (2) one pass over the batches updates the
    weights (Adam at ``learning_rate``) with the implicit hypergradient of the cross-entropy
    of the batch, ``portion`` of it (at least one image) carrying ``delta``.

    Args:
        model: the BadNet (not changed).
        clean: clean labelled images (N, H, W, C).
        rounds: unlearning rounds, default 5 (the paper's).
        fixed_point_steps: ``K``, fixed-point iterations of the hypergradient, default 5.
        learning_rate: Adam's rate for the weights, default 1e-3.
        batch_size: default 100.
        perturbation_lr: SGD rate of the perturbation search, default 10.
        fixed_point_lr: step of the fixed-point map, default 0.1.
        regularization: weight of ``|delta|^2`` in the inner loss, default 1e-3.
        portion: share of each batch carrying the perturbation in the outer loss, default
            0.01, at least one image.
        max_norm: project the perturbation on this L2 radius (units of ``pixel_scale``);
            default None, as in the authors' code.
        pixel_scale: pixel value of one perturbation unit, default the clean images' range
            rounded up to 1 or 255.
        seed: batch order, the images that carry the perturbation, and TensorFlow's seed.
        holdout: clean data to measure after each round (recorded), default none.
        floor: with ``holdout``, the lowest held-out accuracy (%) a returned network may have:
            the last round whose accuracy is at least ``floor`` is returned (round 0: the model
            given), default None (the last round, as in the paper).
        progress: a progress bar over rounds.

    Returns:
        (the repaired model, one row per round: ``perturbation_norm`` (units of
        ``pixel_scale``), ``flipped`` (% of clean images whose class the round's perturbation
        changed before unlearning), ``loss`` (mean outer loss), with ``holdout``
        ``holdout_accuracy`` (%); the first row (round 0) is the start).
    """
    import keras
    import tensorflow as tf

    from ..nets.models import predict_classes
    from ..nets.training import deterministic_ops
    from ..progress import bar

    for name, value in (("rounds", rounds), ("fixed_point_steps", fixed_point_steps), ("batch_size", batch_size)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, not {value}")
    if not 0.0 <= portion <= 1.0:
        raise ValueError(f"portion must be in [0, 1], not {portion}")
    x = np.asarray(clean.x, np.float32)
    y = np.asarray(clean.y, np.int64)
    if len(x) == 0:
        raise ValueError("no clean images to unlearn on")
    scale = float(pixel_scale) if pixel_scale is not None else pixel_range(x)
    with deterministic_ops():
        keras.utils.set_random_seed(seed)
        rng = np.random.default_rng([seed, 23])
        work = keras.models.clone_model(model)
        work.set_weights(model.get_weights())
        optimizer = keras.optimizers.Adam(learning_rate)
        order = rng.permutation(len(x))
        batches = [order[i:i + batch_size] for i in range(0, len(x), batch_size)]
        # the inner loss of the hypergradient is measured on the first batch, as in the paper
        inner_x, inner_y = tf.constant(x[batches[0]]), tf.constant(y[batches[0]])
        theta = work.trainable_variables
        optimizer.build(theta)

        @tf.function(reduce_retracing=True)
        def ascend(delta: Any, xb: Any) -> Any:
            own = tf.argmax(work(xb, training=False), axis=1)
            with tf.GradientTape() as tape:
                tape.watch(delta)
                loss = _inner_loss(work, xb, own, delta, scale, regularization)
            return delta - perturbation_lr * tape.gradient(loss, delta)

        @tf.function(reduce_retracing=True)
        def unlearn(delta: Any, xb: Any, yb: Any, carry: Any) -> Any:
            def outer_loss(d: Any) -> Any:
                p = work(xb + scale * d * carry, training=False)
                return tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(yb, p))

            grads = implicit_hypergradient(work, delta, outer_loss, inner_x, inner_y, scale=scale,
                                           regularization=regularization, fixed_point_lr=fixed_point_lr,
                                           fixed_point_steps=fixed_point_steps)
            optimizer.apply_gradients(zip(grads, theta, strict=True))
            return outer_loss(delta)

        def measured(row: dict[str, float]) -> dict[str, float]:
            if holdout is not None:
                row["holdout_accuracy"] = float(100.0 * np.mean(predict_classes(work, holdout.x) == holdout.y))
            return row

        history = [measured({"round": 0.0})]
        kept = work.get_weights() if floor is not None and holdout is not None else None
        for r in bar(range(rounds), desc="I-BAU rounds", unit="round") if progress else range(rounds):
            delta = tf.zeros((1, *x.shape[1:]), tf.float32)
            for idx in batches:
                delta = ascend(delta, tf.constant(x[idx]))
            norm = float(tf.norm(delta))
            if max_norm is not None and norm > max_norm:
                delta = delta * (max_norm / norm)
                norm = float(max_norm)
            before = np.argmax(work.predict(x, batch_size=256, verbose=0), axis=1)
            after = np.argmax(work.predict(x + scale * delta.numpy(), batch_size=256, verbose=0), axis=1)
            losses = []
            for idx in batches:
                carry = np.zeros((len(idx), 1, 1, 1), np.float32)
                carry[rng.choice(len(idx), size=max(1, int(len(idx) * portion)), replace=False)] = 1.0
                losses.append(float(unlearn(delta, tf.constant(x[idx]), tf.constant(y[idx]), tf.constant(carry))))
            row = {"round": float(r + 1), "perturbation_norm": norm,
                   "flipped": float(100.0 * np.mean(before != after)), "loss": float(np.mean(losses))}
            log.info("I-BAU round %d/%d: perturbation norm %.2f flipped %.1f%% of clean images; outer loss %.3f",
                     r + 1, rounds, norm, row["flipped"], row["loss"])
            history.append(measured(row))
            if kept is not None and row["holdout_accuracy"] >= floor:  # type: ignore[operator]
                kept = work.get_weights()
        if kept is not None and history[-1]["holdout_accuracy"] < floor:  # type: ignore[operator]
            work.set_weights(kept)
        return work, history


@dataclass(frozen=True)
class IBAU(Defense):
    """I-BAU (Zeng et al., ICLR 2022): adversarial unlearning of a universal perturbation with
    the implicit hypergradient (:func:`ibau_unlearn`).

    The clean data is split into an unlearning part and a held-out part
    (:func:`~badnet_repair.defenses.tuning.split_clean`); the held-out part only measures each
    round's clean accuracy, recorded in the history (the last round's model is kept, as in the
    paper). Settings as in :func:`ibau_unlearn`, plus ``holdout_fraction`` (default 0.2).
    """

    name: ClassVar[str] = "i-bau"
    summary: ClassVar[str] = ("unlearn a universal adversarial perturbation with the implicit hypergradient "
                              "(Zeng et al. 2022)")

    rounds: int = setting(5, "unlearning rounds (perturbation search, then a pass of weight updates)")
    fixed_point_steps: int = setting(5, "fixed-point iterations of the implicit hypergradient (K)")
    learning_rate: float = setting(1e-3, "Adam's rate for the weights")
    batch_size: int = setting(100, "batch size")
    perturbation_lr: float = setting(10.0, "SGD rate of the universal perturbation search")
    fixed_point_lr: float = setting(0.1, "step of the fixed-point map")
    regularization: float = setting(1e-3, "weight of |delta|^2 in the inner loss")
    portion: float = setting(0.01, "share of each batch carrying the perturbation (at least one image)")
    max_norm: float | None = setting(None, "L2 radius of the perturbation, in pixel ranges (None: unbounded)")
    pixel_scale: float | None = setting(None, "pixel value of one perturbation unit (None: 1 or 255 from the data)")
    holdout_fraction: float = setting(0.2, "validation share held out to measure each round")
    budget: float | None = setting(3.0, BUDGET_HELP)
    seed: int = setting(0, "split, batch order and TensorFlow seed")

    def repair(self, model: Any, clean: Dataset, *, progress: bool = False) -> Repair:
        """The unlearned model, with its per-round history. Where the last round falls more than
        ``budget`` points below B on the held-out part, the last round within it is returned
        (round 0 is B itself), with a loud line in :attr:`Repair.warnings`."""
        from ..nets.trainer import right_on
        from .tuning import check_budget, split_clean

        tune, holdout, _, _ = split_clean(clean, holdout_fraction=self.holdout_fraction, seed=self.seed)
        base_right = right_on(model, holdout)
        base = float(100.0 * np.mean(base_right))
        floor = None if self.budget is None else base - self.budget
        settings = {k: v for k, v in self.get_params().items() if k not in ("holdout_fraction", "budget")}
        net, history = ibau_unlearn(model, tune, holdout=holdout, floor=floor, progress=progress, **settings)
        last = history[-1]["holdout_accuracy"]
        within = [i for i, h in enumerate(history) if floor is None or h["holdout_accuracy"] >= floor]
        label = "B" if within[-1] == 0 else f"round {within[-1]}"
        # the paired scores are read only where the last round is kept, and then ``net`` is it
        check = check_budget(self.name, last, base, self.budget, [(label, history[within[-1]]["holdout_accuracy"])],
                             (base_right, right_on(net, holdout)))
        if check.fallback == "B":
            net = model
        choices = {"base_holdout_accuracy": history[0]["holdout_accuracy"], "holdout_accuracy": check.accuracy,
                   "kept_round": within[-1] if check.fallback else len(history) - 1, "fallback": check.fallback}
        return Repair(defense=self.name, models=(Repaired(label=self.name, model=net),),
                      record=self.make_record(choices, history),
                      warnings=check.lines)
