"""Tables, CSV/JSON results and the generated ``Lab2_report.md``."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..defenses.sweep import SweepResult
from .analysis import TriggerResponse

__all__ = [
    "DEMO_NOTE",
    "append_section",
    "base_table",
    "evaluation_table",
    "lab_conclusion",
    "models_list",
    "render_report",
    "selection_table",
    "selections_of",
    "sweep_rows",
    "trigger_response_paths",
    "write_trigger_response",
]


_ROLES = ("model", "valid", "bd_valid", "test", "bd_test")


def _in_role_order(items: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """Items keyed by role (model, valid, bd_valid, test, bd_test) in that order, others after."""
    rank = {r: i for i, r in enumerate(_ROLES)}
    return sorted(items.items(), key=lambda kv: (rank.get(kv[0], len(rank)), kv[0]))


def _metric_column(name: str, kind: str) -> str:
    return f"{name}_{'asr' if kind == 'poisoned' else 'accuracy'}"


def sweep_rows(sweep: SweepResult) -> list[dict[str, Any]]:
    """One row per step: channel, fraction pruned, each set's metric, and G's metrics.

    Columns: ``channels_pruned``, ``channel`` (pruned at this step; empty at step 0),
    ``fraction_pruned``, ``<set>_accuracy`` or ``<set>_asr`` for each set, then
    ``goodnet_<set>_accuracy``/``_asr`` and ``goodnet_<set>_false_alarm``/``_detection``.
    """
    g_match = {n: sweep.goodnet_metric(n) for n in sweep.kinds}
    g_alarm = {n: sweep.goodnet_metric(n, what="alarm") for n in sweep.kinds}
    rows = []
    for s in sweep.steps:
        row: dict[str, Any] = {
            "channels_pruned": s.channels_pruned,
            "channel": "" if s.channel is None else s.channel,
            "fraction_pruned": round(s.fraction_pruned, 6),
        }
        for name, kind in sweep.kinds.items():
            row[_metric_column(name, kind)] = round(s.metrics[name], 4)
        for name, kind in sweep.kinds.items():
            k = s.channels_pruned
            row[f"goodnet_{_metric_column(name, kind)}"] = round(float(g_match[name][k]), 4)
            alarm = "detection" if kind == "poisoned" else "false_alarm"
            row[f"goodnet_{name}_{alarm}"] = round(float(g_alarm[name][k]), 4)
        rows.append(row)
    return rows


def _fmt(v: Any, digits: int = 2) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def evaluation_table(evaluations: Sequence[Any]) -> str:
    """A markdown table of evaluations (:class:`~badnet_repair.metrics.Evaluation` objects or their dicts)."""
    evaluations = [e.as_dict() if hasattr(e, "as_dict") else e for e in evaluations]
    # AUROC only where a detector's scores were measured (the lab's tables stay as the lab has them)
    with_auroc = any(e.get("auroc") is not None for e in evaluations)
    head = ("| model | channels pruned | clean accuracy (%) | attack success (%) "
            "| G detection (%) | G false alarm (%) |" + (" AUROC |" if with_auroc else "")
            + "\n|---|---:|---:|---:|---:|---:|" + ("---:|" if with_auroc else "") + "\n")
    lines = [
        f"| {e['model']} | {_fmt(e.get('channels_pruned'))} | {_fmt(e.get('clean_accuracy'))} "
        f"| {_fmt(e.get('attack_success_rate'))} | {_fmt(e.get('detection_rate'))} "
        f"| {_fmt(e.get('false_alarm_rate'))} |"
        + (f" {'–' if e.get('auroc') is None else format(e['auroc'], '.4f')} |" if with_auroc else "")
        for e in evaluations
    ]
    return head + "\n".join(lines) + "\n"


def lab_conclusion(results: Mapping[str, Any]) -> str:
    """A few sentences that read the numbers: what pruning did to the backdoor, and the
    pruning-aware pattern (attack success that survives until accuracy collapses)."""
    evals = results["evaluations"]
    base = next(e for e in evals if e["kind"] == "badnet")
    pruned = [e for e in evals if e["kind"] == "repaired"]
    goods = [e for e in evals if e["kind"] == "goodnet"]
    out: list[str] = []
    if base["attack_success_rate"] is None or not pruned:
        if not pruned:
            out.append("No threshold was reached, so no repaired model was produced.")
        else:
            out.append("No poisoned data was given, so the attack's success was not measured.")
        return " ".join(out)
    out.append(
        f"The BadNet B classifies {base['clean_accuracy']:.2f}% of clean inputs correctly and "
        f"sends {base['attack_success_rate']:.2f}% of poisoned inputs to the attacker's target."
    )
    for e in pruned:
        out.append(
            f"At X={e['threshold']:g} the pruned model B' ({e['channels_pruned']} channels "
            f"pruned) keeps {e['clean_accuracy']:.2f}% clean accuracy and "
            f"{e['attack_success_rate']:.2f}% attack success."
        )
    worst = max(pruned, key=lambda e: e["threshold"])
    if worst["attack_success_rate"] >= 50.0:
        out.append(
            f"Even at X={worst['threshold']:g} the attack still succeeds "
            f"{worst['attack_success_rate']:.1f}% of the time: the backdoor survives pruning until "
            "clean accuracy collapses, the pattern of a pruning-aware attack, whose backdoor "
            "shares channels with clean features. Pruning alone does not repair this BadNet; "
            "fine-pruning (prune, then fine-tune on clean data) is the remedy the paper proposes."
        )
    elif worst["attack_success_rate"] <= 5.0:
        out.append(
            f"By X={worst['threshold']:g} the backdoor is essentially removed: pruning the "
            "channels that clean inputs leave dormant disabled it."
        )
    else:
        out.append(
            f"Pruning weakens the backdoor (attack success {worst['attack_success_rate']:.1f}% at "
            f"X={worst['threshold']:g}) but does not remove it."
        )
    if goods:
        g = max(goods, key=lambda e: e["threshold"])
        out.append(
            f"The GoodNet at X={g['threshold']:g} flags {_fmt(g['detection_rate'])}% of poisoned "
            f"inputs as class N at a false-alarm rate of {_fmt(g['false_alarm_rate'])}% on clean inputs."
        )
    return " ".join(out)


def base_table(results: Mapping[str, Any]) -> str:
    """A markdown table of B's accuracy or attack success on every set of the sweep."""
    kinds = results.get("kinds", {})
    lines = ["| set | measure | B (%) |", "|---|---|---:|"]
    for name, value in _in_role_order(results["base"]):
        kind = kinds.get(name, "poisoned" if name.startswith("bd") else "clean")
        lines.append(f"| {name} | {'attack success rate' if kind == 'poisoned' else 'clean accuracy'} "
                     f"| {value:.2f} |")
    return "\n".join(lines) + "\n"


