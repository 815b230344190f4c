"""Plots of a pruning sweep and of repaired models. Every function returns the figure and
never calls ``plt.show()``; pass ``ax`` to draw into an existing axes.

The figures are sized to be read where they end up: in the notebook (shown at 80 dpi) and in
``Lab2_report.md`` (saved at the figure's dpi, then scaled to a page's width). Legends sit
outside the axes, and labels of marked steps (the thresholds' B'_X) are stacked above the axes,
one row each, so that neither covers data nor each other.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..defenses.sweep import ChannelRanking, SweepResult
from ..formats.data import Dataset
from ..metrics import Evaluation
from ..nets.models import num_classes, predict_classes
from .analysis import TriggerResponse

__all__ = [
    "plot_cleanse_norms",
    "plot_curves",
    "plot_evaluations",
    "plot_goodnet_decisions",
    "plot_goodnet_sweep",
    "plot_ranking",
    "plot_reversed_triggers",
    "plot_samples",
    "plot_sweep",
    "plot_trigger_response",
    "zoom_steps",
]

_STYLE = {"clean": "-", "poisoned": "--"}
# font sizes (points): readable at the notebook's 80 dpi and in a report scaled to a page
_FONT = {"title": 11, "label": 10, "tick": 9, "legend": 9, "note": 9}
_LEVEL = 1.45 * _FONT["note"]  # points between two stacked step labels
_DPI = 100


def _axes(ax: Any, figsize: tuple[float, float] = (6.4, 4.2)) -> tuple[Any, Any]:
    if ax is not None:
        return ax.figure, ax
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout="constrained", dpi=_DPI)
    return fig, fig.add_subplot()


def _style(ax: Any, *, xlabel: str | None = None, ylabel: str | None = None, title: str | None = None,
           title_pad: float = 6.0) -> None:
    """Axis labels, title and tick labels at the module's font sizes."""
    if xlabel is not None:
        ax.set_xlabel(xlabel, fontsize=_FONT["label"])
    if ylabel is not None:
        ax.set_ylabel(ylabel, fontsize=_FONT["label"])
    if title is not None:
        ax.set_title(title, fontsize=_FONT["title"], pad=title_pad)
    ax.tick_params(labelsize=_FONT["tick"])


def _legend_outside(ax: Any, **kwargs: Any) -> Any:
    """The legend right of the axes, top-aligned: it covers no data."""
    return ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, fontsize=_FONT["legend"],
                     **kwargs)


def _mark_steps(ax: Any, marks: Sequence[tuple[float, str]]) -> float:
    """A dotted line at each x of ``marks`` and its label above the axes.

    Labels are stacked one row each, joined to their line by a dotted leader where not on the
    lowest row. Lines in the axes' left half (on average) get labels that start at the line,
    the leftmost highest; in the right half, labels that end at the line, the rightmost
    highest, so that they stay over the axes. Either way, however close the lines, no two
    labels overlap, no leader crosses a label, and no label covers data.

    Returns:
        The title's pad (points) that clears the labels.
    """
    ordered = sorted(marks, key=lambda m: m[0])
    n = len(ordered)
    lo, hi = ax.get_xlim()
    right = n > 0 and (np.mean([m[0] for m in ordered]) - lo) / ((hi - lo) or 1.0) > 0.5
    for i, (x, text) in enumerate(ordered):
        ax.axvline(x, color="0.35", lw=0.9, ls=":")
        level = i if right else n - 1 - i
        leader = dict(arrowstyle="-", color="0.45", lw=0.8, ls=":", shrinkA=0, shrinkB=0,
                      relpos=(1.0 if right else 0.0, 0.0))
        ax.annotate(text, xy=(x, 1.0), xycoords=("data", "axes fraction"), xytext=(0, 3 + level * _LEVEL),
                    textcoords="offset points", ha="right" if right else "left", va="bottom",
                    fontsize=_FONT["note"], color="0.2", arrowprops=leader if level else None,
                    annotation_clip=False)
    return 6.0 + n * _LEVEL


