"""Default settings shared by the library, the CLI and the notebook (no heavy imports here,
so that ``badnet-repair --help`` stays fast)."""

from __future__ import annotations

from typing import Any

__all__ = ["ENSEMBLE_MEANS", "FINE_TUNING"]

#: How several fine-pruned members' probabilities can be combined (the first is the default).
ENSEMBLE_MEANS = ("geometric", "arithmetic")

#: Fine-tuning and fine-pruning defaults (Liu et al., RAID 2018, Section 5). Measured on the
#: demo BadNets (docs/demo_comparison.md): Adam at a constant 1e-3 for 10 epochs without
#: augmentation leaves a pruning-aware backdoor at 64 % attack success; these settings
#: remove it at about 2 points of clean accuracy. ``members`` > 1 averages several networks
#: tuned on different splits (more clean accuracy on real faces, K times the time; docs/results.md),
#: by the geometric mean of their probabilities unless ``ensemble_mean`` says "arithmetic".
FINE_TUNING: dict[str, Any] = {
    "accuracy_drop": 4.0,
    "holdout_fraction": 0.2,
    "members": 1,
    "ensemble_mean": ENSEMBLE_MEANS[0],
    "epochs": 50,
    "learning_rate": 2e-3,
    "batch_size": 64,
    "schedule": "cosine",
    "shift": 2,
    "flip": True,
    "clipnorm": 1.0,
    "distill": 0.0,
    "weight_decay": 0.0,
}
