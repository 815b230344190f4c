"""The whole pruning-defense workflow on files: load, sweep, save B'_X and G_X, report."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..defenses import Pruning, Repaired
from ..defenses.pruning import sweep_of
from ..defenses.sweep import RankAt, SweepResult, extend_sweep
from ..formats.data import Dataset, Layout
from ..formats.files import check_writable, sha256_file, versions, write_results
from ..metrics import Evaluation, evaluate_predictions, evaluate_repair
from ..nets.models import input_scale_of, num_classes, predict_classes, prune_channels, saved_model_paths
from ..reporting.report import render_report, selections_of, sweep_rows
from .run import (
    coverage_warnings,
    low_attack_warnings,
    open_badnet,
    open_evaluation_sets,
    save_repair,
    selection_warnings,
)

__all__ = [
    "DefenseResult",
    "evaluate_lab_models",
    "lab_results",
    "output_paths",
    "repaired_models",
    "run_pruning_defense",
    "save_lab_models",
    "write_lab_outputs",
]

log = logging.getLogger(__name__)

FIGURE = "pruning_curves.png"
REPORT = "Lab2_report.md"


@dataclass(frozen=True, eq=False)
class DefenseResult:
    """What :func:`run_pruning_defense` produced.

    Attributes:
        sweep: the full sweep.
        evaluations: B, then each B'_X and G_X, on the evaluation sets.
        models: threshold -> {"h5", "weights", "keras", "goodnet", "goodnet_h5"} -> path.
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
            paths[f"goodnet_{_tag(x)}_h5"] = d / f"goodnet_{_tag(x)}.h5"
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
    several_targets: bool = False,
    engine: str = "fast",
    batch_size: int = 1024,
    layout: Layout = "nchw",
    trust_model: bool = False,
    input_scale: float | str = 1.0,
    overwrite: bool = False,
    save_models: bool = True,
    report: bool = True,
    progress: bool = True,
    data_source: str | None = None,
    command: str | None = None,
    demo: bool = False,
) -> DefenseResult:
    """Run the lab's pruning defense end to end on files.

    Loads B and the data, sweeps the pruning of ``layer`` (see
    :func:`~badnet_repair.defenses.sweep.prune_sweep`), saves B'_X (``bd_X.h5``,
    ``bd_X_weights.h5``, ``bd_X.keras``) and G_X (``goodnet_X.keras``, ``goodnet_X.h5``) for each threshold,
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
        several_targets: the poisoned files are a multi-target BadNet's (each input's label is its
            own target).
        engine: sweep engine, ``"fast"`` (default) or ``"plain"``.
        batch_size: inputs per forward pass.
        layout: the HDF5 ``data`` layout, ``"nchw"`` (the lab's) or ``"nhwc"``/``"auto"``.
        trust_model: allow model files whose layers run stored code.
        input_scale: B takes file pixels times this, default 1 (``1/255`` for a model trained on 0..1
            pixels; :func:`~badnet_repair.workflow.run.open_badnet`); the saved models take the same.
        overwrite: replace existing outputs.
        save_models: write the repaired models.
        report: write the figure and ``Lab2_report.md``.
        progress: show progress bars.
        data_source: a line for the report saying where the data came from.
        command: the command line that reproduces the run, for the report.
        demo: the files are the built-in demo's (the report says so first).

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
    b, clean = open_badnet(model, valid, trust_model=trust_model, layout=layout, lazy=True, input_scale=input_scale)
    n_classes = num_classes(b)
    defense = Pruning(thresholds=thresholds, layer=layer, rank_at=at, descending=descending, engine=engine,  # type: ignore[arg-type]
                      batch_size=batch_size)
    repair = defense.repair(b, clean, progress=progress)
    layer = repair.record["choices"]["layer"]
    repaired = {float(m.threshold or 0.0): m for m in repair.models}
    models = save_lab_models(b, repaired, out_dir, overwrite=overwrite) if save_models else {}

    # 2. the evaluation: only now are the test and poisoned files opened; the repair's own sweep
    # is measured on them (the clean data is not swept again), so its steps and selections are the repair's
    ev = open_evaluation_sets(repair, b, {"bd_valid": bd_valid, "test": test, "bd_test": bd_test},
                              target=target, several_targets=several_targets, layout=layout)
    others = dict(ev.sets)
    sweep = extend_sweep(b, sweep_of(repair), others, poisoned=ev.poisoned, batch_size=batch_size,
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

    results = lab_results(sweep, evaluations, model_file=model, datasets=[clean, *others.values()],
                          models=models, target=ev.target,
                          parameters=dict(engine=engine, batch_size=batch_size, layout=layout,
                                          input_scale=input_scale_of(b)),
                          data_source=data_source, command=command, badnet=b, demo=demo)
    written = write_lab_outputs(results, sweep, out_dir, report=paths["report"] if report else None,
                                figure=report, overwrite=overwrite)
    return DefenseResult(sweep=sweep, evaluations=tuple(evaluations), models=models,
                         files=written, results=results)


def repaired_models(badnet: Any, sweep: SweepResult) -> dict[float, Repaired]:
    """B'_X for each threshold X the sweep reached: B with the selected channels pruned.

    Returns:
        X -> :class:`~badnet_repair.defenses.Repaired` (``.model`` a new Keras model; B is not
        changed), in threshold order.
    """
    return {x: Repaired(label=f"B'_{_tag(x)}", model=prune_channels(badnet, sweep.layer, s.channels),
                        channels_pruned=s.channels_pruned, threshold=x)
            for x, s in sweep.selections.items() if s is not None}


def save_lab_models(badnet: Any, repaired: Mapping[float, Repaired], out_dir: str | os.PathLike[str], *,
                    overwrite: bool = False) -> dict[float, dict[str, Path]]:
    """Save each B'_X as the lab hands it in, and its GoodNet G_X.

    Writes ``bd_X.h5`` (full model; loads in Keras 2 and 3), ``bd_X_weights.h5`` (the lab's
    weights layout), ``bd_X.keras``, ``goodnet_X.keras`` (Keras 3) and ``goodnet_X.h5`` (standard
    layers only: loads in Keras 2 and 3) into ``out_dir``. Every path is
    checked first: nothing is written if one exists and ``overwrite`` is False.

    Returns:
        X -> {"h5", "weights", "keras", "goodnet", "goodnet_h5"} -> path.
    """
    paths = output_paths(out_dir, list(repaired), save_models=True, report=False)
    check_writable([p for name, p in paths.items() if name.startswith(("bd_", "goodnet_"))], overwrite=overwrite)
    return {x: save_repair(badnet, m.model, out_dir, f"bd_{_tag(x)}", goodnet=paths[f"goodnet_{_tag(x)}"],
                           goodnet_h5=paths[f"goodnet_{_tag(x)}_h5"], overwrite=overwrite)
            for x, m in repaired.items()}


def evaluate_lab_models(badnet: Any, repaired: Mapping[float, Repaired], test: Dataset, bd_test: Dataset | None = None,
                        *, batch_size: int = 1024) -> list[Evaluation]:
    """B, each B'_X and each G_X on a clean and a poisoned set, as the lab's ``eval.py`` scores them.

    Args:
        badnet: B.
        repaired: X -> B'_X (:func:`repaired_models`, or a defense's ``Repaired`` models).
        test: clean data.
        bd_test: poisoned data labelled with the target, optional.
        batch_size: inputs per forward pass.

    Returns:
        [B, B'_X, G_X for each X]: clean accuracy, attack success, and G's detection and
        false-alarm rates (G_X is the lab's rule on B's and B'_X's classes, as the saved
        ``goodnet_X.keras`` computes it).
    """
    n = num_classes(badnet)
    base_clean = predict_classes(badnet, test.x, batch_size=batch_size)
    base_bd = None if bd_test is None else predict_classes(badnet, bd_test.x, batch_size=batch_size)
    labels: dict[str, Any] = dict(clean_labels=test.y, poisoned_labels=None if bd_test is None else bd_test.y,
                                  clean_set=test.name, poisoned_set=None if bd_test is None else bd_test.name)
    out = [evaluate_predictions(model="B", kind="badnet", clean_pred=base_clean, poisoned_pred=base_bd,
                                channels_pruned=0, **labels)]
    for x, m in repaired.items():
        out += evaluate_repair(f"B'_{_tag(x)}", goodnet_label=f"G_{_tag(x)}",
                               clean_pred=predict_classes(m.model, test.x, batch_size=batch_size),
                               poisoned_pred=None if bd_test is None else predict_classes(m.model, bd_test.x,
                                                                                          batch_size=batch_size),
                               base_clean_pred=base_clean, base_poisoned_pred=base_bd, num_classes=n,
                               channels_pruned=m.channels_pruned, threshold=x, **labels)
    return out


def lab_results(sweep: SweepResult, evaluations: Sequence[Evaluation], *, model_file: str | os.PathLike[str],
                datasets: Sequence[Dataset], models: Mapping[float, Mapping[str, Path]] | None = None,
                target: int | None = None, parameters: Mapping[str, Any] | None = None,
                data_source: str | None = None, command: str | None = None, badnet: Any = None,
                demo: bool = False) -> dict[str, Any]:
    """Everything a lab run found, as ``results.json`` holds it and the report reads it.

    Args:
        sweep: the pruning sweep (its ranking, steps and selections).
        evaluations: B, B'_X and G_X on the evaluation sets.
        model_file: B's file.
        datasets: every data set used, each named by its role (``valid``, ``bd_valid``,
            ``test``, ``bd_test``) and read from a file (``Dataset.path``).
        models: X -> format -> saved path, optional.
        target: the attack's target class.
        parameters: settings to record besides the sweep's own.
        data_source: a line saying where the data came from.
        command: the command that reproduces the run.
        badnet: B, to recognise the lab's BadNet by its weights and compare the run with the
            lab's known figures (:mod:`~badnet_repair.reporting.reference`) under ``"reference"``.
        demo: the run is on the built-in demo, not the user's files (the report says so first).

    Returns:
        A JSON-able dict; warnings (clean images of fewer than half the classes; a B'_X far past X; B's
        attack success below 50 % on a poisoned set) under ``"warnings"``.
    """
    files = {"model": Path(model_file), **{d.name: Path(d.path) for d in datasets if d.path}}
    sizes = {d.name: len(d) for d in datasets}
    first = evaluations[0] if evaluations else None
    clean_set = first.clean_set if first else None
    bd_set = first.poisoned_set if first else None
    base = next((e for e in evaluations if e.kind == "badnet"), None)
    attack: dict[str, float | None] = {name: m for name, m in sweep.steps[0].metrics.items()
                                       if sweep.kinds.get(name) == "poisoned"}
    if base is not None and bd_set is not None:
        attack[bd_set] = base.attack_success_rate
    valid = next((d for d in datasets if d.name == sweep.valid_set), None)
    warnings = [*([] if valid is None else coverage_warnings(valid, sweep.num_classes, file=valid.path, quiet=True)),
                *selection_warnings(sweep.selections, images=sizes.get(sweep.valid_set, 0)),
                *low_attack_warnings(attack, target=target)]
    thresholds = [float(x) for x in sweep.selections]
    results = _results_dict(sweep, evaluations, models or {}, files, sizes, sweep.num_classes, target,
                            dict(thresholds=thresholds, layer=sweep.layer, at=sweep.ranking.measured_at,
                                 descending=sweep.ranking.descending, **(parameters or {})),
                            clean_set or sweep.valid_set, bd_set, data_source, command)
    if warnings:
        results["warnings"] = warnings
    results["demo"] = bool(demo)
    if badnet is not None:
        from ..reporting.reference import check_against_reference

        check = check_against_reference(
            evaluations, badnet=badnet, valid_images=sizes.get(sweep.valid_set), test_images=sizes.get("test"),
            valid_accuracy=sweep.steps[0].metrics[sweep.valid_set], layer=sweep.layer,
            dormant_channels=int(np.count_nonzero(sweep.ranking.mean_activation == 0)))
        results["reference"] = check.as_dict()
        if check.differs:
            log.warning("%d figure(s) differ from the lab's published ones, first: %s", len(check.differs),
                        check.differs[0])
    return results


def write_lab_outputs(results: Mapping[str, Any], sweep: SweepResult, out_dir: str | os.PathLike[str], *,
                      report: str | os.PathLike[str] | None = None, conclusion: str | None = None,
                      figure: bool = True, overwrite: bool = False) -> dict[str, Path]:
    """Write a lab run's results and report, atomically.

    Writes ``sweep.csv``, ``results.csv``, ``results.json`` and ``pruning_curves.png`` into
    ``out_dir``, and the markdown report to ``report`` (for example ``Lab2_report.md`` at the
    top of the lab's folder, or inside ``out_dir``). A report outside ``out_dir`` gets its own
    copy of the figure in ``<report name>_files/``, linked relative to it.

    Args:
        results: from :func:`lab_results`.
        sweep: the same run's sweep (for ``sweep.csv`` and the curves).
        out_dir: the results folder.
        report: the report's path, None for no report.
        conclusion: the report's conclusion, default generated from the numbers
            (:func:`~badnet_repair.reporting.report.conclusion`).
        figure: write the curves.
        overwrite: replace existing files.

    Returns:
        name -> path of each file written (``sweep_csv``, ``results_csv``, ``results_json``,
        ``figure``, ``report``, ``report_figure``).
    """
    d = Path(out_dir)
    paths = {"sweep_csv": d / "sweep.csv", "results_csv": d / "results.csv", "results_json": d / "results.json"}
    outputs: dict[Path, Any] = {paths["sweep_csv"]: sweep_rows(sweep),
                                paths["results_csv"]: list(results["evaluations"]),
                                paths["results_json"]: dict(results)}
    if figure:
        from ..reporting.plotting import plot_curves

        paths["figure"] = d / FIGURE
        outputs[paths["figure"]] = plot_curves(sweep)  # drawn at the report's 110 dpi
    if report is not None:
        paths["report"] = Path(report)
        link = None
        if figure:
            # a report outside the results folder (Lab2_report.md at the top of the lab's folder)
            # keeps its figure beside it, as nbconvert does, so the two travel together
            if paths["report"].parent.resolve() != d.resolve():
                paths["report_figure"] = paths["report"].parent / f"{paths['report'].stem}_files" / FIGURE
                outputs[paths["report_figure"]] = outputs[paths["figure"]]
            link = Path(os.path.relpath(paths.get("report_figure", paths["figure"]), paths["report"].parent)).as_posix()
        outputs[paths["report"]] = render_report(results, figure=link, conclusion=conclusion)
    check_writable(paths.values(), overwrite=overwrite)
    write_results(outputs, overwrite=overwrite)
    return paths


def _results_dict(
    sweep: SweepResult, evaluations: Sequence[Evaluation], models: Mapping[float, Mapping[str, Path]],
    files: Mapping[str, Path], sizes: Mapping[str, int], n_classes: int,
    target: int | None, parameters: dict[str, Any], clean_set: str, bd_set: str | None,
    data_source: str | None, command: str | None,
) -> dict[str, Any]:
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
        "selections": selections_of(sweep),
        "evaluation_sets": {"clean": clean_set, "poisoned": bd_set},
        "evaluations": [e.as_dict() for e in evaluations],
        "models": {_tag(x): {k: str(v) for k, v in m.items()} for x, m in models.items()},
    }
