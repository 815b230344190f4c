"""Fine-pruning or fine-tuning on files: repair from the clean data, save the model and its
GoodNet, and only then open the test sets to evaluate."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ..defenses import make_defense
from ..defenses.finetuning import FineTuning
from ..defenses.tuning import FinePruneResult
from ..formats.files import write_results
from ..nets.models import predict_classes
from .run import low_attack_warnings, open_badnet, open_evaluation_sets, save_repair

__all__ = ["run_fine_pruning"]


def run_fine_pruning(
    model: str | os.PathLike[str],
    valid: str | os.PathLike[str],
    *,
    test: str | os.PathLike[str] | None = None,
    bd_test: str | os.PathLike[str] | None = None,
    out_dir: str | os.PathLike[str] = "fixed_models",
    method: Literal["fine-pruning", "fine-tuning"] = "fine-pruning",
    target: int | None = None,
    several_targets: bool = False,
    trust_model: bool = False,
    input_scale: float | str = 1.0,
    overwrite: bool = False,
    progress: bool = True,
    **options: Any,
) -> tuple[FinePruneResult, dict[str, Any]]:
    """Fine-prune (or fine-tune) a BadNet from files, save it and its GoodNet, then evaluate.

    The test files are opened only after the repaired model is chosen and saved, so they
    cannot influence it. Writes ``fp.h5``, ``fp_weights.h5``, ``fp.keras`` and
    ``goodnet_fp.keras`` (``ft`` instead of ``fp`` for fine-tuning) and ``fp_results.json``.
    With several ``members``, ``fp.h5`` and ``fp.keras`` hold the averaging model, and each
    member's weights go to ``fp_member_{i}_weights.h5`` (lab layout, loadable into DeepID)
    instead of ``fp_weights.h5``; a soup (``ensemble_mean="soup"``) is one network, saved as
    one network is, its members beside it.

    Args:
        model: the BadNet's file.
        valid: clean validation data (lab HDF5): the only data the repair sees.
        test, bd_test: clean and poisoned test data, for the evaluation afterwards.
        out_dir: output folder, default ``fixed_models``.
        method: ``"fine-pruning"`` (default) or ``"fine-tuning"``.
        target: the attack's target; default the poisoned file's label.
        several_targets: the poisoned files are a multi-target BadNet's (each input's label is its
            own target).
        trust_model: allow model files with code-carrying layers.
        input_scale: B takes file pixels times this, default 1 (``1/255`` for a model trained on 0..1
            pixels; :func:`~badnet_repair.workflow.run.open_badnet`); the saved models take the same.
        overwrite: replace existing outputs.
        progress: progress bars.
        **options: the defense's settings (:class:`~badnet_repair.defenses.FinePruning`'s or
            :class:`~badnet_repair.defenses.FineTuning`'s fields: layer, accuracy_drop, epochs,
            members, budget...); the others keep the class's defaults.

    Returns:
        (the FinePruneResult, the results dict written to JSON).
    """
    from ..formats.files import check_writable, sha256_file, versions
    from ..metrics import evaluate_predictions, evaluate_repair
    from ..nets.models import input_scale_of, num_classes, save_model, saved_model_paths

    if method not in ("fine-pruning", "fine-tuning"):
        raise ValueError(f"method must be 'fine-pruning' or 'fine-tuning', not {method!r}")
    defense = make_defense(method, **options)
    assert isinstance(defense, FineTuning)
    stem = "fp" if method == "fine-pruning" else "ft"
    out = Path(out_dir)
    members = defense.members
    # an ensemble has no lab-style weights-only file (each member gets one instead); a soup is one network
    one_network = members == 1 or defense.soup
    model_paths = {k: v for k, v in saved_model_paths(out, stem).items() if one_network or k != "weights"}
    member_paths = {f"member_{i}_weights": saved_model_paths(out, f"{stem}_member_{i}")["weights"]
                    for i in range(members)} if members > 1 else {}
    paths = {**model_paths, **member_paths, "goodnet": out / f"goodnet_{stem}.keras",
             "results": out / f"{stem}_results.json"}
    check_writable(paths.values(), overwrite=overwrite)
    # 1. the repair: B and the clean validation data only
    b, clean = open_badnet(model, valid, trust_model=trust_model, input_scale=input_scale)
    n = num_classes(b)
    result = defense.tune(b, clean, progress=progress)
    drops = list(result.warnings)
    save_repair(b, result.model, out, stem, formats=tuple(model_paths), goodnet=paths["goodnet"], overwrite=overwrite)
    for i, member in enumerate(result.members if members > 1 else ()):
        save_model(member.model, out, f"{stem}_member_{i}", formats=("weights",), overwrite=overwrite)
    # 2. the evaluation: only now are the test sets opened
    ev = open_evaluation_sets(result, b, {"test": test, "bd_test": bd_test}, target=target,
                              several_targets=several_targets)
    target = ev.target
    files = {"model": Path(model), "valid": Path(valid), **ev.files}
    t, bd = ev.sets.get("test"), ev.sets.get("bd_test")
    evaluations, warnings = [], []
    if t is not None or bd is not None:
        def preds(m: Any) -> tuple[np.ndarray | None, np.ndarray | None]:
            return predict_classes(m, t.x) if t else None, predict_classes(m, bd.x) if bd else None

        (b_clean, b_bd), (r_clean, r_bd) = preds(b), preds(result.model)
        sets: dict[str, Any] = dict(clean_labels=t.y if t else None, poisoned_labels=bd.y if bd else None,
                                    clean_set="test" if t else None, poisoned_set="bd_test" if bd else None)
        rows = [evaluate_predictions(model="B", kind="badnet", clean_pred=b_clean, poisoned_pred=b_bd,
                                     channels_pruned=0, **sets),
                *evaluate_repair(stem, goodnet_label=f"G_{stem}", clean_pred=r_clean, poisoned_pred=r_bd,
                                 base_clean_pred=b_clean, base_poisoned_pred=b_bd, num_classes=n,
                                 channels_pruned=result.channels_pruned, **sets)]
        evaluations = [e.as_dict() for e in rows]
        warnings = low_attack_warnings({"bd_test": rows[0].attack_success_rate} if bd else {}, target=target)
    results: dict[str, Any] = {
        "method": method,
        "provenance": {"versions": versions(),
                       "inputs": {k: {"path": str(v), "sha256": sha256_file(v)} for k, v in files.items()}},
        "parameters": {"method": method, "input_scale": input_scale_of(b), **defense.get_params()},
        "layer": result.layer,
        "channels_pruned": result.channels_pruned,
        "holdout_images": len(result.members[0].holdout_index),
        "tune_images": len(result.members[0].tune_index),
        "members": [{"seed": m.seed, "pruned_channels": list(m.pruned_channels), "kept_epoch": m.kept_epoch,
                     "holdout": {"base_accuracy": m.base_holdout_accuracy, "pruned_accuracy": m.pruned_holdout_accuracy,
                                 "kept_accuracy": m.holdout_accuracy},
                     "budget": m.budget.as_dict() if m.budget is not None else None,
                     "history": list(m.history)} for m in result.members],
        "target": target,
        "evaluations": evaluations,
        "models": {k: str(v) for k, v in paths.items() if k != "results"},
    }
    soup = result.soup_record()
    if soup is not None:  # a soup, checked as a whole on the part every member held out
        results["soup_budget"] = soup
    if warnings or drops:
        results["warnings"] = [*drops, *warnings]
    write_results({paths["results"]: results}, overwrite=overwrite)
    return result, results
