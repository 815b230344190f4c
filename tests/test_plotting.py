"""The figures read well: labels say what and in which unit, marked steps' labels do not
overlap, legends cover no bars, the zoomed view is where the curves move."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

import badnet_repair as br
from badnet_repair.defenses.sweep import SweepStep, select_threshold
from badnet_repair.reporting.plotting import zoom_steps

C = 60
# validation accuracy drop (points) from step 41 on: X = 2, 4, 10 first reached at steps 45, 48, 52
LAB_DROPS = dict(zip(range(41, 61), [0.3, 0.6, 1.0, 1.5, 2.1, 2.6, 3.3, 4.2, 5.5, 7.0, 8.8, 10.3, 15, 25, 40,
                                     55, 70, 82, 90, 95], strict=True))
# attack success from step 51 on (100 before)
LAB_ASR = dict(zip(range(51, 61), [92, 77, 55, 30, 12, 5, 3, 1, 0.5, 0.2], strict=True))


def _predictions(percent_right: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """(C+1, n) predictions right on the first round(percent * n / 100) images at each step."""
    n = len(labels)
    wrong = (labels + 1) % k
    out = np.empty((len(percent_right), n), np.int32)
    for s, p in enumerate(percent_right):
        m = round(p * n / 100)
        out[s] = np.where(np.arange(n) < m, labels, wrong)
    return out


def lab_like_sweep(drops: dict[int, float] | None = None, asr: dict[int, float] | None = None,
                   thresholds: tuple[float, ...] = (2.0, 4.0, 10.0), n: int = 1000) -> br.SweepResult:
    """A sweep shaped like the lab's: 60 channels of conv_3, 33 dormant, valid accuracy 98.6
    until ~40 pruned, attack success 100 until ~50; X = 2, 4, 10 select steps 45, 48, 52."""
    drops = LAB_DROPS if drops is None else drops
    asr = LAB_ASR if asr is None else asr
    k = 10
    rng = np.random.default_rng(0)
    acc = np.array([98.6 - drops.get(s, 0.0) for s in range(C + 1)])
    att = np.array([asr.get(s, 100.0) for s in range(C + 1)])
    sets = {"valid": ("clean", acc), "test": ("clean", np.clip(acc - 0.4, 0, 100)),
            "bd_valid": ("poisoned", att), "bd_test": ("poisoned", np.clip(att - 0.3, 0, 100))}
    labels = {name: (rng.integers(0, k, n) if kind == "clean" else np.zeros(n, np.int64)).astype(np.int64)
              for name, (kind, _) in sets.items()}
    preds = {name: _predictions(v, labels[name], k) for name, (_, v) in sets.items()}
    mean = np.concatenate([np.zeros(33), np.linspace(0.1, 5.0, C - 33)])
    order = np.argsort(mean, kind="stable")
    ranking = br.ChannelRanking(layer="conv_3", measured_at="pool_3", mean_activation=mean, order=order)
    steps = tuple(SweepStep(channels_pruned=s, channel=None if s == 0 else int(order[s - 1]), fraction_pruned=s / C,
                            metrics={name: 100.0 * float(np.mean(preds[name][s] == labels[name])) for name in sets})
                  for s in range(C + 1))
    selections = {x: select_threshold(preds["valid"], labels["valid"], order, x) for x in thresholds}
    return br.SweepResult(ranking=ranking, valid_set="valid", kinds={n: kind for n, (kind, _) in sets.items()},
                          steps=steps, predictions=preds, labels=labels, num_classes=k, selections=selections)


def drawn(fig):
    """Draw ``fig`` on an Agg canvas; return its renderer."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    fig.canvas.draw()
    return fig.canvas.get_renderer()


def overlap(a, b) -> bool:
    """Bounding boxes overlap (sharing an edge does not count)."""
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def step_labels(ax):
    return [t for t in ax.texts if t.get_text().startswith(("X=",)) or t.get_text().endswith(" pruned")]


def text_box(t, r):
    """The rendered box of an annotation's text alone (not its leader line)."""
    from matplotlib.text import Text

    return Text.get_window_extent(t, r)


def leader_box(t, r):
    return None if t.arrow_patch is None else t.arrow_patch.get_window_extent(r)


def test_the_lab_like_sweep_selects_steps_45_48_52():
    s = lab_like_sweep()
    assert {x: sel.channels_pruned for x, sel in s.selections.items()} == {2.0: 45, 4.0: 48, 10.0: 52}
    assert s.metric("valid")[40] == pytest.approx(98.6) and s.metric("bd_valid")[52] == pytest.approx(77)


