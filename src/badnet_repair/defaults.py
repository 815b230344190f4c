"""Default settings shared by the library, the CLI and the notebook (no heavy imports here,
so that ``badnet-repair --help`` stays fast)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

__all__ = ["ENSEMBLE_MEANS", "FINE_TUNING", "TuningSettings"]

#: How several fine-pruned members' probabilities can be combined (the first is the default).
ENSEMBLE_MEANS = ("geometric", "arithmetic")

#: Fine-tuning and fine-pruning defaults (Liu et al., RAID 2018, Section 5). Measured on the
#: demo BadNets (docs/demo_comparison.md): Adam at a constant 1e-3 for 10 epochs without
#: augmentation leaves a pruning-aware backdoor at 64 % attack success; these settings
#: remove it at about 2 points of clean accuracy. ``members`` > 1 averages several networks
#: tuned on different splits (more clean accuracy on real faces, K times the time; docs/results.md),
#: by the geometric mean of their probabilities unless ``ensemble_mean`` says "arithmetic".
@dataclass(frozen=True)
class TuningSettings:
    """Fine-tuning's settings, declared once: the defaults of
    :func:`~badnet_repair.finetune.fine_prune`, the fields of the fine-tuning and
    fine-pruning defenses, and the CLI's ``fine-prune`` options.

    Attributes:
        holdout_fraction: share of the clean data held out to choose the epoch, default 0.2.
        members: networks tuned on different splits and averaged, default 1.
        ensemble_mean: how members are averaged, ``"geometric"`` (default) or ``"arithmetic"``.
        epochs: default 50.
        learning_rate: Adam's peak rate, default 2e-3.
        batch_size: default 64.
        schedule: ``"cosine"`` (default) or ``"constant"``.
        shift: random translation in pixels, default 2.
        flip: random horizontal flips, default True.
        clipnorm: gradient norm clip, default 1.0 (None: no clipping).
        distill: weight of the BadNet's own correct predictions in the targets, default 0.
        weight_decay: decoupled weight decay (AdamW), default 0.
    """

    holdout_fraction: float = 0.2
    members: int = 1
    ensemble_mean: Literal["geometric", "arithmetic"] = "geometric"
    epochs: int = 50
    learning_rate: float = 2e-3
    batch_size: int = 64
    schedule: str = "cosine"
    shift: int = 2
    flip: bool = True
    clipnorm: float | None = 1.0
    distill: float = 0.0
    weight_decay: float = 0.0


#: The defaults as a dict, with fine-pruning's accuracy drop (points) in front.
FINE_TUNING: dict[str, Any] = {"accuracy_drop": 4.0, **asdict(TuningSettings())}
