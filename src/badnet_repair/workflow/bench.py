"""The defense benchmark: a declared matrix of BadNets x defenses x seeds, run on Dask.

A TOML file declares the matrix (see ``benchmarks/demo.toml``)::

    seeds = [0, 1, 2]                       # defense seeds (for defenses with a ``seed`` setting)
    tf_threads = 1                          # TensorFlow's threads per cell (default 1), in every mode
    [target]                                # what "repaired" means in the leaderboard
    attack_success = 5.0                    # at most this attack success (%)
    accuracy_drop = 3.0                     # and at most this many points below B's clean accuracy

    [[badnet]]                              # a BadNet given by its files ...
    name = "lab"
    split = "held-out"                      # "tuning" (settings may be chosen on it) or "held-out"
    model = "model/bd_net.h5"
    valid = "data/cl/valid.h5"              # the only data a defense sees
    test = "data/cl/test.h5"
    bd_test = "data/bd/bd_test.h5"
    input_scale = "1/255"                   # optional: the model takes file pixels times this (default 1)

    [[badnet]]                              # ... or made by a recipe (workflow.recipes)
    name = "demo-pruning-aware"
    split = "tuning"
    recipe = "demo"
    kind = "pruning-aware"

    [[badnet]]                              # the same BadNet (made once), fewer clean images:
    name = "demo-pruning-aware, 2 a class"  # defenses and detectors see 2 validation images a
    split = "tuning"                        # class (any BadNet entry takes clean_per_class)
    recipe = "demo"
    kind = "pruning-aware"
    clean_per_class = 2

    [[defense]]                             # a registry name and its settings ("none": None);
    name = "fine-pruning"                   # a list of values expands to a grid
    epochs = [30, 50]

    [[detector]]                            # a GoodNet from detectors (registry names), combined;
    detectors = ["strip", "feature-distance"]   # each is reported alone too
    false_alarm = 5.0                       # G's false-alarm budget, split across them (default 5)
    set = { strip = { copies = 64 } }       # optional: a detector's settings over the defaults ("none": None)

A configuration may hold defenses, detectors or both; ``[target]`` also takes ``detection`` (at
least this % of poisoned test inputs flagged, default 95) and ``false_alarm`` (at most this % of
clean test inputs, default 5) for the detection leaderboard.

Each cell (one BadNet, one defense setting, one seed) runs with ``tf_threads`` TensorFlow
threads whether it runs here or on a worker: float sums taken in another order make training
take another path, so a cell's numbers are reproducible for the same thread count and CPU kind,
not across them. Each cell loads the BadNet, repairs it from the
clean validation data, then evaluates the repaired models and their GoodNets on the test sets,
and saves the models and the repair's record. :func:`run_bench` runs the cells as tasks on a
Dask ``LocalCluster`` it starts and stops (one single-threaded worker process per core, on
127.0.0.1, no dashboard) or on an existing cluster; recipe BadNets are made once, as tasks the
cells depend on. The store, ``store.jsonl`` in the output folder (a row per cell), is rewritten
atomically as each cell finishes; a rerun skips the cells already in it. Each row records a
fingerprint of the B it ran on (:func:`~badnet_repair.reporting.reference.weights_fingerprint`):
a store copied to another machine, whose recipe BadNets are made again there, may hold rows of
another B under the same name, and :func:`~badnet_repair.reporting.leaderboard.mixed_badnets`
finds them (the run and its leaderboard say so).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import re
import sys
import time
import traceback
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..defaults import parse_input_scale, setting_problem
from ..defenses import REGISTRY, make_defense
from ..detectors import DEFAULT_FALSE_ALARM
from ..detectors import REGISTRY as DETECTORS
from ..errors import BadNetRepairError
from ..formats.files import atomic_path, versions, write_json
from ..reporting.leaderboard import mixed_badnets
from ..reporting.reference import weights_fingerprint
from .recipes import KINDS, RECIPES, make_recipe, recipe_problems

__all__ = [
    "BadNetSpec",
    "BenchConfig",
    "BenchResult",
    "Cell",
    "ConfigError",
    "DefenseSpec",
    "DetectorSpec",
    "load_config",
    "read_store",
    "run_bench",
    "run_cell",
]

log = logging.getLogger(__name__)

SPLITS = ("tuning", "held-out")
STORE = "store.jsonl"


class ConfigError(BadNetRepairError):
    """A benchmark configuration with mistakes; the message lists each, one per line."""


@dataclass(frozen=True)
class BadNetSpec:
    """One BadNet of the matrix: its files, or the recipe that makes them; ``input_scale``: its
    model takes file pixels times this (:func:`~badnet_repair.nets.models.load_model`);
    ``clean_per_class``: the defenses and detectors see only this many clean validation images
    a class (:meth:`~badnet_repair.formats.data.Dataset.per_class`, seed 0), None for all."""

    name: str
    split: str
    files: Mapping[str, str] = field(default_factory=dict)
    recipe: str | None = None
    kind: str | None = None
    recipe_settings: Mapping[str, Any] = field(default_factory=dict)
    target: int | None = None
    input_scale: float = 1.0
    clean_per_class: int | None = None
    made_as: str = ""

    @property
    def folder_name(self) -> str:
        """The name its recipe's files are made under: the first entry of the same recipe and
        settings (one BadNet trained once, whatever clean data each entry gives the defenses)."""
        return self.made_as or self.name


@dataclass(frozen=True)
class DefenseSpec:
    """One point of a defense's settings grid."""

    name: str
    label: str
    settings: Mapping[str, Any]

    @property
    def seeded(self) -> bool:
        return "seed" in REGISTRY[self.name].settings()


