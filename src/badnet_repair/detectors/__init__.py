"""Detectors on one interface: what a GoodNet uses to flag triggered inputs.

Adding a detector: subclass :class:`Detector` in a new module (settings in ``__init__``,
``fit``, ``scores``, ``flags``), then add it to :data:`REGISTRY`.
"""

from __future__ import annotations

from .base import Detector, goodnet_classes
from .disagreement import Disagreement
from .strip import Strip

__all__ = ["REGISTRY", "Detector", "Disagreement", "Strip", "goodnet_classes"]

#: Registry name -> detector class.
REGISTRY: dict[str, type[Detector]] = {cls.name: cls for cls in (Disagreement, Strip)}
