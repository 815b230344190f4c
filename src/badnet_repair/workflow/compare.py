"""Compare defenses on one BadNet: by default none, fine-tuning, pruning at each X, and
fine-pruning, as Liu, Dolan-Gavitt and Garg ("Fine-Pruning", RAID 2018) do; any
:class:`~badnet_repair.defenses.Defense` can be given. Every defense sees only the clean
validation data; the test sets are read after every repair is done.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..defenses import Defense, FineTuning, Repair, make_defense
from ..detectors import DEFAULT_FALSE_ALARM
from ..formats.data import Dataset
from ..formats.files import write_results
from ..metrics import Evaluation, evaluate_predictions, evaluate_repair
from ..nets.models import num_classes, predict_classes
from ..reporting.report import evaluation_table
from .run import low_attack_warnings, open_badnet, open_evaluation_sets

__all__ = ["DefenseComparison", "compare_defenses", "compare_file", "default_defenses", "evaluate_repairs",
           "write_comparison"]


@dataclass(frozen=True)
class DefenseComparison:
    """Each defense's repaired model B' and GoodNet G on the test sets, in table order.

    Attributes:
        badnet: the BadNet's name.
        evaluations: B's row, then each repaired model's and its GoodNet's.
        warnings: repaired model's label -> its defense's loud lines (a result that fell more than
            the clean-accuracy budget below B on the defense's held-out images, and what was returned
            instead); only labels with lines.
        detection_warnings: the loud lines of the GoodNets from detectors, where there are some
            (:func:`~badnet_repair.workflow.detect.detection_warnings`).
    """

    badnet: str
    evaluations: tuple[Evaluation, ...]
    warnings: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    detection_warnings: tuple[str, ...] = ()


def default_defenses(*, thresholds: Sequence[float] = (2.0, 4.0, 10.0), layer: str | None = None,
                     **fine_options: Any) -> list[Defense]:
    """The defenses Liu et al. compare, in table order: fine-tuning, pruning at each X, and
    fine-pruning, the two tuned ones sharing ``fine_options`` (epochs, learning_rate, ...)."""
    tuning = {k: v for k, v in fine_options.items() if k in FineTuning.settings()}
    return [make_defense("fine-tuning", layer=layer, **tuning),
            make_defense("pruning", thresholds=thresholds, layer=layer),
            make_defense("fine-pruning", layer=layer, **fine_options)]


def compare_defenses(
    model: Any,
    valid: Dataset,
    test: Dataset,
    bd_test: Dataset,
    *,
    name: str = "BadNet",
    defenses: Sequence[Defense] | None = None,
    thresholds: Sequence[float] = (2.0, 4.0, 10.0),
    layer: str | None = None,
    progress: bool = False,
    **fine_options: Any,
) -> DefenseComparison:
    """Evaluate each defense's repaired models and their GoodNets on the test sets.

    Every defense repairs the BadNet from ``valid`` alone, and all of them finish before the
    test sets are read, so nothing measured can influence a repair.

    Args:
        model: the BadNet (not changed).
        valid: clean validation data, the only data the defenses see.
        test: clean test data.
        bd_test: poisoned test data labelled with the target.
        name: the BadNet's name in the table.
        defenses: the defenses, default :func:`default_defenses` built from ``thresholds``,
            ``layer`` and ``fine_options``.
        thresholds: the pruning defense's X values (for the default defenses).
        layer: the pruned conv layer, default found from the graph (``conv_3`` in DeepID).
        progress: progress bars.
        **fine_options: settings of the default fine-tuning and fine-pruning defenses.

    Returns:
        DefenseComparison: B, then for each repaired model its row and its GoodNet's (the
        lab's rule: B's class where B and the repaired model agree, else the alarm class).
    """
    if defenses is None:
        defenses = default_defenses(thresholds=thresholds, layer=layer, **fine_options)
    elif fine_options:
        raise ValueError("give the defenses' settings in the defenses, not as fine_options")
    repairs = [d.repair(model, valid, progress=progress) for d in defenses]
    return evaluate_repairs(model, repairs, test, bd_test, name=name)


def evaluate_repairs(model: Any, repairs: Sequence[Repair], test: Dataset, bd_test: Dataset, *,
                     name: str = "BadNet") -> DefenseComparison:
    """B's row, then each repaired model's and its GoodNet's, on the test sets.

    Args:
        model: the BadNet B.
        repairs: finished repairs of B.
        test: clean test data.
        bd_test: poisoned test data labelled with the target.
        name: the BadNet's name in the table.

    Returns:
        DefenseComparison.
    """
    n = num_classes(model)
    base_clean, base_bd = predict_classes(model, test.x), predict_classes(model, bd_test.x)
    common: dict[str, Any] = dict(clean_labels=test.y, poisoned_labels=bd_test.y, clean_set=test.name,
                                  poisoned_set=bd_test.name)
    out = [evaluate_predictions(model="no defense", kind="badnet", clean_pred=base_clean, poisoned_pred=base_bd,
                                channels_pruned=0, **common)]
    for repair in repairs:
        for m in repair.models:
            out += evaluate_repair(m.label, clean_pred=predict_classes(m.model, test.x),
                                   poisoned_pred=predict_classes(m.model, bd_test.x), base_clean_pred=base_clean,
                                   base_poisoned_pred=base_bd, num_classes=n, channels_pruned=m.channels_pruned,
                                   threshold=m.threshold, **common)
    warnings = {m.label: tuple(r.warnings) for r in repairs if r.warnings for m in r.models}
    return DefenseComparison(badnet=name, evaluations=tuple(out), warnings=warnings)


def compare_file(model: str | os.PathLike[str], valid: str | os.PathLike[str], test: str | os.PathLike[str],
                 bd_test: str | os.PathLike[str], *, defenses: Sequence[Defense], name: str = "BadNet",
                 target: int | None = None, trust_model: bool = False, progress: bool = False,
                 detectors: Sequence[str] = (), false_alarm: float = DEFAULT_FALSE_ALARM,
                 detector_settings: Mapping[str, Mapping[str, Any]] | None = None, several_targets: bool = False,
                 input_scale: float | str = 1.0) -> DefenseComparison:
    """:func:`compare_defenses` on files: every defense repairs B from the clean validation
    file, and only then are the test files opened (:mod:`badnet_repair.workflow.run`).

    Args:
        model: B's file.
        valid: the clean validation data (lab HDF5), the defenses' only data.
        test, bd_test: clean and poisoned test data (lab HDF5).
        defenses: the defenses, in table order.
        name: the BadNet's name in the table.
        target: the attack's target; default the poisoned file's label.
        trust_model: allow model files with code-carrying layers.
        progress: progress bars.
        detectors: registered detectors (:data:`~badnet_repair.detectors.REGISTRY`) whose GoodNets on
            B are added as rows, each alone and, with several, combined; fitted on the clean
            validation file too, before the test files are opened.
        false_alarm: G's false-alarm budget, %, default 5, split across the detectors
            (:func:`~badnet_repair.workflow.detect.make_detectors`).
        detector_settings: detector name -> {setting: value}, over the budget's share.
        several_targets: ``bd_test`` is a multi-target BadNet's: each input's label is its target.
        input_scale: B takes file pixels times this, default 1 (``1/255`` for a model trained on 0..1
            pixels; :func:`~badnet_repair.workflow.run.open_badnet`).

    Returns:
        DefenseComparison.
    """
    from .detect import detection_warnings, detector_evaluations, fit_detectors

    b, clean = open_badnet(model, valid, trust_model=trust_model, input_scale=input_scale)
    repairs = [d.repair(b, clean, progress=progress) for d in defenses]  # each logs its budget lines
    parts = (fit_detectors(b, clean, detectors, false_alarm=false_alarm, settings=detector_settings,
                           repairs=repairs, progress=progress)[0] if detectors else {})
    ev = open_evaluation_sets(repairs, b, {"test": test, "bd_test": bd_test}, target=target,
                              several_targets=several_targets)
    comparison = evaluate_repairs(b, repairs, ev.sets["test"], ev.sets["bd_test"], name=name)
    if parts:
        extra = detector_evaluations(b, parts, ev.sets["test"], ev.sets["bd_test"])
        comparison = DefenseComparison(badnet=name, evaluations=(*comparison.evaluations, *extra),
                                       warnings=comparison.warnings,
                                       detection_warnings=tuple(detection_warnings(parts, extra)))
    low_attack_warnings({f"{name}: bd_test": comparison.evaluations[0].attack_success_rate}, target=ev.target)
    return comparison


def write_comparison(comparisons: Sequence[DefenseComparison], out_dir: str | os.PathLike[str], *,
                     overwrite: bool = False) -> dict[str, Path]:
    """Write ``comparison.csv``, ``.json``, ``.md`` and ``comparison.png`` (bars per BadNet)."""
    from matplotlib.figure import Figure

    from ..reporting.plotting import plot_evaluations

    d = Path(out_dir)
    rows = [{"badnet": c.badnet, **e.as_dict(),
             "warnings": list(c.warnings.get(e.model, ())) if e.kind != "goodnet" else []}
            for c in comparisons for e in c.evaluations]
    md = ["# Defenses compared", ""]
    for c in comparisons:
        md += [f"## {c.badnet}", "", evaluation_table([e.as_dict() for e in c.evaluations])]
        if c.warnings:
            md += ["", "**Warnings** (the defenses' own checks on their held-out clean images):", ""]
            md += [f"- {label}: {line}" for label, lines in c.warnings.items() for line in lines]
        if c.detection_warnings:
            md += ["", "**Detection warnings** (the detectors' thresholds and G's false alarm on the clean test set):",
                   ""]
            md += [f"- {line}" for line in c.detection_warnings]
    fig = Figure(figsize=(max(7.0, 0.6 * len(comparisons[0].evaluations) + 2), 3.8 * len(comparisons)),
                 layout="constrained", dpi=100)
    for ax, c in zip(fig.subplots(len(comparisons), 1, squeeze=False)[:, 0], comparisons, strict=True):
        plot_evaluations([e for e in c.evaluations if e.kind != "goodnet"], ax=ax)
        ax.set_title(c.badnet)
    paths = {k: d / f"comparison.{k}" for k in ("csv", "json", "md", "png")}
    csv_rows = [{**r, "warnings": " | ".join(r["warnings"])} for r in rows]
    write_results({paths["csv"]: csv_rows, paths["json"]: rows, paths["md"]: "\n".join(md), paths["png"]: fig},
                  overwrite=overwrite)
    return paths
