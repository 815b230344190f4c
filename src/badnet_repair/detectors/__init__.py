"""Detectors on one interface: what a GoodNet uses to flag triggered inputs.

Adding a detector: subclass :class:`Detector` in a new module (settings in ``__init__``,
``fit``, ``scores``, ``flags``), then add it to :data:`REGISTRY`. Neural Cleanse
(:class:`NeuralCleanse`) is a model-level scan: it names a BadNet's target classes and
reverse-engineers their triggers; :class:`ReversedTriggerDetector` turns a scan into an
input-level detector.
"""

from __future__ import annotations

from .base import Detector, goodnet_classes
from .combine import AnyOf
from .disagreement import Disagreement
from .neural_cleanse import CleanseScan, NeuralCleanse, ReversedTrigger, ReversedTriggerDetector, anomaly_index
from .strip import Strip

__all__ = ["REGISTRY", "AnyOf", "CleanseScan", "Detector", "Disagreement", "NeuralCleanse", "ReversedTrigger",
           "ReversedTriggerDetector", "Strip", "anomaly_index", "goodnet_classes"]

#: Registry name -> detector class.
REGISTRY: dict[str, type[Detector]] = {cls.name: cls for cls in (Disagreement, Strip, ReversedTriggerDetector,
                                                                    AnyOf)}
