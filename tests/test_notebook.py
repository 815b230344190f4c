"""Executes Homework-2.ipynb headless in a real Jupyter kernel on a tiny generated demo."""

from __future__ import annotations

import ast
import json
import shutil
from pathlib import Path

import nbformat
import pytest

import badnet_repair as br
from badnet_repair.cli import main
from badnet_repair.reporting.notebook import (
    execute_notebook,
    finish_streams,
    markdown_rows,
    notebook_outputs,
    parameter_names,
)

NOTEBOOK = Path(__file__).resolve().parents[1] / "Homework-2.ipynb"
STUDENT_CONCLUSION = "Pruning to X=4 left the backdoor in place; my GoodNet flags it."
# the detection section with the default G's detectors and Neural Cleanse's (its scan and mitigations)
DETECTORS = ("feature-distance", "reversed-trigger")


@pytest.fixture(scope="module")
def executed(small_demo, tmp_path_factory):
    work = tmp_path_factory.mktemp("nb")  # no lab files here: the notebook must fall back to the demo
    # the student's saved notebook, with a conclusion written in its conclusion cell
    student = nbformat.read(NOTEBOOK, as_version=4)
    cell = next(c for c in student.cells if "conclusion" in c.get("metadata", {}).get("tags", []))
    cell.source = cell.source + "\n\n" + STUDENT_CONCLUSION
    nbformat.write(student, work / "saved.ipynb")
    # every section on, the long ones with few epochs
    params = {"DEMO_DIR": str(small_demo.root), "OUT_DIR": "out", "THRESHOLDS": [2, 4, 10],
              "FINE_TUNING": {"epochs": 2}, "NOTEBOOK": "saved.ipynb", "COMPARE_DEFENSES": True, "DETECT": True,
              "DETECTORS": list(DETECTORS)}
    nb = execute_notebook(NOTEBOOK, parameters=params, cwd=work, html=work / "nb.html", timeout=600)
    return nb, work, small_demo


def _stream(nb, name: str) -> str:
    return "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []) if o.get("name") == name)


def test_parameters_cell_holds_only_user_settings():
    names = parameter_names(NOTEBOOK)
    for name in ("MODEL", "VALID", "BD_VALID", "TEST", "BD_TEST", "THRESHOLDS", "LAYER", "OUT_DIR", "REPORT", "DEMO"):
        assert name in names
    assert not [n for n in names if "CONFIG" in n]  # no test-only settings


def test_no_name_defined_under_a_condition_is_used_in_a_later_cell():
    cells = [c.source for c in nbformat.read(NOTEBOOK, as_version=4).cells if c.cell_type == "code"]
    for i, src in enumerate(cells):
        conditional = {t.id for node in ast.parse(src).body if isinstance(node, (ast.If, ast.Try, ast.For, ast.While))
                       for sub in ast.walk(node) if isinstance(sub, ast.Name) and isinstance(sub.ctx, ast.Store)
                       for t in [sub]}
        for later in cells[i + 1:]:
            names = [n for n in ast.walk(ast.parse(later)) if isinstance(n, ast.Name)]
            used = {n.id for n in names if isinstance(n.ctx, ast.Load)} - {n.id for n in names
                                                                          if isinstance(n.ctx, ast.Store)}
            assert not conditional & used, f"cell {i} defines {conditional & used} under a condition; used later"


def test_the_committed_notebook_shows_each_lab_step_and_finished_progress_bars():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    headings = [c.source.splitlines()[0] for c in nb.cells if c.cell_type == "markdown"]
    for step in ("load B", "rank the channels", "sweep", "stop rule", "save", "GoodNet", "evaluate", "conclusion",
                 "report", "every defense"):
        assert any(step.lower() in h.lower() for h in headings), step
    code = [c for c in nb.cells if c.cell_type == "code"]
    ran = [c for c in code[2:] if not c.source.startswith(("if COMPARE_DEFENSES:", "if DETECT:"))]
    assert all(c.get("outputs") for c in ran), "the committed notebook is committed with its outputs"
    bars = [line for c in code for o in c.get("outputs", []) if o.get("name") == "stderr"
            for line in o["text"].splitlines() if "|" in line and "%" in line]
    assert bars and all("100%" in b for b in bars) and not any("\r" in b for b in bars), bars


