"""FT-SAM: fine-tuning with sharpness-aware steps (Zhu, Wei, Shen, Fan and Wu, "Enhancing
Fine-Tuning Based Backdoor Defense with Sharpness-Aware Minimization", ICCV 2023)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from ..defaults import setting
from ..nets.trainer import Step, gradients_at
from .finetuning import FineTuning, Member, TrainingPlan

__all__ = ["FineTuningSAM", "SharpnessAwareStep"]


class SharpnessAwareStep(Step):
    """A sharpness-aware step (SAM; Foret et al., ICLR 2021), or its adaptive form (ASAM; Kwon et
    al., ICML 2021).

    The step takes the batch's gradient ``g`` at the weights ``w``, moves to the worst nearby
    weights ``w + e`` with ``e = rho * T^2 g / |T g|`` (``T = |w|`` elementwise when adaptive,
    else the identity), and returns the gradient taken there, which the optimiser applies to
    ``w``. The adaptive radius is relative to each weight's size, so one ``rho`` suits layers of
    any scale (DeepID's first layers see 0..255 pixels). TensorFlow backend.

    Args:
        rho: the neighbourhood's radius, > 0.
        adaptive: ASAM's scaling, default True.
    """

    def __init__(self, rho: float, adaptive: bool = True) -> None:
        if not rho > 0:
            raise ValueError(f"rho must be > 0, not {rho}")
        self.rho = float(rho)
        self.adaptive = bool(adaptive)

    def gradients(self, trainer: Any, x: Any, y: Any) -> tuple[Any, Any, list[Any]]:
        import tensorflow as tf

        weights = trainer.trainable_variables
        loss, y_pred, grads = super().gradients(trainer, x, y)
        scale = [tf.abs(w) if self.adaptive else tf.ones_like(w) for w in weights]
        norm = tf.linalg.global_norm([t * g for t, g in zip(scale, grads, strict=True)]) + 1e-12
        steps = [self.rho * t * t * g / norm for t, g in zip(scale, grads, strict=True)]
        return loss, y_pred, gradients_at(trainer, x, y, steps)


@dataclass(frozen=True)
class FineTuningSAM(FineTuning):
    """FT-SAM (Zhu, Wei, Shen, Fan and Wu, ICCV 2023): fine-tuning on clean data with
    sharpness-aware steps (:class:`SharpnessAwareStep`), the epoch kept chosen on a held-out part.

    The paper's observation: the weights a backdoor uses are large, so the adaptive
    perturbation moves them most, and minimising the worst nearby loss on clean data pushes
    them out of the backdoor's narrow minimum, which plain fine-tuning with few clean images
    stays in. It needs no BatchNorm and no trigger.

    Settings: those of :class:`~badnet_repair.defenses.finetuning.FineTuning`, plus ``sam_rho``
    (default 0.2, chosen on the tuning BadNets of benchmarks/removal_tuning.toml;
    docs/research/removal.md) and ``sam_adaptive`` (default True).
    """

    name: ClassVar[str] = "ft-sam"
    summary: ClassVar[str] = "fine-tune with sharpness-aware steps, epoch chosen on a held-out part (Zhu et al. 2023)"

    sam_rho: float = setting(0.2, "radius of the sharpness-aware weight perturbation")
    sam_adaptive: bool = setting(True, "radius relative to each weight's size (adaptive SAM)")

    def step_cost(self) -> float:
        """Two gradients per batch (one plain where ``sam_rho`` is 0)."""
        return 2.0 if self.sam_rho else 1.0

    def plan(self, member: Member, start: Any, pruned: tuple[int, ...]) -> TrainingPlan:
        """Fine-tuning's parts, with sharpness-aware steps (plain ones where ``sam_rho`` is 0)."""
        base = super().plan(member, start, pruned)
        step = SharpnessAwareStep(self.sam_rho, self.sam_adaptive) if self.sam_rho else None
        return TrainingPlan(parts=base.parts, step=step)
