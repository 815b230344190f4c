"""Any registered defense on files: repair from the clean data, save the repaired model, and only
then open the test sets to evaluate."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from ..defenses.base import Defense, Repair
from ..formats.files import write_results
from .run import low_attack_warnings, open_badnet, open_evaluation_sets, repair_warnings

__all__ = ["repair_paths", "run_repair", "uses_only_keras_layers"]


def _stem(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", label).strip("_") or "repaired"


def repair_paths(out_dir: str | os.PathLike[str], defense: Defense) -> dict[str, Path]:
    """The files :func:`run_repair` writes for a defense that returns one model: ``<name>.keras``
    (``-`` as ``_``), ``<name>.h5`` where the model is built of Keras's own layers only, and
    ``<name>_results.json``. A defense that returns several models writes one ``.keras`` (and
    ``.h5``) per model, named after its label."""
    stem = _stem(defense.name)
    out = Path(out_dir)
    return {"keras": out / f"{stem}.keras", "h5": out / f"{stem}.h5", "results": out / f"{stem}_results.json"}


def uses_only_keras_layers(model: Any) -> bool:
    """Whether every layer of ``model`` (nested models' included) is one of Keras's own: such a
    model saves as a full ``.h5`` that Keras 2 (the lab's grader) loads too."""
    import keras

    for layer in model.layers:
        if isinstance(layer, keras.Model):
            if not uses_only_keras_layers(layer):
                return False
        elif not type(layer).__module__.startswith("keras."):
            return False
    return True


def run_repair(
    model: str | os.PathLike[str],
    valid: str | os.PathLike[str],
    defense: Defense,
    *,
    test: str | os.PathLike[str] | None = None,
    bd_test: str | os.PathLike[str] | None = None,
    out_dir: str | os.PathLike[str] = "fixed_models",
    target: int | None = None,
    several_targets: bool = False,
    trust_model: bool = False,
    input_scale: float | str = 1.0,
    overwrite: bool = False,
    progress: bool = True,
) -> tuple[Repair, dict[str, Any]]:
    """Repair a BadNet from files with ``defense``, save the repaired model(s), then evaluate.

    The test files are opened only after the repaired models are saved, so they cannot influence
    them. Each model is saved as ``.keras`` (loaded in Keras 3 after ``import badnet_repair``) and,
    where it is built of Keras's own layers only (:func:`uses_only_keras_layers`), as a full
    ``.h5`` too (Keras 2 and 3); see :func:`repair_paths`. ``<name>_results.json`` holds the
    inputs' SHA-256, the settings, the defense's record (what it chose on the clean data), its
    loud lines and, where both test files are given, the evaluation.

    Args:
        model: the BadNet's file.
        valid: clean validation data (lab HDF5): the only data the repair sees.
        defense: the defense (:func:`~badnet_repair.defenses.make_defense`).
        test, bd_test: clean and poisoned test data, for the evaluation afterwards (both, or no
            evaluation).
        out_dir: output folder, default ``fixed_models``.
        target: the attack's target; default the poisoned file's label.
        several_targets: the poisoned file is a multi-target BadNet's.
        trust_model: allow model files with code-carrying layers.
        input_scale: B takes file pixels times this, default 1 (``1/255`` for a model trained on
            0..1 pixels); the saved models take the same.
        overwrite: replace existing outputs.
        progress: progress bars.

    Returns:
        (the Repair, the results dict written to JSON).
    """
    from ..formats.files import check_writable, sha256_file, versions
    from ..nets.models import input_scale_of, save_model
    from .compare import evaluate_repairs

    paths = repair_paths(out_dir, defense)
    # refuse before the repair, not after it (the .h5 is checked once it is known to be written)
    check_writable([paths["keras"], paths["results"]], overwrite=overwrite)
    # 1. the repair: B and the clean validation data only
    b, clean = open_badnet(model, valid, trust_model=trust_model, input_scale=input_scale)
    repair = defense.repair(b, clean, progress=progress)
    saved: dict[str, dict[str, str]] = {}
    for m in repair.models:
        stem = _stem(defense.name if len(repair.models) == 1 else m.label)
        formats = ("keras", "h5") if uses_only_keras_layers(m.model) else ("keras",)
        saved[m.label] = {k: str(v) for k, v in save_model(m.model, out_dir, stem, formats=formats,
                                                           overwrite=overwrite).items()}
    # 2. the evaluation: only now are the test sets opened
    ev = open_evaluation_sets(repair, b, {"test": test, "bd_test": bd_test}, target=target,
                              several_targets=several_targets)
    t, bd = ev.sets.get("test"), ev.sets.get("bd_test")
    evaluations: list[dict[str, Any]] = []
    warnings = repair_warnings(repair)
    if t is not None and bd is not None:
        rows = evaluate_repairs(b, [repair], t, bd, name=Path(model).stem).evaluations
        evaluations = [e.as_dict() for e in rows]
        warnings += low_attack_warnings({"bd_test": rows[0].attack_success_rate}, target=ev.target)
    files = {"model": Path(model), "valid": Path(valid), **ev.files}
    results: dict[str, Any] = {
        "defense": defense.name,
        "provenance": {"versions": versions(),
                       "inputs": {k: {"path": str(v), "sha256": sha256_file(v)} for k, v in files.items()}},
        "parameters": {"input_scale": input_scale_of(b), **defense.get_params()},
        "record": dict(repair.record),
        "target": ev.target,
        "evaluations": evaluations,
        "models": saved,
        "warnings": warnings,
    }
    write_results({paths["results"]: results}, overwrite=overwrite)
    return repair, results
