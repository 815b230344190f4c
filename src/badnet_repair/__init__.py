"""badnet-repair: repair backdoored neural networks (BadNets).

The pruning defense of Liu, Dolan-Gavitt and Garg ("Fine-Pruning", RAID 2018) on the
CSAW-HackML lab's formats and on any Keras CNN (BatchNormalization, skip connections):
rank a conv layer's channels on clean data, prune them in order, keep B'_X where
validation accuracy first falls X points, and build the GoodNet G that flags inputs on
which B and B' disagree; fine-pruning (prune, then fine-tune on clean data) and the
comparison of the defenses, every defense on one interface (:mod:`badnet_repair.defenses`,
:mod:`badnet_repair.detectors`).

Importing the package is cheap: the names below load their modules, and TensorFlow, on
first use (so ``badnet-repair --help`` answers at once). Keras is told about the package's
layers as soon as it is imported, by the package or by you, so
``keras.models.load_model("goodnet_2.keras")`` works after ``import badnet_repair``.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
from types import ModuleType
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Before anything imports Keras: the backend this package is built on, TensorFlow quiet.
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
if os.environ.get("BADNET_REPAIR_TF_LOGS", "0") != "1":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

if TYPE_CHECKING:
    from . import (
        attacks,
        defenses,
        demo,
        detectors,
    )
    from .attacks import triggers
    from .attacks.triggers import Trigger, drawn_triggers, load_trigger, poison, poison_each
    from .defenses import (
        IBAU,
        BTIDBFUnlearning,
        Defense,
        FeatureShiftFinePruning,
        FeatureShiftTuning,
        FinePruning,
        FineTuning,
        FineTuningSAM,
        NeuralCleansePruning,
        NeuralCleanseUnlearning,
        Pruning,
        ReconstructiveNeuronPruning,
        Repair,
        Repaired,
        SharedAdversarialUnlearning,
        TwoStageBackdoorDefense,
        make_defense,
        register_defense,
    )
    from .defenses.finetuning import fine_prune
    from .defenses.ibau import ibau_unlearn
    from .defenses.sweep import (
        ChannelRanking,
        Selection,
        SweepResult,
        SweepStep,
        extend_sweep,
        prune_sweep,
        rank_channels,
    )
    from .defenses.tuning import FinePruneResult, FineTuned, split_clean
    from .demo import faces
    from .detectors import (
        AnyOf,
        CleanseScan,
        Detector,
        Disagreement,
        FeatureDistance,
        FeatureEnsemble,
        NeuralCleanse,
        NoKerasForm,
        ReversedTrigger,
        ReversedTriggerDetector,
        ScaleUp,
        Strip,
        TeCo,
        ThresholdDetector,
        goodnet_classes,
        make_detector,
        register_detector,
    )
    from .detectors.goodnet import (
        GoodNetCombine,
        SplitGoodNet,
        build_detector_goodnet,
        build_goodnet,
        goodnet_predict,
        load_split_goodnet,
    )
    from .errors import (
        BadNetRepairError,
        DataError,
        DataWarning,
        ModelError,
        OutputExistsError,
        UnsafeModelError,
    )
    from .formats.data import Dataset, load_h5, load_images, poisoned_labels, save_h5
    from .metrics import (
        Evaluation,
        accuracy,
        attack_success_rate,
        detection_rate,
        false_alarm_rate,
    )
    from .nets.augment import augment_images
    from .nets.layers import GeometricMean
    from .nets.models import (
        ChannelChain,
        average_models,
        channel_chain,
        deepid,
        default_conv_layer,
        input_scale_of,
        load_data_for,
        load_model,
        num_classes,
        predict_classes,
        prune_channels,
        save_model,
        with_input_scale,
        without_input_scale,
    )
    from .nets.trainer import Trainer, TrainingSettings
    from .reporting.analysis import TriggerResponse, trigger_response
    from .reporting.cleanse import read_cleanse, write_cleanse
    from .reporting.plotting import (
        plot_cleanse_norms,
        plot_curves,
        plot_evaluations,
        plot_goodnet_decisions,
        plot_goodnet_sweep,
        plot_ranking,
        plot_reversed_triggers,
        plot_samples,
        plot_sweep,
        plot_trigger_response,
    )
    from .workflow.compare import DefenseComparison, compare_defenses, write_comparison
    from .workflow.detect import run_detection
    from .workflow.fine_prune import run_fine_pruning
    from .workflow.prune import (
        DefenseResult,
        evaluate_lab_models,
        lab_results,
        repaired_models,
        run_pruning_defense,
        save_lab_models,
        write_lab_outputs,
    )
    from .workflow.repair import run_repair

# public name -> (module, attribute in it; None for the module itself)
_LAZY: dict[str, tuple[str, str | None]] = {
    'attacks': ('.attacks', None),
    'defenses': ('.defenses', None),
    'demo': ('.demo', None),
    'detectors': ('.detectors', None),
    'triggers': ('.attacks', 'triggers'),
    'Trigger': ('.attacks.triggers', 'Trigger'),
    'load_trigger': ('.attacks.triggers', 'load_trigger'),
    'poison': ('.attacks.triggers', 'poison'),
    'Defense': ('.defenses', 'Defense'),
    'FinePruning': ('.defenses', 'FinePruning'),
    'FineTuning': ('.defenses', 'FineTuning'),
    'Pruning': ('.defenses', 'Pruning'),
    'Repair': ('.defenses', 'Repair'),
    'Repaired': ('.defenses', 'Repaired'),
    'make_defense': ('.defenses', 'make_defense'),
    'register_defense': ('.defenses', 'register_defense'),
    'register_detector': ('.detectors', 'register_detector'),
    'FeatureDistance': ('.detectors', 'FeatureDistance'),
    'FeatureEnsemble': ('.detectors', 'FeatureEnsemble'),
    'ScaleUp': ('.detectors', 'ScaleUp'),
    'TeCo': ('.detectors', 'TeCo'),
    'make_detector': ('.detectors', 'make_detector'),
    'NoKerasForm': ('.detectors', 'NoKerasForm'),
    'ThresholdDetector': ('.detectors', 'ThresholdDetector'),
    'SplitGoodNet': ('.detectors.goodnet', 'SplitGoodNet'),
    'load_split_goodnet': ('.detectors.goodnet', 'load_split_goodnet'),
    'fine_prune': ('.defenses.finetuning', 'fine_prune'),
    'ChannelRanking': ('.defenses.sweep', 'ChannelRanking'),
    'Selection': ('.defenses.sweep', 'Selection'),
    'SweepResult': ('.defenses.sweep', 'SweepResult'),
    'SweepStep': ('.defenses.sweep', 'SweepStep'),
    'extend_sweep': ('.defenses.sweep', 'extend_sweep'),
    'prune_sweep': ('.defenses.sweep', 'prune_sweep'),
    'rank_channels': ('.defenses.sweep', 'rank_channels'),
    'FinePruneResult': ('.defenses.tuning', 'FinePruneResult'),
    'FineTuned': ('.defenses.tuning', 'FineTuned'),
    'split_clean': ('.defenses.tuning', 'split_clean'),
    'faces': ('.demo', 'faces'),
    'Detector': ('.detectors', 'Detector'),
    'Disagreement': ('.detectors', 'Disagreement'),
    'goodnet_classes': ('.detectors', 'goodnet_classes'),
    'GoodNetCombine': ('.detectors.goodnet', 'GoodNetCombine'),
    'build_goodnet': ('.detectors.goodnet', 'build_goodnet'),
    'goodnet_predict': ('.detectors.goodnet', 'goodnet_predict'),
    'BadNetRepairError': ('.errors', 'BadNetRepairError'),
    'DataError': ('.errors', 'DataError'),
    'DataWarning': ('.errors', 'DataWarning'),
    'ModelError': ('.errors', 'ModelError'),
    'OutputExistsError': ('.errors', 'OutputExistsError'),
    'UnsafeModelError': ('.errors', 'UnsafeModelError'),
    'Dataset': ('.formats.data', 'Dataset'),
    'load_h5': ('.formats.data', 'load_h5'),
    'load_images': ('.formats.data', 'load_images'),
    'save_h5': ('.formats.data', 'save_h5'),
    'Evaluation': ('.metrics', 'Evaluation'),
    'accuracy': ('.metrics', 'accuracy'),
    'attack_success_rate': ('.metrics', 'attack_success_rate'),
    'detection_rate': ('.metrics', 'detection_rate'),
    'false_alarm_rate': ('.metrics', 'false_alarm_rate'),
    'augment_images': ('.nets.augment', 'augment_images'),
    'GeometricMean': ('.nets.layers', 'GeometricMean'),
    'Trainer': ('.nets.trainer', 'Trainer'),
    'TrainingSettings': ('.nets.trainer', 'TrainingSettings'),
    'ChannelChain': ('.nets.models', 'ChannelChain'),
    'average_models': ('.nets.models', 'average_models'),
    'channel_chain': ('.nets.models', 'channel_chain'),
    'deepid': ('.nets.models', 'deepid'),
    'default_conv_layer': ('.nets.models', 'default_conv_layer'),
    'load_data_for': ('.nets.models', 'load_data_for'),
    'load_model': ('.nets.models', 'load_model'),
    'num_classes': ('.nets.models', 'num_classes'),
    'predict_classes': ('.nets.models', 'predict_classes'),
    'prune_channels': ('.nets.models', 'prune_channels'),
    'save_model': ('.nets.models', 'save_model'),
    'input_scale_of': ('.nets.models', 'input_scale_of'),
    'with_input_scale': ('.nets.models', 'with_input_scale'),
    'without_input_scale': ('.nets.models', 'without_input_scale'),
    'TriggerResponse': ('.reporting.analysis', 'TriggerResponse'),
    'trigger_response': ('.reporting.analysis', 'trigger_response'),
    'plot_curves': ('.reporting.plotting', 'plot_curves'),
    'plot_evaluations': ('.reporting.plotting', 'plot_evaluations'),
    'plot_goodnet_sweep': ('.reporting.plotting', 'plot_goodnet_sweep'),
    'plot_samples': ('.reporting.plotting', 'plot_samples'),
    'plot_sweep': ('.reporting.plotting', 'plot_sweep'),
    'plot_trigger_response': ('.reporting.plotting', 'plot_trigger_response'),
    'DefenseComparison': ('.workflow.compare', 'DefenseComparison'),
    'compare_defenses': ('.workflow.compare', 'compare_defenses'),
    'write_comparison': ('.workflow.compare', 'write_comparison'),
    'run_fine_pruning': ('.workflow.fine_prune', 'run_fine_pruning'),
    'run_repair': ('.workflow.repair', 'run_repair'),
    'DefenseResult': ('.workflow.prune', 'DefenseResult'),
    'run_pruning_defense': ('.workflow.prune', 'run_pruning_defense'),
    'poisoned_labels': ('.formats.data', 'poisoned_labels'),
    'plot_ranking': ('.reporting.plotting', 'plot_ranking'),
    'plot_goodnet_decisions': ('.reporting.plotting', 'plot_goodnet_decisions'),
    'repaired_models': ('.workflow.prune', 'repaired_models'),
    'save_lab_models': ('.workflow.prune', 'save_lab_models'),
    'evaluate_lab_models': ('.workflow.prune', 'evaluate_lab_models'),
    'lab_results': ('.workflow.prune', 'lab_results'),
    'write_lab_outputs': ('.workflow.prune', 'write_lab_outputs'),
    'Strip': ('.detectors', 'Strip'),
    'NeuralCleanse': ('.detectors', 'NeuralCleanse'),
    'CleanseScan': ('.detectors', 'CleanseScan'),
    'ReversedTrigger': ('.detectors', 'ReversedTrigger'),
    'ReversedTriggerDetector': ('.detectors', 'ReversedTriggerDetector'),
    'AnyOf': ('.detectors', 'AnyOf'),
    'build_detector_goodnet': ('.detectors.goodnet', 'build_detector_goodnet'),
    'NeuralCleanseUnlearning': ('.defenses', 'NeuralCleanseUnlearning'),
    'NeuralCleansePruning': ('.defenses', 'NeuralCleansePruning'),
    'IBAU': ('.defenses', 'IBAU'),
    'FineTuningSAM': ('.defenses', 'FineTuningSAM'),
    'FeatureShiftTuning': ('.defenses', 'FeatureShiftTuning'),
    'FeatureShiftFinePruning': ('.defenses', 'FeatureShiftFinePruning'),
    'SharedAdversarialUnlearning': ('.defenses', 'SharedAdversarialUnlearning'),
    'BTIDBFUnlearning': ('.defenses', 'BTIDBFUnlearning'),
    'TwoStageBackdoorDefense': ('.defenses', 'TwoStageBackdoorDefense'),
    'ReconstructiveNeuronPruning': ('.defenses', 'ReconstructiveNeuronPruning'),
    'ibau_unlearn': ('.defenses.ibau', 'ibau_unlearn'),
    'plot_cleanse_norms': ('.reporting.plotting', 'plot_cleanse_norms'),
    'plot_reversed_triggers': ('.reporting.plotting', 'plot_reversed_triggers'),
    'write_cleanse': ('.reporting.cleanse', 'write_cleanse'),
    'read_cleanse': ('.reporting.cleanse', 'read_cleanse'),
    'run_detection': ('.workflow.detect', 'run_detection'),
    'drawn_triggers': ('.attacks.triggers', 'drawn_triggers'),
    'poison_each': ('.attacks.triggers', 'poison_each'),
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module, attr = _LAZY[name]
    value: Any = importlib.import_module(module, __name__)
    if attr is not None:
        value = getattr(value, attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


def _register_layers() -> None:
    """Import the module that registers this package's Keras layers (G's, the ensemble's)."""
    importlib.import_module(".nets.layers", __name__)


