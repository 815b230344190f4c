"""The benchmark's leaderboard: mean and spread over seeds per BadNet and defense, per split.

Reads the rows of a benchmark store (``workflow.bench``): one per cell, each with B's numbers
and, under ``results``, every repaired model's and GoodNet's. A "defense" in the leaderboard
is one repaired model of one setting: ``pruning X=4`` of the ``pruning`` setting, say.
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..formats.files import write_results

__all__ = ["DetectionEntry", "Entry", "detection_entries", "entries", "leaderboard_markdown", "mixed_badnets",
           "plot_detection", "plot_leaderboard", "write_leaderboard"]


@dataclass(frozen=True)
class Entry:
    """One BadNet x defense, over its seeds (percentages; ``*_sd`` the sample standard deviation,
    0 for one seed).

    ``meets``: the seeds' mean attack success is at most the target and the mean clean
    accuracy at most ``accuracy_drop`` points below B's.
    """

    split: str
    badnet: str
    defense: str
    seeds: int
    badnet_clean: float
    badnet_attack: float
    clean: float
    clean_sd: float
    attack: float
    attack_sd: float
    detection: float | None
    false_alarm: float | None
    seconds: float
    meets: bool


def _sd(values: Sequence[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def _model_label(row: Mapping[str, Any], result: Mapping[str, Any]) -> str:
    """``<setting label>`` for a one-model defense, ``<setting label> X=4`` for pruning's several."""
    label = str(row["label"])
    name = str(result["model"])
    return label if name == row["defense"] else f"{label}{name[len(row['defense']):]}"


def entries(rows: Iterable[Mapping[str, Any]], *, attack_success: float = 5.0,
            accuracy_drop: float = 3.0) -> list[Entry]:
    """The leaderboard's entries from a store's rows (failed cells left out), in store order."""
    groups: dict[tuple[str, str, str], list[tuple[Mapping[str, Any], Mapping[str, Any]]]] = {}
    for row in rows:
        if row.get("status") != "ok":
            continue
        for result in row["results"]:
            if result["kind"] == "goodnet":
                continue
            groups.setdefault((row["split"], row["badnet"], _model_label(row, result)), []).append((row, result))
    goodnets = {(row["cell"], r["model"]): r for row in rows if row.get("status") == "ok" for r in row["results"]
                if r["kind"] == "goodnet"}
    out = []
    for (split, badnet, defense), items in groups.items():
        clean = [float(r["clean_accuracy"]) for _, r in items]
        attack = [float(r["attack_success_rate"]) for _, r in items]
        g = [goodnets.get((row["cell"], f"G ({r['model']})")) for row, r in items]
        det = [float(x["detection_rate"]) for x in g if x and x.get("detection_rate") is not None]
        fa = [float(x["false_alarm_rate"]) for x in g if x and x.get("false_alarm_rate") is not None]
        b_clean = statistics.fmean(float(row["badnet_clean_accuracy"]) for row, _ in items)
        b_attack = statistics.fmean(float(row["badnet_attack_success"]) for row, _ in items)
        mean_clean, mean_attack = statistics.fmean(clean), statistics.fmean(attack)
        out.append(Entry(split=split, badnet=badnet, defense=defense, seeds=len(items), badnet_clean=b_clean,
                         badnet_attack=b_attack, clean=mean_clean, clean_sd=_sd(clean), attack=mean_attack,
                         attack_sd=_sd(attack), detection=statistics.fmean(det) if det else None,
                         false_alarm=statistics.fmean(fa) if fa else None,
                         seconds=statistics.fmean(float(row.get("seconds", 0.0)) for row, _ in items),
                         meets=mean_attack <= attack_success and mean_clean >= b_clean - accuracy_drop))
    return out


@dataclass(frozen=True)
class DetectionEntry:
    """One BadNet x GoodNet from detectors (one detector alone, or the combination), over its seeds.

    ``meets``: the seeds' mean detection is at least the target and the mean false alarm at most
    the target's; ``auroc`` is None for a combination (its score is a count of alarms).
    """

    split: str
    badnet: str
    goodnet: str
    seeds: int
    detection: float
    detection_sd: float
    false_alarm: float
    false_alarm_sd: float
    auroc: float | None
    seconds: float
    meets: bool


