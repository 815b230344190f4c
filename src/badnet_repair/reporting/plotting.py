"""Plots of a pruning sweep and of repaired models. Every function returns the figure and
never calls ``plt.show()``; pass ``ax`` to draw into an existing axes."""

from __future__ import annotations

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
]

_STYLE = {"clean": "-", "poisoned": "--"}


def _axes(ax: Any, figsize: tuple[float, float] = (6.4, 4.2)) -> tuple[Any, Any]:
    if ax is not None:
        return ax.figure, ax
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout="constrained")
    return fig, fig.add_subplot()


def _label(sweep: SweepResult, name: str) -> str:
    return f"{name} {'attack success' if sweep.kinds[name] == 'poisoned' else 'accuracy'}"


def _finish_sweep_axes(sweep: SweepResult, ax: Any, *, title: str, fontsize: int, loc: str) -> None:
    """Thresholds marked, percentage axes over the fraction pruned, grid and legend."""
    _mark_thresholds(sweep, ax)
    ax.set(xlabel=f"fraction of {sweep.layer} channels pruned", ylabel="%", ylim=(-2, 102), xlim=(0, 1),
           title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=fontsize, loc=loc)


def _mark_thresholds(sweep: SweepResult, ax: Any) -> None:
    c = len(sweep.steps) - 1
    at_step: dict[int, list[float]] = {}
    for x, sel in sweep.selections.items():
        if sel is not None:
            at_step.setdefault(sel.channels_pruned, []).append(x)
    for k, xs in sorted(at_step.items()):
        ax.axvline(k / c, color="grey", lw=0.8, ls=":")
        ax.annotate("X=" + ", ".join(f"{x:g}" for x in xs), (k / c, 2), rotation=90, fontsize=8,
                    color="dimgrey", ha="right", va="bottom")


def plot_sweep(sweep: SweepResult, *, ax: Any = None, sets: Sequence[str] | None = None) -> Any:
    """Accuracy and attack success rate of B' versus the fraction of channels pruned.

    Clean sets are solid lines, poisoned sets dashed; each threshold's B'_X is marked.

    Args:
        sweep: the sweep result.
        ax: matplotlib axes to draw into, default a new figure.
        sets: which sets to draw, default all.

    Returns:
        The matplotlib Figure.
    """
    fig, ax = _axes(ax)
    frac = np.array([s.fraction_pruned for s in sweep.steps])
    for name in sets or list(sweep.kinds):
        ax.plot(frac, sweep.metric(name), _STYLE[sweep.kinds[name]], label=_label(sweep, name))
    _finish_sweep_axes(sweep, ax, title="Pruned model B'", fontsize=8, loc="lower left")
    return fig


def plot_goodnet_sweep(sweep: SweepResult, *, ax: Any = None, sets: Sequence[str] | None = None) -> Any:
    """The GoodNet G's accuracy, attack success and alarm rates versus fraction pruned.

    Returns:
        The matplotlib Figure.
    """
    fig, ax = _axes(ax)
    frac = np.array([s.fraction_pruned for s in sweep.steps])
    for name in sets or list(sweep.kinds):
        kind = sweep.kinds[name]
        ax.plot(frac, sweep.goodnet_metric(name), _STYLE[kind], label=f"G {_label(sweep, name)}")
        alarm = "detection" if kind == "poisoned" else "false alarm"
        ax.plot(frac, sweep.goodnet_metric(name, what="alarm"), _STYLE[kind], alpha=0.6,
                lw=1, label=f"G {name} {alarm}")
    _finish_sweep_axes(sweep, ax, title="GoodNet G (B and B' disagree -> class N)", fontsize=7, loc="center left")
    return fig