class _LoaderThenRegister(importlib.abc.Loader):
    """Keras's own loader, followed by :func:`_register_layers` once Keras is loaded."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._inner.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._inner.exec_module(module)
        _register_layers()

    def __getattr__(self, name: str) -> Any:  # resources, is_package... as Keras's loader has them
        return getattr(self._inner, name)


class _WhenKerasLoads(importlib.abc.MetaPathFinder):
    """Finds nothing itself; wraps Keras's loader the first time Keras is imported."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname != "keras":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            spec.loader = _LoaderThenRegister(spec.loader)
        return spec


if "keras" in sys.modules:
    _register_layers()
elif not any(isinstance(f, _WhenKerasLoads) for f in sys.meta_path):
    sys.meta_path.insert(0, _WhenKerasLoads())

__all__ = [
    "IBAU",
    "AnyOf",
    "BTIDBFUnlearning",
    "BadNetRepairError",
    "ChannelChain",
    "ChannelRanking",
    "CleanseScan",
    "DataError",
    "DataWarning",
    "Dataset",
    "Defense",
    "DefenseComparison",
    "DefenseResult",
    "Detector",
    "Disagreement",
    "Evaluation",
    "FeatureDistance",
    "FeatureEnsemble",
    "FeatureShiftFinePruning",
    "FeatureShiftTuning",
    "FinePruneResult",
    "FinePruning",
    "FineTuned",
    "FineTuning",
    "FineTuningSAM",
    "GeometricMean",
    "GoodNetCombine",
    "ModelError",
    "NeuralCleanse",
    "NeuralCleansePruning",
    "NeuralCleanseUnlearning",
    "NoKerasForm",
    "OutputExistsError",
    "Pruning",
    "ReconstructiveNeuronPruning",
    "Repair",
    "Repaired",
    "ReversedTrigger",
    "ReversedTriggerDetector",
    "ScaleUp",
    "Selection",
    "SharedAdversarialUnlearning",
    "SplitGoodNet",
    "Strip",
    "SweepResult",
    "SweepStep",
    "TeCo",
    "ThresholdDetector",
    "Trainer",
    "TrainingSettings",
    "Trigger",
    "TriggerResponse",
    "TwoStageBackdoorDefense",
    "UnsafeModelError",
    "__version__",
    "accuracy",
    "attack_success_rate",
    "attacks",
    "augment_images",
    "average_models",
    "build_detector_goodnet",
    "build_goodnet",
    "channel_chain",
    "compare_defenses",
    "deepid",
    "default_conv_layer",
    "defenses",
    "demo",
    "detection_rate",
    "detectors",
    "drawn_triggers",
    "evaluate_lab_models",
    "extend_sweep",
    "faces",
    "false_alarm_rate",
    "fine_prune",
    "goodnet_classes",
    "goodnet_predict",
    "ibau_unlearn",
    "input_scale_of",
    "lab_results",
    "load_data_for",
    "load_h5",
    "load_images",
    "load_model",
    "load_split_goodnet",
    "load_trigger",
    "make_defense",
    "make_detector",
    "num_classes",
    "plot_cleanse_norms",
    "plot_curves",
    "plot_evaluations",
    "plot_goodnet_decisions",
    "plot_goodnet_sweep",
    "plot_ranking",
    "plot_reversed_triggers",
    "plot_samples",
    "plot_sweep",
    "plot_trigger_response",
    "poison",
    "poison_each",
    "poisoned_labels",
    "predict_classes",
    "prune_channels",
    "prune_sweep",
    "rank_channels",
    "read_cleanse",
    "register_defense",
    "register_detector",
    "repaired_models",
    "run_detection",
    "run_fine_pruning",
    "run_pruning_defense",
    "run_repair",
    "save_h5",
    "save_lab_models",
    "save_model",
    "split_clean",
    "trigger_response",
    "triggers",
    "with_input_scale",
    "without_input_scale",
    "write_cleanse",
    "write_comparison",
    "write_lab_outputs",
]