def test_curves_say_what_they_show_and_in_which_unit():
    fig = br.plot_curves(lab_like_sweep())
    assert len(fig.axes) == 4
    for ax in fig.axes:
        assert "%" in ax.get_ylabel() and "accuracy" in ax.get_ylabel() and "attack success" in ax.get_ylabel()
        assert ax.get_ylabel().strip() != "%"
        assert "fraction" in ax.get_xlabel() and "60 channels pruned" in ax.get_xlabel()
    assert "alarm" in fig.axes[2].get_ylabel()


@pytest.mark.parametrize("drops", [None, {50: 2.5, 51: 5.0, 52: 12.0}, {59: 2.5, 60: 12.0}],
                         ids=["lab", "adjacent-steps", "last-steps"])
def test_threshold_labels_overlap_nothing(drops):
    sweep = lab_like_sweep(drops)
    fig = br.plot_curves(sweep)
    r = drawn(fig)
    texts = []
    for ax in fig.axes:
        labels = step_labels(ax)
        selected = {sel.channels_pruned for sel in sweep.selections.values() if sel is not None}
        assert len(labels) == len(selected)
        boxes = [text_box(t, r) for t in labels]
        for a, b in itertools.combinations(boxes, 2):
            assert not overlap(a, b)
        for t in labels:  # a leader joins its label to its line and crosses no other label
            leader = leader_box(t, r)
            if leader is not None:
                assert leader.height > 0
                assert all(not overlap(leader, b)
                           for u, b in zip(labels, boxes, strict=True) if u is not t)
        frame = ax.get_window_extent(r)
        for t, box in zip(labels, boxes, strict=True):
            assert box.y0 >= frame.y1  # above the axes: covers no curve
            assert not overlap(box, ax.title.get_window_extent(r)), t.get_text()
            for other in fig.axes:
                if other is not ax:
                    assert not overlap(box, other.get_window_extent(r))
        texts += boxes
    assert texts


def test_threshold_labels_name_x_and_the_channels_pruned():
    fig = br.plot_curves(lab_like_sweep())
    assert sorted(t.get_text() for t in step_labels(fig.axes[0])) == [
        "X=10: 52 pruned", "X=2: 45 pruned", "X=4: 48 pruned"]


def test_zoom_panel_covers_the_steps_where_the_curves_move():
    sweep = lab_like_sweep()
    fig = br.plot_curves(sweep)
    full_b, zoom_b, full_g, zoom_g = fig.axes
    assert full_b.get_xlim() == pytest.approx((0, 1)) and full_g.get_xlim() == pytest.approx((0, 1))
    first, last = zoom_steps(sweep)
    assert last == C and 36 <= first <= 43  # a little before the curves move (step 41) and X=2's step 45
    for ax in (zoom_b, zoom_g):
        lo, hi = ax.get_xlim()
        assert hi == pytest.approx(1.0)
        assert lo * C == pytest.approx(first)
        assert "zoom" in ax.get_title() and f"{first} to 60" in ax.get_title()
    # without a threshold reached and nothing moving, the zoom starts where a curve first moves
    late = lab_like_sweep({58: 1.5, 59: 1.5, 60: 1.5}, {}, thresholds=(2.0,))
    assert late.selections[2.0] is None
    assert zoom_steps(late) == (56, 60)


def test_curves_legends_exist_outside_the_axes_with_every_line():
    fig = br.plot_curves(lab_like_sweep())
    r = drawn(fig)
    legends = [ax.get_legend() for ax in fig.axes]
    assert legends[0] is None and legends[2] is None  # full views share their row's legend
    for ax, legend in ((fig.axes[1], legends[1]), (fig.axes[3], legends[3])):
        assert legend is not None
        assert len(legend.get_texts()) == len(ax.get_lines()) - len(step_labels(ax))  # minus the X lines
        for other in fig.axes:
            assert not overlap(legend.get_window_extent(r), other.get_window_extent(r))


def test_curves_are_sized_to_read():
    fig = br.plot_curves(lab_like_sweep())
    drawn(fig)
    sizes = {t.get_fontsize() for ax in fig.axes for t in
             [ax.xaxis.label, ax.yaxis.label, ax.title, *ax.get_xticklabels(), *ax.get_yticklabels(), *ax.texts]}
    sizes |= {t.get_fontsize() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()}
    assert min(sizes) >= 9
    assert fig.get_dpi() >= 100 and fig.get_figwidth() <= 12  # scaled to a page, fonts stay >= ~10 px


@pytest.mark.parametrize("plot", ["sweep", "goodnet"])
def test_single_panels_draw_into_the_given_axes_and_zoom(plot):
    from matplotlib.figure import Figure

    sweep = lab_like_sweep()
    fig = Figure()
    ax = fig.add_subplot()
    draw = br.plot_sweep if plot == "sweep" else br.plot_goodnet_sweep
    assert draw(sweep, ax=ax, zoom=True) is fig
    assert ax.get_xlim()[0] * C == pytest.approx(zoom_steps(sweep)[0])
    assert ax.get_legend() is not None