def plot_curves(sweep: SweepResult, *, goodnet_sets: Sequence[str] | None = None) -> Any:
    """Both panels side by side: B' curves on every set, G curves on ``goodnet_sets``.

    ``goodnet_sets`` defaults to the test sets if the sweep has them (names containing
    ``"test"``), else all sets.
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 4.4), layout="constrained")
    left, right = fig.subplots(1, 2)
    plot_sweep(sweep, ax=left)
    chosen = goodnet_sets or [n for n in sweep.kinds if "test" in n] or list(sweep.kinds)
    plot_goodnet_sweep(sweep, ax=right, sets=chosen)
    return fig


def plot_evaluations(evaluations: Sequence[Evaluation], *, ax: Any = None) -> Any:
    """Grouped bars of clean accuracy and attack success rate for each model.

    Returns:
        The matplotlib Figure.
    """
    fig, ax = _axes(ax, (max(6.4, 0.9 * len(evaluations) + 2), 4.2))
    names = [e.model for e in evaluations]
    pos = np.arange(len(names))
    acc = [np.nan if e.clean_accuracy is None else e.clean_accuracy for e in evaluations]
    asr = [np.nan if e.attack_success_rate is None else e.attack_success_rate for e in evaluations]
    ax.bar(pos - 0.2, acc, 0.4, label="clean accuracy")
    ax.bar(pos + 0.2, asr, 0.4, label="attack success rate")
    ax.set_xticks(pos, names, rotation=30, ha="right", fontsize=8)
    ax.set(ylabel="%", ylim=(0, 105))
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def plot_trigger_response(response: TriggerResponse, *, channels_pruned: int | None = None, ax: Any = None,
                          title: str | None = None) -> Any:
    """The trigger's rise of each channel's mean activation, channels in pruning order.

    Bars left of the line are the ``channels_pruned`` channels the pruning defense removes;
    a tall bar right of it is backdoor that pruning leaves for fine-tuning to unlearn.

    Args:
        response: from :func:`~badnet_repair.reporting.analysis.trigger_response`.
        channels_pruned: how many channels the defense pruned (drawn as a line), default none.
        ax: matplotlib axes to draw into, default a new figure.
        title: default "Trigger response of <layer>".

    Returns:
        The matplotlib Figure.
    """
    fig, ax = _axes(ax)
    order = np.argsort(response.place)
    rise = response.rise[order]
    k = len(order) if channels_pruned is None else channels_pruned
    colors = ["tab:grey" if channels_pruned is not None and i < k else "tab:red" for i in range(len(order))]
    ax.bar(np.arange(len(order)), rise, color=colors)
    if channels_pruned is not None:
        ax.axvline(k - 0.5, color="black", lw=0.8, ls=":")
        ax.annotate(f"{k} pruned", (k - 0.5, 0.95), xycoords=("data", "axes fraction"), ha="right",
                    fontsize=8)
    ax.set(xlabel=f"{response.layer} channels in pruning order (least active on clean data first)",
           ylabel="mean activation: triggered - clean", title=title or f"Trigger response of {response.layer}")
    ax.grid(axis="y", alpha=0.3)
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
    fig, ax = _axes(ax)
    values = np.asarray(ranking.mean_activation)[ranking.order]
    ax.bar(np.arange(len(values)), values, color="tab:blue", width=0.85)
    for x, sel in (selections or {}).items():
        if sel is not None:
            k = sel.channels_pruned
            ax.axvline(k - 0.5, color="black", lw=0.8, ls=":")
            ax.annotate(f"X={x:g}: {k}", (k - 0.5, 0.97), xycoords=("data", "axes fraction"), ha="right",
                        va="top", fontsize=7, rotation=90)
    ax.set(xlabel=f"{ranking.layer} channels in pruning order", ylabel=f"mean activation at {ranking.measured_at}",
           title=title or f"Mean activation of {ranking.layer}'s channels on clean data")
    ax.grid(axis="y", alpha=0.3)
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
    fig = Figure(figsize=(1.75 * n, 2.35 * len(rows)), layout="constrained")
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
            ax.set_title("\n".join([*parts, f"G: {out}"]), fontsize=7, color="tab:green" if right else "tab:red")
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
    fig, ax = _axes(ax, (7.0, 4.0))
    k = len(scan.norms)
    if scan.screened:
        reached = (np.ones(k, bool) if getattr(scan, "screen_reached", None) is None
                   else np.asarray(scan.screen_reached, bool))
        found = np.flatnonzero(reached)
        ax.scatter(found, scan.screen_norms[found], s=6, color="0.75", label="screen (all classes)")
        if (~reached).any():
            top = float(np.max(scan.screen_norms[found])) if len(found) else float(np.max(scan.norms))
            ax.scatter(np.flatnonzero(~reached), np.full(int((~reached).sum()), top * 1.05), s=6, marker="x",
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
    ax.set(xlabel="class", ylabel="mask L1 norm (pixels)", title=title or "Neural Cleanse: reversed-trigger norms")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=7, loc="upper right")
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