@dataclass(frozen=True)
class DetectorSpec:
    """One GoodNet from detectors: registry names combined, G's false-alarm budget, and settings
    per detector (``settings``: ``{"detectors": [...], "false_alarm": F, "set": {name: {...}}}``)."""

    name: str
    label: str
    settings: Mapping[str, Any]

    @property
    def seeded(self) -> bool:
        return any("seed" in DETECTORS[d].settings() for d in self.settings["detectors"])


@dataclass(frozen=True)
class Cell:
    """One BadNet repaired by one defense setting, or screened by one GoodNet from detectors, with
    one seed (None: nothing in it takes a seed)."""

    badnet: BadNetSpec
    defense: DefenseSpec | DetectorSpec
    seed: int | None

    @property
    def key(self) -> str:
        """A stable id: the same cell in a rerun (or another configuration) has the same key."""
        parts: list[Any] = [self.badnet.name, self.defense.name, dict(self.defense.settings), self.seed]
        if self.badnet.input_scale != 1.0:  # another model altogether; unscaled cells keep their keys
            parts.append(self.badnet.input_scale)
        if self.badnet.clean_per_class is not None:  # other clean data; cells with all of it keep their keys
            parts.append({"clean_per_class": self.badnet.clean_per_class})
        text = json.dumps(parts, sort_keys=True, default=str)
        return hashlib.sha1(text.encode()).hexdigest()[:12]

    @property
    def title(self) -> str:
        return f"{self.badnet.name} / {self.defense.label}" + ("" if self.seed is None else f" / seed {self.seed}")


@dataclass(frozen=True)
class BenchConfig:
    """A checked benchmark matrix (:func:`load_config`)."""

    path: Path
    badnets: tuple[BadNetSpec, ...]
    defenses: tuple[DefenseSpec, ...]
    seeds: tuple[int, ...] = (0,)
    attack_success: float = 5.0
    accuracy_drop: float = 3.0
    tf_threads: int = 1
    detectors: tuple[DetectorSpec, ...] = ()
    detection: float = 95.0
    false_alarm: float = 5.0

    def cells(self) -> list[Cell]:
        """Every cell, BadNet by BadNet, defense (then GoodNet from detectors) by defense, seed by seed."""
        specs: list[DefenseSpec | DetectorSpec] = [*self.defenses, *self.detectors]
        return [Cell(b, d, s) for b in self.badnets for d in specs for s in (self.seeds if d.seeded else (None,))]


# ----------------------------------------------------------------------------- the configuration


def _read_toml(path: Path) -> dict[str, Any]:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        import tomli as tomllib
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None