def evaluations():
    return [br.Evaluation("B", "badnet", 98.6, 100.0), br.Evaluation("B'_2", "repaired", 96.5, 100.0),
            br.Evaluation("B'_4", "repaired", 94.4, 100.0), br.Evaluation("B'_10", "repaired", 88.3, 77.0),
            br.Evaluation("fine-pruned", "repaired", 97.9, 0.4), br.Evaluation("no poisoned set", "x", 99.0, None)]


def test_comparison_bars_legend_covers_no_bar():
    from matplotlib.figure import Figure

    # as compare.write_comparison draws it: one axes per BadNet, the title set afterwards
    fig = Figure(figsize=(7.0, 7.6), layout="constrained")
    axes = fig.subplots(2, 1)
    for ax in axes:
        assert br.plot_evaluations(evaluations(), ax=ax) is fig
        ax.set_title("a BadNet")
    r = drawn(fig)
    for ax in axes:
        legend = ax.get_legend()
        assert legend is not None and [t.get_text() for t in legend.get_texts()] == [
            "clean accuracy", "attack success rate"]
        box = legend.get_window_extent(r)
        assert ax.patches and all(not overlap(box, bar.get_window_extent(r)) for bar in ax.patches)
        assert not overlap(box, ax.title.get_window_extent(r))
        assert "accuracy" in ax.get_ylabel() and "attack success" in ax.get_ylabel() and "%" in ax.get_ylabel()
    values = [t.get_text() for t in axes[0].texts]
    assert "99" in values and "77" in values and "nan" not in values  # each bar's value, none for a missing one


def test_trigger_response_bars_have_a_legend_that_covers_none():
    response = br.TriggerResponse(layer="conv_3", clean_mean=np.linspace(0, 5, 60),
                                  poisoned_mean=np.linspace(0, 5, 60) + np.where(np.arange(60) % 7 == 0, 30, 0),
                                  place=np.arange(60))
    for k in (45, None):
        fig = br.plot_trigger_response(response, channels_pruned=k)
        r = drawn(fig)
        ax = fig.axes[0]
        legend = ax.get_legend()
        assert legend is not None
        texts = [t.get_text() for t in legend.get_texts()]
        if k is not None:
            assert any("pruned" in t and "45" in t for t in texts) and any("kept" in t and "15" in t for t in texts)
            (mark,) = step_labels(ax)
            assert text_box(mark, r).y0 >= ax.get_window_extent(r).y1
        box = legend.get_window_extent(r)
        assert all(not overlap(box, bar.get_window_extent(r)) for bar in ax.patches)


def test_ranking_threshold_labels_do_not_overlap():
    sweep = lab_like_sweep({50: 2.5, 51: 5.0, 52: 12.0})
    fig = br.plot_ranking(sweep.ranking, selections=sweep.selections)
    r = drawn(fig)
    ax = fig.axes[0]
    boxes = [text_box(t, r) for t in step_labels(ax)]
    assert len(boxes) == 3
    assert all(not overlap(a, b) for a, b in itertools.combinations(boxes, 2))
    assert all(b.y0 >= ax.get_window_extent(r).y1 and not overlap(b, ax.title.get_window_extent(r)) for b in boxes)



def test_the_detection_leaderboard_figure_keeps_its_legend_outside_and_reads():
    from badnet_repair.reporting.leaderboard import plot_detection

    def row(badnet, label, results):
        return {"status": "ok", "kind": "detection", "split": "tuning", "badnet": badnet, "label": label,
                "seconds": 3.0, "results": [{"model": f"G ({m})", "detection_rate": d, "false_alarm_rate": f,
                                             "auroc": a} for m, d, f, a in results]}

    rows = [row(b, "strip + feature-distance", [("strip", 40.0 + i, 2.0, 0.7), ("feature-distance", 99.0, 2.5, 0.99),
                                                ("strip + feature-distance", 99.5, 4.0, None)])
            for i, b in enumerate(["demo", "faces s0", "faces blended s0"])]
    fig = plot_detection(rows)
    r = drawn(fig)
    legends = fig.legends
    assert len(legends) == 1 and [t.get_text() for t in legends[0].get_texts()] == [
        "G (strip) in strip + feature-distance", "G (feature-distance) in strip + feature-distance",
        "G (strip + feature-distance)", "target"]
    for ax in fig.axes:
        assert not overlap(legends[0].get_window_extent(r), ax.get_window_extent(r))
        assert "%" in ax.get_ylabel()
    sizes = {t.get_fontsize() for ax in fig.axes for t in
             [ax.xaxis.label, ax.yaxis.label, ax.title, *ax.get_xticklabels(), *ax.get_yticklabels()]}
    assert min(sizes | {t.get_fontsize() for t in legends[0].get_texts()}) >= 9
