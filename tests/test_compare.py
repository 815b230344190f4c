from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from badnet_repair.cli import main

pytestmark = pytest.mark.slow


def test_compare_on_the_demo_writes_the_papers_defenses_for_both_badnets(small_demo, tmp_path, capsys):
    # the other defenses run through compare in tests/test_notebook.py and each alone in their own tests
    out = tmp_path / "cmp"
    assert main(["compare", "-q", "--demo", "--demo-dir", str(small_demo.root), "--out", str(out),
                 "--defenses", "fine-tuning", "pruning", "fine-pruning", "--epochs", "2", "--thresholds", "4"]) == 0
    rows = json.loads((out / "comparison.json").read_text())
    for badnet in ("baseline BadNet", "pruning-aware BadNet"):
        models = [r["model"] for r in rows if r["badnet"] == badnet]
        assert models[0] == "no defense"
        for name in ("fine-tuning", "fine-pruning"):
            assert name in models and f"G ({name})" in models
        assert any(m.startswith("pruning X=4") for m in models) or len(models) == 5
    assert len(list(csv.DictReader((out / "comparison.csv").open()))) == len(rows)
    assert (out / "comparison.png").stat().st_size > 1000
    assert "## pruning-aware BadNet" in (out / "comparison.md").read_text()
    for r in rows:
        if r["kind"] == "goodnet":
            assert 0 <= r["detection_rate"] <= 100 and 0 <= r["false_alarm_rate"] <= 100


def test_compare_runs_the_defenses_named_from_the_registry(small_demo, tmp_path):
    out = tmp_path / "cmp"
    assert main(["compare", "-q", "--demo", "--demo-dir", str(small_demo.root), "--out", str(out),
                 "--defenses", "pruning", "--thresholds", "0", "4"]) == 0
    rows = json.loads((out / "comparison.json").read_text())
    for badnet in ("baseline BadNet", "pruning-aware BadNet"):
        models = [r["model"] for r in rows if r["badnet"] == badnet]
        assert models[0] == "no defense"
        assert set(models[1:]) <= {"pruning X=0", "G (pruning X=0)", "pruning X=4", "G (pruning X=4)"}
        assert "pruning X=0" in models  # a drop of 0 points is reached at the first channel
    with pytest.raises(SystemExit):
        main(["compare", "--demo", "--defenses", "neural-cleanse"])


def test_compare_opens_test_files_only_after_every_repair(small_demo, tmp_path, monkeypatch):
    from badnet_repair.defenses import Pruning
    from badnet_repair.workflow import run

    events: list[str] = []
    real_load, real_repair = run.load_data_for, Pruning.repair

    def spy_load(model, path, **kw):
        events.append(f"open {Path(path).name}")
        return real_load(model, path, **kw)

    def spy_repair(self, model, clean, **kw):
        events.append("repair")
        return real_repair(self, model, clean, **kw)

    monkeypatch.setattr(run, "load_data_for", spy_load)
    monkeypatch.setattr(Pruning, "repair", spy_repair)
    assert main(["compare", "-q", "--demo", "--demo-dir", str(small_demo.root), "--out", str(tmp_path / "c"),
                 "--defenses", "pruning", "--thresholds", "4"]) == 0
    # per BadNet: the clean file, the repair, then the test files
    assert events == ["open valid.h5", "repair", "open test.h5", "open bd_test.h5"] * 2