def _grid(name: str, entry: Mapping[str, Any], errors: list[str], where: str) -> list[DefenseSpec]:
    """The settings grid of one ``[[defense]]`` entry: every list value is a choice (for a
    setting that is itself a list, such as ``thresholds``, a list of lists is)."""
    cls = REGISTRY[name]
    hints = typing.get_type_hints(cls)
    known = cls.settings()
    label = entry.get("label")
    axes: list[tuple[str, list[Any]]] = []
    for key, value in entry.items():
        if key in ("name", "label"):
            continue
        if key not in known:
            errors.append(f"{where}: defense {name!r} has no setting {key!r}; its settings: {', '.join(known)}")
            continue
        listy = typing.get_origin(hints[key]) is tuple
        is_grid = isinstance(value, list) and (not listy or (bool(value) and isinstance(value[0], list)))
        choices = value if is_grid else [value]
        # TOML has no null: "none" stands for None where the setting takes None and not that string
        optional = type(None) in typing.get_args(hints[key])
        choices = [None if optional and isinstance(v, str) and v.lower() == "none"
                   and setting_problem(v, hints[key]) else v for v in choices]
        if not choices:
            errors.append(f"{where}: setting {key!r} has an empty list of choices")
            continue
        for v in choices:
            problem = setting_problem(v, hints[key])
            if problem:
                errors.append(f"{where}: setting {key!r} = {v!r} {problem}")
        axes.append((key, choices))
    points: list[dict[str, Any]] = [{}]
    for key, choices in axes:
        points = [{**p, key: v} for p in points for v in choices]
    out = []
    for p in points:
        shown = ", ".join(f"{k}={v}" for k, v in p.items() if len(dict(axes)[k]) > 1)
        text = str(label) if label else name
        out.append(DefenseSpec(name=name, label=f"{text} ({shown})" if shown else text,
                               settings={k: tuple(v) if isinstance(v, list) else v for k, v in p.items()}))
    return out