def _label(sweep: SweepResult, name: str) -> str:
    return f"{name} {'attack success' if sweep.kinds[name] == 'poisoned' else 'accuracy'}"


def zoom_steps(sweep: SweepResult, sets: Sequence[str] | None = None) -> tuple[int, int]:
    """The steps (first, last) where the curves move: the zoomed view of the pruning curves.

    Most channels of a BadNet's last conv layer are dormant on clean data, so nothing moves
    until most are pruned. The view starts a little before the first of: the first threshold's
    selected step, and the first step where a curve of ``sets`` (default all) is a point or more
    from B's value; it ends at the last step (all channels pruned).

    Returns:
        (first step, C), steps counted in channels pruned.
    """
    c = len(sweep.steps) - 1
    starts = [sel.channels_pruned for sel in sweep.selections.values() if sel is not None]
    for name in sets or list(sweep.kinds):
        values = sweep.metric(name)
        moved = np.flatnonzero(np.abs(values - values[0]) >= 1.0)
        if len(moved):
            starts.append(int(moved[0]))
    first = min(starts, default=0)
    margin = max(2, math.ceil(0.25 * (c - first)))
    return max(0, first - margin), c


def _threshold_marks(sweep: SweepResult, lo: int = 0) -> list[tuple[float, str]]:
    """(fraction pruned, "X=2: 45 pruned") for each selected step at or after step ``lo``."""
    c = len(sweep.steps) - 1
    at_step: dict[int, list[float]] = {}
    for x, sel in sweep.selections.items():
        if sel is not None and sel.channels_pruned >= lo:
            at_step.setdefault(sel.channels_pruned, []).append(x)
    return [(k / c, "X=" + ", ".join(f"{x:g}" for x in sorted(xs)) + f": {k} pruned")
            for k, xs in sorted(at_step.items())]


def _finish_sweep_axes(sweep: SweepResult, ax: Any, sets: Sequence[str], *, title: str, ylabel: str,
                       zoom: bool, legend: bool) -> None:
    """Axes limits, thresholds marked, labels, grid and the legend outside."""
    c = len(sweep.steps) - 1
    lo = zoom_steps(sweep, sets)[0] if zoom else 0
    ax.set(xlim=(lo / c, 1.0), ylim=(-2, 102), yticks=range(0, 101, 20))
    ax.grid(alpha=0.3)
    pad = _mark_steps(ax, _threshold_marks(sweep, lo))
    if zoom:
        title = f"{title}, zoom: {lo} to {c} channels pruned"
    _style(ax, xlabel=f"fraction of {sweep.layer}'s {c} channels pruned", ylabel=ylabel, title=title,
           title_pad=pad)
    if legend:
        _legend_outside(ax)


def plot_sweep(sweep: SweepResult, *, ax: Any = None, sets: Sequence[str] | None = None, zoom: bool = False,
               legend: bool = True) -> Any:
    """Accuracy and attack success rate of B' versus the fraction of channels pruned.

    Clean sets are solid lines, poisoned sets dashed; each threshold's B'_X is marked, its label
    above the axes.

    Args:
        sweep: the sweep result.
        ax: matplotlib axes to draw into, default a new figure.
        sets: which sets to draw, default all.
        zoom: show only the steps where the curves move (:func:`zoom_steps`), default False.
        legend: draw the legend (right of the axes), default True.

    Returns:
        The matplotlib Figure.
    """
    fig, ax = _axes(ax, (8.0, 4.4))
    frac = np.array([s.fraction_pruned for s in sweep.steps])
    names = list(sets or sweep.kinds)
    for name in names:
        ax.plot(frac, sweep.metric(name), _STYLE[sweep.kinds[name]], label=_label(sweep, name))
    _finish_sweep_axes(sweep, ax, names, title="Pruned model B'", ylabel="accuracy / attack success (%)", zoom=zoom,
                       legend=legend)
    return fig


