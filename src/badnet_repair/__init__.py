"""badnet-repair: repair backdoored neural networks (BadNets).

The pruning defense of Liu, Dolan-Gavitt and Garg ("Fine-Pruning", RAID 2018) on the
CSAW-HackML lab's formats: rank a conv layer's channels on clean data, prune them in order,
keep B'_X where validation accuracy first falls X points, and build the GoodNet G that
flags inputs on which B and B' disagree; fine-pruning (prune, then fine-tune on clean data)
and the comparison of the defenses. Importing the package registers G's layer with
Keras, so ``keras.models.load_model("goodnet_2.keras")`` works afterwards.
"""

from __future__ import annotations

__version__ = "0.1.0"

from . import _backend  # noqa: F401  (before Keras is imported)
from .analysis import TriggerResponse, trigger_response
from .augment import augment_images
from .compare import DefenseComparison, compare_defenses, write_comparison
from .data import Dataset, load_h5, load_images, save_h5
from .defense import DefenseResult, run_pruning_defense
from .errors import (
    BadNetRepairError,
    DataError,
    DataWarning,
    ModelError,
    OutputExistsError,
    UnsafeModelError,
)
from .finetune import FinePruneResult, FineTuned, fine_prune, fine_tune, run_fine_pruning, split_clean
from .goodnet import GoodNetCombine, build_goodnet, goodnet_predict
from .layers import GeometricMean
from .metrics import (
    Evaluation,
    accuracy,
    attack_success_rate,
    detection_rate,
    false_alarm_rate,
)
from .models import (
    average_models,
    deepid,
    load_data_for,
    load_model,
    num_classes,
    predict_classes,
    prune_channels,
    save_model,
)
from .plotting import (
    plot_curves,
    plot_evaluations,
    plot_goodnet_sweep,
    plot_samples,
    plot_sweep,
    plot_trigger_response,
)
from .pruning import ChannelRanking, Selection, SweepResult, SweepStep, prune_sweep, rank_channels
from .triggers import Trigger, load_trigger, poison

__all__ = [
    "BadNetRepairError",
    "ChannelRanking",
    "DataError",
    "DataWarning",
    "Dataset",
    "DefenseComparison",
    "DefenseResult",
    "Evaluation",
    "FinePruneResult",
    "FineTuned",
    "GeometricMean",
    "GoodNetCombine",
    "ModelError",
    "OutputExistsError",
    "Selection",
    "SweepResult",
    "SweepStep",
    "Trigger",
    "TriggerResponse",
    "UnsafeModelError",
    "__version__",
    "accuracy",
    "attack_success_rate",
    "augment_images",
    "average_models",
    "build_goodnet",
    "compare_defenses",
    "deepid",
    "detection_rate",
    "false_alarm_rate",
    "fine_prune",
    "fine_tune",
    "goodnet_predict",
    "load_data_for",
    "load_h5",
    "load_images",
    "load_model",
    "load_trigger",
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
    "write_comparison",
]
