"""Detector GoodNets from the command line (workflow.detect, cli cleanse/detect/compare):
the files written, the detectors fitted on clean data before any test file is opened, and G
reloading as one Keras model."""

from __future__ import annotations

import json
from pathlib import Path

import keras
import numpy as np
import pytest

import badnet_repair as br
from badnet_repair.cli import main

from .conftest import NullDetector


def test_cleanse_writes_the_scan_and_refuses_to_overwrite(small_demo, tmp_path, capsys):
    out = tmp_path / "nc"
    argv = ["cleanse", "-q", "--demo", "baseline", "--demo-dir", str(small_demo.root), "--out", str(out),
            "--steps", "30", "--screen-steps", "10", "--candidates", "1", "--reference", "3"]
    assert main(argv) == 0
    summary = json.loads((out / "neural_cleanse.json").read_text())
    assert len(summary["norms"]) == 5 and summary["screened"] is True
    assert len(summary["optimised"]) == 4  # 1 candidate + 3 reference classes
    for name in ("neural_cleanse.md", "neural_cleanse.png", "neural_cleanse_triggers.png",
                 "neural_cleanse_triggers.npz"):
        assert (out / name).stat().st_size > 0
    assert "Neural Cleanse of bd_net.h5" in capsys.readouterr().out
    assert main(argv) == 1
    assert "exist" in capsys.readouterr().err
    # the label pre-selection, one flag away: only 2 of the 5 classes are screened
    assert main([*argv, "--preselect", "2", "--overwrite"]) == 0
    summary = json.loads((out / "neural_cleanse.json").read_text())
    assert len(summary["preselected"]) == 2 and summary["settings"]["preselect"] == 2


def test_detect_fits_on_clean_data_then_scores_g_and_saves_it(small_demo, tmp_path, monkeypatch):
    from badnet_repair.detectors import Strip
    from badnet_repair.detectors.neural_cleanse import NeuralCleanse
    from badnet_repair.nets import models
    from badnet_repair.workflow import run

    events: list[str] = []
    real_load, real_scan, real_fit = models.load_data_for, NeuralCleanse.scan, Strip.fit

    def spy_load(model, path, **kw):  # type: ignore[no-untyped-def]
        events.append(f"open {Path(path).name}")
        return real_load(model, path, **kw)

    def spy_scan(self, model, clean, **kw):  # type: ignore[no-untyped-def]
        events.append("scan")
        return real_scan(self, model, clean, **kw)

    def spy_fit(self, model, clean):  # type: ignore[no-untyped-def]
        events.append("strip")
        return real_fit(self, model, clean)

    monkeypatch.setattr(models, "load_data_for", spy_load)
    monkeypatch.setattr(run, "load_data_for", spy_load)  # the validation file opens through run.open_badnet
    monkeypatch.setattr(NeuralCleanse, "scan", spy_scan)
    monkeypatch.setattr(Strip, "fit", spy_fit)
    out = tmp_path / "detect"
    assert main(["detect", "-q", "--demo", "multi-target", "--demo-dir", str(small_demo.root), "--out", str(out),
                 "--detectors", "strip", "reversed-trigger", "--false-alarm", "4", "--set", "strip.copies=16"]) == 0
    assert events == ["open valid.h5", "strip", "scan", "open test.h5", "open bd_mt_test.h5"]
    summary = json.loads((out / "detect.json").read_text())
    # the budget of 4 % split between the two; the copies as set
    assert summary["settings"]["strip"]["false_alarm"] == 2.0 and summary["settings"]["strip"]["copies"] == 16
    rows = {r["model"]: r for r in summary["rows"]}
    # each detector's AUROC on the test files, none for the combination
    assert all(0.0 <= rows[f"G ({d})"]["auroc"] <= 1.0 for d in ("strip", "reversed-trigger"))
    assert rows["G (strip + reversed-trigger)"]["auroc"] is None
    assert "| AUROC |" in (out / "detect.md").read_text()
    assert set(rows) == {"G (strip)", "G (reversed-trigger)", "G (strip + reversed-trigger)"}
    both = rows["G (strip + reversed-trigger)"]
    # an input is flagged where either flags it: at least as many as each alone
    assert both["detection_rate"] >= max(rows["G (strip)"]["detection_rate"],
                                         rows["G (reversed-trigger)"]["detection_rate"])
    assert (out / "neural_cleanse.json").exists()
    # G reloads as one model and its alarms are the combined detector's on the test files
    g = keras.models.load_model(out / "goodnet_detect.keras")
    test, bd = br.load_h5(small_demo.test), br.load_h5(small_demo.bd_mt_test)
    n = br.num_classes(g) - 1
    assert 100 * np.mean(br.predict_classes(g, bd.x) == n) == pytest.approx(both["detection_rate"])
    assert 100 * np.mean(br.predict_classes(g, test.x) == n) == pytest.approx(both["false_alarm_rate"])


