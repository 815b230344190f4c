"""The detector registry: what the command line, ``detect``, ``compare`` and the notebook offer by name."""

from __future__ import annotations

from typing import Any

from .base import Detector
from .disagreement import Disagreement
from .features import FeatureDistance, FeatureEnsemble
from .reversed_trigger import ReversedTriggerDetector
from .scaleup import ScaleUp
from .strip import Strip
from .teco import TeCo

__all__ = ["DEFAULT_DETECTORS", "DEFAULT_FALSE_ALARM", "REGISTRY", "make_detector", "register_detector"]

#: Registry name -> detector class, in the order tables list them. Each is made from keyword
#: settings alone (:meth:`~badnet_repair.detectors.Detector.settings`) and builds what else it
#: needs in ``fit``.
REGISTRY: dict[str, type[Detector]] = {cls.name: cls for cls in (
    Disagreement, Strip, ReversedTriggerDetector, FeatureDistance, FeatureEnsemble, ScaleUp, TeCo)}

#: The detectors a GoodNet combines when none are named (``detect``, the notebook), and G's
#: false-alarm budget when none is given (% of held-out clean images, split equally among its
#: detectors by ``workflow.detect.make_detectors``): chosen among declared candidates on tuning
#: BadNets by rules declared before the runs (docs/research/detection32.md, rounds 5 and 8). The
#: feature detectors set it on out-of-fold scores of every clean image (``folds``, default 5),
#: which flag fewer new clean images than the budget (about 3 % at 5 %); a detector whose threshold
#: rests on a few held-out images a class can flag more than its share, so choose its budget lower.
DEFAULT_DETECTORS: tuple[str, ...] = ("feature-ensemble",)
DEFAULT_FALSE_ALARM: float = 5.0


def register_detector(cls: type[Detector], *, replace: bool = False) -> type[Detector]:
    """Add a detector class to :data:`REGISTRY` under its ``name`` (usable as a class decorator),
    so that the command line, ``detect``, ``compare`` and the notebook can use it by name.

    Raises:
        ValueError: for a class that is not a :class:`Detector` with a ``name``, or a name already
            taken (unless ``replace``).
    """
    if not (isinstance(cls, type) and issubclass(cls, Detector)):
        raise ValueError(f"{cls!r} is not a Detector class")
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise ValueError(f"{cls.__name__} has no registry name (a class attribute `name`)")
    if name in REGISTRY and REGISTRY[name] is not cls and not replace:
        raise ValueError(f"a detector named {name!r} is registered already ({REGISTRY[name].__name__})")
    REGISTRY[name] = cls
    return cls


def make_detector(name: str, **settings: Any) -> Detector:
    """The detector registered as ``name`` with the given settings (the others at their defaults).

    Raises:
        ValueError: for an unknown detector or setting, naming the known ones.
    """
    if name not in REGISTRY:
        raise ValueError(f"unknown detector {name!r}; known: {', '.join(REGISTRY)}")
    cls = REGISTRY[name]
    unknown = sorted(set(settings) - set(cls.settings()))
    if unknown:
        raise ValueError(f"unknown setting(s) {', '.join(unknown)} for detector {name!r}; "
                         f"its settings: {', '.join(cls.settings()) or 'none'}")
    return cls(**settings)
