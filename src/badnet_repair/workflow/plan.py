"""Time estimates before long steps, measured on the data at hand.

The lab's own steps take seconds; the defenses beyond it train networks, and their time grows
with the clean set's size and the model's cost. Before a long step starts, the notebook and the
command line say what will run and about how long it will take, from a few timed batches of the
model on the user's own images (not from constants measured elsewhere), and can fit a
fine-tuning defense's epochs to a time budget.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..defenses import Defense
from ..formats.data import Dataset

__all__ = ["Estimate", "ModelSpeed", "estimate_detector", "estimate_repair", "fit_to_budget", "measure_speed"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelSpeed:
    """Seconds per image of a model on this machine, measured on a sample of the user's images.

    Attributes:
        predict: seconds per image of a forward pass (inference, large batches).
        train: seconds per image of a training step (forward and backward, batch ``batch_size``).
        batch_size: the training batch size timed.
    """

    predict: float
    train: float
    batch_size: int


@dataclass(frozen=True)
class Estimate:
    """What a step will run and about how long it takes.

    Attributes:
        what: the step, in a few words (``"fine-pruning"``).
        seconds: the estimate.
        detail: how it was worked out (epochs, images, seconds per image).
    """

    what: str
    seconds: float
    detail: str

    def __str__(self) -> str:
        return f"{self.what}: about {_duration(self.seconds)} ({self.detail})"


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


def measure_speed(model: Any, data: Dataset | np.ndarray, *, batch_size: int = 64, images: int = 512) -> ModelSpeed:
    """Time the model's forward pass and training step on up to ``images`` of ``data``.

    The model is not changed: the training step runs on a copy. The first call of each is a
    warm-up (tracing) and is not counted; the training time is the median of three passes.

    Args:
        model: a Keras model (N, H, W, C) -> (N, K).
        data: images (a Dataset or an array).
        batch_size: the training batch size, default 64 (fine-tuning's).
        images: images timed, default 512.

    Returns:
        ModelSpeed.
    """
    import keras

    x = np.asarray((data.x if isinstance(data, Dataset) else data)[:images], dtype=np.float32)
    if len(x) == 0:
        raise ValueError("cannot time a model on no images")
    model.predict(x[: min(len(x), 64)], batch_size=512, verbose=0)
    start = time.perf_counter()
    model.predict(x, batch_size=512, verbose=0)
    predict = (time.perf_counter() - start) / len(x)
    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    k = int(model.outputs[0].shape[-1])
    y = np.eye(k, dtype=np.float32)[np.arange(len(x)) % k]
    copy.compile(optimizer=keras.optimizers.Adam(1e-4), loss="categorical_crossentropy")
    # the first fit traces the training step and is not timed; a shared machine's noise is
    # damped by the median of three timed passes
    copy.fit(x[:batch_size], y[:batch_size], batch_size=batch_size, epochs=1, verbose=0)
    times = []
    for _ in range(3):
        start = time.perf_counter()
        copy.fit(x, y, batch_size=batch_size, epochs=1, verbose=0)
        times.append((time.perf_counter() - start) / len(x))
    train = float(np.median(times))
    return ModelSpeed(predict=predict, train=train, batch_size=batch_size)


def estimate_repair(defense: Defense, clean: Dataset | int, speed: ModelSpeed) -> Estimate | None:
    """About how long ``defense.repair`` takes on ``clean``, for the fine-tuning family.

    Counts what the trainer runs: per member, ``epochs`` (and FST's ``head_epochs``) passes
    over the tuning part at the cost of the defense's step (its ``step_cost()``), a held-out
    evaluation after each, and distillation's extra forward pass over the tuning part where it is
    on; a defense that trains several networks per member says so (``networks_per_member``).

    Args:
        defense: a defense whose settings include ``epochs`` (fine-tuning, fine-pruning,
            FT-SAM, FST, FST-FP); others return None.
        clean: the clean data it will repair from, or its size.
        speed: :func:`measure_speed` of the model.

    Returns:
        Estimate, or None where the defense's cost is not modelled.
    """
    p = defense.get_params()
    if "epochs" not in p:
        return None
    n = clean if isinstance(clean, int) else len(clean)
    held = float(p.get("holdout_fraction", 0.2))
    tune, holdout = n * (1 - held), n * held
    members = int(p.get("members", 1))
    # what the defense declares: networks per member (fst-fp: one of each method), and the
    # cost of its step in plain steps (FT-SAM: two gradients per batch)
    parts = int(getattr(defense, "networks_per_member", 1))
    epochs = int(p["epochs"]) + int(p.get("head_epochs", 0) or 0)
    step = speed.train * float(getattr(defense, "step_cost", lambda: 1.0)())
    distill = speed.predict if p.get("distill") else 0.0
    per_epoch = tune * (step + distill) + holdout * speed.predict
    # work outside the epochs (TSBD's unlearning, for example), in plain passes over the tuning part
    fixed = float(getattr(defense, "fixed_cost", lambda: 0.0)()) * tune * speed.train
    seconds = parts * members * (epochs * per_epoch + fixed)
    detail = (f"{parts * members} network(s) x {epochs} epochs x {tune:,.0f} tuning + {holdout:,.0f} held-out "
              f"images; {1e3 * speed.train:.2f} ms per training image, {1e3 * speed.predict:.2f} ms per prediction, "
              "measured here")
    return Estimate(defense.name, seconds, detail)


def estimate_detector(copies: int, images: int, speed: ModelSpeed, *, what: str = "STRIP") -> Estimate:
    """About how long STRIP takes to score ``images`` inputs, each superimposed on ``copies`` clean ones."""
    seconds = copies * images * speed.predict
    return Estimate(what, seconds, f"{images:,} inputs x {copies} superimposed copies; "
                                   f"{1e3 * speed.predict:.2f} ms per prediction, measured here")


def fit_to_budget(defense: Defense, clean: Dataset | int, speed: ModelSpeed, *, minutes: float | None,
                  min_epochs: int = 1) -> tuple[Defense, Estimate | None]:
    """The defense with its epochs cut so that its estimated time fits ``minutes``.

    A budget is a product decision, not a tuned setting: the defense's own default (chosen on
    tuning BadNets) runs where it fits; where it does not, fewer epochs run and the returned
    estimate says so, and a warning is logged, so that the cut is never silent.

    Args:
        defense: a defense with an ``epochs`` setting (others are returned unchanged).
        clean: the clean data it will repair from, or its size.
        speed: :func:`measure_speed` of the model.
        minutes: the budget; None for no budget.
        min_epochs: never fewer epochs than this, default 1.

    Returns:
        (the defense, possibly with fewer epochs; its estimate, None where not modelled).
    """
    est = estimate_repair(defense, clean, speed)
    if est is None or minutes is None or est.seconds <= 60.0 * minutes:
        return defense, est
    epochs = int(defense.get_params()["epochs"])
    fitted = max(min_epochs, int(epochs * 60.0 * minutes / est.seconds))
    cut = dataclasses.replace(defense, epochs=fitted)  # type: ignore[type-var]
    new = estimate_repair(cut, clean, speed)
    assert new is not None
    note = (f"{epochs} epochs would take about {_duration(est.seconds)} here; {fitted} epochs fit the "
            f"{minutes:g}-minute budget (the defense's default is {epochs}; results may differ from it)")
    log.warning("%s: %s", defense.name, note)
    return cut, Estimate(new.what, new.seconds, f"{new.detail}; {note}")