def plot_goodnet_sweep(sweep: SweepResult, *, ax: Any = None, sets: Sequence[str] | None = None,
                       zoom: bool = False, legend: bool = True) -> Any:
    """The GoodNet G's accuracy, attack success and alarm rates versus fraction pruned.

    Args:
        sweep: the sweep result.
        ax: matplotlib axes to draw into, default a new figure.
        sets: which sets to draw, default all.
        zoom: show only the steps where the curves move (:func:`zoom_steps`), default False.
        legend: draw the legend (right of the axes), default True.

    Returns:
        The matplotlib Figure.
    """
    fig, ax = _axes(ax, (8.4, 4.4))
    frac = np.array([s.fraction_pruned for s in sweep.steps])
    names = list(sets or sweep.kinds)
    for name in names:
        kind = sweep.kinds[name]
        ax.plot(frac, sweep.goodnet_metric(name), _STYLE[kind], label=f"G {_label(sweep, name)}")
        alarm = "detection" if kind == "poisoned" else "false alarm"
        ax.plot(frac, sweep.goodnet_metric(name, what="alarm"), _STYLE[kind], alpha=0.6,
                lw=1, label=f"G {name} {alarm}")
    _finish_sweep_axes(sweep, ax, names, title="GoodNet G (B, B' disagree: class N)",
                       ylabel="G's accuracy / attack success / alarms (%)", zoom=zoom, legend=legend)
    return fig


def plot_curves(sweep: SweepResult, *, goodnet_sets: Sequence[str] | None = None, zoom: bool = True) -> Any:
    """The pruning curves: B' on every set (top row) and G on ``goodnet_sets`` (bottom row).

    Each row has the full sweep (left, the zoomed steps shaded) and, where ``zoom`` (the
    default), the steps where the curves move (right, :func:`zoom_steps`), with the row's
    legend right of it. ``goodnet_sets`` defaults to the test sets if the sweep has them
    (names containing ``"test"``), else all sets.

    Returns:
        The matplotlib Figure (110 dpi).
    """
    from matplotlib.figure import Figure

    chosen = list(goodnet_sets or [n for n in sweep.kinds if "test" in n] or list(sweep.kinds))
    c = len(sweep.steps) - 1
    if not zoom:
        fig = Figure(figsize=(13.0, 4.6), layout="constrained", dpi=110)
        left, right = fig.subplots(1, 2)
        plot_sweep(sweep, ax=left)
        plot_goodnet_sweep(sweep, ax=right, sets=chosen)
        return fig
    fig = Figure(figsize=(11.0, 7.8), layout="constrained", dpi=110)
    axes = fig.subplots(2, 2, width_ratios=(1.0, 1.45))
    for row, draw, names in ((axes[0], plot_sweep, list(sweep.kinds)), (axes[1], plot_goodnet_sweep, chosen)):
        draw(sweep, ax=row[0], sets=names, legend=False)
        draw(sweep, ax=row[1], sets=names, zoom=True)
        lo = zoom_steps(sweep, names)[0]
        if lo > 0:
            row[0].axvspan(lo / c, 1.0, color="0.5", alpha=0.1, lw=0)
    return fig


def plot_evaluations(evaluations: Sequence[Evaluation], *, ax: Any = None) -> Any:
    """Grouped bars of clean accuracy and attack success rate for each model, each bar's value
    above it and the legend right of the axes.

    Returns:
        The matplotlib Figure.
    """
    fig, ax = _axes(ax, (max(7.0, 0.9 * len(evaluations) + 3.2), 4.4))
    names = [e.model for e in evaluations]
    pos = np.arange(len(names))
    acc = [np.nan if e.clean_accuracy is None else e.clean_accuracy for e in evaluations]
    asr = [np.nan if e.attack_success_rate is None else e.attack_success_rate for e in evaluations]
    for offset, values, label, color in ((-0.2, acc, "clean accuracy", "tab:blue"),
                                         (0.2, asr, "attack success rate", "tab:orange")):
        bars = ax.bar(pos + offset, values, 0.4, label=label, color=color)
        ax.bar_label(bars, labels=["" if np.isnan(v) else f"{v:.0f}" for v in values], fontsize=8, padding=1)
    ax.set_xticks(pos, names, rotation=30, ha="right", rotation_mode="anchor")
    ax.set(ylim=(0, 112), yticks=range(0, 101, 20))
    ax.grid(axis="y", alpha=0.3)
    _style(ax, ylabel="clean accuracy / attack success (%)")
    _legend_outside(ax)
    return fig


