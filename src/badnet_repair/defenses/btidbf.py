"""BTI-DBF(U): backdoor trigger inversion by decoupling benign features, then unlearning (Xu, Huang,
Li, Qin and Ren, "Towards Reliable and Efficient Backdoor Trigger Inversion via Decoupling Benign
Features", ICLR 2024).

Trigger inversion usually hunts the backdoor's features directly, class by class (Neural
Cleanse). BTI-DBF turns it round: the features clean images need are easy to find from clean
data, so it finds those, and calls whatever else moves the network "backdoor":

1. decouple benign features: on B's features (the input of the classifier head), learn a soft
   mask ``m`` such that B's head still gives the true class from ``m * f`` and no longer from
   ``(1 - m) * f`` (:func:`mask_loss`);
2. invert: train a small image-to-image generator ``G`` (:class:`TriggerGenerator`) so that
   ``G(x)`` stays near ``x``, keeps the benign features (``m * f(G(x))`` near ``m * f(x)``) and
   moves the others as far as it can (:func:`generator_loss`): a poisoned-image generator,
   found without a scan of the classes;
3. unlearn: fine-tune on the clean images with a share of them replaced by ``G(x)`` at their
   true labels (:class:`GeneratedPoison`), so the network stops answering the moved features.

The "U" variant alternates: every few epochs the mask and the generator are found again on the
network being unlearned, so the generator chases what is left of the backdoor.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from ..defaults import setting
from ..errors import ModelError
from ..nets.trainer import Part
from .finetuning import FineTuning, Member, TrainingPlan

__all__ = ["BTIDBFUnlearning", "GeneratedPoison", "InversionSettings", "TriggerGenerator", "benign_mask",
           "generator_loss", "mask_loss"]

log = logging.getLogger(__name__)

#: One generator step's cost in plain training steps (measured: 1.75 on the demo's DeepID at 55 x 47, width 16,
#: batch 64, on a 2-core CPU: the feature network's forward pass on x and on G(x), its backward pass to the
#: image and G's own forward and backward passes).
_GENERATOR_STEP_COST = 1.8


def benign_mask(logits: Any) -> Any:
    """The soft mask in (0, 1) from its unbounded parameters: ``tanh(w) / 2 + 1/2`` (the authors'
    parametrisation, which keeps Adam's steps well scaled at both ends)."""
    import tensorflow as tf

    return tf.tanh(logits) / 2.0 + 0.5


def mask_loss(features: Any, labels: Any, logits: Any, kernel: Any, bias: Any, mask_size: float) -> Any:
    """BTI-DBF's decoupling loss for a batch (Xu et al. 2024, Section 3):

    ``CE(head(m * f), y) - CE(head((1 - m) * f), y) + mask_size * mean(m)``

    with ``m = benign_mask(logits)``, ``head(z) = z K + b`` (the head's class scores before its
    softmax) and the mean cross-entropy over the batch. The first term keeps the true class on
    the masked features, the second pushes it off the rest; ``mask_size`` (0 in the paper) asks
    for the smallest mask that does so.

    Args:
        features: (N, D) B's features of clean images (constants).
        labels: (N,) their classes.
        logits: (D,) the mask's parameters (the variable trained).
        kernel, bias: the head's (D, K) kernel and (K,) bias (None: no bias).
        mask_size: weight of the mask's mean.

    Returns:
        The scalar loss.
    """
    import tensorflow as tf

    m = benign_mask(logits)

    def scores(z: Any) -> Any:
        out = tf.matmul(z, kernel)
        return out if bias is None else out + bias

    def ce(z: Any) -> Any:
        return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=scores(z)))

    return ce(m * features) - ce((1.0 - m) * features) + mask_size * tf.reduce_mean(m)


