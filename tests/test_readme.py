"""The README's code runs: every Python block, in order, on a small demo laid out as the lab's
folders; every ``badnet-repair`` command line parses."""

from __future__ import annotations

import re
import shlex
import shutil
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README.read_text(), flags=re.S)


@pytest.fixture
def lab_folder(small_demo, tmp_path, monkeypatch):
    """The small demo's files where the lab keeps them: model/, data/cl/, data/bd/."""
    for src, dst in ((small_demo.model, "model/bd_net.h5"), (small_demo.valid, "data/cl/valid.h5"),
                     (small_demo.test, "data/cl/test.h5"), (small_demo.bd_valid, "data/bd/bd_valid.h5"),
                     (small_demo.bd_test, "data/bd/bd_test.h5")):
        (tmp_path / dst).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, tmp_path / dst)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.slow
def test_every_python_block_runs_on_the_lab_layout(lab_folder):
    blocks = _blocks("python")
    assert len(blocks) >= 2
    namespace: dict[str, object] = {}
    for i, code in enumerate(blocks):
        try:
            exec(compile(code, f"README.md python block {i}", "exec"), namespace)
        except Exception as exc:  # pragma: no cover - the message says which block failed
            pytest.fail(f"README python block {i} failed: {type(exc).__name__}: {exc}")
    # what the blocks promise was written
    for x in ("2", "4", "10"):
        assert (lab_folder / "fixed_models" / f"bd_{x}.h5").exists()
        assert (lab_folder / "fixed_models" / f"goodnet_{x}.keras").exists()
    assert (lab_folder / "fixed_models" / "comparison" / "comparison.md").exists()


def test_every_command_line_in_the_readme_parses():
    from badnet_repair.cli import _parser

    parser = _parser()
    lines = [ln.split("#")[0].strip() for block in _blocks("bash") for ln in block.replace("\\\n", " ").splitlines()]
    commands = [ln for ln in lines if ln.startswith("badnet-repair ")]
    assert len(commands) >= 8
    for line in commands:
        argv = shlex.split(line)[1:]
        try:
            parser.parse_args(argv)
        except SystemExit:
            pytest.fail(f"README command does not parse: {line}")