def plot_trigger_response(response: TriggerResponse, *, channels_pruned: int | None = None, ax: Any = None,
                          title: str | None = None) -> Any:
    """The trigger's rise of each channel's mean activation, channels in pruning order.

    Bars left of the line are the ``channels_pruned`` channels the pruning defense removes
    (grey); a tall (red) bar right of it is backdoor that pruning leaves for fine-tuning to
    unlearn. The legend, right of the axes, says which is which.

    Args:
        response: from :func:`~badnet_repair.reporting.analysis.trigger_response`.
        channels_pruned: how many channels the defense pruned (drawn as a line), default none.
        ax: matplotlib axes to draw into, default a new figure.
        title: default "Trigger response of <layer>".

    Returns:
        The matplotlib Figure.
    """
    from matplotlib.patches import Patch

    fig, ax = _axes(ax, (8.4, 4.2))
    order = np.argsort(response.place)
    rise = response.rise[order]
    n = len(order)
    k = n if channels_pruned is None else channels_pruned
    colors = ["tab:grey" if channels_pruned is not None and i < k else "tab:red" for i in range(n)]
    ax.bar(np.arange(n), rise, color=colors)
    pad = 6.0
    if channels_pruned is None:
        handles = [Patch(color="tab:red", label="a channel's rise")]
    else:
        pad = _mark_steps(ax, [(k - 0.5, f"{k} pruned")])
        handles = [Patch(color="tab:grey", label=f"pruned by the defense ({k})"),
                   Patch(color="tab:red", label=f"kept ({n - k})")]
    ax.grid(axis="y", alpha=0.3)
    _style(ax, xlabel=f"{response.layer}'s {n} channels in pruning order (least active on clean data first)",
           ylabel="mean activation: triggered - clean", title=title or f"Trigger response of {response.layer}",
           title_pad=pad)
    _legend_outside(ax, handles=handles)
    return fig


