"""The hand-in: what a student submits for the lab, collected into one folder.

``badnet-repair report`` runs the notebook, which writes the models and results into its
``OUT_DIR`` (``fixed_models/``) and the report next to the notebook. A student then needs the
executed notebook, its HTML, the report with its figure and HTML, and the repaired models that
the lab's Keras 2 ``eval.py`` loads, in the lab's layout and outside every ignored folder:
:func:`collect_handin` copies them into one folder with a ``README.md`` that lists them.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

from ..formats.files import write_text

__all__ = ["HANDIN_MODELS", "collect_handin"]

log = logging.getLogger(__name__)

#: The files of the output folder that are handed in (glob patterns): the models in the formats
#: the lab's Keras 2 grader loads, and the results.
HANDIN_MODELS = ("bd_*.h5", "goodnet_*.h5", "results.json", "results.csv", "sweep.csv", "pruning_curves.png",
                 "comparison/*")


def _models_of_this_run(out: Path) -> set[str] | None:
    """The file names of the models the run that wrote ``out/results.json`` saved; None where it
    does not say (no results.json, or one without ``models``)."""
    try:
        models = json.loads((out / "results.json").read_text()).get("models")
    except (OSError, ValueError):
        return None
    if not isinstance(models, dict):
        return None
    return {Path(p).name for formats in models.values() if isinstance(formats, dict) for p in formats.values()}


def _copy(src: Path, dst: Path) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if src.resolve() != dst.resolve():
        shutil.copy2(src, dst)
    return dst


def collect_handin(handin: str | os.PathLike[str], *, notebook: str | os.PathLike[str] | None,
                   notebook_html: str | os.PathLike[str] | None, report: str | os.PathLike[str],
                   out_dir: str | os.PathLike[str], patterns: Sequence[str] = HANDIN_MODELS) -> list[Path]:
    """Copy what a student hands in into ``handin`` and list it in ``handin/README.md``.

    Layout: ``<notebook>.ipynb`` and ``.html``; ``Lab2_report.md``, its figure folder
    (``Lab2_report_files/``) and ``Lab2_report.html``; ``fixed_models/`` with the files of
    ``out_dir`` that match ``patterns`` (:data:`HANDIN_MODELS`). Files already in ``handin`` (the
    executed notebook written there) stay where they are.

    Args:
        handin: the hand-in folder (made if absent).
        notebook, notebook_html: the executed notebook and its HTML, if any.
        report: the markdown report; its ``<stem>_files/`` folder and ``.html`` come along where
            they exist.
        out_dir: the run's output folder.
        patterns: glob patterns of ``out_dir``'s files to hand in.

    Returns:
        The hand-in's files, README.md last.
    """
    root = Path(handin)
    root.mkdir(parents=True, exist_ok=True)
    files: list[Path] = []
    for p in (notebook, notebook_html):
        if p is not None and Path(p).is_file():
            files.append(_copy(Path(p), root / Path(p).name))
    rep = Path(report)
    if rep.is_file():
        files.append(_copy(rep, root / rep.name))
        html = rep.with_suffix(".html")
        if html.is_file():
            files.append(_copy(html, root / html.name))
        figures = rep.parent / f"{rep.stem}_files"
        if figures.is_dir():
            files += [_copy(f, root / figures.name / f.name) for f in sorted(figures.iterdir()) if f.is_file()]
    out = Path(out_dir)
    written = _models_of_this_run(out)
    stale: list[str] = []
    for pattern in patterns:
        for f in sorted(out.glob(pattern)):
            if not f.is_file():
                continue
            if written is not None and f.parent == out and f.name.startswith(("bd_", "goodnet_")) \
                    and f.name not in written:
                stale.append(f.name)  # an earlier run's model (another X), not this run's results
                continue
            files.append(_copy(f, root / "fixed_models" / f.relative_to(out)))
    if stale:
        log.warning("left out of the hand-in: %s in %s were not written by this run (its results.json)",
                    ", ".join(stale), out)
    lines = ["# Hand-in", "",
             "Made by `badnet-repair report`: the notebook as run, the report, and the repaired models.", "",
             "| file | size |", "|---|---:|"]
    lines += [f"| `{f.relative_to(root).as_posix()}` | {f.stat().st_size / 1e6:.2f} MB |" for f in files]
    lines += ["", "The models load in Keras 2 (the lab's `eval.py`) and Keras 3, for example:", "",
              "```", "python eval.py data/cl/test.h5 data/bd/bd_test.h5 fixed_models/goodnet_4.h5", "```", "",
              "`goodnet_X.h5` outputs the extra class N (the class count of B) where B and B'_X disagree.", ""]
    files.append(write_text(root / "README.md", "\n".join(lines), overwrite=True))
    return files
