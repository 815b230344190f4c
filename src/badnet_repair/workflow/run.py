"""One workflow for defenses on files: open the BadNet and the clean data, repair, save, and
only then open the test and poisoned files to evaluate.

The order is built into the functions' arguments, not left to statement order:
:func:`open_badnet` opens the model and the clean validation data and nothing else;
:func:`open_evaluation_sets` is the only function that opens test or poisoned files, and it
takes the finished repairs as its first argument, so no repair can exist after it is
called. :func:`save_repair` writes a repaired model and its GoodNet, and
:func:`~badnet_repair.formats.files.write_results` is the one writer of the csv, json, md and
png outputs.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..defenses import Repair
from ..defenses.tuning import FinePruneResult
from ..detectors.goodnet import build_goodnet, build_portable_goodnet
from ..formats.data import Dataset, Layout, poisoned_labels
from ..formats.files import atomic_path
from ..nets.models import load_data_for, load_model, num_classes, save_model, without_input_scale

__all__ = [
    "EvaluationSets",
    "coverage_warnings",
    "low_attack_warnings",
    "open_badnet",
    "open_evaluation_sets",
    "repair_warnings",
    "save_repair",
    "selection_warnings",
]

log = logging.getLogger(__name__)

#: Evaluation roles and whether they hold poisoned inputs.
EVALUATION_ROLES = {"bd_valid": True, "test": False, "bd_test": True}


def open_badnet(model: str | os.PathLike[str], valid: str | os.PathLike[str], *, trust_model: bool = False,
                layout: Layout = "nchw", lazy: bool = False, input_scale: float | str = 1.0) -> tuple[Any, Dataset]:
    """Load the BadNet B and the clean validation data, checked against B.

    Args:
        model: B's file (``.h5``, ``.keras`` or weights-only ``.h5``).
        valid: the clean validation data (lab HDF5), the only data a defense sees.
        trust_model: allow model files with code-carrying layers.
        layout: how the HDF5 images are stored, default ``"nchw"`` (the lab's).
        lazy: read the images chunk by chunk when used instead of now.
        input_scale: B takes file pixels times this, default 1 (``1/255``: a model trained on 0..1
            pixels); B is then wrapped to take the files' 0..255 pixels
            (:func:`~badnet_repair.nets.models.load_model`).

    Returns:
        (B, the clean Dataset named ``"valid"``).
    """
    b = load_model(model, trust=trust_model, input_scale=input_scale)
    clean = load_data_for(b, valid, layout=layout, name="valid", lazy=lazy)
    coverage_warnings(clean, num_classes(b), file=valid)
    return b, clean


def coverage_warnings(clean: Dataset, classes: int, *, file: str | os.PathLike[str] | None = None,
                      quiet: bool = False) -> list[str]:
    """A loud line where the clean data holds images of fewer than half of B's classes: a defense
    or detector sees, and its held-out check measures, only those; the others can lose accuracy
    or raise false alarms unseen.
    Logged as a warning.

    Args:
        clean: the clean data a defense repairs from.
        classes: B's number of classes.
        file: the data's file, named in the line.
        quiet: return the line without logging it (for a record, where :func:`open_badnet` has
            said it already).

    Returns:
        The line, or nothing where half the classes or more have images.
    """
    present = int(np.unique(np.asarray(clean.y)).size)
    if 2 * present >= classes:
        return []
    line = (f"WARNING: {file or clean.name}: clean images of only {present} of the model's {classes} classes; "
            "defenses and detectors fit and check on those alone, and the others may lose accuracy or raise "
            "false alarms unseen")
    if not quiet:
        log.warning("%s", line)
    return [line]


def selection_warnings(selections: Mapping[float, Any], *, images: int) -> list[str]:
    """A loud line for each B'_X whose validation drop far exceeds X (more than X + 3 points and
    twice X): on few clean images one image is several points, and the first pruning step past X
    can land far beyond it. Logged as warnings.

    Args:
        selections: X -> the sweep's selection (``accuracy_drop`` in points), or None.
        images: the validation images the drops were measured on.

    Returns:
        The lines, one per such X (empty where every B'_X lands near its X).
    """
    out = []
    for x, sel in selections.items():
        if sel is None or not (sel.accuracy_drop > x + 3.0 and sel.accuracy_drop > 2 * x):
            continue
        out.append(f"WARNING: B'_{x:g} is {sel.accuracy_drop:.2f} points below B on validation, not about {x:g}: the "
                   f"first pruning step past {x:g} points lands there ({images} validation images, one image is "
                   f"{100.0 / max(images, 1):.2f} points)")
        log.warning("%s", out[-1])
    return out


def save_repair(badnet: Any, repaired: Any, out_dir: str | os.PathLike[str], stem: str, *,
                formats: Sequence[str] = ("h5", "weights", "keras"), goodnet: str | os.PathLike[str] | None = None,
                goodnet_h5: str | os.PathLike[str] | None = None, overwrite: bool = False) -> dict[str, Path]:
    """Save a repaired model as ``<stem>.h5``, ``<stem>_weights.h5``, ``<stem>.keras`` (those in
    ``formats``) and the lab's GoodNet of B and it: as ``.keras`` at ``goodnet`` (its own layer;
    Keras 3) and as a full ``.h5`` of standard layers at ``goodnet_h5`` (Keras 2 and 3;
    :func:`~badnet_repair.detectors.goodnet.build_portable_goodnet`), for those given. Every file
    takes the input B was trained on: a model with an input scale is saved without it.

    Returns:
        format (and ``"goodnet"``, ``"goodnet_h5"``) -> path written.
    """
    # the files, G's too, take the input B and B' were trained on: built from the unscaled models
    badnet, repaired = without_input_scale(badnet), without_input_scale(repaired)
    saved = dict(save_model(repaired, out_dir, stem, formats=tuple(formats), overwrite=overwrite))
    if goodnet is not None:
        with atomic_path(goodnet, overwrite=overwrite) as tmp:
            build_goodnet(badnet, repaired).save(tmp)
        saved["goodnet"] = Path(goodnet)
    if goodnet_h5 is not None:
        target = Path(goodnet_h5)
        if target.suffix != ".h5":
            raise ValueError(f"{target}: the portable GoodNet is written as .h5")
        portable = build_portable_goodnet(badnet, repaired, name=target.stem)
        saved["goodnet_h5"] = save_model(portable, target.parent, target.stem, formats=("h5",),
                                         overwrite=overwrite)["h5"]
    return saved


@dataclass(frozen=True, eq=False)
class EvaluationSets:
    """The test and poisoned sets of a run, opened after its repairs.

    Attributes:
        sets: role (``bd_valid``, ``test``, ``bd_test``) -> Dataset, for the roles given;
            poisoned sets are labelled with the target.
        poisoned: the roles that hold poisoned inputs.
        target: the attack's target class, or None without poisoned sets.
        files: role -> the file it was read from.
    """

    sets: Mapping[str, Dataset]
    poisoned: tuple[str, ...]
    target: int | None
    files: Mapping[str, Path]


def open_evaluation_sets(repairs: Repair | Sequence[Repair] | FinePruneResult, badnet: Any,
                         files: Mapping[str, str | os.PathLike[str] | None], *, target: int | None = None,
                         several_targets: bool = False, layout: Layout = "nchw", lazy: bool = True) -> EvaluationSets:
    """Open the test and poisoned files, once the repairs they evaluate are done.

    Args:
        repairs: the finished repair(s) these sets will evaluate (or fine-pruning's result);
            not read, only required, so that evaluation data can only be opened after repairing.
        badnet: B, to check the images and labels against.
        files: role (``bd_valid``, ``test``, ``bd_test``) -> path, None for a role not given.
        target: the attack's target class; default each poisoned file's single label.
        several_targets: a multi-target BadNet's poisoned files: each input's label is its own
            target (:func:`~badnet_repair.formats.data.poisoned_labels`).
        layout: how the HDF5 images are stored.
        lazy: read the images chunk by chunk (default).

    Returns:
        EvaluationSets.
    """
    if repairs is None:
        raise ValueError("open_evaluation_sets needs the finished repairs")
    unknown = set(files) - set(EVALUATION_ROLES)
    if unknown:
        raise ValueError(f"unknown evaluation roles {sorted(unknown)}; expected {list(EVALUATION_ROLES)}")
    sets: dict[str, Dataset] = {}
    opened: dict[str, Path] = {}
    poisoned: list[str] = []
    for role, is_poisoned in EVALUATION_ROLES.items():
        path = files.get(role)
        if path is None:
            continue
        ds = load_data_for(badnet, path, layout=layout, name=role, lazy=lazy)
        if is_poisoned:
            ds, target = poisoned_labels(ds, target, several=several_targets)
            poisoned.append(role)
        sets[role], opened[role] = ds, Path(path)
    return EvaluationSets(sets=sets, poisoned=tuple(poisoned), target=target, files=opened)


#: Below this attack success (%) on a poisoned set, B probably does not answer that set's trigger.
LOW_ATTACK_SUCCESS = 50.0


def low_attack_warnings(attack_success: Mapping[str, float | None], *, target: int | None = None) -> list[str]:
    """A warning for each poisoned set on which the BadNet's own attack success is below 50 %.

    A BadNet answers its trigger almost always; a poisoned file it does not answer probably
    carries another BadNet's trigger (or the target is wrong), and every attack success
    measured on it would mean nothing. Each warning is also logged.

    Args:
        attack_success: poisoned set name -> B's attack success on it, in %.
        target: the target class the sets were scored against.

    Returns:
        The warnings, one line each (empty when every set is answered).
    """
    out = []
    for name, rate in attack_success.items():
        if rate is not None and rate < LOW_ATTACK_SUCCESS:
            out.append(f"{name}: the BadNet sends only {rate:.2f}% of these poisoned inputs to the target"
                       f"{'' if target is None else f' {target}'} (below {LOW_ATTACK_SUCCESS:g}%): this poisoned "
                       "file may carry another BadNet's trigger, or the target is wrong (--target); attack "
                       "success measured on it says little")
            log.warning("%s", out[-1])
    return out


def repair_warnings(repair: Repair | FinePruneResult) -> list[str]:
    """A repair's loud lines: each network that fell more than its defense's clean-accuracy
    budget below B on the clean images the defense held out, and what was returned instead
    (:func:`~badnet_repair.defenses.tuning.check_budget`; no test or poisoned data is read).
    The defense logged each as a warning already; callers show them where the user looks.

    Returns:
        The lines, in the repair's order.
    """
    return list(repair.warnings)