def plot_samples(
    images: np.ndarray,
    labels: Sequence[Any],
    *,
    ncols: int = 5,
    title: str | None = None,
    fig: Any = None,
) -> Any:
    """A grid of (n, H, W, 3) 0..255 images with a caption each.

    Returns:
        The matplotlib Figure.
    """
    from matplotlib.figure import Figure

    n = len(images)
    nrows = max(1, -(-n // ncols))
    if fig is None:
        fig = Figure(figsize=(1.6 * ncols, 2.0 * nrows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrows, ncols)).reshape(-1)
    for i, ax in enumerate(axes):
        ax.axis("off")
        if i < n:
            ax.imshow(np.clip(images[i], 0, 255).astype(np.uint8))
            ax.set_title(str(labels[i]), fontsize=8)
    if title:
        fig.suptitle(title)
    return fig


def plot_ranking(ranking: ChannelRanking, *, selections: Any = None, ax: Any = None, title: str | None = None) -> Any:
    """The channels' mean activation on clean data, sorted in pruning order.

    The pruning defense removes channels from the left: those clean inputs use least. Where
    ``selections`` is given (a sweep's ``selections``: X -> Selection), a dotted line marks
    how many channels each B'_X prunes.

    Args:
        ranking: from :func:`~badnet_repair.defenses.sweep.rank_channels` (C channels).
        selections: optional X -> Selection (or None where X was not reached).
        ax: matplotlib axes to draw into, default a new figure.
        title: default "Mean activation of <layer>'s channels on clean data".

    Returns:
        The matplotlib Figure.
    """
    fig, ax = _axes(ax, (7.2, 4.2))
    values = np.asarray(ranking.mean_activation)[ranking.order]
    ax.bar(np.arange(len(values)), values, color="tab:blue", width=0.85)
    at_step: dict[int, list[float]] = {}
    for x, sel in (selections or {}).items():
        if sel is not None:
            at_step.setdefault(sel.channels_pruned, []).append(x)
    pad = _mark_steps(ax, [(k - 0.5, "X=" + ", ".join(f"{x:g}" for x in sorted(xs)) + f": {k} pruned")
                           for k, xs in sorted(at_step.items())]) if at_step else 6.0
    ax.grid(axis="y", alpha=0.3)
    _style(ax, xlabel=f"{ranking.layer}'s {len(values)} channels in pruning order",
           ylabel=f"mean activation at {ranking.measured_at}",
           title=title or f"Mean activation of {ranking.layer}'s channels on clean data", title_pad=pad)
    return fig


def plot_goodnet_decisions(goodnet: Any, clean: Dataset, poisoned: Dataset | None = None, *, n: int = 5,
                           title: str | None = None) -> Any:
    """G's decision on the first ``n`` clean and ``n`` poisoned images, with B's and B''s classes.

    Each caption gives the label, what B and B' (G's two halves, where G is the lab's GoodNet
    of :func:`~badnet_repair.detectors.goodnet.build_goodnet`) answer, and G's output: B's
    class where they agree, ``N`` (the alarm class) where they differ. Green: G is right (the
    label on a clean image, the alarm on a poisoned one); red: it is not.

    Args:
        goodnet: G, (M, H, W, C) -> (M, N+1) probabilities.
        clean: clean images and labels.
        poisoned: poisoned images, optional.
        n: images per row, default 5.
        title: the figure's title, optional.

    Returns:
        The matplotlib Figure.
    """
    from matplotlib.figure import Figure

    alarm = num_classes(goodnet) - 1
    halves = {lyr.name: lyr for lyr in goodnet.layers}
    rows = [("clean", clean.x[:n], clean.y[:n])]
    if poisoned is not None:
        rows.append(("poisoned", poisoned.x[:n], poisoned.y[:n]))
    fig = Figure(figsize=(1.9 * n, 2.45 * len(rows)), layout="constrained", dpi=_DPI)
    axes = np.atleast_2d(fig.subplots(len(rows), n))
    for r, (kind, x, y) in enumerate(rows):
        g = predict_classes(goodnet, x)
        b = predict_classes(halves["badnet"], x) if "badnet" in halves else None
        b2 = predict_classes(halves["repaired"], x) if "repaired" in halves else None
        for i, ax in enumerate(axes[r]):
            ax.axis("off")
            if i >= len(x):
                continue
            ax.imshow(np.clip(x[i], 0, 255).astype(np.uint8))
            out = "N (alarm)" if g[i] == alarm else str(int(g[i]))
            right = g[i] == alarm if kind == "poisoned" else g[i] == y[i]
            head = f"{kind}, label {int(y[i])}" if kind == "clean" else f"poisoned (target {int(y[i])})"
            parts = [head] + ([f"B {int(b[i])}, B' {int(b2[i])}"] if b is not None and b2 is not None else [])
            ax.set_title("\n".join([*parts, f"G: {out}"]), fontsize=8, color="tab:green" if right else "tab:red")
    if title:
        fig.suptitle(title, fontsize=9)
    return fig


def plot_cleanse_norms(scan: Any, *, ax: Any = None, title: str | None = None) -> Any:
    """A Neural Cleanse scan's mask norms: every class's screened norm (grey), each fully
    optimised class's norm (reference classes open, candidates filled, flagged red), and the
    flagging line, the norm whose anomaly index is the threshold.

    Args:
        scan: a :class:`~badnet_repair.detectors.neural_cleanse.CleanseScan`.
        ax: axes to draw into, default a new figure's.
        title: default "Neural Cleanse: reversed-trigger norms".

    Returns:
        The matplotlib Figure.
    """
    fig, ax = _axes(ax, (8.6, 4.2))
    k = len(scan.norms)
    if scan.screened:
        reached = (np.ones(k, bool) if getattr(scan, "screen_reached", None) is None
                   else np.asarray(scan.screen_reached, bool))
        # classes the label pre-selection left out were never screened: no norm to draw
        screened = np.isfinite(np.asarray(scan.screen_norms, np.float64))
        found = np.flatnonzero(reached & screened)
        left_out = int((~screened).sum())
        ax.scatter(found, scan.screen_norms[found], s=6, color="0.75",
                   label="screen (all classes)" if not left_out else f"screen ({int(screened.sum())} pre-selected)")
        missed = ~reached & screened
        if missed.any():
            top = float(np.max(scan.screen_norms[found])) if len(found) else float(np.nanmax(scan.norms))
            ax.scatter(np.flatnonzero(missed), np.full(int(missed.sum()), top * 1.05), s=6, marker="x",
                       color="0.6", label="screen: no trigger reached success")
    refs = np.asarray(scan.reference, np.int64)
    cands = np.asarray([c for c in scan.candidates if c not in scan.flagged], np.int64)
    flagged = np.asarray(scan.flagged, np.int64)
    ax.scatter(refs, scan.norms[refs], s=22, facecolors="none", edgecolors="tab:blue", label="reference, optimised")
    if len(cands):
        ax.scatter(cands, scan.norms[cands], s=22, color="tab:blue", label="candidate, optimised")
    if len(flagged):
        ax.scatter(flagged, scan.norms[flagged], s=40, color="tab:red", zorder=3, label="flagged")
        for c in flagged:
            ax.annotate(f"class {c}", (c, scan.norms[c]), textcoords="offset points", xytext=(5, 5), fontsize=8,
                        color="tab:red")
    ref_norms = scan.norms[refs]
    med = float(np.median(ref_norms))
    mad = 1.4826 * float(np.median(np.abs(ref_norms - med)))
    threshold = float(scan.settings.get("anomaly_threshold", 2.0))
    ax.axhline(med, color="0.4", lw=0.8, ls=":", label="median (reference)")
    ax.axhline(med - threshold * mad, color="tab:red", lw=0.8, ls="--", label=f"anomaly index {threshold:g}")
    ax.set_ylim(bottom=0)
    _style(ax, xlabel="class", ylabel="mask L1 norm (pixels)", title=title or "Neural Cleanse: reversed-trigger norms")
    _legend_outside(ax)
    return fig


def plot_reversed_triggers(scan: Any, image: np.ndarray, *, classes: Sequence[int] | None = None,
                           title: str | None = None, max_rows: int = 6) -> Any:
    """Each reversed trigger as images: its mask, its pattern where the mask is, and a clean
    image stamped with it.

    Args:
        scan: a :class:`~badnet_repair.detectors.neural_cleanse.CleanseScan`.
        image: one clean (H, W, C) image, 0..255.
        classes: the classes to show, default the flagged ones (the smallest-norm class where
            none is flagged).
        title: the figure's title, optional.
        max_rows: at most this many classes, the first ones, default 6.

    Returns:
        The matplotlib Figure, one row per class.
    """
    from matplotlib.figure import Figure

    if classes is None:
        classes = list(scan.flagged) or [min(scan.triggers, key=lambda c: scan.norms[c])]
    rows = [scan.triggers[int(c)] for c in list(classes)[:max_rows]]
    fig = Figure(figsize=(5.4, 2.0 * len(rows) + (0.3 if title else 0.0)), layout="constrained")
    axes = np.atleast_2d(fig.subplots(len(rows), 3))
    for row, t in zip(axes, rows, strict=False):
        m = t.mask[..., None]
        shown = (
            (t.mask, f"class {t.target}: mask\nL1 {t.norm:.0f}", "gray"),
            (np.clip(m * t.pattern + (1 - m) * 255.0, 0, 255).astype(np.uint8), "pattern x mask", None),
            (np.clip(t.apply(image[None])[0], 0, 255).astype(np.uint8),
             f"stamped: {t.attack_success:.0f} % to {t.target}", None),
        )
        for ax, (img, caption, cmap) in zip(row, shown, strict=False):
            ax.imshow(img, cmap=cmap, vmin=0 if cmap else None, vmax=1 if cmap else None)
            ax.set_title(caption, fontsize=8)
            ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    return fig
