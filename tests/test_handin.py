"""The hand-in folder and the student's conclusion."""

from __future__ import annotations

import nbformat

from badnet_repair.reporting.notebook import read_conclusion
from badnet_repair.workflow.handin import collect_handin


def test_read_conclusion_takes_the_students_text_and_nothing_else(tmp_path):
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("# Title"),
                                         nbformat.v4.new_markdown_cell("### Your conclusion\n\n*Replace this line "
                                                                       "with your conclusion.*")])
    nb.cells[1].metadata["tags"] = ["conclusion"]
    path = tmp_path / "hw.ipynb"
    nbformat.write(nb, path)
    assert read_conclusion(path) is None  # nothing written yet
    nb.cells[1].source += "\n\nPruning at X=4 kept **92 %** accuracy.\n\n- one point"
    nbformat.write(nb, path)
    assert read_conclusion(path) == "Pruning at X=4 kept **92 %** accuracy.\n\n- one point"
    assert read_conclusion(tmp_path / "absent.ipynb") is None


def test_collect_handin_copies_the_lab_layout_and_lists_it(tmp_path):
    out = tmp_path / "fixed_models"
    (out / "comparison").mkdir(parents=True)
    for name in ("bd_4.h5", "bd_4_weights.h5", "bd_4.keras", "goodnet_4.h5", "goodnet_4.keras", "results.json",
                 "comparison/comparison.md"):
        (out / name).write_text(name)
    (tmp_path / "Lab2_report_files").mkdir()
    (tmp_path / "Lab2_report_files" / "pruning_curves.png").write_bytes(b"png")
    (tmp_path / "Lab2_report.md").write_text("report")
    (tmp_path / "Lab2_report.html").write_text("html")
    handin = tmp_path / "handin"
    handin.mkdir()
    (handin / "hw.ipynb").write_text("{}")  # written there by the run
    files = collect_handin(handin, notebook=handin / "hw.ipynb", notebook_html=None,
                           report=tmp_path / "Lab2_report.md", out_dir=out)
    got = sorted(p.relative_to(handin).as_posix() for p in files)
    assert got == ["Lab2_report.html", "Lab2_report.md", "Lab2_report_files/pruning_curves.png", "README.md",
                   "fixed_models/bd_4.h5", "fixed_models/bd_4_weights.h5", "fixed_models/comparison/comparison.md",
                   "fixed_models/goodnet_4.h5", "fixed_models/results.json", "hw.ipynb"]
    readme = (handin / "README.md").read_text()
    assert "`fixed_models/goodnet_4.h5`" in readme and ".keras" not in readme


def test_collect_handin_leaves_out_models_an_earlier_run_left(tmp_path, caplog):
    import json

    out = tmp_path / "fixed_models"
    out.mkdir()
    for name in ("bd_2.h5", "goodnet_2.h5", "bd_4.h5", "bd_4_weights.h5", "goodnet_4.h5"):
        (out / name).write_text(name)
    # this run (X=4 only) wrote results.json listing its models
    models = {"4": {"h5": str(out / "bd_4.h5"), "weights": str(out / "bd_4_weights.h5"),
                    "goodnet_h5": str(out / "goodnet_4.h5")}}
    (out / "results.json").write_text(json.dumps({"models": models}))
    (tmp_path / "Lab2_report.md").write_text("report")
    with caplog.at_level("WARNING", logger="badnet_repair"):
        files = collect_handin(tmp_path / "handin", notebook=None, notebook_html=None,
                               report=tmp_path / "Lab2_report.md", out_dir=out)
    got = sorted(p.name for p in files if p.parent.name == "fixed_models")
    assert got == ["bd_4.h5", "bd_4_weights.h5", "goodnet_4.h5", "results.json"]
    assert "bd_2.h5, goodnet_2.h5" in caplog.text and "not written by this run" in caplog.text
    assert (out / "bd_2.h5").exists()  # left where it was, not deleted
