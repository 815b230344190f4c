"""The lab's steps one by one (workflow.prune's step functions and the plots the notebook shows)
give what the whole ``run_pruning_defense`` gives."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

import badnet_repair as br
from badnet_repair.reporting.report import models_list, selection_table


@pytest.fixture(scope="module")
def steps(lab_files):
    b = br.load_model(lab_files["model"])
    valid = br.load_data_for(b, lab_files["valid"], name="valid")
    test = br.load_data_for(b, lab_files["test"], name="test")
    bd_test, target = br.poisoned_labels(br.load_data_for(b, lab_files["bd_test"], name="bd_test"), None)
    ranking = br.rank_channels(b, valid)
    sweep = br.prune_sweep(b, valid, ranking=ranking, thresholds=[2, 4])
    repaired = br.repaired_models(b, sweep)
    return b, valid, test, bd_test, target, sweep, repaired


def test_step_by_step_evaluations_equal_the_whole_run(steps, lab_files, tmp_path):
    b, _valid, test, bd_test, _target, sweep, repaired = steps
    evaluations = br.evaluate_lab_models(b, repaired, test, bd_test)
    whole = br.run_pruning_defense(lab_files["model"], lab_files["valid"], test=lab_files["test"],
                                   bd_test=lab_files["bd_test"], out_dir=tmp_path, thresholds=[2, 4],
                                   save_models=False, report=False, progress=False)
    assert [e.model for e in evaluations] == ["B", "B'_2", "G_2", "B'_4", "G_4"]
    for got, want in zip(evaluations, whole.evaluations, strict=True):
        assert got.model == want.model and got.channels_pruned == want.channels_pruned
        for field in ("clean_accuracy", "attack_success_rate", "detection_rate", "false_alarm_rate"):
            assert getattr(got, field) == pytest.approx(getattr(want, field), abs=1.0), field  # a float32 tie at most
    assert b.get_layer("conv_3").get_weights()[0].any(), "B is not changed"
    pruned = repaired[2.0].model.get_layer("conv_3").get_weights()[0]
    chosen = sweep.selections[2.0].channels  # type: ignore[union-attr]
    assert not pruned[..., list(chosen)].any() and repaired[2.0].channels_pruned == len(chosen)


def test_save_lab_models_writes_the_lab_files_and_refuses_to_overwrite(steps, tmp_path):
    b, *_, repaired = steps
    saved = br.save_lab_models(b, repaired, tmp_path)
    assert set(saved) == {2.0, 4.0}
    assert {p.name for p in saved[4.0].values()} == {"bd_4.h5", "bd_4_weights.h5", "bd_4.keras", "goodnet_4.keras",
                                                    "goodnet_4.h5"}
    assert "- X=4: `" in models_list(saved)
    with pytest.raises(br.OutputExistsError):
        br.save_lab_models(b, repaired, tmp_path)


def test_results_and_report_with_the_students_conclusion(steps, lab_files, tmp_path):
    b, valid, test, bd_test, target, sweep, repaired = steps
    evaluations = br.evaluate_lab_models(b, repaired, test, bd_test)
    results = br.lab_results(sweep, evaluations, model_file=lab_files["model"], datasets=[valid, test, bd_test],
                             target=target, data_source="the test's lab files")
    assert results["provenance"]["inputs"]["test"]["images"] == len(test)
    assert results["evaluation_sets"] == {"clean": "test", "poisoned": "bd_test"}
    assert [s["threshold"] for s in results["selections"]] == [2.0, 4.0]
    paths = br.write_lab_outputs(results, sweep, tmp_path / "out", report=tmp_path / "Lab2_report.md",
                                 conclusion="My own conclusion.")
    report = paths["report"].read_text()
    assert "](Lab2_report_files/pruning_curves.png)" in report and "My own conclusion." in report
    assert paths["report_figure"].read_bytes() == paths["figure"].read_bytes()
    assert (tmp_path / "out" / "results.json").exists() and (tmp_path / "out" / "sweep.csv").exists()
    with pytest.raises(br.OutputExistsError):
        br.write_lab_outputs(results, sweep, tmp_path / "out", report=tmp_path / "Lab2_report.md")


def test_selection_table_from_the_sweep_shows_attack_success_at_the_stop(steps, lab_files):
    b, valid, *_ = steps
    bd_valid, _ = br.poisoned_labels(br.load_data_for(b, lab_files["bd_valid"], name="bd_valid"), None)
    sweep = br.prune_sweep(b, valid, others={"bd_valid": bd_valid}, poisoned=["bd_valid"], thresholds=[2])
    sel = sweep.selections[2.0]
    assert sel is not None
    row = selection_table(sweep).strip().splitlines()[-1].strip("|").split("|")
    assert int(row[1]) == sel.channels_pruned
    assert float(row[-1]) == pytest.approx(sweep.steps[sel.channels_pruned].metrics["bd_valid"], abs=0.005)


def test_plot_ranking_draws_the_mean_activations_in_pruning_order(steps):
    _, _, _, _, _, sweep, _ = steps
    fig = br.plot_ranking(sweep.ranking, selections=sweep.selections)
    heights = [p.get_height() for p in fig.axes[0].patches]
    want = sweep.ranking.mean_activation[sweep.ranking.order]
    np.testing.assert_allclose(heights, want)
    assert all(a <= b for a, b in itertools.pairwise(heights))


def test_plot_goodnet_decisions_captions_follow_the_rule(small_deepid):
    from .conftest import random_faces

    x = random_faces(5, seed=3)
    y = br.predict_classes(small_deepid, x)
    clean = br.Dataset(x, y, name="clean")
    poisoned = br.Dataset(x, np.zeros(5, np.int64), name="poisoned")
    repaired = br.prune_channels(small_deepid, "conv_3", range(55))
    g = br.build_goodnet(small_deepid, repaired)
    fig = br.plot_goodnet_decisions(g, clean, poisoned)
    titles = [ax.get_title() for ax in fig.axes]
    r = br.predict_classes(repaired, x)
    for i in range(5):
        want = "G: N (alarm)" if r[i] != y[i] else f"G: {y[i]}"
        assert titles[i].endswith(want) and f"B {y[i]}, B' {r[i]}" in titles[i]
        assert titles[5 + i].endswith(want)