def selections_of(sweep: SweepResult) -> list[dict[str, Any]]:
    """Each threshold's stopping point, as ``results.json`` lists them."""
    out: list[dict[str, Any]] = []
    for x, s in sweep.selections.items():
        if s is None:
            out.append({"threshold": x, "channels_pruned": None})
            continue
        out.append({"threshold": x, "channels_pruned": s.channels_pruned, "channels": [int(c) for c in s.channels],
                    "valid_accuracy": s.valid_accuracy, "accuracy_drop": s.accuracy_drop,
                    "metrics": dict(sweep.steps[s.channels_pruned].metrics)})
    return out


def selection_table(source: Mapping[str, Any] | SweepResult) -> str:
    """A markdown table of each X's stopping point: channels pruned, validation accuracy, and
    the attack success on each poisoned set of the sweep at that step.

    Args:
        source: a :class:`~badnet_repair.defenses.sweep.SweepResult`, or results as
            ``results.json`` holds them.
    """
    if isinstance(source, SweepResult):
        selections, channels, kinds = selections_of(source), len(source.ranking.order), dict(source.kinds)
    else:
        selections, channels, kinds = source["selections"], len(source["order"]), dict(source.get("kinds", {}))
    poisoned = [n for n, k in kinds.items() if k == "poisoned"]
    head = "| X | channels pruned | fraction | validation accuracy (%) | drop (points) |"
    head += "".join(f" {n} attack success (%) |" for n in poisoned)
    lines = [head, "|---:|---:|---:|---:|---:|" + "---:|" * len(poisoned)]
    for s in selections:
        if s.get("channels_pruned") is None:
            lines.append(f"| {s['threshold']:g} | not reached | | | |" + " |" * len(poisoned))
            continue
        metrics = s.get("metrics", {})
        lines.append(
            f"| {s['threshold']:g} | {s['channels_pruned']} | {s['channels_pruned'] / channels:.3f} | "
            f"{s['valid_accuracy']:.2f} | {s['accuracy_drop']:.2f} |"
            + "".join(f" {_fmt(metrics.get(n))} |" for n in poisoned)
        )
    return "\n".join(lines) + "\n"


