"""The README's code runs: every Python block, in order, on a small demo laid out as the lab's
folders; every ``badnet-repair`` command line parses."""

from __future__ import annotations

import re
import shlex
import shutil
from pathlib import Path

import numpy as np
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
    commands = [ln.removeprefix(".venv/bin/") for ln in lines
                if ln.removeprefix(".venv/bin/").startswith("badnet-repair ")]
    assert len(commands) >= 8
    for line in commands:
        argv = shlex.split(line)[1:]
        try:
            parser.parse_args(argv)
        except SystemExit:
            pytest.fail(f"README command does not parse: {line}")


def _lab_commands() -> list[str]:
    """The command lines of the README's section "The lab, step by step"."""
    text = README.read_text()
    section = text[text.index("## The lab, step by step"):text.index("## The notebook and the report")]
    block = re.findall(r"```bash\n(.*?)```", section, flags=re.S)[0]
    return [ln.split("#")[0].strip() for ln in block.splitlines() if ln.split("#")[0].strip()]


@pytest.mark.slow
def test_the_lab_commands_run_as_written_in_a_fresh_shell(lab_folder):
    """Each of the lab's command lines, exactly as the README prints it, in a shell whose PATH has no
    virtual environment (the setup's ``.venv`` beside the lab's folders); ``report`` runs the notebook,
    which tests/test_notebook.py covers, so it is only checked to start (``--help``)."""
    import os
    import subprocess
    import sys

    from PIL import Image

    (lab_folder / ".venv").symlink_to(Path(sys.prefix), target_is_directory=True)
    if not (lab_folder / ".venv" / "bin" / "badnet-repair").exists():
        pytest.skip("the tests do not run from the project's virtual environment with badnet-repair installed")
    commands = _lab_commands()
    assert [c.split()[:2] for c in commands] == [[".venv/bin/badnet-repair", verb]
                                                 for verb in ("prune", "eval", "predict", "report")]
    Image.fromarray(np.zeros((55, 47, 3), np.uint8)).save(lab_folder / "face.png")
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env["PATH"] = "/usr/bin:/bin"
    for line in commands:
        if " report" in line:
            line += " --help"
        run = subprocess.run(line, shell=True, cwd=lab_folder, env=env, capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, f"{line}: {run.stderr[-2000:]}"
    assert (lab_folder / "fixed_models" / "goodnet_4.keras").exists()