def load_config(path: str | os.PathLike[str]) -> BenchConfig:
    """Read and check a benchmark configuration.

    Files are resolved relative to the configuration's folder. Every mistake is collected:
    unknown keys, defenses, settings, recipes or kinds; settings of the wrong type; missing
    files; BadNets without a split; the same BadNet (name, model file or recipe) marked both
    ``tuning`` and ``held-out``.

    Raises:
        ConfigError: listing every mistake, one per line.
    """
    p = Path(path)
    raw = _read_toml(p)
    base = p.parent
    errors: list[str] = []
    unknown = sorted(set(raw) - {"seeds", "target", "badnet", "defense", "detector", "name", "description",
                                 "tf_threads"})
    if unknown:
        errors.append(f"unknown top-level key(s) {', '.join(unknown)}; expected seeds, target, badnet, defense, "
                      "detector")
    seeds = raw.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool)
                                                           for s in seeds):
        errors.append(f"seeds must be a non-empty list of whole numbers, not {seeds!r}")
        seeds = [0]
    tf_threads = raw.get("tf_threads", 1)
    if not isinstance(tf_threads, int) or isinstance(tf_threads, bool) or tf_threads < 1:
        errors.append(f"tf_threads must be a whole number >= 1, not {tf_threads!r}")
        tf_threads = 1
    target = raw.get("target", {})
    bad_target = sorted(set(target) - {"attack_success", "accuracy_drop", "detection", "false_alarm"})
    if bad_target:
        errors.append(f"[target] has unknown key(s) {', '.join(bad_target)}; expected attack_success, accuracy_drop, "
                      "detection, false_alarm")

    badnets: list[BadNetSpec] = []
    identities: dict[str, tuple[str, str]] = {}
    for i, b in enumerate(raw.get("badnet", [])):
        where = f"[[badnet]] {i + 1} ({b.get('name', 'no name')})"
        name, split = b.get("name"), b.get("split")
        if not isinstance(name, str) or not name:
            errors.append(f"{where}: needs a name")
            name = f"badnet-{i + 1}"
        if split not in SPLITS:
            errors.append(f"{where}: split must be 'tuning' or 'held-out', not {split!r}")
        recipe = b.get("recipe")
        files: dict[str, str] = {}
        settings: dict[str, Any] = {}
        kind = b.get("kind")
        input_scale = 1.0
        if recipe is None:
            extra = sorted(set(b) - {"name", "split", "model", "valid", "test", "bd_test", "target", "input_scale",
                                     "clean_per_class"})
            if extra:
                errors.append(f"{where}: unknown key(s) {', '.join(extra)} (a BadNet by files takes model, valid, "
                              "test, bd_test, target, input_scale, clean_per_class; or give a recipe)")
            if "input_scale" in b:
                try:
                    input_scale = parse_input_scale(b["input_scale"])
                except ValueError as exc:
                    errors.append(f"{where}: {exc}")
            for role in ("model", "valid", "test", "bd_test"):
                if role not in b:
                    errors.append(f"{where}: missing {role!r} (or give a recipe)")
                    continue
                f = Path(str(b[role]))
                f = f if f.is_absolute() else base / f
                if not f.is_file():
                    errors.append(f"{where}: {role} file {f} does not exist")
                files[role] = str(f)
            identity = str(Path(files.get("model", name)).resolve())
        else:
            if recipe not in RECIPES:
                errors.append(f"{where}: unknown recipe {recipe!r}; known: {', '.join(RECIPES)}")
            if kind not in KINDS:
                errors.append(f"{where}: kind must be one of {', '.join(KINDS)}, not {kind!r}")
            elif recipe == "demo" and kind == "clean":
                errors.append(f"{where}: the demo recipe has no clean model (the faces recipe has)")
            allowed = set(RECIPES.get(recipe, {}))
            extra = sorted(set(b) - {"name", "split", "recipe", "kind", "target", "clean_per_class"} - allowed)
            if extra:
                errors.append(f"{where}: recipe {recipe!r} has no setting(s) {', '.join(extra)}; "
                              f"its settings: {', '.join(sorted(allowed))}")
            settings = {k: b[k] for k in allowed if k in b}
            for key in ("faces", "trigger", "demo_dir"):
                if key in settings:
                    f = Path(str(settings[key]))
                    settings[key] = str(f if f.is_absolute() else base / f)
            errors += [f"{where}: {problem}" for problem in recipe_problems(str(recipe), kind, settings)]
            identity = json.dumps([recipe, kind, settings], sort_keys=True)
        made_as = identities.get(identity, (name, ""))[0]
        for key in (f"name:{name}", identity):
            seen = identities.get(key)
            if seen and seen[1] != split:
                errors.append(f"{where}: is marked {split!r} but also {seen[1]!r} (as {seen[0]}); a held-out "
                              "BadNet must never be used for tuning")
            elif seen and key.startswith("name:"):
                errors.append(f"{where}: the name {name!r} is used twice")
            identities.setdefault(key, (name, str(split)))
        per_class = b.get("clean_per_class")
        if per_class is not None and (not isinstance(per_class, int) or isinstance(per_class, bool) or per_class < 1):
            errors.append(f"{where}: clean_per_class must be a whole number >= 1 (clean images a class), "
                          f"not {per_class!r}")
            per_class = None
        badnets.append(BadNetSpec(name=name, split=str(split), files=files, recipe=recipe, kind=kind,
                                  recipe_settings=settings, target=b.get("target"), input_scale=input_scale,
                                  clean_per_class=per_class, made_as=made_as))
    if not raw.get("badnet"):
        errors.append("no [[badnet]] entries")

    defenses: list[DefenseSpec] = []
    for i, d in enumerate(raw.get("defense", [])):
        name = d.get("name")
        where = f"[[defense]] {i + 1} ({name})"
        if name not in REGISTRY:
            errors.append(f"{where}: unknown defense {name!r}; known: {', '.join(REGISTRY)}")
            continue
        defenses += _grid(name, d, errors, where)
    detectors = [spec for i, d in enumerate(raw.get("detector", []))
                 if (spec := _detector_spec(d, errors, f"[[detector]] {i + 1}")) is not None]
    if not raw.get("defense") and not raw.get("detector"):
        errors.append("no [[defense]] or [[detector]] entries")
    labels = [d.label for d in defenses] + [d.label for d in detectors]
    for label in sorted({x for x in labels if labels.count(x) > 1}):
        errors.append(f"two defense entries are both labelled {label!r}; give each a label")
    if errors:
        raise ConfigError(f"{p}: {len(errors)} mistake(s):\n  " + "\n  ".join(errors))
    for d in defenses:  # every grid point builds
        try:
            make_defense(d.name, **dict(d.settings))
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{p}: defense {d.label!r}: {exc}") from None
    return BenchConfig(path=p, badnets=tuple(badnets), defenses=tuple(defenses), seeds=tuple(seeds),
                       attack_success=float(target.get("attack_success", 5.0)),
                       accuracy_drop=float(target.get("accuracy_drop", 3.0)), tf_threads=tf_threads,
                       detectors=tuple(detectors), detection=float(target.get("detection", 95.0)),
                       false_alarm=float(target.get("false_alarm", 5.0)))