def models_list(models: Mapping[Any, Mapping[str, Any]]) -> str:
    """A markdown list of the saved models, one line per threshold.

    Args:
        models: X -> format -> path, as :func:`~badnet_repair.workflow.prune.save_lab_models`
            returns them (or ``results["models"]``).
    """
    return "\n".join((f"- X={x:g}: " if isinstance(x, float) else f"- X={x}: ")
                     + ", ".join(f"`{f}`" for f in files.values()) for x, files in models.items()) + "\n"


#: The first line of a report or notebook run on the built-in demo.
DEMO_NOTE = ("This is a demo run on the project's built-in synthetic faces, not on the lab's files. To make your "
             "own: put the lab's model/ and data/ in place and run `badnet-repair report` (README: Handing in).")


def render_report(results: Mapping[str, Any], *, figure: str | None = "pruning_curves.png",
                  title: str = "Lab 2 report: repairing a BadNet with the pruning defense",
                  conclusion: str | None = None) -> str:
    """The markdown report of a pruning-defense run, from its ``results.json`` content.

    Args:
        results: the dict written to ``results.json`` by
            :func:`~badnet_repair.workflow.prune.run_pruning_defense`.
        figure: the curves image path, relative to the report, or None.
        title: the top heading.
        conclusion: the conclusion's text, default generated from the numbers
            (:func:`lab_conclusion`).

    Returns:
        Markdown text.
    """
    p = results["parameters"]
    inputs = results["provenance"]["inputs"]
    lines = [f"# {title}", ""]
    if results.get("demo"):
        lines += [f"> **{DEMO_NOTE}**", ""]
    if results.get("data_source"):
        lines += [f"*Data: {results['data_source']}.*", ""]
    for warning in results.get("warnings", []):
        lines += [f"> **Warning:** {warning}.", ""]
    lines += [
        "## Method",
        "",
        "The pruning defense of Liu, Dolan-Gavitt and Garg (\"Fine-Pruning\", RAID 2018): the "
        f"channels of the convolutional layer `{p['layer']}` are ranked by their mean activation "
        f"on the clean validation data (measured at `{results['measured_at']}`, "
        f"{'descending' if p['descending'] else 'ascending'}), then pruned one at a time "
        "(kernel and bias set to zero). For each X, the repaired model B'_X is the first step "
        "at which validation accuracy is at least X points below the BadNet B's. The GoodNet "
        "G_X outputs B's class where B and B'_X agree and class N "
        f"(= {results['num_classes']}) where they differ.",
        "",
        "## Inputs",
        "",
        "| role | file | images | SHA-256 |",
        "|---|---|---:|---|",
    ]
    for role, info in _in_role_order(inputs):
        n = info.get("images")
        lines.append(f"| {role} | `{info['path']}` | {'' if n is None else n} | `{info['sha256'][:16]}…` |")
    lines += [
        "",
        f"Classes: {results['num_classes']}; attack target: {_fmt(results.get('target'))}; "
        f"thresholds X: {', '.join(f'{x:g}' for x in p['thresholds'])}.",
        "",
        "## The BadNet B",
        "",
        base_table(results),
        "## Stopping points",
        "",
        selection_table(results),
    ]
    sets = results["evaluation_sets"]
    lines += [
        "",
        f"## Results on `{sets['clean']}` (clean) and `{sets['poisoned'] or 'no poisoned set'}` (poisoned)",
        "",
        evaluation_table(results["evaluations"]),
    ]
    if figure:
        lines += ["## Curves", "", f"![Accuracy and attack success rate versus channels pruned]({figure})", ""]
    if results.get("reference"):
        from .reference import reference_table

        lines += ["## The lab's known figures", "", reference_table(results["reference"])]
    lines += ["## Conclusion", "", (lab_conclusion(results) if conclusion is None else conclusion).strip(), ""]
    if results.get("models"):
        lines += ["## Saved models", "", models_list(results["models"])]
    prov = results["provenance"]
    lines += [
        "## Reproduce",
        "",
        f"```\n{results.get('command') or 'badnet-repair prune'}\n```",
        "",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in prov["versions"].items()) + ".",
        "",
    ]
    return "\n".join(lines)


