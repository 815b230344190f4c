"""How settings are declared and checked, and the help texts several commands share (no heavy
imports here, so that ``badnet-repair --help`` stays fast). Each setting's default lives on the
class that uses it (a defense, a detector, the trainer)."""

from __future__ import annotations

import sys
import types
import typing
from dataclasses import field
from typing import Any

__all__ = ["BUDGET_HELP", "ENSEMBLE_MEANS", "INPUT_SCALE_HELP", "LAYER_HELP", "parse_input_scale", "setting",
           "setting_problem", "setting_value"]

#: How several fine-pruned members are combined (the first is the default): their probabilities'
#: geometric or arithmetic mean (an ensemble of networks), or their weights' mean (a soup: one network).
ENSEMBLE_MEANS = ("geometric", "arithmetic", "soup")

#: What ``layer`` means wherever a defense takes one.
LAYER_HELP = ("conv layer to prune (default: found from the graph, the last conv layer followed by pooling; "
              "conv_3 in DeepID)")


#: What ``budget`` means wherever a defense takes one (the clean-accuracy budget).
BUDGET_HELP = ("clean-accuracy budget: a result more than this many points below B on the held-out clean images "
               "is replaced by a candidate within it (an earlier epoch or round, the pruned start, B) and the user "
               "told loudly (none = off)")


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


def setting_value(text: str) -> Any:
    """A setting's value written as text (``--set NAME.SETTING=VALUE``), as TOML reads it (``0.5``,
    ``true``, ``[2, 4]``, ``"geometric"``), ``none`` as None, and anything else as the plain string."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        import tomli as tomllib
    text = text.strip()
    if text.lower() in ("none", "null"):
        return None
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text
