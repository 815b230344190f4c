"""Default settings shared by the library, the CLI and the notebook (no heavy imports here,
so that ``badnet-repair --help`` stays fast)."""

from __future__ import annotations

import types
import typing
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

__all__ = ["ENSEMBLE_MEANS", "FINE_TUNING", "INPUT_SCALE_HELP", "LAYER_HELP", "TuningSettings", "parse_input_scale",
           "setting", "setting_problem"]

#: How several fine-pruned members' probabilities can be combined (the first is the default).
ENSEMBLE_MEANS = ("geometric", "arithmetic")

#: Fine-tuning and fine-pruning defaults (Liu et al., RAID 2018, Section 5). Measured on the
#: demo BadNets (docs/demo_comparison.md): Adam at a constant 1e-3 for 10 epochs without
#: augmentation leaves a pruning-aware backdoor at 64 % attack success; these settings
#: remove it at about 2 points of clean accuracy. ``members`` > 1 averages several networks
#: tuned on different splits (more clean accuracy on real faces, K times the time; docs/research/real_faces_history.md),
#: by the geometric mean of their probabilities unless ``ensemble_mean`` says "arithmetic".
#: What ``layer`` means wherever a defense takes one.
LAYER_HELP = ("conv layer to prune (default: found from the graph, the last conv layer followed by pooling; "
              "conv_3 in DeepID)")


#: What ``input_scale`` means wherever a model is opened (the command line's ``--input-scale``).
INPUT_SCALE_HELP = ("the model takes file pixels times this (1/255 for models trained on 0..1 pixels, as the "
                    "CSAW-HackML 2020 competition's); data files stay 0..255 (default 1)")


def parse_input_scale(value: Any) -> float:
    """The input scale a model takes: file pixels (0..255) times this are its input.

    Args:
        value: a number > 0, or text: ``"1"``, ``"1/255"`` (a fraction) or ``"0.00392"``.

    Returns:
        The scale as a float, finite and > 0.

    Raises:
        ValueError: with a one-line message, for anything else.
    """
    import math

    def fail() -> ValueError:
        return ValueError(f"input scale {value!r} is not a number > 0 (give 1, 1/255 or a number such as 0.5)")

    if isinstance(value, bool):
        raise fail()
    if isinstance(value, int | float):
        scale = float(value)
    elif isinstance(value, str):
        top, slash, bottom = value.strip().partition("/")
        try:
            scale = float(top) / float(bottom) if slash else float(top)
        except (ValueError, ZeroDivisionError):
            raise fail() from None
    else:
        raise fail()
    if not (math.isfinite(scale) and scale > 0):
        raise fail()
    return scale


def setting(default: Any, help: str) -> Any:
    """A defense setting: a dataclass field with its default and the one-line help the CLI
    shows for it (``--name``, generated from the field)."""
    return field(default=default, metadata={"help": help})


def setting_problem(value: Any, hint: Any) -> str | None:
    """Why ``value`` does not fit the type ``hint`` of a defense setting, or None.

    Args:
        value: a setting's value as TOML or the command line's ``--set`` parses it (a list
            for a tuple setting).
        hint: the setting's type annotation (``typing.get_type_hints`` of the defense class).

    Returns:
        A phrase such as ``"must be a number"``, or None where the value fits.
    """
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal:
        return None if value in args else f"must be one of {', '.join(map(repr, args))}"
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        problems = [setting_problem(value, a) for a in args if a is not type(None)]
        return None if any(p is None for p in problems) else problems[0]
    if origin is tuple:
        if not isinstance(value, list | tuple) or not all(isinstance(v, int | float) and not isinstance(v, bool)
                                                           for v in value):
            return "must be a list of numbers"
        return None
    if hint is bool:
        return None if isinstance(value, bool) else "must be true or false"
    if hint is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else "must be a whole number"
    if hint is float:
        return None if isinstance(value, int | float) and not isinstance(value, bool) else "must be a number"
    if hint is str:
        return None if isinstance(value, str) else "must be a string"
    return None


@dataclass(frozen=True)
class TuningSettings:
    """Fine-tuning's settings, declared once: the defaults of
    :func:`~badnet_repair.defenses.tuning.fine_prune`, the fields of the fine-tuning and
    fine-pruning defenses, and the CLI's ``fine-prune`` options.

    Attributes:
        holdout_fraction: share of the clean data held out to choose the epoch, default 0.2.
        members: networks tuned on different splits and averaged, default 1.
        ensemble_mean: how members are averaged, ``"geometric"`` (default) or ``"arithmetic"``.
        epochs: default 50.
        learning_rate: Adam's peak rate, default 2e-3.
        batch_size: default 64.
        schedule: ``"cosine"`` (default) or ``"constant"``.
        shift: random translation in pixels, default 2.
        flip: random horizontal flips, default True.
        clipnorm: gradient norm clip, default 1.0 (None: no clipping).
        distill: weight of the BadNet's own correct predictions in the targets, default 0.
        weight_decay: decoupled weight decay (AdamW), default 0.
    """

    holdout_fraction: float = setting(0.2, "validation share held out to choose the prune amount and epoch")
    members: int = setting(1, "networks tuned on different splits of the clean data and averaged "
                              "(1 = a single network, as in the paper)")
    ensemble_mean: Literal["geometric", "arithmetic"] = setting(
        "geometric", "how several members' probabilities are averaged (geometric: a member that kept the "
                     "backdoor is outvoted)")
    epochs: int = setting(50, "fine-tuning epochs")
    learning_rate: float = setting(2e-3, "Adam's peak learning rate")
    batch_size: int = setting(64, "fine-tuning batch size")
    schedule: Literal["cosine", "constant"] = setting("cosine", "learning rate: cosine-decayed to 0 or constant")
    shift: int = setting(2, "augmentation: random shifts of up to this many pixels (0 = none)")
    flip: bool = setting(True, "augmentation: random horizontal flips (off for data that is not left-right "
                               "symmetric)")
    clipnorm: float | None = setting(1.0, "clip gradients to this norm (0 = no clipping)")
    distill: float = setting(0.0, "weight of the BadNet's own predictions on the clean tuning images in the "
                                  "targets (0 = labels only)")
    weight_decay: float = setting(0.0, "decoupled weight decay (AdamW) while tuning: wears down the weights "
                                       "clean data does not use (0 = plain Adam)")


#: The defaults as a dict, with fine-pruning's own two (accuracy drop in points, whether the pruned
#: start may be kept) in front.
FINE_TUNING: dict[str, Any] = {"accuracy_drop": 4.0, "keep_pruned_start": False, **asdict(TuningSettings())}
