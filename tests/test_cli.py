from __future__ import annotations

import csv
import json
import os
from typing import Any

import numpy as np
import pytest

import badnet_repair as br
from badnet_repair.cli import main


def run_prune(lab_files, out, *extra):
    f = lab_files
    return main(["prune", "-q", "--model", str(f["model"]), "--valid", str(f["valid"]),
                 "--bd-valid", str(f["bd_valid"]), "--test", str(f["test"]),
                 "--bd-test", str(f["bd_test"]), "--out", str(out), *extra])


@pytest.fixture(scope="module")
def pruned(lab_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "fixed_models"
    assert run_prune(lab_files, out, "--thresholds", "2", "4", "10") == 0
    return out


def test_prune_writes_models_results_and_report(pruned):
    names = {p.name for p in pruned.iterdir()}
    for x in ("2", "4", "10"):
        assert {f"bd_{x}.h5", f"bd_{x}_weights.h5", f"bd_{x}.keras", f"goodnet_{x}.keras"} <= names
    assert {"sweep.csv", "results.csv", "results.json", "pruning_curves.png", "Lab2_report.md"} <= names
    assert not [n for n in names if "partial" in n]
    results = json.loads((pruned / "results.json").read_text())
    rows = list(csv.DictReader((pruned / "sweep.csv").open()))
    assert len(rows) == 61 and rows[0]["channel"] == "" and rows[-1]["fraction_pruned"] == "1.0"
    base = float(rows[0]["valid_accuracy"])
    assert base == pytest.approx(100 * (300 - 5) / 300, abs=1e-3)  # 5 labels were flipped
    for sel in results["selections"]:
        k = sel["channels_pruned"]
        drops = [base - float(r["valid_accuracy"]) for r in rows[1:]]
        first = next(i + 1 for i, d in enumerate(drops) if d >= sel["threshold"] - 1e-9)
        assert k == first
        assert len(sel["channels"]) == k and sel["channels"] == results["order"][:k]
    report = (pruned / "Lab2_report.md").read_text()
    assert "pruning_curves.png" in report and "| B'_4 |" in report and "## Conclusion" in report
    assert results["provenance"]["versions"]["keras"]
    assert len(results["provenance"]["inputs"]["valid"]["sha256"]) == 64


def test_saved_repaired_model_has_the_selected_channels_zeroed(pruned):
    results = json.loads((pruned / "results.json").read_text())
    sel = next(s for s in results["selections"] if s["threshold"] == 4)
    model = br.load_model(pruned / "bd_4_weights.h5")
    k, b = model.get_layer("conv_3").get_weights()
    zeroed = sorted(c for c in range(60) if not k[..., c].any() and b[c] == 0)
    assert zeroed == sorted(sel["channels"])


def test_eval_of_saved_models_matches_the_sweep(pruned, lab_files, capsys):
    results = json.loads((pruned / "results.json").read_text())
    by_name = {e["model"]: e for e in results["evaluations"]}
    capsys.readouterr()
    assert main(["eval", str(lab_files["test"]), str(lab_files["bd_test"]), str(pruned / "bd_4.h5"), "--json"]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert ev["clean_accuracy"] == pytest.approx(by_name["B'_4"]["clean_accuracy"], abs=0.01)
    assert ev["attack_success_rate"] == pytest.approx(by_name["B'_4"]["attack_success_rate"], abs=0.01)
    g_file = str(pruned / "goodnet_4.keras")
    assert main(["eval", str(lab_files["test"]), str(lab_files["bd_test"]), g_file, "--json"]) == 0
    g = json.loads(capsys.readouterr().out)
    for key in ("clean_accuracy", "attack_success_rate", "detection_rate", "false_alarm_rate"):
        assert g[key] == pytest.approx(by_name["G_4"][key], abs=0.01)


def test_predict_prints_a_class_in_0_to_n(pruned, tmp_path, capsys):
    from PIL import Image

    from .conftest import random_faces

    img = random_faces(1, seed=99)[0].astype(np.uint8)
    Image.fromarray(img).save(tmp_path / "face.png")
    capsys.readouterr()
    assert main(["predict", str(pruned / "goodnet_2.keras"), str(tmp_path / "face.png")]) == 0
    assert 0 <= int(capsys.readouterr().out.strip()) <= 7


def test_existing_outputs_are_not_overwritten(pruned, lab_files, capsys):
    before = {p.name: p.read_bytes() for p in pruned.iterdir()}
    assert run_prune(lab_files, pruned) == 1
    err = capsys.readouterr().err
    assert "already exist" in err and "--overwrite" in err and "Traceback" not in err
    assert {p.name: p.read_bytes() for p in pruned.iterdir()} == before


def test_overwrite_gives_byte_identical_results(lab_files, tmp_path):
    out = tmp_path / "out"
    assert run_prune(lab_files, out, "--no-models") == 0
    first = {n: (out / n).read_bytes() for n in ("sweep.csv", "results.csv", "results.json")}
    assert run_prune(lab_files, out, "--no-models", "--overwrite") == 0
    assert {n: (out / n).read_bytes() for n in first} == first


def test_prune_uses_the_lab_layout_by_default(lab_files, monkeypatch, capsys):
    monkeypatch.chdir(lab_files["root"])
    out = "fixed_models_default"
    assert main(["prune", "-q", "--no-models", "--out", out, "--thresholds", "4"]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("Using the lab files")
    assert os.path.exists(os.path.join(lab_files["root"], out, "results.json"))


@pytest.mark.parametrize("bad", ["-1", "abc", "inf"])
def test_bad_thresholds_are_refused(lab_files, tmp_path, capsys, bad):
    assert run_prune(lab_files, tmp_path / "o", "--thresholds", bad) == 2
    assert "threshold" in capsys.readouterr().err


def test_bad_input_gives_one_line_not_a_traceback(lab_files, tmp_path, capsys):
    (tmp_path / "junk.h5").write_text("nope")
    f = lab_files
    code = main(["prune", "-q", "--model", str(f["model"]), "--valid", str(tmp_path / "junk.h5"),
                 "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 1 and "junk.h5" in err and "not an HDF5 file" in err and "Traceback" not in err
    code = main(["prune", "-q", "--model", str(f["model"]), "--valid", str(f["valid"]),
                 "--bd-valid", str(f["valid"]), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 1 and "labels should all be the attack's target" in err and "--target" in err


def test_low_attack_warnings_by_hand(caplog):
    from badnet_repair.workflow.run import low_attack_warnings

    with caplog.at_level("WARNING", logger="badnet_repair"):
        out = low_attack_warnings({"bd_valid": 12.5, "bd_test": 99.0, "none": None}, target=0)
    assert len(out) == 1 and out[0].startswith("bd_valid: the BadNet sends only 12.50% of these poisoned inputs")
    assert "to the target 0" in out[0] and "another BadNet's trigger" in caplog.text
    assert low_attack_warnings({"bd_test": 50.0}) == []


def test_coverage_and_selection_warnings_by_hand(caplog):
    from types import SimpleNamespace

    from badnet_repair.workflow.run import coverage_warnings, selection_warnings

    x = np.zeros((6, 2, 2, 3), np.float32)
    with caplog.at_level("WARNING", logger="badnet_repair"):
        # 3 images of class 3 for a 7-class model: below half the classes
        (line,) = coverage_warnings(br.Dataset(x[:3], np.array([3, 3, 3]), "valid"), 7, file="v.h5")
    assert line.startswith("WARNING: v.h5: clean images of only 1 of the model's 7 classes") and line in caplog.text
    assert coverage_warnings(br.Dataset(x[:4], np.array([0, 1, 2, 2]), "valid"), 6) == []  # half of 6
    # 21 images: one is 4.76 points; X=2 first passed at 14.29 points (far past), X=10 at 14.29 (not)
    sel = {2.0: SimpleNamespace(accuracy_drop=14.29), 10.0: SimpleNamespace(accuracy_drop=14.29), 4.0: None}
    (far,) = selection_warnings(sel, images=21)
    assert far.startswith("WARNING: B'_2 is 14.29 points below B on validation, not about 2") and "4.76 points" in far
    assert selection_warnings({4.0: SimpleNamespace(accuracy_drop=6.9)}, images=1000) == []  # within X + 3


def test_prune_warns_when_the_badnet_ignores_the_poisoned_files(lab_files, tmp_path, caplog):
    out = tmp_path / "o"
    with caplog.at_level("WARNING", logger="badnet_repair"):
        assert run_prune(lab_files, out, "--thresholds", "4", "--no-models") == 0
    results = json.loads((out / "results.json").read_text())
    low = [n for n in ("bd_valid", "bd_test") if results["base"][n] < 50]
    assert low  # the fixture's random DeepID does not answer the square trigger
    assert [w.split(":")[0] for w in results["warnings"]] == low
    assert "may carry another BadNet's trigger" in caplog.text
    assert (out / "Lab2_report.md").read_text().count("> **Warning:**") == len(low)


def test_prune_records_the_few_classes_line_in_results(lab_files, tmp_path, caplog):
    valid = br.load_h5(lab_files["valid"])
    two = np.isin(valid.y, np.unique(valid.y)[:2])  # 2 of the model's 7 classes
    few = br.save_h5(tmp_path / "few.h5", valid.x[two], valid.y[two], dtype="float64")
    out = tmp_path / "o"
    with caplog.at_level("WARNING", logger="badnet_repair"):
        assert run_prune({**lab_files, "valid": few}, out, "--thresholds", "4", "--no-models") == 0
    lines = [w for w in json.loads((out / "results.json").read_text())["warnings"] if "clean images of only" in w]
    assert lines == [f"WARNING: {few}: clean images of only 2 of the model's 7 classes; defenses and detectors "
                     "fit and check on those alone, and the others may lose accuracy or raise false alarms unseen"]
    assert caplog.text.count("clean images of only") == 1  # logged once, by open_badnet


def test_compare_set_gives_one_defense_a_typed_setting_over_the_shared_flags(lab_files, tmp_path, monkeypatch,
                                                                            capsys):
    from badnet_repair.workflow import compare

    seen: list = []

    def fake_compare_file(path, valid, test, bd_test, *, defenses, **kw):
        seen.extend(defenses)
        return "comparison"

    def fake_write(comparisons, out, *, overwrite):
        md = tmp_path / "comparison.md"
        md.write_text("table")
        return {"md": md}

    monkeypatch.setattr(compare, "compare_file", fake_compare_file)
    monkeypatch.setattr(compare, "write_comparison", fake_write)
    files = [f"--{k.replace('_', '-')}={lab_files[k]}" for k in ("model", "valid", "test", "bd_test")]
    assert main(["compare", "-q", *files, "--defenses", "fine-pruning", "ft-sam", "i-bau", "--epochs", "7",
                 "--set", "ft-sam.sam_rho=0.5", "--set", "i-bau.max_norm=10", "--set", "i-bau.rounds=2",
                 "--set", "fine-pruning.keep-pruned-start=false", "--set", "ft-sam.clipnorm=0"]) == 0
    fp, sam, ibau = seen
    assert (fp.keep_pruned_start, fp.epochs) == (False, 7)
    assert (sam.sam_rho, sam.epochs, sam.sam_adaptive, sam.clipnorm) == (0.5, 7, True, None)
    assert (ibau.max_norm, ibau.rounds) == (10, 2)
    assert isinstance(ibau.max_norm, int | float) and isinstance(ibau.rounds, int)
    # a misspelt or mistyped setting is refused before anything runs, naming what it takes
    for wrong, says in (("ft-sam.rho=1", "its settings: "), ("ft-sam.sam_rho=big", "must be a number"),
                        ("i-bau.rounds=2.5", "must be a whole number"),
                        ("nope.x=1", "no defense or detector 'nope'"), ("sam_rho=1", "NAME.SETTING=VALUE"),
                        ("strip.colour=1", "detector strip has no setting 'colour'; its settings: copies"),
                        ("strip.copies=many", "must be a whole number")):
        with pytest.raises(SystemExit):
            main(["compare", *files, "--set", wrong])
        assert says in capsys.readouterr().err
    assert main(["compare", *files, "--defenses", "pruning", "--set", "ft-sam.sam_rho=0.5"]) == 1
    assert "--defenses leaves out" in capsys.readouterr().err
    assert main(["compare", *files, "--defenses", "pruning", "--set", "strip.copies=8"]) == 1
    assert "--detectors leaves out" in capsys.readouterr().err


def test_compare_flags_change_a_defense_only_where_given(lab_files, tmp_path, monkeypatch):
    """A setting flag reaches every defense that has the setting, and only when passed: each
    keeps its own defaults otherwise (FST's distill 0.3, I-BAU's learning rate), and a flag equal
    to fine-pruning's default still changes another defense (--distill 0 switches FST's off)."""
    from badnet_repair.defenses import REGISTRY
    from badnet_repair.workflow import compare

    seen: list[list[Any]] = []
    monkeypatch.setattr(compare, "compare_file", lambda *a, defenses, **kw: seen.append(list(defenses)) or "c")
    monkeypatch.setattr(compare, "write_comparison",
                        lambda *a, **kw: {"md": (tmp_path / "c.md", (tmp_path / "c.md").write_text("t"))[0]})
    files = [f"--{k.replace('_', '-')}={lab_files[k]}" for k in ("model", "valid", "test", "bd_test")]
    names = ["fine-pruning", "fst", "i-bau", "pruning"]
    assert main(["compare", "-q", *files, "--defenses", *names]) == 0
    assert [d.get_params() for d in seen[-1]] == [REGISTRY[n]().get_params() for n in names]
    assert main(["compare", "-q", *files, "--defenses", *names, "--distill", "0", "--learning-rate", "0.002",
                 "--budget", "none", "--batch-size", "32"]) == 0
    fp, fst, ibau, pruning = seen[-1]
    assert (fst.distill, fst.weight_decay, fst.budget, fst.learning_rate) == (0.0, 1.0, None, 0.002)
    assert (ibau.learning_rate, ibau.batch_size) == (0.002, 32)
    assert (fp.distill, fp.budget, fp.batch_size) == (0.0, None, 32)
    assert pruning.batch_size == REGISTRY["pruning"]().batch_size  # the sweep's own batch, not fine-tuning's


def test_prune_sweeps_each_set_once(lab_files, tmp_path, monkeypatch):
    from badnet_repair.defenses import sweep as sweep_module

    swept: list[str] = []
    real = sweep_module._sweep_fast

    def spy(model, chain, sets, *args, **kwargs):
        swept.extend(sets)
        return real(model, chain, sets, *args, **kwargs)

    monkeypatch.setattr(sweep_module, "_sweep_fast", spy)
    assert run_prune(lab_files, tmp_path / "out", "--thresholds", "2") == 0
    assert sorted(swept) == ["bd_test", "bd_valid", "test", "valid"]


def test_budget_warnings_reach_the_comparison_files(tmp_path):
    """A repair's loud lines are in comparison.md under its table, in its rows of comparison.json
    (not its GoodNet's) and in comparison.csv."""
    from badnet_repair.workflow.compare import evaluate_repairs, write_comparison
    from badnet_repair.workflow.run import repair_warnings

    from .conftest import tiny_conv_model

    b = tiny_conv_model(np.eye(2, dtype=np.float32), np.ones((8, 3), np.float32))
    x = np.random.default_rng(0).uniform(0, 1, (6, 4, 4, 2)).astype(np.float32)
    test, bd = br.Dataset(x, np.zeros(6, np.int64), "test"), br.Dataset(x, np.zeros(6, np.int64), "bd_test")
    line = "WARNING: fst fell 40.0 points below the BadNet ...: returned the BadNet unchanged"
    loud = br.Repair(defense="fst", models=(br.Repaired("fst", b),), record={}, warnings=(line,))
    quiet = br.Repair(defense="fine-tuning", models=(br.Repaired("fine-tuning", b),), record={})
    assert repair_warnings(loud) == [line] and repair_warnings(quiet) == []
    comparison = evaluate_repairs(b, [quiet, loud], test, bd, name="tiny")
    assert comparison.warnings == {"fst": (line,)}
    paths = write_comparison([comparison], tmp_path)
    rows = json.loads(paths["json"].read_text())
    assert [r["warnings"] for r in rows if r["model"] == "fst"] == [[line]]
    assert all(r["warnings"] == [] for r in rows if r["model"] != "fst")
    assert f"- fst: {line}" in paths["md"].read_text()
    assert line in paths["csv"].read_text()


@pytest.mark.slow
def test_fine_prune_prints_and_records_the_budget_line(small_demo, tmp_path, capsys):
    """A learning rate far too high wrecks the tuned network; the result is B (no pruned start
    within 3 points) and the line is printed and first in results.json's warnings."""
    out = tmp_path / "o"
    assert main(["fine-prune", "-q", "--model", str(small_demo.model), "--valid", str(small_demo.valid),
                 "--method", "fine-tuning", "--epochs", "2", "--learning-rate", "5", "--clipnorm", "none",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    results = json.loads((out / "ft_results.json").read_text())
    (member,) = results["members"]
    assert member["budget"]["fallback"] == "B" and member["budget"]["budget"] == 3.0
    assert results["warnings"][0] == member["budget"]["warning"] and member["budget"]["warning"] in printed
    assert main(["fine-prune", "-q", "--model", str(small_demo.model), "--valid", str(small_demo.valid),
                 "--method", "fine-tuning", "--accuracy-drop", "2", "--out", str(tmp_path / "o2")]) == 1
    assert "--accuracy-drop: not a setting of --method fine-tuning" in capsys.readouterr().err


def test_log_and_warning_lines_read_once_and_on_one_line():
    import logging
    import warnings

    from badnet_repair.cli import _one_line_warning, _OneLineFormatter
    from badnet_repair.errors import DataWarning

    fmt = _OneLineFormatter("%(levelname)s: %(message)s")
    loud = logging.LogRecord("badnet_repair", logging.WARNING, "f.py", 1, "WARNING: fine-tuning fell 30.0 points",
                             None, None)
    assert fmt.format(loud) == "WARNING: fine-tuning fell 30.0 points"
    plain = logging.LogRecord("badnet_repair", logging.WARNING, "f.py", 1, "held out 5 of 16", None, None)
    assert fmt.format(plain) == "WARNING: held out 5 of 16"
    line = _one_line_warning(DataWarning("valid.h5: every pixel is in 0..1"), DataWarning, "/x/data.py", 9, "code")
    assert line == "valid.h5: every pixel is in 0..1"
    assert _one_line_warning(UserWarning("odd"), UserWarning, "/x.py", 1) == "UserWarning: odd"
    assert "\n" not in line and warnings.formatwarning is not _one_line_warning  # only main() installs it