def detection_entries(rows: Iterable[Mapping[str, Any]], *, detection: float = 95.0,
                      false_alarm: float = 5.0) -> list[DetectionEntry]:
    """The detection leaderboard's entries: the rows of GoodNet-from-detectors cells (``kind``
    ``"detection"``), failed cells left out, one entry per BadNet and G (each detector alone and
    the combination), in store order."""
    groups: dict[tuple[str, str, str], list[tuple[Mapping[str, Any], Mapping[str, Any]]]] = {}
    for row in rows:
        if row.get("status") != "ok" or row.get("kind") != "detection":
            continue
        for result in row["results"]:
            name = str(result["model"])
            # a part alone, at its share of its entry's budget, is named with its entry: the same
            # detector in two entries has two thresholds
            label = name if name == f"G ({row['label']})" else f"{name} in {row['label']}"
            groups.setdefault((row["split"], row["badnet"], label), []).append((row, result))
    out = []
    for (split, badnet, goodnet), items in groups.items():
        det = [float(r["detection_rate"]) for _, r in items]
        fa = [float(r["false_alarm_rate"]) for _, r in items]
        au = [float(r["auroc"]) for _, r in items if r.get("auroc") is not None]
        out.append(DetectionEntry(split=split, badnet=badnet, goodnet=goodnet, seeds=len(items),
                                  detection=statistics.fmean(det), detection_sd=_sd(det),
                                  false_alarm=statistics.fmean(fa), false_alarm_sd=_sd(fa),
                                  auroc=statistics.fmean(au) if au else None,
                                  seconds=statistics.fmean(float(row.get("seconds", 0.0)) for row, _ in items),
                                  meets=statistics.fmean(det) >= detection and statistics.fmean(fa) <= false_alarm))
    return out


def _detection_markdown(rows: Sequence[Mapping[str, Any]], *, detection: float, false_alarm: float) -> list[str]:
    es = detection_entries(rows, detection=detection, false_alarm=false_alarm)
    if not es:
        return []
    lines = ["## GoodNets from detectors", "",
             f"Target: at least {detection:g} % of poisoned test inputs flagged at most {false_alarm:g} % of clean "
             "test inputs flagged (means over seeds); every threshold set on clean validation data only. AUROC: the "
             "detector's scores on the poisoned against the clean test inputs.", ""]
    for split in ("tuning", "held-out"):
        part = [e for e in es if e.split == split]
        if not part:
            continue
        names = sorted({e.goodnet for e in part}, key=[e.goodnet for e in part].index)
        lines += [f"### {split} BadNets ({len({e.badnet for e in part})})", "",
                  "| G | meets the target on | mean detection (%) | mean false alarm (%) | mean AUROC |",
                  "|---|---:|---:|---:|---:|"]
        for n in names:
            mine = [e for e in part if e.goodnet == n]
            aurocs = [e.auroc for e in mine if e.auroc is not None]
            lines.append(f"| {n} | {sum(e.meets for e in mine)} of {len(mine)} | "
                         f"{statistics.fmean(e.detection for e in mine):.2f} | "
                         f"{statistics.fmean(e.false_alarm for e in mine):.2f} | "
                         f"{statistics.fmean(aurocs):.4f} |" if aurocs else
                         f"| {n} | {sum(e.meets for e in mine)} of {len(mine)} | "
                         f"{statistics.fmean(e.detection for e in mine):.2f} | "
                         f"{statistics.fmean(e.false_alarm for e in mine):.2f} | – |")
        lines += ["", "| BadNet | G | seeds | detection (%) | false alarm (%) | AUROC | s / run | meets |",
                  "|---|---|---:|---:|---:|---:|---:|---|"]
        for e in part:
            lines.append(f"| {e.badnet} | {e.goodnet} | {e.seeds} | {_pm(e.detection, e.detection_sd, e.seeds)} | "
                         f"{_pm(e.false_alarm, e.false_alarm_sd, e.seeds)} | "
                         f"{'–' if e.auroc is None else f'{e.auroc:.4f}'} | {e.seconds:.0f} | "
                         f"{'yes' if e.meets else 'no'} |")
        lines.append("")
    return lines


def _pm(mean: float, sd: float, seeds: int) -> str:
    return f"{mean:.2f}" if seeds == 1 else f"{mean:.2f} ± {sd:.2f}"


