"""badnet-repair: repair backdoored neural networks (BadNets).

The pruning defense of Liu, Dolan-Gavitt and Garg ("Fine-Pruning", RAID 2018) on the
CSAW-HackML lab's formats and on any Keras CNN (BatchNormalization, skip connections):
rank a conv layer's channels on clean data, prune them in order, keep B'_X where
validation accuracy first falls X points, and build the GoodNet G that flags inputs on
which B and B' disagree; fine-pruning (prune, then fine-tune on clean data) and the
comparison of the defenses, every defense on one interface (:mod:`badnet_repair.defenses`,
:mod:`badnet_repair.detectors`). Importing the package registers G's layer with Keras, so
``keras.models.load_model("goodnet_2.keras")`` works afterwards.
"""

from __future__ import annotations

__version__ = "0.1.0"

from . import (
    _backend,  # noqa: F401  (before Keras is imported)
    attacks,
    defenses,
    demo,
    detectors,
)
from .attacks import triggers
from .attacks.triggers import Trigger, load_trigger, poison
from .defaults import TuningSettings
from .defenses import Defense, FinePruning, FineTuning, Pruning, Repair, Repaired, make_defense
from .defenses.sweep import ChannelRanking, Selection, SweepResult, SweepStep, prune_sweep, rank_channels
from .defenses.tuning import FinePruneResult, FineTuned, fine_prune, fine_tune, split_clean
from .demo import faces
from .detectors import Detector, Disagreement, goodnet_classes
from .detectors.goodnet import GoodNetCombine, build_goodnet, goodnet_predict
from .errors import (
    BadNetRepairError,
    DataError,
    DataWarning,
    ModelError,
    OutputExistsError,
    UnsafeModelError,
)
from .formats.data import Dataset, load_h5, load_images, save_h5
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
    load_data_for,
    load_model,
    num_classes,
    predict_classes,
    prune_channels,
    save_model,
)
from .reporting.analysis import TriggerResponse, trigger_response
from .reporting.plotting import (
    plot_curves,
    plot_evaluations,
    plot_goodnet_sweep,
    plot_samples,
    plot_sweep,
    plot_trigger_response,
)
from .workflow.compare import DefenseComparison, compare_defenses, write_comparison
from .workflow.fine_prune import run_fine_pruning
from .workflow.prune import DefenseResult, run_pruning_defense

__all__ = [
    "BadNetRepairError",
    "ChannelChain",
    "ChannelRanking",
    "DataError",
    "DataWarning",
    "Dataset",
    "Defense",
    "DefenseComparison",
    "DefenseResult",
    "Detector",
    "Disagreement",
    "Evaluation",
    "FinePruneResult",
    "FinePruning",
    "FineTuned",
    "FineTuning",
    "GeometricMean",
    "GoodNetCombine",
    "ModelError",
    "OutputExistsError",
    "Pruning",
    "Repair",
    "Repaired",
    "Selection",
    "SweepResult",
    "SweepStep",
    "Trigger",
    "TriggerResponse",
    "TuningSettings",
    "UnsafeModelError",
    "__version__",
    "accuracy",
    "attack_success_rate",
    "attacks",
    "augment_images",
    "average_models",
    "build_goodnet",
    "channel_chain",
    "compare_defenses",
    "deepid",
    "default_conv_layer",
    "defenses",
    "demo",
    "detection_rate",
    "detectors",
    "faces",
    "false_alarm_rate",
    "fine_prune",
    "fine_tune",
    "goodnet_classes",
    "goodnet_predict",
    "load_data_for",
    "load_h5",
    "load_images",
    "load_model",
    "load_trigger",
    "make_defense",
    "num_classes",
    "plot_curves",
    "plot_evaluations",
    "plot_goodnet_sweep",
    "plot_samples",
    "plot_sweep",
    "plot_trigger_response",
    "poison",
    "predict_classes",
    "prune_channels",
    "prune_sweep",
    "rank_channels",
    "run_fine_pruning",
    "run_pruning_defense",
    "save_h5",
    "save_model",
    "split_clean",
    "trigger_response",
    "triggers",
    "write_comparison",
]
