"""The package's import behaviour: cheap to import, the CLI's help without TensorFlow, and
Keras knowing the package's layers whichever of the two is imported first."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

import badnet_repair as br


def _python(code: str, cwd) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("argv", [["--help"], ["prune", "--help"], ["compare", "--help"],
                                  ["fine-prune", "--help"], ["prune", "--thresholds", "-1"], ["prune", "--bogus"]])
def test_help_and_argument_errors_answer_without_tensorflow(argv, tmp_path):
    r = _python(f"""
        import sys
        from badnet_repair.cli import main
        try:
            rc = main({argv!r})
        except SystemExit as exc:
            rc = exc.code
        heavy = [m for m in ("tensorflow", "keras", "h5py") if m in sys.modules]
        print("RC", rc, "HEAVY", heavy)
    """, tmp_path)
    last = r.stdout.strip().splitlines()[-1]
    assert last.startswith("RC "), r.stderr
    rc = int(last.split()[1])
    assert rc == (0 if "--help" in argv else 2)
    assert "HEAVY ['h5py']" in last or "HEAVY []" in last, last


def test_public_names_resolve_and_are_listed():
    for name in br.__all__:
        assert getattr(br, name) is not None, name
    assert set(br.__all__) <= set(dir(br))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        br.nope  # noqa: B018


@pytest.mark.slow
@pytest.mark.parametrize("first", ["badnet_repair", "keras"])
def test_keras_loads_a_goodnet_after_import_badnet_repair(first, tmp_path):
    made = _python("""
        import badnet_repair as br
        b = br.deepid(num_classes=3)
        br.build_goodnet(b, br.prune_channels(b, "conv_3", [0, 1])).save("g.keras")
    """, tmp_path)
    assert made.returncode == 0, made.stderr[-2000:]
    second = "keras" if first == "badnet_repair" else "badnet_repair"
    r = _python(f"""
        import {first}
        import {second}
        import keras
        print("SHAPE", keras.models.load_model("g.keras").output_shape)
    """, tmp_path)
    assert "SHAPE (None, 4)" in r.stdout, r.stderr[-2000:]
    # and without the package, Keras does not know G's layer: the import is what registers it
    r = _python("""
        import keras
        try:
            keras.models.load_model("g.keras")
        except Exception as exc:
            print("FAILS", type(exc).__name__)
    """, tmp_path)
    assert "FAILS" in r.stdout
