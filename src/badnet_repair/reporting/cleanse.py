"""A Neural Cleanse scan written out: the norms and anomaly indices as JSON and markdown, the
norms and the reversed triggers as figures, and the masks and patterns as arrays."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["cleanse_markdown", "cleanse_paths", "read_cleanse", "write_cleanse"]


def cleanse_paths(out_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """The files :func:`write_cleanse` writes into ``out_dir``: ``json``, ``md``, ``png`` (the
    norms), ``triggers_png`` and ``npz`` (masks and patterns)."""
    d = Path(out_dir)
    return {"json": d / "neural_cleanse.json", "md": d / "neural_cleanse.md", "png": d / "neural_cleanse.png",
            "triggers_png": d / "neural_cleanse_triggers.png", "npz": d / "neural_cleanse_triggers.npz"}


def cleanse_markdown(scan: Any, *, title: str = "Neural Cleanse", top: int = 10) -> str:
    """A scan as markdown: the verdict, how the scan went, and the ``top`` fully optimised
    classes with the smallest norms.

    Args:
        scan: a :class:`~badnet_repair.detectors.neural_cleanse.CleanseScan`.
        title: the heading.
        top: rows of the table, default 10.
    """
    s = scan.settings
    verdict = (f"**Flagged as backdoor target(s): {', '.join(map(str, scan.flagged))}.**" if scan.flagged else
               "**No class flagged**: no reversed trigger is anomalously small.")
    pre = getattr(scan, "preselected", None)
    which = (f"All {len(scan.norms)} classes were" if pre is None else
             f"{len(pre)} of the {len(scan.norms)} classes, pre-selected by how often B ranks them among its "
             f"top {100 * float(s.get('preselect_share', 0.25)):g}% of labels on clean images (K-Arm's "
             "pre-screening), were")
    how = (f"{which} screened ({s.get('screen_steps')} steps at a fixed lambda "
           f"{s.get('screen_cost')}); the {len(scan.candidates)} with the smallest screened triggers and "
           f"{len(scan.reference)} random reference classes were optimised fully ({s.get('steps')} steps)."
           if scan.screened else
           f"All {len(scan.norms)} classes were optimised fully ({s.get('steps')} steps).")
    lines = [f"# {title}", "", verdict, "",
             how + f" A class is flagged where its anomaly index (how far its norm lies below the reference "
             f"classes' median, in MAD-estimated standard deviations) exceeds {s.get('anomaly_threshold')}. "
             f"Scan: {scan.seconds:.0f} s.", "",
             "| class | mask L1 norm | anomaly index | reversed trigger's attack success (%) | role | flagged |",
             "|---:|---:|---:|---:|---|---|"]
    for c in sorted(scan.triggers, key=lambda c: scan.norms[c])[:top]:
        t = scan.triggers[c]
        role = "candidate" if c in scan.candidates else "reference"
        lines.append(f"| {c} | {t.norm:.1f} | {scan.anomaly[c]:.2f} | {t.attack_success:.1f} | {role} | "
                     f"{'yes' if c in scan.flagged else ''} |")
    return "\n".join(lines) + "\n"


def write_cleanse(scan: Any, out_dir: str | os.PathLike[str], image: np.ndarray, *, title: str = "Neural Cleanse",
                  overwrite: bool = False) -> dict[str, Path]:
    """Write a scan: ``neural_cleanse.json`` (:meth:`CleanseScan.summary`), ``.md``
    (:func:`cleanse_markdown`), ``.png`` (the norms), ``neural_cleanse_triggers.png`` (the
    flagged classes' reversed triggers, stamped on ``image``) and ``neural_cleanse_triggers.npz``
    (``classes`` (M,), ``masks`` (M, H, W), ``patterns`` (M, H, W, C), ``norms`` (M,), for every
    fully optimised class).

    Args:
        scan: the scan.
        out_dir: the folder (made if missing).
        image: a clean (H, W, C) image to stamp.
        title: the heading and figure titles.
        overwrite: replace existing files, default False (an existing one raises
            :class:`~badnet_repair.errors.OutputExistsError` before anything is written).

    Returns:
        The paths, by the keys of :func:`cleanse_paths`.
    """
    from ..formats.files import write_results
    from .plotting import plot_cleanse_norms, plot_reversed_triggers

    paths = cleanse_paths(out_dir)
    classes = sorted(scan.triggers)
    arrays = {"classes": np.asarray(classes, np.int64),
              "masks": np.stack([scan.triggers[c].mask for c in classes]),
              "patterns": np.stack([scan.triggers[c].pattern for c in classes]),
              "norms": np.asarray([scan.triggers[c].norm for c in classes])}
    write_results({paths["json"]: scan.summary(), paths["md"]: cleanse_markdown(scan, title=title),
                   paths["png"]: plot_cleanse_norms(scan, title=f"{title}: reversed-trigger norms"),
                   paths["triggers_png"]: plot_reversed_triggers(scan, image, title=f"{title}: reversed triggers"),
                   paths["npz"]: arrays}, overwrite=overwrite)
    return paths


def read_cleanse(out_dir: str | os.PathLike[str]) -> Any:
    """A scan :func:`write_cleanse` wrote, back as a
    :class:`~badnet_repair.detectors.neural_cleanse.CleanseScan` (to unlearn or prune with it
    later without scanning again): the flagged classes, the settings, every class's norm, the
    fully optimised classes' anomaly indices, roles and reversed triggers (masks and patterns
    exactly as saved; norms shown in the JSON to 3 decimals).

    Raises:
        DataError: naming the file, where one is missing or not a scan's.
    """
    import json

    from ..detectors.neural_cleanse import CleanseScan, ReversedTrigger
    from ..errors import DataError

    paths = cleanse_paths(out_dir)
    try:
        summary = json.loads(paths["json"].read_text())
        with np.load(paths["npz"]) as arrays:
            classes, masks, patterns = arrays["classes"], arrays["masks"], arrays["patterns"]
            exact = arrays["norms"]
        norms = np.asarray(summary["norms"], np.float64)
        rows = {int(r["class"]): r for r in summary["optimised"]}
        flagged = tuple(int(c) for c in summary["flagged"])
    except FileNotFoundError as exc:
        raise DataError(f"{exc.filename}: no such file (a Neural Cleanse scan's folder holds "
                        "neural_cleanse.json and neural_cleanse_triggers.npz)") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{out_dir}: not a Neural Cleanse scan's files: {exc}") from None
    triggers = {int(c): ReversedTrigger(int(c), masks[i], patterns[i], float(exact[i]),
                                        float(rows[int(c)]["attack_success"]))
                for i, c in enumerate(classes)}
    screen = norms.copy()
    anomaly = np.full(len(norms), np.nan)
    for c, r in rows.items():
        norms[c] = triggers[c].norm
        screen[c] = np.nan if r["screen_norm"] is None else float(r["screen_norm"])
        anomaly[c] = float(r["anomaly_index"])
    return CleanseScan(flagged=flagged, norms=norms, screen_norms=screen, anomaly=anomaly,
                       candidates=tuple(sorted(c for c, r in rows.items() if r["role"] == "candidate")),
                       reference=tuple(sorted(c for c, r in rows.items() if r["role"] == "reference")),
                       triggers=triggers, screened=bool(summary["screened"]), seconds=float(summary["seconds"]),
                       settings=dict(summary["settings"]),
                       screen_reached=None if summary.get("screen_reached") is None else
                       np.asarray(summary["screen_reached"], bool),
                       # absent from scans saved before the pre-selection existed
                       preselected=None if summary.get("preselected") is None else
                       tuple(int(c) for c in summary["preselected"]),
                       preselect_share=None if summary.get("preselect_share") is None else
                       np.asarray(summary["preselect_share"], np.float64))