def _detector_spec(entry: Mapping[str, Any], errors: list[str], where: str) -> DetectorSpec | None:
    """One ``[[detector]]`` entry, checked by making its detectors (mistakes go to ``errors``)."""
    from .detect import make_detectors

    extra = sorted(set(entry) - {"detectors", "label", "false_alarm", "set"})
    if extra:
        errors.append(f"{where}: unknown key(s) {', '.join(extra)}; a detector entry takes detectors, label, "
                      "false_alarm, set")
    names = entry.get("detectors")
    if isinstance(names, str):
        names = [names]
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        errors.append(f"{where}: detectors must be a list of registry names ({', '.join(DETECTORS)})")
        return None
    budget = entry.get("false_alarm", DEFAULT_FALSE_ALARM)
    if isinstance(budget, bool) or not isinstance(budget, int | float) or not 0 <= budget <= 100:
        errors.append(f"{where}: false_alarm must be a percentage, not {budget!r}")
        return None
    chosen = entry.get("set", {})
    if not isinstance(chosen, dict) or not all(isinstance(v, dict) for v in chosen.values()):
        errors.append(f"{where}: set must be a table of tables, e.g. set = {{ strip = {{ copies = 64 }} }}")
        return None
    # TOML has no null: "none" stands for None, as in the CLI's --set NAME.SETTING=none
    chosen = {det: {k: None if isinstance(v, str) and v.lower() == "none" else v for k, v in values.items()}
              for det, values in chosen.items()}
    try:
        make_detectors(names, false_alarm=float(budget), settings=chosen)
    except (TypeError, ValueError) as exc:
        errors.append(f"{where}: {exc}")
        return None
    settings = {"detectors": list(names), "false_alarm": float(budget),
                **({"set": {k: dict(v) for k, v in chosen.items()}} if chosen else {})}
    return DetectorSpec(name="detection", label=str(entry.get("label") or " + ".join(names)), settings=settings)


# ----------------------------------------------------------------------------- one cell


def _limit_threads(threads: int | None) -> None:
    """TensorFlow's thread pools, before its runtime starts in this process (worker processes
    sharing the cores must not each use all of them, and a cell's numbers depend on them)."""
    if not threads:
        return
    import tensorflow as tf

    if tf.config.threading.get_intra_op_parallelism_threads() == threads:
        return
    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
    except RuntimeError:  # already started: it keeps its pools, and the rows say so
        log.warning("TensorFlow is already running with its own thread pools; tf_threads=%d not applied", threads)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_") or "model"


