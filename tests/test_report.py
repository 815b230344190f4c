"""The markdown report (reporting/report.py)."""

from __future__ import annotations

import pytest


def test_append_section_adds_a_step_and_its_warnings_to_a_written_report(tmp_path):
    from badnet_repair.errors import DataError
    from badnet_repair.reporting.report import append_section

    report = tmp_path / "Lab2_report.md"
    with pytest.raises(DataError, match="no report"):
        append_section(report, "Beyond", "body")
    report.write_text("# Report\n\nthe lab's part\n")
    append_section(report, "Beyond the lab: fine-pruning", "| a | b |", warnings=["WARNING: far below B."])
    text = report.read_text()
    assert text.startswith("# Report\n\nthe lab's part\n")
    assert "## Beyond the lab: fine-pruning\n\n> **Warning:** WARNING: far below B.\n\n| a | b |" in text
    append_section(report, "More", "body", warnings=["CAUTION: few images; bound 7.6 points."])
    assert "## More\n\n> **Caution:** few images; bound 7.6 points.\n\nbody" in report.read_text()