@pytest.mark.slow
def test_notebook_runs_without_errors_and_says_it_uses_the_demo(executed):
    nb, _, _ = executed
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    text = _stream(nb, "stdout")
    assert "No lab files" in text and "Using the built-in demo" in text


@pytest.mark.slow
def test_notebook_progress_bars_are_saved_finished(executed):
    nb, _, _ = executed
    bars = [line for line in _stream(nb, "stderr").splitlines() if "%|" in line]
    assert any(b.startswith("pruning conv_3: 100%") for b in bars), bars
    assert all("100%" in b for b in bars) and "\r" not in _stream(nb, "stderr")


@pytest.mark.slow
def test_notebook_shows_figures(executed):
    nb, work, _ = executed
    pngs = notebook_outputs(nb, "image/png")
    assert len(pngs) >= 6  # samples, ranking, curves, G's decisions, defense comparison, trigger response
    html = (work / "nb.html").read_text()
    assert html.count("data:image/png;base64") >= 6


@pytest.mark.slow
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
    assert [e["model"] for e in saved["evaluations"]] == [e.model for e in lib.evaluations]
    for got, want in zip(saved["evaluations"], lib.evaluations, strict=True):
        assert got["clean_accuracy"] == pytest.approx(want.clean_accuracy, abs=0.2)  # float32 ties at most
    assert [s["channels_pruned"] for s in saved["selections"]] == [s["channels_pruned"] for s in
                                                                 lib.results["selections"]]
    stops = next(t for t in notebook_outputs(nb, "text/markdown") if t.startswith("| X |"))
    assert [int(r[1]) for r in markdown_rows(stops)] == [s["channels_pruned"] for s in lib.results["selections"]]


@pytest.mark.slow
def test_notebook_comparison_section_shows_the_written_comparison(executed):
    nb, work, _ = executed
    rows = json.loads((work / "out" / "comparison" / "comparison.json").read_text())
    names = [r["model"] for r in rows]
    assert names[0] == "no defense" and "fine-pruning" in names and "G (fine-tuning)" in names
    assert {"ft-sam", "i-bau", "fst", "fst-fp"} <= set(names)  # the PURIFY parameter's defaults
    # the comparison's table (the detection section's table of Neural Cleanse's mitigations comes later)
    table = [t for t in notebook_outputs(nb, "text/markdown") if "| model |" in t and "| G (fine-tuning) |" in t]
    assert len(table) == 1
    shown = {r[0]: r for r in markdown_rows(table[0][table[0].index("| model |"):])}
    assert list(shown) == names
    for r in rows:
        assert float(shown[r["model"]][2]) == pytest.approx(r["clean_accuracy"], abs=0.005)
        assert float(shown[r["model"]][3]) == pytest.approx(r["attack_success_rate"], abs=0.005)
    assert (work / "out" / "comparison" / "comparison.png").stat().st_size > 1000


@pytest.mark.slow
def test_notebook_trigger_response_names_channels_of_the_pruned_layer(executed):
    nb, _, demo = executed
    line = next(x for x in _stream(nb, "stdout").splitlines() if x.startswith("channels the trigger raises most"))
    channels = int(br.load_model(demo.model).get_layer("conv_3").filters)
    listed = [p.split(":")[0].strip() for p in line.split("place in pruning order):")[1].split(";")]
    assert len(listed) == 5 and all(0 <= int(c) < channels for c in listed)