def run_cell(cell: Cell, files: Mapping[str, str], out_dir: str | os.PathLike[str], *,
             threads: int | None = None) -> dict[str, Any]:
    """Repair one BadNet with one defense setting and seed, evaluate, save; never raises.

    The defense sees B and the clean validation data only; the test files are opened after
    the repair. The repaired models (``.keras``) and the repair's record go to
    ``out_dir/cells/<key>/``.

    Returns:
        The store's row: the cell, ``status`` ``"ok"`` or ``"failed"`` (with ``error``), B's
        and each repaired model's and GoodNet's numbers under ``results``, seconds, versions.
    """
    start = time.perf_counter()
    row: dict[str, Any] = {"cell": cell.key, "badnet": cell.badnet.name, "split": cell.badnet.split,
                           "defense": cell.defense.name, "label": cell.defense.label,
                           "settings": dict(cell.defense.settings), "seed": cell.seed,
                           "worker": f"{platform.node()}:{os.getpid()}"}
    try:
        _limit_threads(threads)
        import tensorflow as tf

        # what TensorFlow really uses (0: its default, every core)
        row["tf_threads"] = tf.config.threading.get_intra_op_parallelism_threads() or os.cpu_count()
        from ..formats.data import poisoned_labels
        from ..nets.models import load_data_for, load_model, without_input_scale
        from .compare import evaluate_repairs

        row["input_scale"] = cell.badnet.input_scale
        b = load_model(files["model"], input_scale=cell.badnet.input_scale)
        row["badnet_weights_sha256"] = weights_fingerprint(b)
        valid = load_data_for(b, files["valid"], name="valid")
        if cell.badnet.clean_per_class is not None:
            valid = valid.per_class(cell.badnet.clean_per_class)
            row["clean_images"] = len(valid)
        if isinstance(cell.defense, DetectorSpec):
            row.update(_detection_cell(cell, b, valid, files))
            row.update(seconds=round(time.perf_counter() - start, 2), versions=versions(),
                       peak_rss_mib=_peak_rss_mib())
            return row
        settings = dict(cell.defense.settings)
        if cell.seed is not None:
            settings["seed"] = cell.seed
        defense = make_defense(cell.defense.name, **settings)
        repair = defense.repair(b, valid)
        # the evaluation: only now are the test files read
        test = load_data_for(b, files["test"], name="test")
        bd_test, target = poisoned_labels(load_data_for(b, files["bd_test"], name="bd_test"), cell.badnet.target,
                                          several=cell.badnet.kind == "multi-target")
        evaluations = evaluate_repairs(b, [repair], test, bd_test, name=cell.badnet.name).evaluations
        folder = Path(out_dir) / "cells" / cell.key
        folder.mkdir(parents=True, exist_ok=True)
        saved = {}
        for m in repair.models:
            path = folder / f"{_slug(m.label)}.keras"
            with atomic_path(path, overwrite=True) as tmp:
                without_input_scale(m.model).save(tmp)  # the input B's file takes
            saved[m.label] = str(path)
        write_json(folder / "record.json", repair.record, overwrite=True)
        base = evaluations[0]
        row.update(status="ok", target=target, settings=repair.record["settings"], warnings=list(repair.warnings),
                   badnet_clean_accuracy=base.clean_accuracy, badnet_attack_success=base.attack_success_rate,
                   results=[{k: v for k, v in e.as_dict().items() if k not in ("clean_set", "poisoned_set")}
                            for e in evaluations[1:]],
                   models=saved)
    except Exception as exc:  # a failed cell is recorded; the benchmark goes on
        row.update(status="failed", error=f"{type(exc).__name__}: {exc}",
                   traceback=traceback.format_exc(limit=8))
    row.update(seconds=round(time.perf_counter() - start, 2), versions=versions(), peak_rss_mib=_peak_rss_mib())
    return row


def _detection_cell(cell: Cell, b: Any, valid: Any, files: Mapping[str, str]) -> dict[str, Any]:
    """A GoodNet-from-detectors cell after B and the clean data are open: fit the detectors on the
    clean data, then open the test sets and score each detector alone and all combined."""
    from ..formats.data import poisoned_labels
    from ..metrics import evaluate_predictions
    from ..nets.models import load_data_for, predict_classes
    from .detect import detection_warnings, detector_evaluations, fit_detectors

    spec = cell.defense.settings
    parts, seconds, scan = fit_detectors(b, valid, spec["detectors"], false_alarm=spec["false_alarm"],
                                         seed=0 if cell.seed is None else cell.seed, settings=spec.get("set"))
    test = load_data_for(b, files["test"], name="test")
    bd_test, target = poisoned_labels(load_data_for(b, files["bd_test"], name="bd_test"), cell.badnet.target,
                                      several=cell.badnet.kind == "multi-target")
    base = evaluate_predictions(model="B", kind="badnet", clean_pred=predict_classes(b, test.x), clean_labels=test.y,
                                poisoned_pred=predict_classes(b, bd_test.x), poisoned_labels=bd_test.y)
    rows = detector_evaluations(b, parts, test, bd_test)
    extra: dict[str, Any] = {"warnings": detection_warnings(parts, rows)}
    if scan is not None:
        extra["scan"] = scan_summary(scan, bd_test.y)
    return {"status": "ok", "kind": "detection", "target": target, "fit_seconds": seconds, **extra,
            "settings": {**dict(spec), "detectors": {n: d.get_params() for n, d in parts.items()}},
            "badnet_clean_accuracy": base.clean_accuracy, "badnet_attack_success": base.attack_success_rate,
            "results": [{k: v for k, v in e.as_dict().items() if k not in ("clean_set", "poisoned_set")}
                        for e in rows]}


