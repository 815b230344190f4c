"""Executes Homework-2.ipynb headless in a real Jupyter kernel on a tiny generated demo."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import badnet_repair as br
from badnet_repair.cli import main
from badnet_repair.reporting.notebook import execute_notebook, markdown_rows, notebook_outputs, parameter_names

NOTEBOOK = Path(__file__).resolve().parents[1] / "Homework-2.ipynb"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def executed(small_demo, tmp_path_factory):
    work = tmp_path_factory.mktemp("nb")  # no lab files here: the notebook must fall back to the demo
    params = {"DEMO_DIR": str(small_demo.root), "OUT_DIR": str(work / "out"), "THRESHOLDS": [2, 4, 10],
              "FINE_TUNING": {"epochs": 2}}
    nb = execute_notebook(NOTEBOOK, parameters=params, cwd=work, html=work / "nb.html", timeout=600)
    return nb, work, small_demo


def test_parameters_cell_is_tagged_and_holds_the_lab_layout():
    names = parameter_names(NOTEBOOK)
    for name in ("MODEL", "VALID", "BD_VALID", "TEST", "BD_TEST", "THRESHOLDS", "LAYER", "OUT_DIR", "DEMO"):
        assert name in names


def test_notebook_runs_without_errors_and_says_it_uses_the_demo(executed):
    nb, _, _ = executed
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    text = "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []) if o.get("name") == "stdout")
    assert "No lab files" in text and "Using the built-in demo" in text


def test_notebook_shows_figures(executed):
    nb, work, _ = executed
    pngs = notebook_outputs(nb, "image/png")
    assert len(pngs) >= 4  # samples grid, curves, defense comparison, trigger response
    html = (work / "nb.html").read_text()
    assert html.count("data:image/png;base64") >= 4


def test_notebook_tables_equal_the_librarys_results(executed, tmp_path):
    nb, work, demo = executed
    lib = br.run_pruning_defense(demo.model, demo.valid, bd_valid=demo.bd_valid, test=demo.test,
                                 bd_test=demo.bd_test, out_dir=tmp_path / "lib", save_models=False,
                                 report=False, progress=False)
    table = next(t for t in notebook_outputs(nb, "text/markdown") if "| model |" in t)
    rows = {r[0]: r for r in markdown_rows(table[table.index("| model |"):])}
    assert len(rows) == len(lib.evaluations)
    for e in lib.evaluations:
        row = rows[e.model]
        assert row[1] == str(e.channels_pruned)
        assert float(row[2]) == pytest.approx(e.clean_accuracy, abs=0.005)
        assert float(row[3]) == pytest.approx(e.attack_success_rate, abs=0.005)
    saved = json.loads((work / "out" / "results.json").read_text())
    assert saved["evaluations"] == [e.as_dict() for e in lib.evaluations]


def test_notebook_fine_pruning_section_shows_the_written_comparison(executed):
    nb, work, _ = executed
    rows = json.loads((work / "out" / "comparison" / "comparison.json").read_text())
    names = [r["model"] for r in rows]
    assert names[0] == "no defense" and "fine-pruning" in names and "G (fine-tuning)" in names
    table = [t for t in notebook_outputs(nb, "text/markdown") if "| model |" in t][-1]
    shown = {r[0]: r for r in markdown_rows(table[table.index("| model |"):])}
    assert list(shown) == names
    for r in rows:
        assert float(shown[r["model"]][2]) == pytest.approx(r["clean_accuracy"], abs=0.005)
        assert float(shown[r["model"]][3]) == pytest.approx(r["attack_success_rate"], abs=0.005)
    assert (work / "out" / "comparison" / "comparison.png").stat().st_size > 1000


def test_notebook_trigger_response_names_channels_of_the_pruned_layer(executed):
    nb, _, demo = executed
    text = "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []) if o.get("name") == "stdout")
    line = next(x for x in text.splitlines() if x.startswith("channels the trigger raises most"))
    channels = int(br.load_model(demo.model).get_layer("conv_3").filters)
    listed = [p.split(":")[0].strip() for p in line.split("place in pruning order):")[1].split(";")]
    assert len(listed) == 5 and all(0 <= int(c) < channels for c in listed)


def test_notebook_writes_the_report_files(executed):
    _, work, _ = executed
    out = work / "out"
    assert (out / "Lab2_report.md").exists() and (out / "pruning_curves.png").exists()
    html = (out / "Lab2_report.html").read_text()
    assert "data:image/png;base64" in html and "<table>" in html
    assert (out / "goodnet_4.keras").exists()


def test_report_command_renders_the_executed_notebook(small_demo, tmp_path, monkeypatch, capsys):
    import shutil

    nb = tmp_path / "Homework-2.ipynb"
    shutil.copy(NOTEBOOK, nb)
    monkeypatch.chdir(tmp_path)
    assert main(["report", "--notebook", str(nb), "-p", "DEMO_DIR", str(small_demo.root),
                 "-p", "DEMO", "pruning-aware", "-p", "THRESHOLDS", "[4]"]) == 0
    out = capsys.readouterr().out
    assert "notebook HTML" in out
    assert (tmp_path / "fixed_models" / "Homework-2.html").exists()
    results = json.loads((tmp_path / "fixed_models" / "results.json").read_text())
    assert results["parameters"]["thresholds"] == [4.0]
    assert results["provenance"]["inputs"]["model"]["path"].endswith("pa_net.h5")
    assert main(["report", "--notebook", str(nb), "-p", "NOPE", "1"]) == 1
    assert "no parameter named NOPE" in capsys.readouterr().err