@pytest.mark.slow
def test_notebook_writes_the_report_at_the_top_and_the_models_in_out_dir(executed):
    nb, work, _ = executed
    report = (work / "Lab2_report.md").read_text()
    assert "](Lab2_report_files/pruning_curves.png)" in report and (work / "out" / "pruning_curves.png").exists()
    assert (work / "Lab2_report_files" / "pruning_curves.png").exists()
    # the report's conclusion is the student's, from the saved notebook's conclusion cell; the
    # generated summary is only shown as a starting point
    assert STUDENT_CONCLUSION in report and "Replace this line" not in report
    shown = next(t for t in notebook_outputs(nb, "text/markdown") if t.startswith("**Generated summary**"))
    assert "The BadNet B" in shown and "The BadNet B classifies" not in report
    # the bounded fine-pruning after the lab's steps is in the report too, with any budget line
    beyond = report[report.index("## Beyond the lab: fine-pruning"):]
    assert "| G (fine-pruning) |" in beyond and "Running fine-pruning" not in beyond and "fine-pruning: about" in beyond
    cell = next(c for c in nb.cells if "append_section(REPORT" in c.source)  # the bounded fine-pruning's
    warned = any("WARNING: fine-pruning" in "".join(o.get("data", {}).get("text/markdown", ""))
                 for o in cell.get("outputs", []))
    assert ("> **Warning:** WARNING: fine-pruning" in beyond) == warned
    assert "| feature-gate |" in report[report.index("## Beyond the lab: the feature gate"):]
    html = (work / "Lab2_report.html").read_text()
    assert "data:image/png;base64" in html and "<table>" in html and "Beyond the lab" in html
    for x in ("2", "4", "10"):
        assert (work / "out" / f"goodnet_{x}.keras").exists() and (work / "out" / f"bd_{x}.h5").exists()


def test_finish_streams_keeps_the_last_redraw_of_each_line():
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x")])
    nb.cells[0].outputs = [nbformat.v4.new_output("stream", name="stderr", text="\rbar  10%|#\rbar  50%|##"),
                           nbformat.v4.new_output("stream", name="stderr", text="\rbar 100%|###\ndone\n"),
                           nbformat.v4.new_output("stream", name="stdout", text="out\n")]
    finish_streams(nb)
    assert [o["text"] for o in nb.cells[0].outputs] == ["bar 100%|###\ndone\n", "out\n"]


