"""Detectors on one interface: what a GoodNet uses to flag triggered inputs.

Adding a detector: subclass :class:`Detector` (or :class:`ThresholdDetector`) in a new module
(settings as keyword arguments of ``__init__``, ``fit``, ``scores``, ``flags``; its Keras form
``keras_flags``, or its fitted ``state`` where it has none), then add it to :data:`REGISTRY` in
``registry.py``, or from outside the package with :func:`register_detector`. Neural Cleanse
(:class:`NeuralCleanse`) is a model-level scan: it names a BadNet's target classes and
reverse-engineers their triggers; :class:`ReversedTriggerDetector` turns a scan into an
input-level detector.
"""

from __future__ import annotations

from .base import Detector, NoKerasForm, ThresholdDetector, calibration_split, goodnet_classes, threshold_at
from .combine import AnyOf
from .disagreement import Disagreement
from .features import FeatureDistance, FeatureEnsemble
from .neural_cleanse import CleanseScan, NeuralCleanse, ReversedTrigger, anomaly_index
from .registry import DEFAULT_DETECTORS, DEFAULT_FALSE_ALARM, REGISTRY, make_detector, register_detector
from .reversed_trigger import ReversedTriggerDetector
from .scaleup import ScaleUp
from .strip import Strip
from .teco import TeCo

__all__ = [
    "DEFAULT_DETECTORS",
    "DEFAULT_FALSE_ALARM",
    "REGISTRY",
    "AnyOf",
    "CleanseScan",
    "Detector",
    "Disagreement",
    "FeatureDistance",
    "FeatureEnsemble",
    "NeuralCleanse",
    "NoKerasForm",
    "ReversedTrigger",
    "ReversedTriggerDetector",
    "ScaleUp",
    "Strip",
    "TeCo",
    "ThresholdDetector",
    "anomaly_index",
    "calibration_split",
    "goodnet_classes",
    "make_detector",
    "register_detector",
    "threshold_at",
]