def scan_summary(scan: Any, target: Any) -> dict[str, Any]:
    """What a Neural Cleanse scan did with the attack's target(s), for the record (the scan
    itself never saw them): the classes it flagged and, per target, its place in the label
    pre-selection and the screen (:meth:`~badnet_repair.detectors.neural_cleanse.CleanseScan.preselect_rank`,
    :meth:`~badnet_repair.detectors.neural_cleanse.CleanseScan.screen_rank`; None where it was left
    out), whether it was optimised fully, and its norm and anomaly index."""
    import numpy as np

    def number(v: Any) -> float | None:
        return None if not np.isfinite(v) else round(float(v), 3)

    def places(t: int) -> dict[str, Any]:
        chosen = scan.preselected is not None and t in scan.preselected
        return {"preselection_place": scan.preselect_rank(t) if chosen else None,
                "screen_place": scan.screen_rank(t) if np.isfinite(scan.screen_norms[t]) else None,
                "optimised": t in scan.triggers, "norm": number(scan.norms[t]), "anomaly": number(scan.anomaly[t])}

    targets = sorted({int(t) for t in np.atleast_1d(np.asarray(target))})
    return {"flagged": [int(c) for c in scan.flagged], "seconds": round(float(scan.seconds), 1),
            "targets": {str(t): places(t) for t in targets}}


def _peak_rss_mib() -> float | None:
    """This process's peak resident memory so far, in MiB (None where the platform does not say)."""
    try:
        import resource
    except ImportError:  # pragma: no cover - Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1024 * 1024 if sys.platform == "darwin" else 1024), 1)


# ----------------------------------------------------------------------------- the store


