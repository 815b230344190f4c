"""Defenses on one interface, and the registry the CLI and configurations read.

Adding a defense: write a frozen dataclass subclassing :class:`Defense` in a new module
(settings as typed fields, ``name``, ``summary``, ``repair(model, clean)``), then add it
to :data:`REGISTRY` below. See docs/architecture.md.
"""

from __future__ import annotations

from typing import Any

from .base import Defense, Repair, Repaired
from .cleanse import NeuralCleansePruning, NeuralCleanseUnlearning
from .finetuning import FeatureShiftFinePruning, FeatureShiftTuning, FinePruning, FineTuning, FineTuningSAM
from .ibau import IBAU
from .pruning import Pruning

__all__ = ["IBAU", "REGISTRY", "Defense", "FeatureShiftFinePruning", "FeatureShiftTuning", "FinePruning",
           "FineTuning", "FineTuningSAM", "NeuralCleansePruning", "NeuralCleanseUnlearning", "Pruning", "Repair",
           "Repaired", "make_defense"]

#: Registry name -> defense class, in the order tables list them.
REGISTRY: dict[str, type[Defense]] = {cls.name: cls for cls in (
    FineTuning, Pruning, FinePruning, NeuralCleanseUnlearning, NeuralCleansePruning, FineTuningSAM, IBAU,
    FeatureShiftTuning, FeatureShiftFinePruning)}


def make_defense(name: str, **settings: Any) -> Defense:
    """The defense registered as ``name`` with the given settings.

    Raises:
        ValueError: for an unknown defense or setting, naming the known ones.
    """
    if name not in REGISTRY:
        raise ValueError(f"unknown defense {name!r}; known: {', '.join(REGISTRY)}")
    cls = REGISTRY[name]
    unknown = sorted(set(settings) - set(cls.settings()))
    if unknown:
        raise ValueError(f"unknown setting(s) {', '.join(unknown)} for defense {name!r}; "
                         f"its settings: {', '.join(cls.settings())}")
    if "thresholds" in settings:
        settings["thresholds"] = tuple(float(x) for x in settings["thresholds"])
    return cls(**settings)