def _loud(line: str) -> str:
    """A loud line as a Markdown quote: a caution (a repair kept on too few held-out images to be
    sure of its budget) as a caution, anything else as a warning."""
    text = line.rstrip(".")
    if text.startswith("CAUTION: "):
        return f"> **Caution:** {text[len('CAUTION: '):]}."
    return f"> **Warning:** {text}."


def append_section(report: str | os.PathLike[str], heading: str, body: str, *,
                   warnings: Sequence[str] = ()) -> Path:
    """Add a section at the end of a written markdown report (a step after the lab's, such as
    the notebook's fine-pruning beyond it), its warnings first and in bold, so the report carries
    them as the notebook does.

    Args:
        report: the report's markdown file (it must exist).
        heading: the section's heading (without ``##``).
        body: its markdown.
        warnings: loud lines (a repair's :attr:`~badnet_repair.defenses.Repair.warnings`).

    Returns:
        The report's path.
    """
    from ..errors import DataError
    from ..formats.files import atomic_path

    path = Path(report)
    if not path.is_file():
        raise DataError(f"{path}: no report to add the section {heading!r} to (write the report first)")
    text = path.read_text().rstrip("\n")
    lines = [text, "", f"## {heading}", ""]
    lines += [line for w in warnings for line in (_loud(w), "")]
    lines += [body.strip(), ""]
    with atomic_path(path, overwrite=True) as tmp:  # the report is being extended, not replaced
        tmp.write_text("\n".join(lines))
    return path


def trigger_response_paths(out_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """{"json", "md", "png"} -> the files :func:`write_trigger_response` writes into ``out_dir``."""
    return {k: Path(out_dir) / f"trigger_response.{k}" for k in ("json", "md", "png")}


def write_trigger_response(response: TriggerResponse, out_dir: str | os.PathLike[str], *,
                           channels_pruned: int | None = None, top: int = 10, title: str | None = None,
                           overwrite: bool = False) -> dict[str, Path]:
    """Write a :class:`TriggerResponse` as ``trigger_response.json``, ``.md`` and ``.png``.

    Args:
        response: from :func:`trigger_response`.
        out_dir: the folder (made if missing).
        channels_pruned: how many channels the defense prunes, default None (not marked).
        top: channels listed in the markdown table, largest rise first, default 10.
        title: the table's and the figure's title, default "Trigger response of <layer>".
        overwrite: replace existing files, default False (an existing one raises
            :class:`~badnet_repair.errors.OutputExistsError` before anything is written).

    Returns:
        {"json", "md", "png"} -> path. The JSON holds every channel (:meth:`TriggerResponse.as_dict`)
        and ``channels_pruned``; the figure is :func:`~badnet_repair.reporting.plotting.plot_trigger_response`.
    """
    from matplotlib.figure import Figure

    from ..formats.files import write_results
    from .plotting import plot_trigger_response

    paths = trigger_response_paths(out_dir)
    k = channels_pruned
    md = [f"# {title or f'Trigger response of {response.layer}'}", "",
          f"The {top} channels of {response.layer} whose mean activation the trigger raises most; place 0 is "
          f"pruned first (least active on clean data)"
          + (f", and the first {k} places are pruned." if k is not None else "."), "",
          "| channel | rise | clean mean | poisoned mean | place in pruning order |"
          + (" pruned |" if k is not None else ""),
          "|---:|---:|---:|---:|---:|" + ("---|" if k is not None else "")]
    for c in response.top(top):
        md.append(f"| {c} | {response.rise[c]:+.3f} | {response.clean_mean[c]:.3f} | "
                  f"{response.poisoned_mean[c]:.3f} | {response.place[c]} |"
                  + ("" if k is None else " yes |" if response.place[c] < k else " no |"))
    fig = Figure(figsize=(8.4, 4.2), layout="constrained", dpi=100)  # the legend sits right of the bars
    plot_trigger_response(response, channels_pruned=channels_pruned, ax=fig.add_subplot(), title=title)
    write_results({paths["json"]: {**response.as_dict(), "channels_pruned": channels_pruned},
                   paths["md"]: "\n".join(md) + "\n", paths["png"]: fig}, overwrite=overwrite)
    return paths
