"""Plots of a pruning sweep and of repaired models. Every function returns the figure and
never calls ``plt.show()``; pass ``ax`` to draw into an existing axes."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..defenses.sweep import SweepResult
from ..metrics import Evaluation
from .analysis import TriggerResponse

__all__ = ["plot_curves", "plot_evaluations", "plot_goodnet_sweep", "plot_samples", "plot_sweep",
           "plot_trigger_response"]

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
