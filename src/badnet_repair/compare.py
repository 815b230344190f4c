"""Compare defenses on one BadNet: none, fine-tuning, pruning at each X, fine-pruning.

Liu, Dolan-Gavitt and Garg ("Fine-Pruning", RAID 2018) compare exactly these. Every defense
sees only the clean validation data; the test sets are measured, never used for a choice.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .data import Dataset
from .finetune import fine_prune
from .goodnet import goodnet_predict
from .io import atomic_path, check_writable, write_json, write_text
from .metrics import Evaluation, evaluate_predictions
from .models import num_classes, predict_classes
from .pruning import prune_sweep
from .report import evaluation_table, to_csv

__all__ = ["DefenseComparison", "compare_defenses", "write_comparison"]


@dataclass(frozen=True)
class DefenseComparison:
    """Each defense's repaired model B' and GoodNet G on the test sets, in table order."""

    badnet: str
    evaluations: tuple[Evaluation, ...]


def compare_defenses(
    model: Any,
    valid: Dataset,
    test: Dataset,
    bd_test: Dataset,
    *,
    name: str = "BadNet",
    thresholds: Sequence[float] = (2.0, 4.0, 10.0),
    layer: str | None = None,
    progress: bool = False,
    **fine_options: Any,
) -> DefenseComparison:
    """Evaluate no defense, fine-tuning, pruning at each X and fine-pruning, with GoodNets.

    Args:
        model: the BadNet (not changed).
        valid: clean validation data, the only data the defenses see.
        test: clean test data.
        bd_test: poisoned test data labelled with the target.
        name: the BadNet's name in the table.
        thresholds: the pruning defense's X values.
        layer: the pruned conv layer, default :func:`~badnet_repair.models.default_conv_layer` (``conv_3`` in DeepID).
        progress: progress bars.
        **fine_options: passed to :func:`~badnet_repair.finetune.fine_prune` for both
            fine-tuning and fine-pruning (epochs, learning_rate, accuracy_drop, ...).

    Returns:
        DefenseComparison: B, then for each defense its repaired model and its GoodNet.
    """
    n = num_classes(model)
    sweep = prune_sweep(model, valid, others={"test": test, "bd_test": bd_test}, poisoned=["bd_test"],
                        layer=layer, thresholds=thresholds, progress=progress)
    base_clean, base_bd = sweep.predictions["test"][0], sweep.predictions["bd_test"][0]

    def rows(label: str, clean: Any, bd: Any, pruned: int, x: float | None) -> list[Evaluation]:
        common: dict[str, Any] = dict(clean_labels=test.y, poisoned_labels=bd_test.y, threshold=x,
                                      channels_pruned=pruned, clean_set=test.name, poisoned_set=bd_test.name)
        return [
            evaluate_predictions(model=label, kind="repaired", clean_pred=clean, poisoned_pred=bd, **common),
            evaluate_predictions(model=f"G ({label})", kind="goodnet", alarm_class=n,
                                 clean_pred=goodnet_predict(base_clean, clean, n),
                                 poisoned_pred=goodnet_predict(base_bd, bd, n), **common),
        ]

    out = [evaluate_predictions(model="no defense", kind="badnet", clean_pred=base_clean, clean_labels=test.y,
                                poisoned_pred=base_bd, poisoned_labels=bd_test.y, channels_pruned=0,
                                clean_set=test.name, poisoned_set=bd_test.name)]
    tuned = fine_prune(model, valid, method="fine-tuning", layer=layer, progress=progress, **fine_options)
    out += rows("fine-tuning", predict_classes(tuned.model, test.x), predict_classes(tuned.model, bd_test.x),
                0, None)
    for x, sel in sweep.selections.items():
        if sel is not None:
            k = sel.channels_pruned
            out += rows(f"pruning X={x:g}", sweep.predictions["test"][k], sweep.predictions["bd_test"][k], k, x)
    fp = fine_prune(model, valid, method="fine-pruning", layer=layer, progress=progress, **fine_options)
    out += rows("fine-pruning", predict_classes(fp.model, test.x), predict_classes(fp.model, bd_test.x),
                fp.channels_pruned, None)
    return DefenseComparison(badnet=name, evaluations=tuple(out))


def write_comparison(comparisons: Sequence[DefenseComparison], out_dir: str | os.PathLike[str], *,
                     overwrite: bool = False) -> dict[str, Path]:
    """Write ``comparison.csv``, ``.json``, ``.md`` and ``comparison.png`` (bars per BadNet)."""
    from matplotlib.figure import Figure

    from .plotting import plot_evaluations

    d = Path(out_dir)
    paths = {k: d / f"comparison.{k}" for k in ("csv", "json", "md", "png")}
    check_writable(paths.values(), overwrite=overwrite)
    rows = [{"badnet": c.badnet, **e.as_dict()} for c in comparisons for e in c.evaluations]
    write_text(paths["csv"], to_csv(rows), overwrite=overwrite)
    write_json(paths["json"], rows, overwrite=overwrite)
    md = ["# Defenses compared", ""]
    for c in comparisons:
        md += [f"## {c.badnet}", "", evaluation_table([e.as_dict() for e in c.evaluations])]
    write_text(paths["md"], "\n".join(md), overwrite=overwrite)
    fig = Figure(figsize=(max(7.0, 0.6 * len(comparisons[0].evaluations) + 2), 3.8 * len(comparisons)),
                 layout="constrained")
    for ax, c in zip(fig.subplots(len(comparisons), 1, squeeze=False)[:, 0], comparisons, strict=True):
        plot_evaluations([e for e in c.evaluations if e.kind != "goodnet"], ax=ax)
        ax.set_title(c.badnet)
    with atomic_path(paths["png"], overwrite=overwrite) as tmp:
        fig.savefig(tmp, dpi=100)
    return paths
