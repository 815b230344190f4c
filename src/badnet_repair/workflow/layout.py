"""Where the inputs come from: the lab's file layout, files given, or the built-in demo."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..demo.make import DEMO_BADNETS
from ..errors import DataError

__all__ = ["LAB_FILES", "ResolvedInputs", "resolve_inputs"]

log = logging.getLogger(__name__)

# The CSAW-HackML lab's layout, relative to the folder the work runs in.
LAB_FILES = {
    "model": "model/bd_net.h5",
    "valid": "data/cl/valid.h5",
    "bd_valid": "data/bd/bd_valid.h5",
    "test": "data/cl/test.h5",
    "bd_test": "data/bd/bd_test.h5",
}
LAB_WEIGHTS = "model/bd_weights.h5"
GET_LAB = (
    "Download the lab's model/ and data/ folders as its README says (CSAW-HackML lab), "
    "pass the files with --model, --valid, --bd-valid, --test and --bd-test, "
    "or run on the built-in demo with --demo baseline"
)


@dataclass(frozen=True)
class ResolvedInputs:
    """The input files of a run and a sentence saying where they came from.

    Attributes:
        files: role (model, valid, bd_valid, test, bd_test) -> path, or None if not used.
        source: e.g. "the lab files in /home/me/lab".
        notice: a line to show first when the lab files were absent and the demo is used.
        demo: the demo BadNet used ("baseline", "pruning-aware" or "multi-target"), or None.
    """

    files: Mapping[str, str | None]
    source: str
    notice: str | None = None
    demo: str | None = None


def _demo(which: str, demo_dir: str | os.PathLike[str], demo_config: Any, progress: bool,
          notice: str | None) -> ResolvedInputs:
    from ..demo.make import DemoConfig, load_demo_manifest, make_demo

    if isinstance(demo_config, dict):
        demo_config = DemoConfig(**demo_config)
    if which not in DEMO_BADNETS:
        raise ValueError(f"demo must be one of {DEMO_BADNETS}, not {which!r}")
    manifest = load_demo_manifest(demo_dir)
    if manifest is None or which.replace("-", "_") not in manifest:
        log.warning("making the built-in demo's %s BadNet in %s (once)", which, demo_dir)
    # only the BadNet this run uses: the other is made the first time a command asks for it
    paths = make_demo(demo_dir, config=demo_config, progress=progress, badnets=(which,))
    model = {"pruning-aware": paths.pruning_aware_model, "multi-target": paths.multi_target_model}.get(which,
                                                                                                   paths.model)
    multi = which == "multi-target"
    files: dict[str, str | None] = {
        "model": str(model), "valid": str(paths.valid),
        "bd_valid": str(paths.bd_mt_valid if multi else paths.bd_valid),
        "test": str(paths.test), "bd_test": str(paths.bd_mt_test if multi else paths.bd_test),
    }
    return ResolvedInputs(files, f"the built-in demo ({which} BadNet on synthetic faces, {demo_dir}/)",
                          notice, which)


def resolve_inputs(
    given: Mapping[str, str | os.PathLike[str] | None] | None = None,
    *,
    root: str | os.PathLike[str] = ".",
    demo: str | None = None,
    demo_dir: str | os.PathLike[str] = ".demo",
    demo_config: Any = None,
    progress: bool = True,
) -> ResolvedInputs:
    """Decide which files a run uses.

    - ``demo`` set: the built-in demo (made first if needed) with that BadNet.
    - nothing given: the lab layout under ``root`` (``model/bd_weights.h5`` stands in for a
      missing ``model/bd_net.h5``); where none of the lab files exist, the demo's baseline
      BadNet, with a notice saying so; where only some exist, an error naming the missing.
    - only the lab layout's own paths given: as if nothing were given.
    - other files given: those, and the lab layout's files for the roles not given where
      they exist; model and valid are required.

    Args:
        given: role -> path, roles as in :data:`LAB_FILES`; None values mean not given.
        root: the folder holding the lab layout, default the current folder.
        demo: ``"baseline"`` or ``"pruning-aware"`` to force the demo.
        demo_dir: the demo's cache folder, default ``.demo``.
        demo_config: a :class:`~badnet_repair.demo.DemoConfig` (or a dict of its fields)
            for a demo not yet made.
        progress: progress bars while a demo is made.

    Returns:
        ResolvedInputs.
    """
    given_str: dict[str, str | None] = {k: (None if v is None else str(v)) for k, v in (given or {}).items()}
    if given_str and all(given_str.get(k) in (None, v) for k, v in LAB_FILES.items()):
        # the lab layout's own paths (a notebook's defaults) mean the same as nothing given
        given_str = {}
    given = given_str
    unknown = set(given) - set(LAB_FILES)
    if unknown:
        raise ValueError(f"unknown input roles {sorted(unknown)}; expected {list(LAB_FILES)}")
    base = Path(root)
    if demo is not None:
        if any(v is not None for v in given.values()):
            raise DataError("the demo takes no --model/--valid/... files; drop one or the other")
        return _demo(demo, demo_dir, demo_config, progress, None)
    lab = {k: base / v for k, v in LAB_FILES.items()}
    if not lab["model"].exists() and (base / LAB_WEIGHTS).exists():
        lab["model"] = base / LAB_WEIGHTS
    where = base.resolve()
    if all(v is None for v in given.values()):
        missing = [str(p.relative_to(base)) for p in lab.values() if not p.exists()]
        if len(missing) == len(lab):
            folder = "the current folder" if str(root) in (".", "") else str(root)
            notice = (f"No lab files in {folder} ({', '.join(LAB_FILES.values())}); "
                      "using the built-in demo instead.")
            return _demo("baseline", demo_dir, demo_config, progress, notice)
        if missing:
            raise DataError(f"lab files not found in {where}: {', '.join(missing)}. {GET_LAB}.")
        return ResolvedInputs({k: str(p) for k, p in lab.items()}, f"the lab files in {where}")
    files: dict[str, str | None] = {}
    for key, path in lab.items():
        if given_str.get(key) is not None:
            files[key] = given_str[key]
        elif path.exists():
            files[key] = str(path)
        elif key in ("model", "valid"):
            raise DataError(f"no --{key.replace('_', '-')} given and {path} does not exist. {GET_LAB}.")
        else:
            files[key] = None
    return ResolvedInputs(files, "the files given")
