"""The whole pruning-defense workflow on files: load, sweep, save B'_X and G_X, report."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..defenses import Pruning
from ..defenses.pruning import ranking_of
from ..defenses.sweep import RankAt, SweepResult, prune_sweep
from ..formats.data import Dataset, Layout
from ..formats.files import check_writable, sha256_file, versions, write_results
from ..metrics import Evaluation, evaluate_predictions, evaluate_repair
from ..nets.models import num_classes, saved_model_paths
from ..reporting.report import render_report, sweep_rows
from .run import low_attack_warnings, open_badnet, open_evaluation_sets, save_repair

__all__ = ["DefenseResult", "output_paths", "run_pruning_defense"]

log = logging.getLogger(__name__)

FIGURE = "pruning_curves.png"
REPORT = "Lab2_report.md"


@dataclass(frozen=True, eq=False)
class DefenseResult:
    """What :func:`run_pruning_defense` produced.

    Attributes:
        sweep: the full sweep.
        evaluations: B, then each B'_X and G_X, on the evaluation sets.
        models: threshold -> {"h5", "weights", "keras", "goodnet"} -> path.
        files: name -> path of every results file written.
        results: the content of ``results.json``.
    """

    sweep: SweepResult
    evaluations: tuple[Evaluation, ...]
    models: Mapping[float, Mapping[str, Path]]
    files: Mapping[str, Path]
    results: Mapping[str, Any]


def _tag(x: float) -> str:
    return f"{x:g}"


def output_paths(out_dir: str | os.PathLike[str], thresholds: Sequence[float],
                 *, save_models: bool = True, report: bool = True) -> dict[str, Path]:
    """Every file a run writes into ``out_dir``, by name (checked before any work starts)."""
    d = Path(out_dir)
    paths = {"sweep_csv": d / "sweep.csv", "results_csv": d / "results.csv",
             "results_json": d / "results.json"}
    if report:
        paths["figure"] = d / FIGURE
        paths["report"] = d / REPORT
    if save_models:
        for x in thresholds:
            for fmt, p in saved_model_paths(d, f"bd_{_tag(x)}").items():
                paths[f"bd_{_tag(x)}_{fmt}"] = p
            paths[f"goodnet_{_tag(x)}"] = d / f"goodnet_{_tag(x)}.keras"
    return paths


def run_pruning_defense(
    model: str | os.PathLike[str],
    valid: str | os.PathLike[str],
    *,
    bd_valid: str | os.PathLike[str] | None = None,
    test: str | os.PathLike[str] | None = None,
    bd_test: str | os.PathLike[str] | None = None,
    out_dir: str | os.PathLike[str] = "fixed_models",
    thresholds: Sequence[float] = (2.0, 4.0, 10.0),
    layer: str | None = None,
    at: RankAt = "pooled",
    descending: bool = False,
    target: int | None = None,
    engine: str = "fast",
    batch_size: int = 1024,
    layout: Layout = "nchw",
    trust_model: bool = False,
    overwrite: bool = False,
    save_models: bool = True,
    report: bool = True,
    progress: bool = True,
    data_source: str | None = None,
    command: str | None = None,
) -> DefenseResult:
    """Run the lab's pruning defense end to end on files.

    Loads B and the data, sweeps the pruning of ``layer`` (see
    :func:`~badnet_repair.defenses.sweep.prune_sweep`), saves B'_X (``bd_X.h5``,
    ``bd_X_weights.h5``, ``bd_X.keras``) and G_X (``goodnet_X.keras``) for each threshold,
    evaluates B, B'_X and G_X on the test sets (the validation sets if no test sets are
    given), and writes ``sweep.csv``, ``results.csv``, ``results.json``,
    ``pruning_curves.png`` and ``Lab2_report.md``. Nothing existing is overwritten unless
    ``overwrite``; every file is written atomically.

    Args:
        model: B's file (full ``.h5``, ``.keras``, or weights-only ``.h5`` for DeepID).
        valid: clean validation data (lab HDF5).
        bd_valid, test, bd_test: optional poisoned validation, clean test and poisoned
            test data.
        out_dir: output folder, default ``fixed_models``.
        thresholds: accuracy drops X in points, default (2, 4, 10).
        layer: conv layer to prune, default
            :func:`~badnet_repair.nets.models.default_conv_layer` (``conv_3`` in DeepID).
        at: rank at the ``"pooled"`` output (default) or the ``"conv"`` output.
        descending: prune the most active channels first.
        target: the attack's target class; default read from the poisoned files' labels.
        engine: sweep engine, ``"fast"`` (default) or ``"plain"``.
        batch_size: inputs per forward pass.
        layout: the HDF5 ``data`` layout, ``"nchw"`` (the lab's) or ``"nhwc"``/``"auto"``.
        trust_model: allow model files whose layers run stored code.
        overwrite: replace existing outputs.
        save_models: write the repaired models.
        report: write the figure and ``Lab2_report.md``.
        progress: show progress bars.
        data_source: a line for the report saying where the data came from.
        command: the command line that reproduces the run, for the report.

    Returns:
        DefenseResult.
    """
    thresholds = tuple(float(x) for x in thresholds)
    for x in thresholds:
        if not np.isfinite(x) or x < 0:
            raise ValueError(f"thresholds must be numbers >= 0, got {x!r}")
    paths = output_paths(out_dir, thresholds, save_models=save_models, report=report)
    check_writable(paths.values(), overwrite=overwrite)

    # 1. the repair: B and the clean validation data only
    b, clean = open_badnet(model, valid, trust_model=trust_model, layout=layout, lazy=True)
    n_classes = num_classes(b)
    defense = Pruning(thresholds=thresholds, layer=layer, rank_at=at, descending=descending, engine=engine,  # type: ignore[arg-type]
                      batch_size=batch_size)
    repair = defense.repair(b, clean, progress=progress)
    layer = repair.record["choices"]["layer"]
    models: dict[float, dict[str, Path]] = {}
    for m in repair.models if save_models else ():
        x = float(m.threshold or 0.0)
        tag = _tag(x)
        models[x] = save_repair(b, m.model, out_dir, f"bd_{tag}", goodnet=paths[f"goodnet_{tag}"],
                                          overwrite=overwrite)

    # 2. the evaluation: only now are the test and poisoned files opened; the sweep follows the
    # repair's own ranking, so its steps and selections are the repair's
    ev = open_evaluation_sets(repair, b, {"bd_valid": bd_valid, "test": test, "bd_test": bd_test},
                              target=target, layout=layout)
    target = ev.target
    files = {"model": Path(model), "valid": Path(valid), **ev.files}
    others = dict(ev.sets)
    sweep = prune_sweep(b, clean, others=others, poisoned=ev.poisoned, layer=layer, thresholds=thresholds,
                        ranking=ranking_of(repair), engine=engine, batch_size=batch_size,  # type: ignore[arg-type]
                        progress=progress)

    clean_set = "test" if "test" in others else "valid"
    bd_set = "bd_test" if "bd_test" in others else ("bd_valid" if "bd_valid" in others else None)

    def preds(s: str | None, step: int) -> np.ndarray | None:
        return None if s is None else sweep.predictions[s][step]

    labels: dict[str, Any] = dict(clean_labels=sweep.labels[clean_set],
                                  poisoned_labels=sweep.labels[bd_set] if bd_set else None,
                                  clean_set=clean_set, poisoned_set=bd_set)
    evaluations = [evaluate_predictions(model="B", kind="badnet", clean_pred=preds(clean_set, 0),
                                        poisoned_pred=preds(bd_set, 0), channels_pruned=0, **labels)]
    for m in repair.models:
        k, tag = m.channels_pruned, _tag(float(m.threshold or 0.0))
        evaluations += evaluate_repair(f"B'_{tag}", goodnet_label=f"G_{tag}",
                                       clean_pred=preds(clean_set, k), poisoned_pred=preds(bd_set, k),
                                       base_clean_pred=preds(clean_set, 0), base_poisoned_pred=preds(bd_set, 0),
                                       num_classes=n_classes, channels_pruned=k, threshold=m.threshold, **labels)

    warnings = low_attack_warnings({n: sweep.steps[0].metrics[n] for n in ev.poisoned}, target=target)
    results = _results_dict(sweep, evaluations, models, files, clean, others, n_classes, target,
                            dict(thresholds=list(thresholds), layer=layer, at=at, descending=descending,
                                 engine=engine, batch_size=batch_size, layout=layout),
                            clean_set, bd_set, data_source, command)
    if warnings:
        results["warnings"] = warnings
    outputs: dict[Path, Any] = {paths["sweep_csv"]: sweep_rows(sweep),
                                paths["results_csv"]: [e.as_dict() for e in evaluations],
                                paths["results_json"]: results}
    if report:
        from ..reporting.plotting import plot_curves

        fig = plot_curves(sweep)
        fig.set_dpi(110)
        outputs[paths["figure"]] = fig
        outputs[paths["report"]] = render_report(results, figure=FIGURE)
    write_results(outputs, overwrite=overwrite)
    written: dict[str, Path] = {name: paths[name] for name in ("sweep_csv", "results_csv", "results_json", "figure",
                                                               "report") if name in paths}
    return DefenseResult(sweep=sweep, evaluations=tuple(evaluations), models=models,
                         files=written, results=results)


def _results_dict(
    sweep: SweepResult, evaluations: Sequence[Evaluation], models: Mapping[float, Mapping[str, Path]],
    files: Mapping[str, Path], clean: Dataset, others: Mapping[str, Dataset], n_classes: int,
    target: int | None, parameters: dict[str, Any], clean_set: str, bd_set: str | None,
    data_source: str | None, command: str | None,
) -> dict[str, Any]:
    sizes = {"valid": len(clean), **{k: len(v) for k, v in others.items()}}
    inputs = {role: {"path": str(p), "sha256": sha256_file(p), "images": sizes.get(role)}
              for role, p in files.items()}
    return {
        "provenance": {"versions": versions(), "inputs": inputs},
        "parameters": parameters,
        "data_source": data_source,
        "command": command,
        "num_classes": n_classes,
        "target": target,
        "layer": sweep.layer,
        "measured_at": sweep.ranking.measured_at,
        "order": [int(c) for c in sweep.ranking.order],
        "mean_activation": [float(v) for v in sweep.ranking.mean_activation],
        "base": dict(sweep.steps[0].metrics),
        "kinds": dict(sweep.kinds),
        "selections": [
            {"threshold": x, "channels_pruned": None} if s is None else
            {"threshold": x, "channels_pruned": s.channels_pruned, "channels": list(s.channels),
             "valid_accuracy": s.valid_accuracy, "accuracy_drop": s.accuracy_drop}
            for x, s in sweep.selections.items()
        ],
        "evaluation_sets": {"clean": clean_set, "poisoned": bd_set},
        "evaluations": [e.as_dict() for e in evaluations],
        "models": {_tag(x): {k: str(v) for k, v in m.items()} for x, m in models.items()},
    }