@pytest.mark.slow
def test_report_command_renders_the_executed_notebook(small_demo, tmp_path, monkeypatch, capsys):
    nb = tmp_path / "Homework-2.ipynb"
    shutil.copy(NOTEBOOK, nb)
    monkeypatch.chdir(tmp_path)
    args = ["report", "--notebook", str(nb), "-p", "DEMO_DIR", str(small_demo.root), "-p", "DEMO", "pruning-aware",
            "-p", "THRESHOLDS", "[4]", "-p", "COMPARE_DEFENSES", "False"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "notebook HTML" in out and f"report: {tmp_path / 'Lab2_report.md'}" in out
    handin = tmp_path / "handin"
    for name in ("Homework-2.ipynb", "Homework-2.html", "Lab2_report.md", "Lab2_report.html",
                 "Lab2_report_files/pruning_curves.png", "fixed_models/bd_4.h5", "fixed_models/goodnet_4.h5",
                 "fixed_models/results.json", "README.md"):
        assert (handin / name).is_file(), name
    assert "fixed_models/goodnet_4.h5" in (handin / "README.md").read_text()
    executed = nbformat.read(handin / "Homework-2.ipynb", as_version=4)
    assert any(c.get("outputs") for c in executed.cells if c.cell_type == "code")
    # the demo run says so in the report's first lines, and the report falls back to the summary
    first = (tmp_path / "Lab2_report.md").read_text().splitlines()[:4]
    assert any("demo run" in line for line in first)
    assert "student's own conclusion was not written" in (tmp_path / "Lab2_report.md").read_text()
    results = json.loads((tmp_path / "fixed_models" / "results.json").read_text())
    assert [s["threshold"] for s in results["selections"]] == [4.0]
    assert results["provenance"]["inputs"]["model"]["path"].endswith("pa_net.h5")
    assert main(["report", "--notebook", str(nb), "-p", "NOPE", "1"]) == 1
    assert "no parameter named NOPE" in capsys.readouterr().err
    # an existing hand-in is replaced only when asked (checked before anything runs)
    assert main(["report", "--notebook", str(nb)]) == 1
    assert "--overwrite" in capsys.readouterr().err
    # the notebook itself is replaced only when asked
    assert main(["report", "--notebook", str(nb), "--executed", str(nb)]) == 1
    assert "--in-place" in capsys.readouterr().err
    assert not nbformat.read(nb, as_version=4).cells[3].get("outputs")


@pytest.mark.slow
def test_notebook_detection_section_shows_each_detector_and_both(executed):
    nb, _, _ = executed
    both = f"G ({' + '.join(DETECTORS)})"
    table = [t for t in notebook_outputs(nb, "text/markdown") if f"| {both} |" in t]
    assert len(table) == 1
    rows = {r[0]: r for r in markdown_rows(table[0][table[0].index("| model |"):])}
    assert list(rows) == [*(f"G ({d})" for d in DETECTORS), both]
    detection = {name: float(r[4]) for name, r in rows.items()}
    # an input is flagged where any detector flags it
    assert detection[both] >= max(detection[f"G ({d})"] for d in DETECTORS)
    text = "".join("".join(o.get("text", "")) for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "Neural Cleanse flagged:" in text
    # Neural Cleanse's two mitigations, repaired from the same scan, each with its GoodNet
    table = [t for t in notebook_outputs(nb, "text/markdown") if "| nc-unlearning |" in t]
    assert len(table) == 1
    rows = [r[0] for r in markdown_rows(table[0][table[0].index("| model |"):])]
    assert rows == ["no defense", "nc-unlearning", "G (nc-unlearning)", "nc-pruning", "G (nc-pruning)"]


@pytest.mark.slow
def test_notebook_beyond_the_lab_section_estimates_then_shows_fine_pruning_the_gate_and_the_default_g(executed):
    from badnet_repair.detectors import DEFAULT_DETECTORS

    nb, _, _ = executed
    text = _stream(nb, "stdout")
    assert "Running fine-pruning: about" in text and "fitted on the clean validation data in" in text
    tables = notebook_outputs(nb, "text/markdown")
    fp = [t for t in tables if "| fine-pruning |" in t and "| G (fine-pruning) |" in t and "| ft-sam |" not in t]
    assert len(fp) == 1
    assert [r[0] for r in markdown_rows(fp[0][fp[0].index("| model |"):])] == ["no defense", "fine-pruning",
                                                                              "G (fine-pruning)"]
    gate = [t for t in tables if "| feature-gate |" in t and "| G (feature-gate) |" in t and "| ft-sam |" not in t]
    assert len(gate) == 1
    assert [r[0] for r in markdown_rows(gate[0][gate[0].index("| model |"):])] == ["no defense", "feature-gate",
                                                                                  "G (feature-gate)"]
    default_g = f"G ({' + '.join(DEFAULT_DETECTORS)})"
    g = [t for t in tables if t.startswith("| model |") and f"| {default_g} |" in t]
    assert len(g) == 1 and [r[0] for r in markdown_rows(g[0])][-1] == default_g


@pytest.mark.slow
def test_notebook_shows_the_labs_known_figures_for_orientation_on_the_demo(executed):
    nb, work, _ = executed
    table = next(t for t in notebook_outputs(nb, "text/markdown") if "| figure | published |" in t)
    assert "not on the lab's BadNet" in table and "| B'_4: channels pruned | 48 |" in table
    assert "**differs**" not in table  # nothing is compared off the lab's files
    assert "## The lab's known figures" in (work / "Lab2_report.md").read_text()


def test_the_committed_notebook_says_first_that_it_is_a_demo_run():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert "run on that demo" in nb.cells[0].source
    first_output = notebook_outputs(nb, "text/markdown")[0]
    assert "demo run" in first_output
    report = (NOTEBOOK.parent / "Lab2_report.md").read_text().splitlines()
    assert any("demo run" in line for line in report[:4])


def test_the_default_parameters_leave_the_long_sections_off():
    ns: dict[str, object] = {}
    cell = next(c for c in nbformat.read(NOTEBOOK, as_version=4).cells
                if "parameters" in c.get("metadata", {}).get("tags", []))
    exec(cell.source, ns)
    assert ns["COMPARE_DEFENSES"] is False and ns["DETECT"] is False and ns["BEYOND"] is True
