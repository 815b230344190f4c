"""Defenses on one interface, and the registry the CLI and configurations read.

Adding a defense: write a frozen dataclass subclassing :class:`Defense` in a new module
(settings as typed fields, ``name``, ``summary``, ``repair(model, clean)``; a defense that
trains subclasses :class:`FineTuning` and supplies its parts), then add it to
:data:`REGISTRY` below, or from outside the package with :func:`register_defense`. See
docs/architecture.md.
"""

from __future__ import annotations

from typing import Any

from .base import Defense, Repair, Repaired
from .btidbf import BTIDBFUnlearning
from .cleanse import NeuralCleansePruning, NeuralCleanseUnlearning
from .discriminant import DiscriminantFusion, DiscriminantGate
from .feature_gate import FeatureGate, TwoGates
from .finetuning import FinePruning, FineTuning
from .fst import FeatureShiftFinePruning, FeatureShiftTuning
from .ibau import IBAU
from .pruning import Pruning
from .rnp import ReconstructiveNeuronPruning
from .sam import FineTuningSAM
from .sau import SharedAdversarialUnlearning
from .subspace import CleanSubspaceProjection, SubspaceFineTuning
from .tsbd import TwoStageBackdoorDefense

__all__ = ["DEFAULT_DEFENSE", "IBAU", "REGISTRY", "BTIDBFUnlearning", "CleanSubspaceProjection",
           "Defense", "DiscriminantFusion", "DiscriminantGate", "FeatureGate", "FeatureShiftFinePruning",
           "FeatureShiftTuning",
           "FinePruning", "FineTuning", "FineTuningSAM", "NeuralCleansePruning", "NeuralCleanseUnlearning", "Pruning",
           "ReconstructiveNeuronPruning", "Repair", "Repaired", "SharedAdversarialUnlearning", "SubspaceFineTuning",
           "TwoGates", "TwoStageBackdoorDefense", "make_defense", "register_defense"]

#: Registry name -> defense class, in the order tables list them.
REGISTRY: dict[str, type[Defense]] = {cls.name: cls for cls in (
    FineTuning, Pruning, FinePruning, NeuralCleanseUnlearning, NeuralCleansePruning, FineTuningSAM, IBAU,
    FeatureShiftTuning, FeatureShiftFinePruning, SharedAdversarialUnlearning, BTIDBFUnlearning,
    TwoStageBackdoorDefense, ReconstructiveNeuronPruning, CleanSubspaceProjection,
    SubspaceFineTuning, DiscriminantFusion, DiscriminantGate, FeatureGate, TwoGates)}

#: The recommended removal defense: ``repair``'s default and the notebook's beyond-the-lab step (chosen by issue
#: 31's round 18 on its tuning BadNets; docs/research/removal31.md).
DEFAULT_DEFENSE = TwoGates.name


def register_defense(cls: type[Defense], *, replace: bool = False) -> type[Defense]:
    """Add a defense class to :data:`REGISTRY` under its ``name`` (usable as a class decorator),
    so that the command line, ``compare``, ``bench`` and the notebook can use it by name.

    Raises:
        ValueError: for a class that is not a :class:`Defense` dataclass with a ``name``, or a
            name already taken (unless ``replace``).
    """
    import dataclasses

    if not (isinstance(cls, type) and issubclass(cls, Defense) and dataclasses.is_dataclass(cls)):
        raise ValueError(f"{cls!r} is not a Defense dataclass")
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise ValueError(f"{cls.__name__} has no registry name (a class attribute `name`)")
    if name in REGISTRY and REGISTRY[name] is not cls and not replace:
        raise ValueError(f"a defense named {name!r} is registered already ({REGISTRY[name].__name__})")
    REGISTRY[name] = cls
    return cls


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