def mixed_badnets(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """One line per BadNet name whose ok rows were run on different B's: different weights
    (``badnet_weights_sha256``, where rows have it) or different figures of B on its test sets
    (clean accuracy, attack success). Such rows do not compare; [] where every name is one B."""
    seen: dict[str, dict[str, set[Any]]] = {}
    for r in rows:
        if r.get("status") != "ok" or "badnet_clean_accuracy" not in r:
            continue
        b = seen.setdefault(str(r["badnet"]), {"figures": set(), "weights": set()})
        b["figures"].add((round(float(r["badnet_clean_accuracy"]), 6), round(float(r["badnet_attack_success"]), 6)))
        if r.get("badnet_weights_sha256"):
            b["weights"].add(r["badnet_weights_sha256"])
    lines = []
    for name, b in seen.items():
        if len(b["figures"]) > 1 or len(b["weights"]) > 1:
            shown = "; ".join(f"{c:.2f} % / {a:.2f} %" for c, a in sorted(b["figures"]))
            lines.append(f"WARNING: BadNet {name!r}: its rows were run on {max(len(b['figures']), len(b['weights']))} "
                         f"different B's (B's clean accuracy / attack success on test: {shown}); they do not compare: "
                         "drop the rows of the B no longer on disk and run the bench again")
    return lines


def leaderboard_markdown(rows: Sequence[Mapping[str, Any]], *, attack_success: float = 5.0,
                         accuracy_drop: float = 3.0, title: str = "Leaderboard", detection: float = 95.0,
                         false_alarm: float = 5.0) -> str:
    """The leaderboard as markdown: per split, a summary (BadNets where each defense meets the
    target) and every BadNet x defense with mean ± standard deviation over seeds; the GoodNets
    from detectors the same way (:func:`detection_entries`); then the failed cells."""
    es = entries(rows, attack_success=attack_success, accuracy_drop=accuracy_drop)
    lines = [f"# {title}", ""]
    lines += [f"**{line}.**\n" for line in mixed_badnets(rows)]
    if es:
        lines += [f"Target: attack success at most {attack_success:g} % and clean accuracy at most "
                  f"{accuracy_drop:g} points below the BadNet's (means over seeds). Percentages on each BadNet's "
                  "test sets; ± is the standard deviation over defense seeds.", ""]
    for split in ("tuning", "held-out"):
        part = [e for e in es if e.split == split]
        if not part:
            continue
        badnets = sorted({e.badnet for e in part}, key=[e.badnet for e in part].index)
        defenses = sorted({e.defense for e in part}, key=[e.defense for e in part].index)
        lines += [f"## {split} BadNets ({len(badnets)})", "",
                  "| defense | meets the target on | mean clean accuracy drop (points) | mean attack success (%) |",
                  "|---|---:|---:|---:|"]
        for d in defenses:
            mine = [e for e in part if e.defense == d]
            lines.append(f"| {d} | {sum(e.meets for e in mine)} of {len(mine)} | "
                         f"{statistics.fmean(e.badnet_clean - e.clean for e in mine):.2f} | "
                         f"{statistics.fmean(e.attack for e in mine):.2f} |")
        lines += ["", "| BadNet | B clean / attack | defense | seeds | clean accuracy | attack success "
                  "| G detection | G false alarm | s / run | meets |",
                  "|---|---|---|---:|---:|---:|---:|---:|---:|---|"]
        for e in part:
            lines.append(
                f"| {e.badnet} | {e.badnet_clean:.2f} / {e.badnet_attack:.2f} | {e.defense} | {e.seeds} | "
                f"{_pm(e.clean, e.clean_sd, e.seeds)} | {_pm(e.attack, e.attack_sd, e.seeds)} | "
                f"{'–' if e.detection is None else f'{e.detection:.2f}'} | "
                f"{'–' if e.false_alarm is None else f'{e.false_alarm:.2f}'} | {e.seconds:.0f} | "
                f"{'yes' if e.meets else 'no'} |")
        lines.append("")
    lines += _detection_markdown(rows, detection=detection, false_alarm=false_alarm)
    failed = [r for r in rows if r.get("status") != "ok"]
    if failed:
        lines += ["## Failed cells", "", "| BadNet | defense | seed | error |", "|---|---|---:|---|"]
        lines += [f"| {r['badnet']} | {r['label']} | {r.get('seed')} | {str(r.get('error', '')).splitlines()[0]} |"
                  for r in failed]
        lines.append("")
    return "\n".join(lines)


def plot_leaderboard(rows: Sequence[Mapping[str, Any]], *, attack_success: float = 5.0,
                     accuracy_drop: float = 3.0, split: str | None = None) -> Any:
    """Two panels: each defense's runs as clean accuracy drop vs attack success (the target
    region shaded), and per-BadNet bars of mean attack success per defense.

    Returns:
        The matplotlib Figure.
    """
    import numpy as np
    from matplotlib.figure import Figure

    es = [e for e in entries(rows, attack_success=attack_success, accuracy_drop=accuracy_drop)
          if split is None or e.split == split]
    fig = Figure(figsize=(13, 4.8), layout="constrained")
    left, right = fig.subplots(1, 2)
    defenses = sorted({e.defense for e in es}, key=[e.defense for e in es].index)
    badnets = sorted({e.badnet for e in es}, key=[e.badnet for e in es].index)
    for d in defenses:
        mine = [e for e in es if e.defense == d]
        left.scatter([e.badnet_clean - e.clean for e in mine], [e.attack for e in mine], label=d, s=28)
    from matplotlib.patches import Rectangle

    lo, hi = left.get_xlim()
    lo = min(lo, -0.5)
    left.add_patch(Rectangle((lo, -3), accuracy_drop - lo, attack_success + 3, color="tab:green", alpha=0.12,
                             label="target"))
    left.set_xlim(lo, max(hi, accuracy_drop + 0.5))
    left.set(xlabel="clean accuracy drop from B (points)", ylabel="attack success (%)",
             title="each BadNet: mean over seeds", ylim=(-3, 103))
    left.grid(alpha=0.3)
    left.legend(fontsize=7)
    width = 0.8 / max(1, len(defenses))
    pos = np.arange(len(badnets))
    for i, d in enumerate(defenses):
        values = [next((e.attack for e in es if e.badnet == b and e.defense == d), np.nan) for b in badnets]
        right.bar(pos + (i - (len(defenses) - 1) / 2) * width, values, width, label=d)
    right.axhline(attack_success, color="tab:green", lw=0.8, ls=":")
    right.set_xticks(pos, badnets, rotation=25, ha="right", fontsize=7)
    right.set(ylabel="attack success (%)", title="attack success per BadNet", ylim=(0, 103))
    right.grid(axis="y", alpha=0.3)
    return fig


def plot_detection(rows: Sequence[Mapping[str, Any]], *, detection: float = 95.0, false_alarm: float = 5.0,
                   split: str | None = None) -> Any:
    """Two panels for the GoodNets from detectors: each G's false alarm against its detection per
    BadNet (the target region shaded), and per-BadNet bars of detection per G.

    Returns:
        The matplotlib Figure.
    """
    import numpy as np
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    es = [e for e in detection_entries(rows, detection=detection, false_alarm=false_alarm)
          if split is None or e.split == split]
    fig = Figure(figsize=(13, 5.2), layout="constrained")
    left, right = fig.subplots(1, 2)
    names = sorted({e.goodnet for e in es}, key=[e.goodnet for e in es].index)
    badnets = sorted({e.badnet for e in es}, key=[e.badnet for e in es].index)
    for n in names:
        mine = [e for e in es if e.goodnet == n]
        left.scatter([e.false_alarm for e in mine], [e.detection for e in mine], label=n, s=28)
    left.add_patch(Rectangle((-1, detection), false_alarm + 1, 104 - detection, color="tab:green", alpha=0.12,
                             label="target"))
    left.set(xlabel="false alarm on clean test inputs (%)", ylabel="detection of poisoned test inputs (%)",
             title="each BadNet: mean over seeds", ylim=(-3, 104), xlim=(-1, max(false_alarm * 2, 12)))
    left.grid(alpha=0.3)
    width = 0.8 / max(1, len(names))
    pos = np.arange(len(badnets))
    for i, n in enumerate(names):
        values = [next((e.detection for e in es if e.badnet == b and e.goodnet == n), np.nan) for b in badnets]
        right.bar(pos + (i - (len(names) - 1) / 2) * width, values, width, label=n)
    right.axhline(detection, color="tab:green", lw=0.8, ls=":")
    right.set_xticks(pos, badnets, rotation=25, ha="right", fontsize=9)
    right.set(ylabel="detection (%)", title="detection per BadNet", ylim=(0, 104))
    right.grid(axis="y", alpha=0.3)
    handles, labels = left.get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right upper", fontsize=9)
    return fig


def write_leaderboard(rows: Sequence[Mapping[str, Any]], out_dir: str | os.PathLike[str], *,
                      attack_success: float = 5.0, accuracy_drop: float = 3.0, title: str = "Leaderboard",
                      detection: float = 95.0, false_alarm: float = 5.0, overwrite: bool = True) -> dict[str, Path]:
    """Write ``leaderboard.md`` and the figures into ``out_dir``: ``leaderboard.png`` where there
    are defenses, ``detection.png`` where there are GoodNets from detectors.

    Returns:
        {"md", "png" and/or "detection_png"} -> path.
    """
    d = Path(out_dir)
    paths = {"md": d / "leaderboard.md"}
    text = leaderboard_markdown(rows, attack_success=attack_success, accuracy_drop=accuracy_drop, title=title,
                                detection=detection, false_alarm=false_alarm)
    outputs: dict[Path, Any] = {}
    if entries(rows, attack_success=attack_success, accuracy_drop=accuracy_drop) or not detection_entries(rows):
        paths["png"] = d / "leaderboard.png"
        text += f"\n![each defense on each BadNet]({paths['png'].name})\n"
        outputs[paths["png"]] = plot_leaderboard(rows, attack_success=attack_success, accuracy_drop=accuracy_drop)
    if detection_entries(rows):
        paths["detection_png"] = d / "detection.png"
        text += f"\n![each GoodNet from detectors on each BadNet]({paths['detection_png'].name})\n"
        outputs[paths["detection_png"]] = plot_detection(rows, detection=detection, false_alarm=false_alarm)
    write_results({paths["md"]: text, **outputs}, overwrite=overwrite)
    return paths