def read_store(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The rows of a store (``store.jsonl``), in the order written; [] if it does not exist."""
    p = Path(path)
    if p.is_dir():
        p = p / STORE
    if not p.exists():
        return []
    rows = []
    for i, line in enumerate(p.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                raise BadNetRepairError(f"{p}: line {i} is not JSON (the store is damaged)") from None
    return rows


def _write_store(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    with atomic_path(path, overwrite=True) as tmp:
        Path(tmp).write_text("".join(json.dumps(r, sort_keys=True, default=str) + "\n" for r in rows))


# ----------------------------------------------------------------------------- the run


@dataclass(frozen=True)
class BenchResult:
    """What :func:`run_bench` did.

    Attributes:
        store: the store's path.
        rows: every row in the store afterwards.
        ran: keys of the cells run now.
        skipped: keys of the cells already in the store.
        seconds: wall time of the run.
        workers: the Dask workers used (0: run in this process).
    """

    store: Path
    rows: tuple[dict[str, Any], ...]
    ran: tuple[str, ...]
    skipped: tuple[str, ...]
    seconds: float
    workers: int


def _recipe_task(recipe: str, kind: str, settings: Mapping[str, Any], folder: str,
                 threads: int | None) -> dict[str, str]:
    _limit_threads(threads)
    return make_recipe(recipe, kind, settings, folder)


def _cell_task(cell: Cell, files: Mapping[str, str], out_dir: str, threads: int | None) -> dict[str, Any]:
    return run_cell(cell, files, out_dir, threads=threads)


def run_bench(config: BenchConfig, out_dir: str | os.PathLike[str], *, scheduler: str | None = None,
              workers: int | None = None, serial: bool = False, cells: str | None = None,
              progress: bool = True, on_row: Callable[[dict[str, Any]], None] | None = None) -> BenchResult:
    """Run every cell of the matrix not already in the store.

    Args:
        config: from :func:`load_config`.
        out_dir: the output folder: ``store.jsonl``, ``cells/``, ``badnets/`` (recipe BadNets).
        scheduler: the address of an existing Dask scheduler (``tcp://host:8786``); default a
            ``LocalCluster`` started and stopped here.
        workers: worker processes of the local cluster, default one per core.
        serial: run in this process, one cell after another, without Dask.
        cells: a regular expression; only cells whose title (``badnet / defense / seed N``)
            matches are run.
        progress: a progress bar over cells.
        on_row: called with each row as it is stored.

    Returns:
        BenchResult.
    """
    start = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    store = out / STORE
    rows = read_store(store)
    done = {r["cell"] for r in rows}
    pattern = re.compile(cells) if cells else None
    todo = [c for c in config.cells() if c.key not in done and (pattern is None or pattern.search(c.title))]
    skipped = tuple(c.key for c in config.cells() if c.key in done)
    ran: list[str] = []

    order = {c.key: i for i, c in enumerate(config.cells())}

    def keep(row: dict[str, Any]) -> None:
        rows.append(row)
        # in the configuration's order (cells finish in any order), cells no longer in it last
        rows.sort(key=lambda r: order.get(r["cell"], len(order)))
        _write_store(store, rows)
        ran.append(row["cell"])
        if row["status"] != "ok":
            log.warning("cell %s (%s / %s) failed: %s", row["cell"], row["badnet"], row["label"], row["error"])
        if on_row is not None:
            on_row(row)

    from ..progress import bar

    write_json(out / "bench.json", {"config": str(config.path), "attack_success": config.attack_success,
                                    "accuracy_drop": config.accuracy_drop, "cells": len(config.cells()),
                                    "tf_threads": config.tf_threads, "detection": config.detection,
                                    "false_alarm": config.false_alarm},
               overwrite=True)
    needed = {c.badnet.folder_name: c.badnet for c in todo}
    if not todo:
        _warn_mixed(rows, store)
        return BenchResult(store, tuple(rows), (), skipped, time.perf_counter() - start, 0)
    if serial:
        _limit_threads(config.tf_threads)
        made = {n: (dict(b.files) if b.recipe is None else
                    make_recipe(b.recipe, str(b.kind), b.recipe_settings, str(out / "badnets" / _slug(n))))
                for n, b in needed.items()}
        for c in bar(todo, desc="benchmark cells", unit="cell") if progress else todo:
            keep(run_cell(c, made[c.badnet.folder_name], out, threads=config.tf_threads))
        _warn_mixed(rows, store)
        return BenchResult(store, tuple(rows), tuple(ran), skipped, time.perf_counter() - start, 0)

    from distributed import Client, LocalCluster, as_completed

    cluster = None
    if scheduler is None:
        n = workers or os.cpu_count() or 1
        cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True, host="127.0.0.1",
                               dashboard_address=None, silence_logs=logging.ERROR)
    client = Client(scheduler or cluster)
    try:
        if cluster is not None:
            client.wait_for_workers(len(cluster.workers))
        n_workers = len(client.nthreads())
        threads = config.tf_threads
        recipes = {n: client.submit(_recipe_task, b.recipe, str(b.kind), dict(b.recipe_settings),
                                    str(out / "badnets" / _slug(n)), threads, key=f"badnet-{_slug(n)}-{n_workers}",
                                    pure=False)
                   for n, b in needed.items() if b.recipe is not None}
        futures = [client.submit(_cell_task, c, recipes.get(c.badnet.folder_name, dict(c.badnet.files)), str(out),
                                 threads, key=f"cell-{c.key}", pure=False) for c in todo]
        by_key = {f.key: c for f, c in zip(futures, todo, strict=True)}
        bar_ = bar(total=len(futures), desc="benchmark cells", unit="cell") if progress else None
        for future in as_completed(futures):
            cell = by_key[future.key]
            try:
                row = future.result()
            except Exception as exc:  # the recipe it depends on failed, or the worker died
                row = {"cell": cell.key, "badnet": cell.badnet.name, "split": cell.badnet.split,
                       "defense": cell.defense.name, "label": cell.defense.label,
                       "settings": dict(cell.defense.settings), "seed": cell.seed, "status": "failed",
                       "error": f"{type(exc).__name__}: {exc}", "versions": versions()}
            keep(row)
            if bar_ is not None:
                bar_.update()
        if bar_ is not None:
            bar_.close()
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
    _warn_mixed(rows, store)
    return BenchResult(store, tuple(rows), tuple(ran), skipped, time.perf_counter() - start, n_workers)


def _warn_mixed(rows: Sequence[Mapping[str, Any]], store: Path) -> None:
    for line in mixed_badnets(rows):
        log.warning("%s: %s", store, line)