def test_detect_without_detectors_fits_the_default_g_at_its_budget(small_demo, tmp_path):
    from badnet_repair.detectors import DEFAULT_DETECTORS, DEFAULT_FALSE_ALARM

    out = tmp_path / "default"
    assert main(["detect", "-q", "--demo", "baseline", "--demo-dir", str(small_demo.root), "--out", str(out)]) == 0
    summary = json.loads((out / "detect.json").read_text())
    assert list(summary["settings"]) == list(DEFAULT_DETECTORS)
    # G's budget is split equally among its detectors
    for name in DEFAULT_DETECTORS:
        assert summary["settings"][name]["false_alarm"] == pytest.approx(DEFAULT_FALSE_ALARM / len(DEFAULT_DETECTORS))
    assert f"G ({' + '.join(DEFAULT_DETECTORS)})" in {r["model"] for r in summary["rows"]}


def test_detect_saves_the_feature_ensemble_as_one_model(small_demo, tmp_path):
    out = tmp_path / "ensemble"
    assert main(["detect", "-q", "--demo", "baseline", "--demo-dir", str(small_demo.root), "--out", str(out),
                 "--detectors", "feature-ensemble", "--false-alarm", "5",
                 "--set", "feature-ensemble.layers=['head', 'conv']"]) == 0
    summary = json.loads((out / "detect.json").read_text())
    assert summary["settings"]["feature-ensemble"]["layers"] == ["head", "conv"]
    row = next(r for r in summary["rows"] if r["model"] == "G (feature-ensemble)")
    g = keras.models.load_model(out / "goodnet_detect.keras")
    test, bd = br.load_h5(small_demo.test), br.load_h5(small_demo.bd_test)
    n = br.num_classes(g) - 1
    assert 100 * np.mean(br.predict_classes(g, bd.x) == n) == pytest.approx(row["detection_rate"])
    assert 100 * np.mean(br.predict_classes(g, test.x) == n) == pytest.approx(row["false_alarm_rate"])


def test_compare_adds_detector_rows(small_demo, tmp_path):
    out = tmp_path / "cmp"
    assert main(["compare", "-q", "--demo", "--demo-dir", str(small_demo.root), "--out", str(out),
                 "--defenses", "pruning", "--thresholds", "4", "--detectors", "strip", "disagreement"]) == 0
    rows = json.loads((out / "comparison.json").read_text())
    models_seen = {r["model"] for r in rows}
    assert {"G (strip)", "G (disagreement)", "G (strip + disagreement)"} <= models_seen
    strip_rows = [r for r in rows if r["model"] == "G (strip)"]
    assert len(strip_rows) == 2 and all(r["false_alarm_rate"] is not None for r in strip_rows)


def test_unknown_detectors_are_refused(small_deepid):
    from badnet_repair.workflow.detect import fit_detectors

    with pytest.raises(ValueError, match="unknown detector 'nope'; known: disagreement"):
        fit_detectors(small_deepid, br.Dataset(np.zeros((2, 55, 47, 3), np.float32), np.zeros(2, np.int64)),
                      ["nope"])


def test_detection_warnings_name_a_coarse_threshold_and_a_false_alarm_far_beyond_the_budget():
    from badnet_repair.metrics import evaluate_predictions
    from badnet_repair.workflow.detect import detection_warnings

    coarse = NullDetector(false_alarm=1.0)
    coarse.calibration_warning = "null: its threshold rests on 3 clean images"
    parts = {"a": coarse, "b": NullDetector(false_alarm=2.0)}
    labels = np.zeros(100, np.int64)

    def row(model: str, flagged: int):  # G's row: `flagged` of 100 clean test images get the alarm class 9
        pred = np.where(np.arange(100) < flagged, 9, 0)
        return evaluate_predictions(model=model, kind="goodnet", clean_pred=pred, clean_labels=labels,
                                    poisoned_pred=np.full(10, 9), poisoned_labels=np.full(10, 1), alarm_class=9)

    # a: 3 % (not beyond max(2, 1 + 2)); b: 5 % (beyond max(4, 4)); both: 6 % (not beyond max(6, 5))
    lines = detection_warnings(parts, [row("G (a)", 3), row("G (b)", 5), row("G (a + b)", 6)])
    assert lines[0] == coarse.calibration_warning
    assert len(lines) == 2 and lines[1].startswith("G (b) flags 5.00 %") and "budget of 2.00 %" in lines[1]
    # the combination's budget is the sum of its parts'
    lines = detection_warnings(parts, [row("G (a + b)", 10)])
    assert lines[-1].startswith("G (a + b) flags 10.00 %") and "3.00 %" in lines[-1]
