"""The ``badnet-repair`` command line."""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .defaults import INPUT_SCALE_HELP, LAYER_HELP, parse_input_scale, setting_problem, setting_value
from .defenses import DEFAULT_DEFENSE
from .defenses import REGISTRY as DEFENSES
from .demo.make import DEMO_BADNETS
from .detectors import DEFAULT_DETECTORS, DEFAULT_FALSE_ALARM
from .detectors import REGISTRY as DETECTORS
from .workflow.layout import LAB_FILES, ResolvedInputs

__all__ = ["main"]

log = logging.getLogger("badnet_repair")

_NEUTRAL_FLAGS = {"-q", "--quiet", "--overwrite"}


def _thresholds(values: Sequence[str]) -> list[float]:
    out = []
    for v in values:
        try:
            x = float(v)
        except ValueError:
            raise argparse.ArgumentTypeError(f"threshold {v!r} is not a number") from None
        if not x >= 0 or x == float("inf"):
            raise argparse.ArgumentTypeError(f"threshold {v!r} must be a finite number >= 0")
        out.append(x)
    return out


def _input_scale(text: str) -> float:
    """The argparse type of ``--input-scale``: ``1``, ``1/255`` or a number > 0."""
    try:
        return parse_input_scale(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_input_scale(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input-scale", type=_input_scale, default=1.0, metavar="SCALE", help=INPUT_SCALE_HELP)


_INPUT_HELP = {
    "model": "the BadNet B",
    "valid": "clean validation data",
    "bd_valid": "poisoned validation data",
    "test": "clean test data",
    "bd_test": "poisoned test data",
}


def _add_inputs(parser: argparse.ArgumentParser, roles: Sequence[str]) -> None:
    """The input-file options, each defaulting to the lab layout's file."""
    for role in roles:
        parser.add_argument(f"--{role.replace('_', '-')}",
                            help=f"{_INPUT_HELP[role]} (default {LAB_FILES[role]})")


def _add_settings(parser: argparse.ArgumentParser, cls: type[Any], *, only: Sequence[str] | None = None,
                  given_only: bool = False) -> None:
    """One option per setting of defense class ``cls`` (its dataclass fields, or those in
    ``only``): ``--name``, typed and with the default and help its class declares;
    ``--no-name`` for a setting that is on by default; ``--name X [X ...]`` for a tuple,
    given as text and checked by the command (thresholds). With ``given_only`` a setting the
    user did not pass is absent from the parsed arguments, so that each defense keeps its own
    default (the help shows ``cls``'s)."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if only is not None and f.name not in only:
            continue
        flag, hint, text = f.name.replace("_", "-"), hints[f.name], f.metadata.get("help", "")
        unset = argparse.SUPPRESS if given_only else f.default
        if hint is bool:
            parser.add_argument(f"--no-{flag}" if f.default else f"--{flag}", dest=f.name, default=unset,
                                action="store_false" if f.default else "store_true", help=text)
            continue
        if typing.get_origin(hint) is tuple:
            default = [f"{v:g}" for v in typing.cast(tuple, f.default)]
            parser.add_argument(f"--{flag}", nargs="+", default=argparse.SUPPRESS if given_only else default,
                                metavar="X", help=f"{text} (default: {' '.join(default)})")
            continue
        shown = f"{f.default:g}" if isinstance(f.default, float) else f.default
        options: dict[str, Any] = {"default": unset,
                                   "help": text if f.default is None else f"{text} (default {shown})"}
        if typing.get_origin(hint) is typing.Literal:
            options["choices"] = list(typing.get_args(hint))
        else:
            base = next((t for t in typing.get_args(hint) if t is not type(None)), hint)
            options["type"] = _or_none(base) if type(None) in typing.get_args(hint) else base
        parser.add_argument(f"--{flag}", **options)


def _or_none(base: Any) -> Any:
    """An argparse type for a setting that may be None: ``none`` (any case) or a ``base`` value."""
    def parse(text: str) -> Any:
        return None if text.strip().lower() == "none" else base(text)

    parse.__name__ = getattr(base, "__name__", "value")  # argparse names the type in its errors
    return parse


def _flag_value(name: str, value: Any) -> Any:
    """A setting's value as the command line means it: ``clipnorm`` 0 is no clipping (None)."""
    return None if name == "clipnorm" and value == 0 else value


def _given(args: argparse.Namespace, cls: Any) -> dict[str, Any]:
    """The settings of defense class ``cls`` the user passed on the command line (options added
    with ``given_only``: the others are absent, and each defense keeps its own default)."""
    return {name: _flag_value(name, getattr(args, name)) for name in cls.settings() if hasattr(args, name)}


def _resolve(args: argparse.Namespace, given: Any, **options: Any) -> ResolvedInputs:
    """The run's input files (:func:`~badnet_repair.workflow.layout.resolve_inputs`); an input
    scale is refused for the built-in demo, whose BadNets take the files' 0..255 pixels."""
    from .errors import DataError
    from .workflow.layout import resolve_inputs

    refused = DataError("the built-in demo's BadNets take the files' 0..255 pixels: --input-scale is for a model "
                        "file of your own (--model)")
    scaled = getattr(args, "input_scale", 1.0) != 1.0
    if scaled and options.get("demo"):  # before the demo is made
        raise refused
    resolved = resolve_inputs(given, **options)
    if scaled and resolved.demo is not None:  # no lab files: the demo stood in for them
        raise refused
    return resolved


def _show_written(paths: Any) -> int:
    """Print a command's markdown result, then every file it wrote; the command's exit status 0."""
    print(paths["md"].read_text())
    for p in paths.values():
        print(p)
    return 0


def _setting_of(registries: dict[str, dict[str, Any]], example: str) -> Any:
    """The argparse type of ``--set NAME.SETTING=VALUE``: (name, setting, typed value), the name a
    defense's or detector's in ``registries`` (what -> registry), checked against the settings its
    class declares."""
    import typing

    def parse(text: str) -> tuple[str, str, Any]:
        where, sep, raw = text.partition("=")
        name, dot, key = where.strip().rpartition(".")
        kinds = " or ".join(registries)
        if not sep or not dot or not name or not key:
            raise argparse.ArgumentTypeError(f"{text!r}: expected NAME.SETTING=VALUE, e.g. {example}")
        found = [(what, reg[name]) for what, reg in registries.items() if name in reg]
        if not found:
            known = "; ".join(f"{what}s: {', '.join(reg)}" for what, reg in registries.items())
            raise argparse.ArgumentTypeError(f"{text!r}: no {kinds} {name!r}; {known}")
        what, cls = found[0]
        key = key.replace("-", "_")
        if key not in cls.settings():
            raise argparse.ArgumentTypeError(f"{text!r}: {what} {name} has no setting {key!r}; its settings: "
                                             f"{', '.join(cls.settings()) or 'none'}")
        value = _flag_value(key, setting_value(raw))
        hints = typing.get_type_hints(cls.__init__ if what == "detector" else cls)
        problem = setting_problem(value, hints[key]) if key in hints else None
        if problem:
            raise argparse.ArgumentTypeError(f"{text!r}: {name}'s setting {key} {problem}")
        return name, key, tuple(value) if isinstance(value, list) else value

    return parse


_defense_setting = _setting_of({"defense": DEFENSES}, "ft-sam.sam_rho=0.5")
_any_setting = _setting_of({"defense": DEFENSES, "detector": DETECTORS}, "ft-sam.sam_rho=0.5 or strip.copies=64")
_detector_setting = _setting_of({"detector": DETECTORS}, "strip.copies=64")


def _int_or_none(text: str) -> int | None:
    """A whole number, or None for ``none``."""
    if text.strip().lower() == "none":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number or 'none', not {text!r}") from None


FALSE_ALARM_HELP = (f"G's false-alarm budget, %% of clean inputs (default {DEFAULT_FALSE_ALARM:g}): "
                    "split equally among the detectors, "
                    "each with a threshold set to flag at most its share of held-out clean validation images")


def _settings_by_name(given: Sequence[tuple[str, str, Any]], names: Sequence[str],
                      flag: str) -> dict[str, dict[str, Any]]:
    """``--set`` values as name -> {setting: value}, refusing names that ``flag`` leaves out."""
    from .errors import BadNetRepairError

    out: dict[str, dict[str, Any]] = {}
    for name, key, value in given:
        out.setdefault(name, {})[key] = value
    unused = sorted(set(out) - set(names))
    if unused:
        raise BadNetRepairError(f"--set names {', '.join(unused)}, which {flag} leaves out")
    return out


def _add_run_options(parser: argparse.ArgumentParser, *, demo_help: str, both_demos: bool = False) -> None:
    """The options the commands that read a BadNet share: target, output folder, overwriting,
    trusting the model file, its input scale, and the built-in demo."""
    parser.add_argument("--target", type=int, help="attack target class (default: the poisoned files' label)")
    parser.add_argument("--multi-target", action="store_true",
                        help="the poisoned files are a multi-target BadNet's: each input's label is its own target "
                        "(implied by --demo multi-target)")
    parser.add_argument("--out", default="fixed_models", help="output folder (default fixed_models/)")
    parser.add_argument("--trust-model", action="store_true",
                        help="allow model files with layers that run stored code (Lambda, custom)")
    _add_input_scale(parser)
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    if both_demos:
        parser.add_argument("--demo", action="store_true", help=demo_help)
    else:
        parser.add_argument("--demo", choices=list(DEMO_BADNETS), help=demo_help)
    parser.add_argument("--demo-dir", default=".demo", help="the demo's cache folder (default .demo/)")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="badnet-repair",
        description="Repair backdoored neural networks (BadNets) with the pruning defense.",
    )
    p.add_argument("--version", action="store_true", help="print the version and exit")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-q", "--quiet", action="store_true",
                        help="only warnings and errors, no progress bars")
    sub = p.add_subparsers(dest="command")

    pr = sub.add_parser(
        "prune",
        parents=[common],
        help="run the pruning defense; save B'_X, G_X, results and the report",
        description="Rank the channels of a conv layer on clean validation data, prune them one "
        "at a time, save B'_X where validation accuracy first falls X points, and the GoodNet "
        "G_X. With no file arguments it uses the lab layout (model/, data/cl/, data/bd/).",
    )
    _add_inputs(pr, ["model", "valid", "bd_valid", "test", "bd_test"])
    _add_settings(pr, DEFENSES["pruning"])
    pr.add_argument("--layout", choices=["nchw", "nhwc", "auto"], default="nchw",
                    help="how the HDF5 'data' is stored (default nchw, the lab's)")
    pr.add_argument("--no-models", action="store_true", help="do not save the repaired models")
    _add_run_options(pr, demo_help="run on the built-in demo's BadNet (made first if needed); the default when "
                     "none of the lab files exist")

    md = sub.add_parser(
        "make-demo", parents=[common],
        help="make the built-in demo: synthetic faces and three BadNets, in the lab's formats",
        description="Generate synthetic face data sets (lab-format HDF5) and train a baseline and a "
        "pruning-aware BadNet with a drawn sunglasses trigger, and a multi-target BadNet (drawn "
        "sunglasses, eyebrows and lipstick, each to its own target), into a cache folder. Reused when "
        "already made; --regenerate makes it anew.",
    )
    md.add_argument("--demo-dir", default=".demo", help="cache folder (default .demo/)")
    md.add_argument("--regenerate", action="store_true", help="make it again")
    md.add_argument("--identities", type=int, help="number of identities (default 100)")
    md.add_argument("--seed", type=int, help="seed (default 0)")

    fp = sub.add_parser(
        "fine-prune", parents=[common],
        help="fine-pruning (or fine-tuning): prune, then fine-tune on clean validation data",
        description="Fine-Pruning (Liu et al., RAID 2018): prune conv channels by the same ranking, "
        "then fine-tune on a part of the clean validation data, choosing the prune amount and the "
        "epoch on the held-out rest. Test data is read only afterwards, for evaluation.",
    )
    _add_inputs(fp, ["model", "valid", "test", "bd_test"])
    fp.add_argument("--method", choices=["fine-pruning", "fine-tuning"], default="fine-pruning")
    _add_settings(fp, DEFENSES["fine-pruning"], given_only=True)
    _add_run_options(fp, demo_help="run on the built-in demo")

    rr = sub.add_parser(
        "repair", parents=[common],
        help=f"repair a BadNet with one registered defense (default {DEFAULT_DEFENSE}); save the repaired model, "
        "then evaluate",
        description="Repair a BadNet from its clean validation data with one registered defense, save the "
        "repaired model (.keras; also .h5 where it is built of Keras's own layers) and <name>_results.json, and "
        "only then evaluate it and its GoodNet on the test sets given. With no file arguments it uses the lab "
        "layout, or the built-in demo.",
    )
    _add_inputs(rr, ["model", "valid", "test", "bd_test"])
    rr.add_argument("--defense", choices=list(DEFENSES), default=DEFAULT_DEFENSE, metavar="NAME",
                    help=f"the defense (default {DEFAULT_DEFENSE}, the project's recommended removal defense; one of: "
                    f"{', '.join(DEFENSES)})")
    rr.add_argument("--set", action="append", type=_any_setting, default=[], metavar="NAME.SETTING=VALUE",
                    help=f"one of the defense's settings (repeatable; e.g. {DEFAULT_DEFENSE}.drop=2); a name the "
                    "defense does not take is refused with the list of those it does")
    _add_run_options(rr, demo_help="run on the built-in demo")

    cp = sub.add_parser(
        "compare", parents=[common],
        help="compare no defense with every registered defense (or those of --defenses) and their GoodNets, "
        "per BadNet",
        description="For each BadNet given (or both demo BadNets with --demo), evaluate every defense "
        "and its GoodNet on the test sets; write comparison.csv/.json/.md and comparison.png. A setting "
        "flag changes every defense that has the setting, and only where given: each defense keeps its own "
        "defaults otherwise (the defaults shown are fine-pruning's); --set changes one defense.",
    )
    cp.add_argument("--model", action="append", help="a BadNet (repeat for several)")
    _add_inputs(cp, ["valid", "test", "bd_test"])
    _add_settings(cp, DEFENSES["pruning"], only=("thresholds",))
    cp.add_argument("--defenses", nargs="+", choices=list(DEFENSES), default=list(DEFENSES), metavar="NAME",
                    help="the defenses to compare, in table order (default all: "
                    + "; ".join(f"{n}: {cls.summary}" for n, cls in DEFENSES.items()) + ")")
    cp.add_argument("--detectors", nargs="+", default=[], choices=list(DETECTORS), metavar="NAME",
                    help="also GoodNets of B from these detectors, each alone and combined (default none; "
                    + "; ".join(f"{n}: {cls.summary}" for n, cls in DETECTORS.items()) + ")")
    cp.add_argument("--false-alarm", type=float, default=DEFAULT_FALSE_ALARM, help=FALSE_ALARM_HELP)
    _add_settings(cp, DEFENSES["fine-pruning"], given_only=True)
    cp.add_argument("--set", action="append", type=_any_setting, default=[], metavar="NAME.SETTING=VALUE",
                    help="one defense's or detector's setting, over the flags above (repeatable; e.g. "
                    "ft-sam.sam_rho=0.5, i-bau.max_norm=10, fine-pruning.keep_pruned_start=false, strip.copies=64); "
                    "a name the defense or detector does not take is refused with the list of those it does")
    _add_run_options(cp, demo_help="both demo BadNets on the demo data", both_demos=True)

    tp = sub.add_parser(
        "trigger-response", parents=[common],
        help="where the backdoor lives: each channel's rise under the trigger and place in the pruning order",
        description="Rank the layer's channels on the clean validation data as the pruning defense does, "
        "prune to --accuracy-drop, and measure how much the trigger raises each channel's mean activation "
        "(poisoned test images against the clean test images of the other classes). Writes "
        "trigger_response.json/.md/.png. An evaluation: it reads poisoned data, which no defense may.",
    )
    tp.add_argument("--model", help="the BadNet (default the lab's model/bd_net.h5)")
    _add_inputs(tp, ["valid", "test", "bd_test"])
    tp.add_argument("--layer", help=LAYER_HELP)
    tp.add_argument("--accuracy-drop", type=float, default=10.0,
                    help="mark the channels pruning removes at this validation accuracy drop (default 10)")
    tp.add_argument("--top", type=int, default=10, help="channels listed in the table (default 10)")
    _add_run_options(tp, demo_help="a demo BadNet on the demo data")

    nc = sub.add_parser(
        "cleanse", parents=[common],
        help="Neural Cleanse: reverse-engineer each class's smallest trigger; flag the anomalously small",
        description="Scan the BadNet with Neural Cleanse (Wang et al. 2019) on the clean validation data only: "
        "screen every class, optimise the candidates and random reference classes fully, flag classes whose "
        "trigger norm is a low outlier. Writes neural_cleanse.json/.md/.png, neural_cleanse_triggers.png "
        "(the flagged classes' reversed triggers) and neural_cleanse_triggers.npz (masks and patterns).",
    )
    nc.add_argument("--model", help="the BadNet (default the lab's model/bd_net.h5)")
    _add_inputs(nc, ["valid"])
    nc.add_argument("--steps", type=int, default=300, help="optimisation steps per fully optimised class "
                    "(default 300)")
    nc.add_argument("--screen-steps", type=int, default=60, help="steps of the screen (default 60)")
    nc.add_argument("--candidates", type=int, default=10, help="classes the screen passes on (default 10)")
    nc.add_argument("--reference", type=int, default=30, help="random classes optimised fully for the "
                    "median and MAD (default 30)")
    nc.add_argument("--anomaly-threshold", type=float, default=None,
                    help="flag above this anomaly index (default: the scanner's)")
    nc.add_argument("--preselect", type=_int_or_none, default=argparse.SUPPRESS,
                    help="screen only this many labels, chosen from B's top-k predictions on the clean images "
                    "(K-Arm's pre-screening; 'none': screen every class; default the scanner's, 128)")
    nc.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    _add_run_options(nc, demo_help="a demo BadNet on the demo data")
    nc.set_defaults(out="neural_cleanse")

    dt = sub.add_parser(
        "detect", parents=[common],
        help="a GoodNet from detectors (any registered: the feature ensemble by default, STRIP, the reversed "
        "trigger, ...); its detection and false alarms",
        description="Fit the detectors on the clean validation data only, combine them (an input is flagged "
        "where any flags it), save G (B's class, or class N where flagged) as goodnet_detect.keras, then "
        "score G on the test files: clean accuracy, false alarms, detection. The reversed-trigger detector "
        "(named with --detectors) runs Neural Cleanse and unlearns its reversed triggers (nc-unlearning); "
        "its scan is written too.",
    )
    dt.add_argument("--model", help="the BadNet (default the lab's model/bd_net.h5)")
    _add_inputs(dt, ["valid", "test", "bd_test"])
    dt.add_argument("--detectors", nargs="+", default=list(DEFAULT_DETECTORS), choices=list(DETECTORS),
                    metavar="NAME", help=f"the detectors, combined (default {' '.join(DEFAULT_DETECTORS)}; "
                    + "; ".join(f"{n}: {cls.summary}" for n, cls in DETECTORS.items()) + ")")
    dt.add_argument("--false-alarm", type=float, default=DEFAULT_FALSE_ALARM, help=FALSE_ALARM_HELP)
    dt.add_argument("--seed", type=int, default=0, help="the detectors' seed (default 0)")
    dt.add_argument("--set", action="append", type=_detector_setting, default=[], metavar="DETECTOR.SETTING=VALUE",
                    help="one detector's setting (repeatable; e.g. strip.copies=64, disagreement.accuracy_drop=10); "
                    "a setting given here wins over the false-alarm budget's share")
    _add_run_options(dt, demo_help="a demo BadNet on the demo data")

    rp = sub.add_parser(
        "report", parents=[common],
        help="run Homework-2.ipynb headless; write Lab2_report.md and the notebook as HTML",
        description="Execute the notebook top to bottom in a Jupyter kernel (its parameters cell "
        "overridden by -p), which saves the models and results into its OUT_DIR and writes its REPORT "
        "(Lab2_report.md next to the notebook, with Lab2_report.html); then collect what a student hands in "
        "into HANDIN (default handin/): the executed notebook and its HTML (images embedded), the report with "
        "its figure and HTML, and the repaired models and results (fixed_models/), with a README.md listing them.",
    )
    rp.add_argument("--notebook", default="Homework-2.ipynb", help="the notebook (default Homework-2.ipynb)")
    rp.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                    help="override a parameter, e.g. -p DEMO pruning-aware -p THRESHOLDS '[2, 4]'")
    rp.add_argument("--handin", default="handin",
                    help="the hand-in folder, next to the notebook unless absolute (default handin/)")
    rp.add_argument("--overwrite", action="store_true", help="replace an existing hand-in folder")
    rp.add_argument("--html", help="HTML of the executed notebook (default HANDIN/<notebook>.html)")
    rp.add_argument("--executed", help="the executed notebook (default HANDIN/<notebook>.ipynb)")
    rp.add_argument("--in-place", action="store_true",
                    help="write the executed notebook over the notebook itself, outputs included (to commit them)")
    rp.add_argument("--timeout", type=int, default=1800, help="seconds allowed per cell (default 1800)")

    bn = sub.add_parser(
        "bench", parents=[common],
        help="run a benchmark matrix (BadNets x defenses x seeds, from a TOML file) on Dask; write its leaderboard",
        description="Run every cell of the matrix a TOML file declares (see benchmarks/*.toml) as tasks on a Dask "
        "LocalCluster started here (one worker process per core, on 127.0.0.1) or on an existing cluster "
        "(--scheduler). Rows go to OUT/store.jsonl as cells finish; a rerun skips finished cells. Then "
        "OUT/leaderboard.md and .png are written. --report STORE rebuilds the leaderboard without running.",
    )
    bn.add_argument("config", nargs="?", help="the benchmark's TOML file")
    bn.add_argument("--out", help="output folder (default bench/<config name>/; with --report, the store's folder)")
    bn.add_argument("--scheduler", metavar="ADDRESS",
                    help="an existing Dask scheduler, e.g. tcp://10.0.0.5:8786 (default: a local cluster)")
    bn.add_argument("--workers", type=int, help="worker processes of the local cluster (default one per core)")
    bn.add_argument("--serial", action="store_true", help="run the cells here, one after another, without Dask")
    bn.add_argument("--cells", metavar="REGEX", help="only the cells whose 'badnet / defense / seed N' matches")
    bn.add_argument("--report", metavar="STORE", help="rebuild the leaderboard from a store (or its folder)")
    bn.add_argument("--title", help="the leaderboard's title (default the config's name)")

    ev = sub.add_parser("eval", parents=[common], help="clean accuracy and attack success rate of a model",
                        description="Evaluate a model as the lab's eval script does; for a GoodNet "
                        "also its detection and false-alarm rates.")
    ev.add_argument("clean", help="clean data (lab HDF5)")
    ev.add_argument("poisoned", nargs="?", help="poisoned data (lab HDF5)")
    ev.add_argument("model", help="model file (.h5 or .keras)")
    ev.add_argument("--target", type=int, help="attack target (default: the poisoned file's label)")
    ev.add_argument("--layout", choices=["nchw", "nhwc", "auto"], default="nchw",
                    help="how the HDF5 'data' is stored (default nchw, the lab's)")
    ev.add_argument("--trust-model", action="store_true",
                    help="allow model files with layers that run stored code (Lambda, custom)")
    _add_input_scale(ev)
    ev.add_argument("--json", action="store_true", help="print the numbers as JSON")

    pd = sub.add_parser("predict", parents=[common], help="classify images (PNG/JPEG); prints a class in [0, N]")
    pd.add_argument("model", help="model file (.h5 or .keras); a GoodNet outputs N for a detected trigger")
    pd.add_argument("images", nargs="+", help="image files or folders")
    pd.add_argument("--resize", action="store_true", help="resize images to the model's input size")
    pd.add_argument("--trust-model", action="store_true",
                    help="allow model files with layers that run stored code (Lambda, custom)")
    _add_input_scale(pd)
    return p