class TriggerGenerator:
    """The inverted poisoned-image generator: a tiny conv net whose bounded output is added to the
    image,

    ``G(x) = clip(x + bound * scale * tanh(net(x / scale) + P), 0, scale)``

    where ``net`` is three 3 x 3 convolutions (``width`` channels, ReLU; no BatchNorm), ``P`` a
    learned per-pixel map (zero at first; BadNets triggers sit at one place, which the convolutions
    alone cannot know; the authors' U-Net learns it from its padding), ``scale`` the pixel range
    (255 for 0..255 images) and ``bound`` the largest change of a pixel in units of it. The last
    convolution starts near zero, so ``G`` starts near the identity (the authors pre-train their
    U-Net to reproduce its input instead).

    Args:
        image_shape: (H, W, C).
        width: channels of the hidden convolutions.
        bound: in (0, 1].
        scale: the pixel range.
        seed: the weights' seed.
    """

    def __init__(self, image_shape: tuple[int, ...], *, width: int, bound: float, scale: float, seed: int) -> None:
        import keras

        h, w, c = (int(d) for d in image_shape)
        init = keras.initializers
        x = keras.Input((h, w, c), name="image")
        z = keras.layers.Rescaling(1.0 / scale, name="to_unit")(x)
        for i in range(2):
            z = keras.layers.Conv2D(width, 3, padding="same", activation="relu", name=f"conv_{i + 1}",
                                    kernel_initializer=init.GlorotUniform(seed=seed + i))(z)
        z = keras.layers.Conv2D(c, 3, padding="same", name="residual",
                                kernel_initializer=init.RandomNormal(stddev=1e-2, seed=seed + 2))(z)
        self.net = keras.Model(x, z, name="trigger_generator")
        self.pattern = keras.Variable(np.zeros((h, w, c), np.float32), name="trigger_pattern")
        self.bound = float(bound)
        self.scale = float(scale)

    @property
    def trainable_variables(self) -> list[Any]:
        return [*self.net.trainable_variables, self.pattern]

    def __call__(self, x: Any) -> Any:
        import tensorflow as tf

        change = self.bound * self.scale * tf.tanh(self.net(x, training=False) + self.pattern)
        return tf.clip_by_value(x + change, 0.0, self.scale)

    def apply(self, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """``G`` on numpy images, in batches."""
        import tensorflow as tf

        out = [np.asarray(self(tf.constant(x[i:i + batch_size], tf.float32))) for i in range(0, len(x), batch_size)]
        return np.concatenate(out) if out else np.asarray(x, np.float32)


def generator_loss(features: Any, generator: Any, x: Any, mask: Any, *, feature_scale: float, norm_bound: float,
                   feature_bound: float, benign_weight: float) -> tuple[Any, Any, Any, Any]:
    """BTI-DBF's inversion loss for a batch (Xu et al. 2024, Section 3, with the switch of the authors' code):

    with ``d = f(G(x)) - f(x)``, ``benign = mean((m d)^2) / S``, ``backdoor = mean(((1 - m) d)^2) / S``
    (``S`` the clean features' mean square, so the bounds do not depend on the features' scale)
    and ``distance = mean(((G(x) - x) / scale)^2)``, the loss is ``distance`` where ``G`` went too
    far (``distance > norm_bound^2`` or ``benign > feature_bound``: pulled back towards ``x``) and
    ``-backdoor + benign_weight * benign`` otherwise.

    Args:
        features: image -> (N, D) B's features (the head's input).
        generator: the generator (``generator.scale`` the pixel range).
        x: (N, H, W, C) clean images.
        mask: (D,) the benign mask (a constant).
        feature_scale: ``S`` (> 0).
        norm_bound: the largest root mean square change of the image, in pixel ranges.
        feature_bound: the largest ``benign`` before the pull-back.
        benign_weight: weight of ``benign`` in the loss.

    Returns:
        (loss, benign, backdoor, distance), scalars.
    """
    import tensorflow as tf

    clean = tf.stop_gradient(features(x, training=False))
    made = generator(x)
    moved = features(made, training=False) - clean
    benign = tf.reduce_mean(tf.square(mask * moved)) / feature_scale
    backdoor = tf.reduce_mean(tf.square((1.0 - mask) * moved)) / feature_scale
    distance = tf.reduce_mean(tf.square((made - x) / generator.scale))
    too_far = tf.logical_or(distance > norm_bound ** 2, benign > feature_bound)
    loss = tf.where(too_far, distance, -backdoor + benign_weight * benign)
    return loss, benign, backdoor, distance


@dataclass(frozen=True)
class InversionSettings:
    """What one inversion round takes (the defense's settings, passed to :class:`GeneratedPoison`)."""

    mask_epochs: int
    mask_lr: float
    mask_size: float
    generator_epochs: int
    generator_lr: float
    generator_width: int
    norm_bound: float
    perturbation_bound: float
    feature_bound: float
    benign_weight: float
    batch_size: int


class GeneratedPoison(Part):
    """BTI-DBF(U)'s part: inverted poisoned images unlearned at their true labels.

    At the start of each of ``rounds`` rounds (spread evenly over the ``epochs``; the first before
    epoch 1, on B itself) the part decouples the benign features of the network being trained and
    trains the generator on them (:meth:`invert`), on that epoch's tuning images (the only images
    the trainer hands a part, so the held-out ones are never used). Every epoch a ``share`` of the
    tuning images (drawn at random) is replaced by ``G(x)``, their labels kept, as Neural Cleanse's
    :class:`~badnet_repair.defenses.cleanse.Stamp` does with its reversed triggers. The generator
    carries on from round to round (so does its optimiser), the mask starts afresh, as in the
    authors' code. Records the last round's numbers each epoch (``inversion_*``).

    Args:
        settings: the inversion's settings.
        rounds: inversion rounds (capped at ``epochs``).
        epochs: the trainer's epochs.
        share: in [0, 1].
        head: the classifier's Dense layer, default found from the graph.
        seed: the generator's weights, the mask's start and the batches' order.
    """

    def __init__(self, settings: InversionSettings, *, rounds: int, epochs: int, share: float,
                 head: str | None = None, seed: int = 0) -> None:
        if not 0.0 <= share <= 1.0:
            raise ValueError(f"generated_share must be in [0, 1], not {share}")
        self.settings = settings
        rounds = max(1, min(int(rounds), int(epochs)))
        self.starts = {1 + (r * int(epochs)) // rounds for r in range(rounds)}
        self.share = float(share)
        self.head_name = head
        self.seed = int(seed)
        self.rng = np.random.default_rng([self.seed, 29])
        self.epoch = 0
        self.round = 0
        self.generator: TriggerGenerator | None = None
        self.stats: dict[str, float] = {}

    def begin(self, network: Any) -> None:
        import keras

        from ..nets.models import classifier_head

        self.network = network
        self.head = classifier_head(network, self.head_name)
        if len(self.head.input.shape) != 2:
            raise ModelError(f"the classifier head {self.head.name!r} takes a tensor of shape {self.head.input.shape}; "
                             "BTI-DBF masks a flat feature vector")
        # shares the network's layers: always the current weights
        self.features = keras.Model(network.inputs, self.head.input, name="head_features")
        self.epoch, self.round, self.generator, self.stats = 0, 0, None, {}

    def transform(self, x: np.ndarray, labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        self.epoch += 1
        if self.epoch in self.starts:
            self.invert(np.asarray(x, np.float32), np.asarray(labels))
        assert self.generator is not None
        x = np.array(x, np.float32, copy=True)
        picked = np.flatnonzero(rng.random(len(x)) < self.share)
        if len(picked):
            x[picked] = self.generator.apply(x[picked])
        return x

    def targets(self, x: np.ndarray, labels: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, dict[str, float]]:
        return targets, dict(self.stats)

    def invert(self, x: np.ndarray, labels: np.ndarray) -> dict[str, float]:
        """One round: decouple the benign features of the network as it is now, then train the
        generator on them. Returns (and records) the round's numbers."""
        import keras
        import tensorflow as tf

        s = self.settings
        self.round += 1
        if self.generator is None:
            # the pixel range, as I-BAU reads it: the bounds are in units of it
            scale = 255.0 if float(np.max(x)) > 1.5 else 1.0
            self.generator = TriggerGenerator(x.shape[1:], width=s.generator_width, bound=s.perturbation_bound,
                                              scale=scale, seed=self.seed)
            self.generator_optimizer = keras.optimizers.Adam(s.generator_lr)
            self.generator_optimizer.build(self.generator.trainable_variables)
            self._generator_step = self._make_generator_step()
        feats = np.asarray(self.features.predict(x, batch_size=512, verbose=0), np.float32)
        mask = self._decouple(feats, labels)
        scale = max(float(np.mean(np.square(feats, dtype=np.float64))), 1e-12)
        mask_t = tf.constant(mask)
        sums = np.zeros(3)
        for _ in range(s.generator_epochs):
            sums[:] = 0.0
            order = self.rng.permutation(len(x))
            for i in range(0, len(x), s.batch_size):
                got = self._generator_step(tf.constant(x[order[i:i + s.batch_size]]), mask_t, tf.constant(scale))
                sums += np.array([float(v) for v in got]) * len(order[i:i + s.batch_size])
        benign, backdoor, distance = sums / len(x)
        # how far the generated images move the network's answers (clean data only)
        made = self.generator.apply(x)
        own = np.argmax(self.network.predict(x, batch_size=512, verbose=0), axis=1)
        now = np.argmax(self.network.predict(made, batch_size=512, verbose=0), axis=1)
        right = own == labels
        flipped = float(100.0 * np.mean(now[right] != labels[right])) if right.any() else 0.0
        self.stats.update({"inversion_round": float(self.round), "inversion_benign_change": float(benign),
                           "inversion_backdoor_change": float(backdoor),
                           "inversion_rms_change": float(np.sqrt(distance)),
                           "inversion_flipped": flipped})
        log.info("BTI-DBF round %d: mask mean %.2f (true class kept by the mask %.1f%%, by the rest %.1f%%); "
                 "generator moves the backdoor features %.3g and the benign %.3g (x clean mean square), "
                 "image RMS change %.3f; it flips %.1f%% of the clean images the network got right", self.round,
                 self.stats["mask_mean"], self.stats["mask_kept"], self.stats["mask_rest_kept"], backdoor, benign,
                 np.sqrt(distance), flipped)
        return dict(self.stats)

    def _decouple(self, feats: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """The benign mask learned on the features ``feats`` of images of classes ``labels``."""
        import keras
        import tensorflow as tf

        s = self.settings
        start = np.asarray(self.rng.standard_normal((feats.shape[1],)), np.float32)
        logits = keras.Variable(start, name="mask_logits")
        optimizer = keras.optimizers.Adam(s.mask_lr)
        optimizer.build([logits])
        kernel = self.head.kernel
        bias = self.head.bias if self.head.use_bias else None

        @tf.function(reduce_retracing=True)
        def step(f: Any, y: Any) -> Any:
            with tf.GradientTape() as tape:
                loss = mask_loss(f, y, logits, kernel, bias, s.mask_size)
            optimizer.apply_gradients([(tape.gradient(loss, logits), logits)])
            return loss

        y = labels.astype(np.int64)
        for _ in range(s.mask_epochs):
            order = self.rng.permutation(len(feats))
            for i in range(0, len(feats), s.batch_size):
                idx = order[i:i + s.batch_size]
                step(tf.constant(feats[idx]), tf.constant(y[idx]))
        m = np.asarray(benign_mask(tf.convert_to_tensor(logits)), np.float32)
        w = np.asarray(kernel)
        b = np.asarray(bias) if bias is not None else 0.0
        self.stats.update({"mask_mean": float(m.mean()),
                           "mask_kept": float(100.0 * np.mean(np.argmax((feats * m) @ w + b, axis=1) == labels)),
                           "mask_rest_kept": float(100.0 * np.mean(np.argmax((feats * (1 - m)) @ w + b, axis=1)
                                                                   == labels))})
        return m

    def _make_generator_step(self) -> Any:
        import tensorflow as tf

        s, generator, optimizer = self.settings, self.generator, self.generator_optimizer
        assert generator is not None

        @tf.function(reduce_retracing=True)
        def step(x: Any, mask: Any, scale: Any) -> Any:
            with tf.GradientTape() as tape:
                loss, benign, backdoor, distance = generator_loss(
                    self.features, generator, x, mask, feature_scale=scale, norm_bound=s.norm_bound,
                    feature_bound=s.feature_bound, benign_weight=s.benign_weight)
            variables = generator.trainable_variables
            optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables, strict=True))
            return benign, backdoor, distance

        return step


@dataclass(frozen=True)
class BTIDBFUnlearning(FineTuning):
    """BTI-DBF(U) (Xu, Huang, Li, Qin and Ren, ICLR 2024): fine-tuning on clean data with a share of
    each epoch's images replaced by poisoned versions from an inverted generator, at their true
    labels (:class:`GeneratedPoison`); the generator is inverted again at the start of each round on
    the network being unlearned. The epoch kept is chosen on a held-out part of the clean data, and
    the clean-accuracy budget holds, as for every fine-tuning defense.

    The inversion (:func:`mask_loss`, :func:`generator_loss`, :class:`TriggerGenerator`) sees only
    the tuning images the trainer hands it each epoch (after augmentation): the held-out part of
    :func:`~badnet_repair.defenses.tuning.split_clean` is never trained on. It needs no BatchNorm, no
    class scan and no trigger shape.

    Settings: those of :class:`~badnet_repair.defenses.finetuning.FineTuning` (epochs 50, learning
    rate 2e-3, ...: the family's, chosen for ~10 clean images per class; the authors' Adam at 1e-4 for
    150 epochs on 5 % of CIFAR-10 barely moves a network with as few images), plus, from the authors'
    code (github.com/xuxiong0214/BTIDBF, ``btidbfu.py`` and ``cfg.py``) unless said otherwise:

    - ``rounds`` 3 and ``generator_epochs`` 5 (ours, for time): the authors' ``nround`` 5 and
      ``uround`` 30 took 572 s on a demo BadNet on 2 CPU cores against fine-tuning's 108 s; three
      rounds of five generator epochs keep the alternation (the first round on B, then on the
      network being unlearned) within the 3-minute aim (step cost 1.54 plain steps). Chosen on
      time alone, before any result; the authors' values are a candidate of the tuning round
      (docs/research/removal31.md). Rounds are spread evenly over the epochs;
    - ``generated_share`` 0.1 (they replace ``0.1 B + 1`` images of each batch of ``B``);
    - ``mask_epochs`` 20 (``mround``) and ``mask_lr`` 0.01 (their Adam on the mask);
    - ``mask_size`` 0: weight of the mask's mean in the decoupling loss; their code computes the
      mask's norm but leaves it out of the loss;
    - ``generator_lr`` 1e-3 (``gen_lr``);
    - ``norm_bound`` 0.11: their generator falls back to minimising the image's mean squared change
      where it exceeds 0.3 on CIFAR-10's standardised pixels (std about 0.2): a root mean square
      of about sqrt(0.3) x 0.2 = 0.11 of the pixel range, here measured in pixel ranges so that it
      holds for 0..255 images;
    - ``feature_bound`` 3 (``feat_bound``, in their ResNet-18's feature units), here in units of the
      clean features' mean square, so that it does not depend on a network's feature scale
      (DeepID's on 0..255 pixels are large);
    - ``benign_weight`` 0.01 (their weight of the benign features' change);
    - ``perturbation_bound`` 0.5 (ours): the largest change of one pixel, in pixel ranges; their U-Net
      has no such cap; the root mean square bound binds first, this one keeps G from painting
      arbitrary content;
    - ``generator_width`` 16 (ours): their generator is a 4-block U-Net with 32 base filters, far
      too slow on a 2-core CPU; the learned per-pixel map gives the small one what its size lacks;
    - ``head``: the classifier's Dense layer, default found from the graph.

    What we leave out of the authors' code: the cross-entropy towards the detected target label
    they add to the generator's loss from the second round (it assumes one target, and the bench
    has multi-target BadNets), and the unlearning loss's term pulling the features of the generated
    images to those of their clean originals (the trainer's steps do not see which images were
    replaced). The paper's method is the unlearning on generated images at their true labels.
    """

    name: ClassVar[str] = "bti-dbf"
    summary: ClassVar[str] = ("unlearn poisoned images from a generator that keeps B's benign features and moves "
                              "the rest (Xu et al. 2024)")

    rounds: int = setting(3, "BTI-DBF: inversion rounds, spread evenly over the epochs (the first on B)")
    generated_share: float = setting(0.1, "BTI-DBF: share of each epoch's tuning images replaced by the generator's "
                                          "poisoned versions, true labels kept")
    mask_epochs: int = setting(20, "BTI-DBF: epochs learning the benign-feature mask, per round")
    mask_lr: float = setting(0.01, "BTI-DBF: Adam's rate for the mask")
    mask_size: float = setting(0.0, "BTI-DBF: weight of the mask's mean in the decoupling loss (0 = the authors')")
    generator_epochs: int = setting(5, "BTI-DBF: epochs training the generator, per round")
    generator_lr: float = setting(1e-3, "BTI-DBF: Adam's rate for the generator")
    generator_width: int = setting(16, "BTI-DBF: channels of the generator's hidden convolutions")
    norm_bound: float = setting(0.11, "BTI-DBF: root mean square change of a generated image, in pixel ranges, above "
                                      "which the generator is pulled back")
    perturbation_bound: float = setting(0.5, "BTI-DBF: largest change of one pixel by the generator, in pixel ranges")
    feature_bound: float = setting(3.0, "BTI-DBF: mean squared change of the benign features (x the clean features' "
                                        "mean square) above which the generator is pulled back")
    benign_weight: float = setting(0.01, "BTI-DBF: weight of the benign features' change in the generator's loss")
    head: str | None = setting(None, "the classifier's Dense layer (default: found from the graph)")

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("rounds", "mask_epochs", "generator_epochs", "generator_width"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, not {getattr(self, name)}")
        for name in ("mask_lr", "generator_lr", "norm_bound", "feature_bound"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, not {getattr(self, name)}")
        for name in ("mask_size", "benign_weight"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, not {getattr(self, name)}")
        if not 0.0 < self.perturbation_bound <= 1.0:
            raise ValueError(f"perturbation_bound must be in (0, 1], not {self.perturbation_bound}")
        if not 0.0 <= self.generated_share <= 1.0:
            raise ValueError(f"generated_share must be in [0, 1], not {self.generated_share}")

    def step_cost(self) -> float:
        """A plain step, plus each round's generator epochs spread over the training epochs (the
        mask's epochs work on cached features and cost next to nothing)."""
        rounds = min(self.rounds, self.epochs)
        return 1.0 + rounds * self.generator_epochs * _GENERATOR_STEP_COST / self.epochs

    def inversion(self) -> InversionSettings:
        """The settings one inversion round takes."""
        return InversionSettings(
            mask_epochs=self.mask_epochs, mask_lr=self.mask_lr, mask_size=self.mask_size,
            generator_epochs=self.generator_epochs, generator_lr=self.generator_lr,
            generator_width=self.generator_width, norm_bound=self.norm_bound,
            perturbation_bound=self.perturbation_bound, feature_bound=self.feature_bound,
            benign_weight=self.benign_weight, batch_size=self.batch_size)

    def plan(self, member: Member, start: Any, pruned: tuple[int, ...]) -> TrainingPlan:
        """Fine-tuning's parts, then the generated poisoned images."""
        base = super().plan(member, start, pruned)
        part = GeneratedPoison(self.inversion(), rounds=self.rounds, epochs=self.epochs, share=self.generated_share,
                               head=self.head, seed=member.seed)
        return TrainingPlan(parts=(*base.parts, part), step=base.step, warmup=base.warmup)
