"""Bad inputs, interrupted runs and determinism (the reliability catalogue)."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import badnet_repair as br
from badnet_repair.errors import DataError

# ---------------------------------------------------------------- property-based loaders

shapes = st.lists(st.integers(0, 6), min_size=0, max_size=5).map(tuple)
dtypes = st.sampled_from(["float64", "float32", "uint8", "int16", "bool", "S3"])


@st.composite
def malformed_h5(draw):
    keys = draw(st.lists(st.sampled_from(["data", "label", "images", "x", "y"]), unique=True, max_size=3))
    content = {}
    for k in keys:
        shape = draw(shapes)
        dtype = draw(dtypes)
        if dtype == "S3":
            arr = np.full(shape, b"abc", dtype="S3")
        else:
            arr = np.asarray(draw(st.sampled_from([0.0, 0.5, 255.0, -1.0, 1283.0, np.nan, np.inf])))
            with np.errstate(invalid="ignore"):
                arr = np.broadcast_to(arr, shape).astype(dtype)
        content[k] = arr
    return content, draw(st.sampled_from(["nchw", "nhwc", "auto"])), draw(st.booleans())


def assert_valid_or_data_error(load):
    try:
        ds = load()
    except DataError:
        return
    x = ds.x[:] if not isinstance(ds.x, np.ndarray) else ds.x
    assert x.ndim == 4 and x.dtype == np.float32 and np.isfinite(x).all()
    assert ds.y.dtype == np.int64 and ds.y.shape == (len(x),) and len(x) > 0
    assert (ds.y >= 0).all()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(malformed_h5())
def test_h5_loader_returns_valid_arrays_or_raises_data_error(tmp_path, case):
    content, layout, lazy = case
    p = tmp_path / "case.h5"
    with h5py.File(p, "w") as f:
        for k, v in content.items():
            f.create_dataset(k, data=v)
    assert_valid_or_data_error(lambda: br.load_h5(p, layout=layout, lazy=lazy, num_classes=1283))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.integers(0, 4000), st.binary(max_size=64))
def test_truncated_or_corrupted_h5_raises_data_error(tmp_path, cut, junk):
    good = tmp_path / "good.h5"
    if not good.exists():
        br.save_h5(good, np.random.default_rng(0).uniform(0, 255, (3, 5, 4, 3)), np.arange(3))
    blob = good.read_bytes()
    bad = tmp_path / "bad.h5"
    bad.write_bytes(blob[: min(cut, len(blob) - 1)] + junk)
    assert_valid_or_data_error(lambda: br.load_h5(bad))


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=300), st.sampled_from(["png", "jpg"]), st.booleans())
def test_image_loader_returns_valid_arrays_or_raises_data_error(tmp_path, tail, fmt, keep_header):
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.zeros((55, 47, 3), np.uint8)).save(buf, format="PNG" if fmt == "png" else "JPEG")
    blob = buf.getvalue()
    p = tmp_path / f"img.{fmt}"
    p.write_bytes((blob[: len(blob) // 2] if keep_header else b"") + tail)
    try:
        x = br.load_images(p)
    except DataError:
        return
    assert x.shape == (1, 55, 47, 3) and x.dtype == np.float32


# ---------------------------------------------------------------- lazy loading


def test_lazy_images_read_the_same_pixels_as_eager(tmp_path):
    data = np.random.default_rng(1).uniform(0, 255, (11, 3, 6, 5))
    p = tmp_path / "d.h5"
    with h5py.File(p, "w") as f:
        f["data"], f["label"] = data, np.arange(11)
    eager, lazy = br.load_h5(p), br.load_h5(p, lazy=True)
    assert isinstance(lazy.x, br.formats.data.LazyImages) and lazy.x.shape == eager.x.shape
    np.testing.assert_array_equal(lazy.x[2:7], eager.x[2:7])
    idx = np.array([9, 2, 2, 0])
    np.testing.assert_array_equal(lazy.x[idx], eager.x[idx])
    np.testing.assert_array_equal(lazy.x[::3], eager.x[::3])
    data[8, 0, 0, 0] = np.nan
    with h5py.File(p, "w") as f:
        f["data"], f["label"] = data, np.arange(11)
    lazy = br.load_h5(p, lazy=True)  # opening does not read pixels
    with pytest.raises(DataError, match="image 8 has non-finite"):
        lazy.x[5:11]


def test_sweep_on_lazy_data_equals_sweep_on_arrays(lab_files, small_deepid):
    eager = br.load_h5(lab_files["valid"])
    lazy = br.load_h5(lab_files["valid"], lazy=True)
    a = br.prune_sweep(small_deepid, eager, batch_size=64)
    b = br.prune_sweep(small_deepid, lazy, batch_size=64)
    np.testing.assert_array_equal(a.predictions["valid"], b.predictions["valid"])


# ---------------------------------------------------------------- interrupted runs


def prune_cmd(lab_files, out, *extra):
    f = lab_files
    return [sys.executable, "-m", "badnet_repair", "prune", "-q", "--model", str(f["model"]),
            "--valid", str(f["valid"]), "--bd-valid", str(f["bd_valid"]), "--test", str(f["test"]),
            "--bd-test", str(f["bd_test"]), "--out", str(out), *extra]


def assert_every_final_file_is_complete(out: Path):
    for p in out.iterdir():
        if p.name.startswith("."):
            continue  # temporary files are hidden and never carry a final name
        if p.suffix == ".json":
            json.loads(p.read_text())
        elif p.suffix in (".h5", ".keras"):
            br.load_model(p)
        elif p.suffix == ".csv":
            assert p.read_text().endswith("\n")


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_a_killed_run_leaves_earlier_results_intact_and_no_partial_files(lab_files, tmp_path, sig):
    out = tmp_path / "out"
    subprocess.run(prune_cmd(lab_files, out, "--thresholds", "3"), check=True, capture_output=True)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    codes: list[tuple[str, int]] = []
    for phase in ("sweep", "models"):
        proc = subprocess.Popen(prune_cmd(lab_files, out, "--overwrite"), env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.time() + 120
        if phase == "sweep":
            assert proc.stdout.readline().startswith(b"Using")  # printed just before loading
            time.sleep(0.3)
        else:
            while not (out / "bd_2.h5").exists() and proc.poll() is None and time.time() < deadline:
                time.sleep(0.01)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
        codes.append((phase, proc.returncode))
        if sig == signal.SIGINT:
            assert proc.returncode in (0, 130), err.decode()[-3000:]  # 0 only if it finished before the signal
            if proc.returncode == 130:
                assert b"interrupted" in err and b"Traceback" not in err
            assert not [p for p in out.iterdir() if "partial" in p.name]
        else:
            assert proc.returncode == -signal.SIGKILL
        assert_every_final_file_is_complete(out)
        for name in ("bd_3.h5", "bd_3_weights.h5", "bd_3.keras", "goodnet_3.keras"):
            assert (out / name).read_bytes() == before[name]
    # the interruption during the sweep really interrupted it
    assert codes[0][1] == (130 if sig == signal.SIGINT else -signal.SIGKILL)


def test_an_interrupt_that_a_library_turns_into_an_error_still_says_interrupted(monkeypatch, capsys):
    """TensorFlow or h5py, interrupted inside C code, may raise their own error, which the loaders
    turn into a ModelError; the command line knows Ctrl-C arrived and exits 130, not 1."""
    from badnet_repair import cli
    from badnet_repair.errors import ModelError

    def interrupted_inside_a_library(args):
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # the handler raises here at the latest
        except KeyboardInterrupt:
            raise ModelError("model.h5: Keras could not load this model: cancelled") from None
        return 0

    def plain_error(args):
        raise ModelError("model.h5: Keras could not load this model: bad config")

    before = signal.getsignal(signal.SIGINT)
    monkeypatch.setattr(cli, "_cmd_eval", interrupted_inside_a_library)
    assert cli.main(["eval", "t.h5", "bt.h5", "m.h5"]) == 130
    assert "interrupted" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGINT) is before  # the handler is put back
    monkeypatch.setattr(cli, "_cmd_eval", plain_error)
    assert cli.main(["eval", "t.h5", "bt.h5", "m.h5"]) == 1  # no interrupt: the error itself
    assert "bad config" in capsys.readouterr().err


def _interrupted_then(outcome):
    """A command whose library, interrupted, does ``outcome``: raise its own error or drop the
    KeyboardInterrupt (as one raised inside a callback from C code is) and finish."""
    def command(args):
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
        except KeyboardInterrupt:
            if outcome == "error":
                raise RuntimeError("CancelledError: the operation was cancelled") from None
        return 0
    return command


@pytest.mark.parametrize("outcome", ["error", "dropped"])
def test_an_interrupt_a_library_turns_into_another_error_or_drops_still_exits_130(monkeypatch, capsys, outcome):
    from badnet_repair import cli

    monkeypatch.setattr(cli, "_cmd_eval", _interrupted_then(outcome))
    assert cli.main(["eval", "t.h5", "bt.h5", "m.h5"]) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "Traceback" not in err
    if outcome == "dropped":
        assert "the command finished: its outputs are complete" in err


def test_an_error_of_a_library_without_an_interrupt_is_not_called_an_interrupt(monkeypatch):
    from badnet_repair import cli

    def broken(args):
        raise RuntimeError("a bug")

    monkeypatch.setattr(cli, "_cmd_eval", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        cli.main(["eval", "t.h5", "bt.h5", "m.h5"])


# ---------------------------------------------------------------- determinism


def test_repeated_sweeps_give_the_same_order_and_predictions(lab_files, small_deepid):
    valid = br.load_h5(lab_files["valid"])
    a = br.prune_sweep(small_deepid, valid)
    b = br.prune_sweep(small_deepid, valid)
    np.testing.assert_array_equal(a.ranking.order, b.ranking.order)
    np.testing.assert_array_equal(a.predictions["valid"], b.predictions["valid"])


def test_results_record_versions_hashes_and_parameters(lab_files, tmp_path):
    from badnet_repair.formats.files import sha256_file

    r = br.run_pruning_defense(lab_files["model"], lab_files["valid"], out_dir=tmp_path / "o",
                               thresholds=[3], save_models=False, report=False, progress=False)
    prov = r.results["provenance"]
    for lib in ("python", "tensorflow", "keras", "numpy", "badnet_repair"):
        assert prov["versions"][lib]
    assert prov["inputs"]["valid"]["sha256"] == sha256_file(lab_files["valid"])
    assert r.results["parameters"]["thresholds"] == [3.0] and r.results["parameters"]["layer"] == "conv_3"