def _cmd_make_demo(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from .demo.make import DemoConfig, load_demo_manifest, make_demo

    cfg: DemoConfig | None = None
    if args.identities is not None or args.seed is not None:
        cfg = DemoConfig()
        if args.identities is not None:
            cfg = replace(cfg, num_identities=args.identities)
        if args.seed is not None:
            cfg = replace(cfg, seed=args.seed)
    paths = make_demo(args.demo_dir, config=cfg, regenerate=args.regenerate, progress=not args.quiet)
    manifest = load_demo_manifest(args.demo_dir) or {}
    print(f"demo in {paths.root}/")
    for which in ("baseline", "pruning_aware", "multi_target"):
        m = manifest.get(which, {})
        if m:
            print(f"  {which} BadNet: clean test accuracy {m['clean_test_accuracy']:.2f}%, "
                  f"attack success rate {m['test_attack_success_rate']:.2f}%")
    print(f"  models: {paths.model}, {paths.pruning_aware_model}, {paths.multi_target_model}")
    print(f"  data: {paths.valid.parent}/, {paths.bd_valid.parent}/")
    return 0


def _cmd_prune(args: argparse.Namespace, argv: Sequence[str]) -> int:
    try:
        thresholds = _thresholds(args.thresholds)
    except argparse.ArgumentTypeError as exc:
        print(f"badnet-repair prune: error: {exc}", file=sys.stderr)
        return 2
    from .workflow.prune import run_pruning_defense

    resolved = _resolve(args, {k: getattr(args, k) for k in LAB_FILES}, demo=args.demo,
                        demo_dir=args.demo_dir, progress=not args.quiet)
    if resolved.notice:
        print(resolved.notice, flush=True)
    inputs, source = resolved.files, resolved.source
    print(f"Using {source}: " + ", ".join(f"{k}={v}" for k, v in inputs.items() if v), flush=True)
    result = run_pruning_defense(
        inputs["model"], inputs["valid"],  # type: ignore[arg-type]
        bd_valid=inputs["bd_valid"], test=inputs["test"], bd_test=inputs["bd_test"],
        out_dir=args.out, thresholds=thresholds, layer=args.layer, at=args.rank_at,
        descending=args.descending, target=args.target, engine=args.engine,
        several_targets=args.multi_target or args.demo == "multi-target",
        batch_size=args.batch_size, layout=args.layout, trust_model=args.trust_model,
        input_scale=args.input_scale, overwrite=args.overwrite, save_models=not args.no_models,
        progress=not args.quiet, data_source=source, demo=resolved.demo is not None,
        # Flags that do not change the numbers stay out, so reruns give identical results.
        command="badnet-repair " + shlex.join(a for a in argv if a not in _NEUTRAL_FLAGS),
    )
    from .reporting.report import evaluation_table

    sel = result.sweep.selections
    for x, s in sel.items():
        if s is not None:
            print(f"X={x:g}: {s.channels_pruned} channels pruned, validation accuracy "
                  f"{s.valid_accuracy:.2f}% ({s.accuracy_drop:.2f} points below B)")
    print(evaluation_table([e.as_dict() for e in result.evaluations]))
    reference = result.results.get("reference")
    if reference and reference["lab_badnet"]:
        # the lab's own B: say whether this run reproduces the lab's published figures
        print(reference["message"], *(f"  {line}" for line in reference["differs"]), sep="\n")
    for name in ("report", "results_json", "sweep_csv", "figure"):
        if name in result.files:
            print(f"{name}: {result.files[name]}")
    for x, files in result.models.items():
        print(f"models X={x:g}: " + ", ".join(str(p) for p in files.values()))
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from .formats.data import poisoned_labels
    from .metrics import evaluate_predictions
    from .nets.models import load_data_for, load_model, num_classes, predict_classes

    model = load_model(args.model, trust=args.trust_model, input_scale=args.input_scale)
    n = num_classes(model)
    from .detectors.goodnet import is_goodnet

    goodnet = is_goodnet(model)
    clean = load_data_for(model, args.clean, layout=args.layout, lazy=True)
    bd = None
    if args.poisoned:
        bd, _ = poisoned_labels(load_data_for(model, args.poisoned, layout=args.layout, lazy=True), args.target)
    ev = evaluate_predictions(
        model=str(args.model), kind="goodnet" if goodnet else "model",
        clean_pred=predict_classes(model, clean.x), clean_labels=clean.y,
        poisoned_pred=predict_classes(model, bd.x) if bd else None,
        poisoned_labels=bd.y if bd else None, alarm_class=n - 1 if goodnet else None,
        clean_set=str(args.clean), poisoned_set=str(args.poisoned) if bd else None,
    )
    if args.json:
        print(json.dumps(ev.as_dict(), indent=2, sort_keys=True))
        return 0
    print(f"Clean Classification accuracy: {ev.clean_accuracy:.4f}")
    if ev.attack_success_rate is not None:
        print(f"Attack Success Rate: {ev.attack_success_rate:.4f}")
    if goodnet:
        print(f"False alarm rate (clean inputs flagged as class {n - 1}): {ev.false_alarm_rate:.4f}")
        if ev.detection_rate is not None:
            print(f"Detection rate (poisoned inputs flagged as class {n - 1}): {ev.detection_rate:.4f}")
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from .formats.data import load_images
    from .nets.models import load_model, predict_classes

    model = load_model(args.model, trust=args.trust_model, input_scale=args.input_scale)
    shape = tuple(int(d) for d in model.inputs[0].shape[1:])
    x = load_images(args.images, image_shape=shape, resize=args.resize)  # type: ignore[arg-type]
    pred = predict_classes(model, x)
    if len(args.images) == 1 and len(pred) == 1:
        print(int(pred[0]))
    else:
        from .formats.data import IMAGE_SUFFIXES

        names: list[str] = []
        for item in args.images:
            p = Path(item)
            names += ([str(q) for q in sorted(p.iterdir()) if q.suffix.lower() in IMAGE_SUFFIXES]
                      if p.is_dir() else [item])
        for name, c in zip(names, pred, strict=True):
            print(f"{name}\t{int(c)}")
    return 0


def _fine_prune_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The settings ``fine-prune`` passes to its method's defense: those given; a pruning setting
    given with ``--method fine-tuning`` is refused."""
    from .errors import BadNetRepairError

    given = _given(args, DEFENSES["fine-pruning"])
    own = DEFENSES[args.method].settings()
    extra = sorted(k for k in given if k not in own)
    if extra:
        flags = ", ".join("--" + k.replace("_", "-") for k in extra)
        raise BadNetRepairError(f"{flags}: not a setting of --method {args.method}")
    return given


def _repair_files(args: argparse.Namespace) -> dict[str, str | None]:
    """The files a repair command reads (given, the lab layout or the demo), said first."""
    given = {"model": args.model, "valid": args.valid, "test": args.test, "bd_test": args.bd_test}
    resolved = _resolve(args, given, demo=args.demo, demo_dir=args.demo_dir, progress=not args.quiet)
    if resolved.notice:
        print(resolved.notice, flush=True)
    files = dict(resolved.files)
    print(f"Using {resolved.source}: model={files['model']}, valid={files['valid']}", flush=True)
    return files


def _cmd_fine_prune(args: argparse.Namespace) -> int:
    from .reporting.report import evaluation_table
    from .workflow.fine_prune import run_fine_pruning

    files = _repair_files(args)
    result, results = run_fine_pruning(
        files["model"], files["valid"], test=files.get("test"), bd_test=files.get("bd_test"),  # type: ignore[arg-type]
        out_dir=args.out, method=args.method, target=args.target, trust_model=args.trust_model,
        input_scale=args.input_scale,
        several_targets=args.multi_target or args.demo == "multi-target",
        overwrite=args.overwrite, progress=not args.quiet, **_fine_prune_settings(args))
    for i, m in enumerate(result.members):
        who = f"member {i}: " if len(result.members) > 1 else ""
        print(f"{args.method}: {who}{len(m.pruned_channels)} channels pruned, epoch {m.kept_epoch} kept; "
              f"held-out accuracy {m.base_holdout_accuracy:.2f}% (B) -> {m.pruned_holdout_accuracy:.2f}% "
              f"(pruned) -> {m.holdout_accuracy:.2f}% (kept)")
    for line in result.warnings:
        print(line, flush=True)
    if results["evaluations"]:
        print(evaluation_table(results["evaluations"]))
    for name, path in results["models"].items():
        print(f"{name}: {path}")
    return 0


def _cmd_repair(args: argparse.Namespace) -> int:
    from .defenses import make_defense
    from .reporting.report import evaluation_table
    from .workflow.repair import repair_paths, run_repair

    settings = _settings_by_name(args.set, [args.defense], "--defense").get(args.defense, {})
    defense = make_defense(args.defense, **settings)
    files = _repair_files(args)
    _, results = run_repair(
        files["model"], files["valid"], defense, test=files.get("test"), bd_test=files.get("bd_test"),  # type: ignore[arg-type]
        out_dir=args.out, target=args.target, trust_model=args.trust_model, input_scale=args.input_scale,
        several_targets=args.multi_target or args.demo == "multi-target", overwrite=args.overwrite,
        progress=not args.quiet)
    # the loud lines were logged as they arose (and are in the results file)
    if results["evaluations"]:
        print(evaluation_table(results["evaluations"]))
    else:
        print("No evaluation: give --test and --bd-test to score the repaired model.")
    for label, paths in results["models"].items():
        print(f"{label}: {', '.join(paths.values())}")
    print(f"results: {repair_paths(args.out, defense)['results']}")
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from .defenses import make_defense
    from .errors import DataError
    from .workflow.compare import compare_file, write_comparison
    from .workflow.layout import resolve_inputs

    # each defense takes the settings given on the command line that its class declares, and keeps
    # its own defaults for the rest; pruning only its own flags (its batch_size is the sweep's, not
    # fine-tuning's --batch-size), and the layer
    given = _given(args, DEFENSES["fine-pruning"])
    pruning = {"thresholds": _thresholds(args.thresholds), **{k: v for k, v in given.items() if k == "layer"}}
    chosen = _settings_by_name([s for s in args.set if s[0] in DEFENSES], args.defenses, "--defenses")
    detector_settings = _settings_by_name([s for s in args.set if s[0] not in DEFENSES], args.detectors,
                                          "--detectors")
    def flags_for(name: str) -> dict[str, Any]:
        own = DEFENSES[name].settings()
        return pruning if name == "pruning" else {k: v for k, v in given.items() if k in own}

    defenses = [make_defense(n, **{**flags_for(n), **chosen.get(n, {})}) for n in args.defenses]
    if args.demo:
        base = _resolve(args, None, demo="baseline", demo_dir=args.demo_dir, progress=not args.quiet)
        aware = resolve_inputs(demo="pruning-aware", demo_dir=args.demo_dir, progress=not args.quiet)
        models = [("baseline BadNet", base.files["model"]), ("pruning-aware BadNet", aware.files["model"])]
        files = base.files
    else:
        if not args.model:
            raise DataError("give one or more --model files, or --demo")
        given = {"model": args.model[0], "valid": args.valid, "test": args.test, "bd_test": args.bd_test}
        files = resolve_inputs(given).files
        models = [(Path(m).stem, m) for m in args.model]
    if not files.get("test") or not files.get("bd_test"):
        raise DataError("the comparison needs --test and --bd-test")
    comparisons = []
    for name, path in models:
        print(f"{name}: {path}", flush=True)
        comparisons.append(compare_file(path, files["valid"], files["test"], files["bd_test"],  # type: ignore[arg-type]
                                        defenses=defenses, name=name, target=args.target,
                                        trust_model=args.trust_model, progress=not args.quiet,
                                        detectors=args.detectors, false_alarm=args.false_alarm,
                                        detector_settings=detector_settings,
                                        several_targets=args.multi_target, input_scale=args.input_scale))
    paths = write_comparison(comparisons, args.out, overwrite=args.overwrite)
    return _show_written(paths)


def _cmd_trigger_response(args: argparse.Namespace) -> int:
    from .defenses.sweep import prune_sweep
    from .errors import DataError
    from .formats.data import poisoned_labels
    from .formats.files import check_writable
    from .nets.models import load_data_for
    from .reporting.analysis import trigger_response
    from .reporting.report import trigger_response_paths, write_trigger_response
    from .workflow.run import open_badnet

    # refuse before loading and sweeping, not after
    check_writable(trigger_response_paths(args.out).values(), overwrite=args.overwrite)
    given = {"model": args.model, "valid": args.valid, "test": args.test, "bd_test": args.bd_test}
    files = _resolve(args, given, demo=args.demo, demo_dir=args.demo_dir, progress=not args.quiet).files
    if not files.get("test") or not files.get("bd_test"):
        raise DataError("trigger-response needs --test and --bd-test")
    b, valid = open_badnet(files["model"], files["valid"], trust_model=args.trust_model,  # type: ignore[arg-type]
                           input_scale=args.input_scale)
    test = load_data_for(b, files["test"], name="test")  # type: ignore[arg-type]
    bd, target = poisoned_labels(load_data_for(b, files["bd_test"], name="bd_test"), args.target,  # type: ignore[arg-type]
                                 several=args.multi_target or args.demo == "multi-target")
    sweep = prune_sweep(b, valid, layer=args.layer, thresholds=[args.accuracy_drop], progress=not args.quiet)
    pruned = len(sweep.channels_at(args.accuracy_drop))
    # the poisoned images are made from the other classes' images; compare with those
    clean = test.x[test.y != target]
    response = trigger_response(b, clean if len(clean) else test.x, bd, layer=args.layer, ranking=sweep.ranking)
    paths = write_trigger_response(response, args.out, channels_pruned=pruned, top=args.top,
                                   title=f"{Path(str(files['model'])).name}: trigger response of {response.layer}",
                                   overwrite=args.overwrite)
    return _show_written(paths)


def _cmd_cleanse(args: argparse.Namespace) -> int:
    from .detectors.neural_cleanse import NeuralCleanse
    from .formats.files import check_writable
    from .reporting.cleanse import cleanse_paths, write_cleanse
    from .workflow.run import open_badnet

    check_writable(cleanse_paths(args.out).values(), overwrite=args.overwrite)
    given = {"model": args.model, "valid": args.valid}
    files = _resolve(args, given, demo=args.demo, demo_dir=args.demo_dir, progress=not args.quiet).files
    b, valid = open_badnet(files["model"], files["valid"], trust_model=args.trust_model,  # type: ignore[arg-type]
                           input_scale=args.input_scale)
    extra = {} if args.anomaly_threshold is None else {"anomaly_threshold": args.anomaly_threshold}
    if "preselect" in args:
        extra["preselect"] = args.preselect
    scanner = NeuralCleanse(steps=args.steps, screen_steps=args.screen_steps, candidates=args.candidates,
                            reference=args.reference, seed=args.seed, **extra)
    scan = scanner.scan(b, valid, progress=not args.quiet)
    paths = write_cleanse(scan, args.out, valid.x[0], title=f"Neural Cleanse of {Path(str(files['model'])).name}",
                          overwrite=args.overwrite)
    return _show_written(paths)


def _cmd_detect(args: argparse.Namespace) -> int:
    from .errors import DataError
    from .formats.data import poisoned_labels
    from .formats.files import check_writable
    from .nets.models import load_data_for
    from .reporting.cleanse import cleanse_paths
    from .workflow.detect import detect_paths, run_detection, write_detection
    from .workflow.run import open_badnet

    wanted = detect_paths(args.out)
    if "reversed-trigger" in args.detectors:
        wanted.update(cleanse_paths(args.out))
    check_writable(wanted.values(), overwrite=args.overwrite)
    given = {"model": args.model, "valid": args.valid, "test": args.test, "bd_test": args.bd_test}
    files = _resolve(args, given, demo=args.demo, demo_dir=args.demo_dir, progress=not args.quiet).files
    if not files.get("test") or not files.get("bd_test"):
        raise DataError("detect needs --test and --bd-test to score G")
    b, valid = open_badnet(files["model"], files["valid"], trust_model=args.trust_model,  # type: ignore[arg-type]
                           input_scale=args.input_scale)
    result = run_detection(b, valid, detectors=args.detectors, false_alarm=args.false_alarm, seed=args.seed,
                           settings=_settings_by_name(args.set, args.detectors, "--detectors"),
                           progress=not args.quiet)
    # the test files are opened only now, after every detector is fitted
    test = load_data_for(b, files["test"], name="test")  # type: ignore[arg-type]
    bd, _ = poisoned_labels(load_data_for(b, files["bd_test"], name="bd_test"), args.target,  # type: ignore[arg-type]
                            several=args.multi_target or args.demo == "multi-target")
    paths = write_detection(result, test, bd, args.out, title=Path(str(files["model"])).name,
                            overwrite=args.overwrite)
    return _show_written(paths)


def _cmd_bench(args: argparse.Namespace) -> int:
    from .errors import DataError

    if bool(args.config) == bool(args.report):
        raise DataError("give a benchmark configuration (CONFIG) or --report STORE, not both or neither")
    from .reporting.leaderboard import write_leaderboard
    from .workflow.bench import STORE, load_config, read_store, run_bench

    if args.report:
        store = Path(args.report)
        if store.is_dir():
            store = store / STORE
        if not store.is_file():
            raise DataError(f"{store}: no such store")
        rows = read_store(store)
        meta = json.loads((store.parent / "bench.json").read_text()) if (store.parent / "bench.json").exists() else {}
        paths = write_leaderboard(rows, Path(args.out) if args.out else store.parent,
                                  attack_success=float(meta.get("attack_success", 5.0)),
                                  accuracy_drop=float(meta.get("accuracy_drop", 3.0)),
                                  detection=float(meta.get("detection", 95.0)),
                                  false_alarm=float(meta.get("false_alarm", 5.0)),
                                  title=args.title or f"Leaderboard: {store.parent.name}")
        print(paths["md"].read_text())
        return 0
    config = load_config(args.config)
    out = Path(args.out) if args.out else Path("bench") / config.path.stem
    cells = config.cells()
    print(f"{config.path}: {len(config.badnets)} BadNets x {len(config.defenses)} defense settings"
          + (f" and {len(config.detectors)} GoodNets from detectors" if config.detectors else "")
          + f": {len(cells)} cells; output in {out}/", flush=True)
    result = run_bench(config, out, scheduler=args.scheduler, workers=args.workers, serial=args.serial,
                       cells=args.cells, progress=not args.quiet)
    failed = [r for r in result.rows if r["cell"] in set(result.ran) and r["status"] != "ok"]
    print(f"ran {len(result.ran)} cells ({len(failed)} failed) in {result.seconds:.0f} s on "
          f"{result.workers or 'no'} Dask worker(s); {len(result.skipped)} already in {result.store}")
    paths = write_leaderboard(result.rows, out, attack_success=config.attack_success,
                              accuracy_drop=config.accuracy_drop, detection=config.detection,
                              false_alarm=config.false_alarm, title=args.title or f"Leaderboard: {config.path.stem}")
    print(paths["md"].read_text())
    for p in (result.store, *paths.values()):
        print(p)
    return 1 if failed else 0


def _literal(text: str) -> Any:
    import ast

    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare word is a string


def _cmd_report(args: argparse.Namespace) -> int:
    from .errors import DataError, OutputExistsError
    from .reporting.notebook import execute_notebook, parameter_names

    nb = Path(args.notebook)
    if not nb.is_file():
        raise DataError(f"{nb}: no such notebook")
    names = set(parameter_names(nb))
    params = {name: _literal(value) for name, value in args.parameter}
    unknown = sorted(set(params) - names)
    if unknown:
        raise DataError(f"{nb}: no parameter named {', '.join(unknown)}; its parameters: {', '.join(sorted(names))}")
    out_dir = Path(str(params.get("OUT_DIR", "fixed_models")))
    if not out_dir.is_absolute():
        out_dir = nb.parent / out_dir
    handin = Path(args.handin) if Path(args.handin).is_absolute() else nb.parent / args.handin
    html = Path(args.html) if args.html else handin / f"{nb.stem}.html"
    if args.in_place and args.executed:
        raise DataError("give --executed or --in-place, not both")
    executed = nb if args.in_place else Path(args.executed) if args.executed else handin / f"{nb.stem}.ipynb"
    if executed.resolve() == nb.resolve() and not args.in_place:
        raise DataError(f"{executed}: that is the notebook itself; pass --in-place to replace it with its "
                        "executed copy")
    if handin.exists() and any(handin.iterdir()) and not args.overwrite:
        raise OutputExistsError(f"{handin}: the hand-in folder exists; pass --overwrite to replace it")
    print(f"Running {nb} headless" + (f" with {params}" if params else "") + " ...", flush=True)
    from nbclient.exceptions import CellExecutionError

    try:
        execute_notebook(nb, parameters=params, output=executed, html=html, timeout=args.timeout)
    except CellExecutionError as exc:
        first = str(exc).strip().splitlines()
        tail = [ln for ln in first if ln.strip()][-1:] or ["(no message)"]
        print(f"badnet-repair report: error: a cell of {nb} failed: {tail[0]}", file=sys.stderr)
        return 1
    print(f"executed notebook: {executed}\nnotebook HTML: {html}")
    report = Path(str(params.get("REPORT", "Lab2_report.md")))
    report = report if report.is_absolute() else nb.parent / report
    for path in (report, report.with_suffix(".html")):
        if path.exists():
            print(f"report: {path}")
    from .workflow.handin import collect_handin

    listing = collect_handin(handin, notebook=executed, notebook_html=html, report=report, out_dir=out_dir)
    print(f"hand-in: {handin}/ ({len(listing)} files; {handin / 'README.md'} lists them)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 1 bad input, 130 interrupted)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    args = parser.parse_args(argv)
    if args.version:
        from . import __version__

        print(__version__)
        return 0
    if not args.command:
        parser.print_help()
        return 2
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_OneLineFormatter("%(levelname)s: %(message)s"))
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, handlers=[handler])
    logging.captureWarnings(True)
    import warnings

    # a warning about the user's input is one line, as errors are (not Python's file:line and source);
    # put back after the command, for a caller running main() in its own process
    formatwarning, warnings.formatwarning = warnings.formatwarning, _one_line_warning
    if args.quiet:
        # -q: only our own warnings; Keras's and TensorFlow's (a Keras 2 file's input structure, say)
        # are about their internals, not the user's results
        for module in ("keras", "tensorflow", "tf_keras"):
            warnings.filterwarnings("ignore", module=module)
    try:
        with _SigintSeen() as sigint:
            return _run(args, argv, parser, sigint)
    finally:
        warnings.formatwarning = formatwarning


class _SigintSeen:
    """Records whether Ctrl-C (SIGINT) arrived while a command ran, raising KeyboardInterrupt as
    Python's own handler does. TensorFlow or h5py, interrupted inside their C code, can turn the
    interrupt into an error of their own, which then reaches the user as a bad-input message;
    knowing it arrived, the command line says "interrupted" instead (exit status 130)."""

    def __init__(self) -> None:
        self.seen = False
        self.previous: Any = None

    def _handle(self, signum: int, frame: Any) -> None:
        self.seen = True
        raise KeyboardInterrupt

    def __enter__(self) -> _SigintSeen:
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        import signal

        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


class _OneLineFormatter(logging.Formatter):
    """``LEVEL: message``, without the level twice where the message already starts with it (the
    repairs' loud lines begin with ``WARNING:`` so that they read alone in results.json and reports)."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        doubled = f"{record.levelname}: {record.levelname}: "
        return text.replace(doubled, f"{record.levelname}: ", 1) if text.startswith(doubled) else text


def _one_line_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                      line: str | None = None) -> str:
    from .errors import DataWarning

    return str(message) if issubclass(category, DataWarning) else f"{category.__name__}: {message}"


def _run(args: argparse.Namespace, argv: list[str], parser: argparse.ArgumentParser, sigint: _SigintSeen) -> int:
    """Run the parsed command; map errors and interrupts to exit statuses."""
    from .errors import BadNetRepairError

    interrupted = f"badnet-repair {args.command}: interrupted; no partial output files were left"
    try:
        status = _dispatch(args, argv)
    except BadNetRepairError as exc:
        if sigint.seen:
            print(interrupted, file=sys.stderr)
            return 130
        print(f"badnet-repair {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        return 130
    except Exception:
        # TensorFlow, interrupted inside its C++ code, may raise an error of its own
        if sigint.seen:
            print(interrupted, file=sys.stderr)
            return 130
        raise
    if status is None:
        parser.error(f"unknown command {args.command!r}")
    if sigint.seen:
        # a library caught the KeyboardInterrupt (one raised inside a callback from C code is
        # dropped) and the command ran to its end: its outputs are complete, but Ctrl-C is still
        # what the user asked for, and a script must see it
        print(f"badnet-repair {args.command}: interrupted, but Ctrl-C arrived where a library dropped it and "
              "the command finished: its outputs are complete", file=sys.stderr)
        return 130
    return status


def _dispatch(args: argparse.Namespace, argv: list[str]) -> int | None:
    """Run the command ``args.command`` names; None for an unknown one."""
    if args.command == "prune":
        return _cmd_prune(args, argv)
    if args.command == "eval":
        return _cmd_eval(args)
    if args.command == "predict":
        return _cmd_predict(args)
    if args.command == "make-demo":
        return _cmd_make_demo(args)
    if args.command == "report":
        return _cmd_report(args)
    if args.command == "fine-prune":
        return _cmd_fine_prune(args)
    if args.command == "repair":
        return _cmd_repair(args)
    if args.command == "compare":
        return _cmd_compare(args)
    if args.command == "trigger-response":
        return _cmd_trigger_response(args)
    if args.command == "bench":
        return _cmd_bench(args)
    if args.command == "cleanse":
        return _cmd_cleanse(args)
    if args.command == "detect":
        return _cmd_detect(args)
    return None
