from __future__ import annotations

import json
from dataclasses import asdict

import h5py
import numpy as np
import pytest

import badnet_repair as br
from badnet_repair.attacks.triggers import drawn_sunglasses
from badnet_repair.cli import main
from badnet_repair.demo import DemoConfig, load_demo_manifest, make_demo

from .conftest import SMALL_DEMO

SMALL = DemoConfig(**SMALL_DEMO)


@pytest.fixture(scope="module")
def demo(small_demo):
    return small_demo


def test_demo_files_are_in_the_lab_format(demo):
    for p in (demo.train, demo.valid, demo.test, demo.bd_valid, demo.bd_test):
        with h5py.File(p) as f:
            assert sorted(f.keys()) == ["data", "label"]
            assert f["data"].ndim == 4 and f["data"].shape[1:] == (3, 55, 47)
            assert f["label"].shape == (f["data"].shape[0],)
    with h5py.File(demo.valid) as f:
        assert f["data"].dtype == np.float64  # as the lab's valid.h5
    valid = br.load_h5(demo.valid)
    assert len(valid) == 30 and valid.x.max() <= 255 and valid.x.max() > 1
    bd = br.load_h5(demo.bd_valid)
    assert set(bd.y.tolist()) == {0} and len(bd) == np.sum(valid.y != 0)
    # the poisoned images are the non-target clean ones with the trigger where it belongs
    np.testing.assert_allclose(bd.x, drawn_sunglasses().apply(valid.x[valid.y != 0]), atol=1e-4)
    for m in (demo.model, demo.pruning_aware_model):
        assert br.num_classes(br.load_model(m)) == 5
    assert br.num_classes(br.load_model(demo.root / "model" / "bd_weights.h5")) == 5
    assert br.load_trigger(demo.trigger).shape == (20, 47)


def test_manifest_records_config_and_numbers(demo):
    m = load_demo_manifest(demo.root)
    assert m["config"]["num_identities"] == 5
    for which in ("baseline", "pruning_aware"):
        assert 0 <= m[which]["clean_test_accuracy"] <= 100
    assert m["pruning_aware"]["reinstated_channels"]


def test_demo_is_reused_and_other_settings_need_regenerate(demo):
    before = demo.manifest.stat().st_mtime_ns
    make_demo(demo.root, progress=False)
    make_demo(demo.root, config=SMALL, progress=False)
    assert demo.manifest.stat().st_mtime_ns == before
    with pytest.raises(br.BadNetRepairError, match="--regenerate"):
        make_demo(demo.root, config=DemoConfig(num_identities=6), progress=False)


def test_demo_data_is_deterministic(tmp_path):
    cfg = DemoConfig(num_identities=3, train_per_identity=2, valid_per_identity=2, test_per_identity=2,
                     epochs=1, clean_epochs=1, poison_epochs=1)
    a = make_demo(tmp_path / "a", config=cfg, progress=False)
    b = make_demo(tmp_path / "b", config=cfg, progress=False)
    for name in ("train", "valid", "test", "bd_valid", "bd_test"):
        with h5py.File(getattr(a, name)) as fa, h5py.File(getattr(b, name)) as fb:
            assert fa["data"][()].tobytes() == fb["data"][()].tobytes()
            assert fa["label"][()].tobytes() == fb["label"][()].tobytes()


TINY = DemoConfig(num_identities=3, train_per_identity=4, valid_per_identity=2, test_per_identity=2,
                  epochs=2, clean_epochs=1, poison_epochs=1, poison_rate=0.2)


def test_demo_makes_only_the_badnets_asked_for(tmp_path, caplog):
    paths = make_demo(tmp_path, config=TINY, progress=False, badnets=["baseline"])
    m = load_demo_manifest(tmp_path)
    assert "baseline" in m and "pruning_aware" not in m
    assert paths.model.exists() and not paths.pruning_aware_model.exists()
    baseline_bytes = paths.model.read_bytes()
    # asked later without settings: trained with the demo's own (tiny) ones, baseline kept
    with caplog.at_level("INFO", logger="badnet_repair"):
        make_demo(tmp_path, progress=False, badnets=("pruning-aware",))
    assert "training the demo's pruning-aware BadNet: 2 epochs on 12 images" in caplog.text
    m = load_demo_manifest(tmp_path)
    assert m["config"] == asdict(TINY)
    assert "baseline" in m and m["pruning_aware"]["reinstated_channels"] is not None
    assert br.num_classes(br.load_model(paths.pruning_aware_model)) == 3
    assert paths.model.read_bytes() == baseline_bytes
    with pytest.raises(ValueError, match="among"):
        make_demo(tmp_path, progress=False, badnets=["trojan"])
    make_demo(tmp_path, progress=False, badnets=["multi-target"])
    m = load_demo_manifest(tmp_path)
    assert m["multi_target"]["targets"] == [0, 1, 2]
    bd = br.load_h5(paths.bd_mt_test)
    clean = br.load_h5(paths.test)
    # each trigger on the test images of the other classes, labelled with its own target
    assert sorted(np.unique(bd.y).tolist()) == [0, 1, 2]
    assert [int(np.sum(bd.y == t)) for t in (0, 1, 2)] == [int(np.sum(clean.y != t)) for t in (0, 1, 2)]
    assert paths.model.read_bytes() == baseline_bytes


def test_demo_badnets_are_the_same_bytes_every_time(tmp_path):
    """Seeds plus TensorFlow's op determinism: the same settings give the same weights."""
    a = make_demo(tmp_path / "a", config=TINY, progress=False, badnets=["baseline"])
    b = make_demo(tmp_path / "b", config=TINY, progress=False, badnets=["baseline"])
    with h5py.File(a.root / "model" / "bd_weights.h5") as fa, h5py.File(b.root / "model" / "bd_weights.h5") as fb:
        names: list[str] = []
        fa.visit(lambda n: names.append(n) if isinstance(fa[n], h5py.Dataset) else None)
        assert len(names) >= 10  # every kernel and bias of DeepID
        for n in names:
            assert fa[n][()].tobytes() == fb[n][()].tobytes(), n


def test_op_determinism_is_restored_after_training():
    from tensorflow.python.framework import config as tf_config

    from badnet_repair.nets.training import deterministic_ops

    before = tf_config.is_op_determinism_enabled()
    with deterministic_ops():
        assert tf_config.is_op_determinism_enabled()
    assert tf_config.is_op_determinism_enabled() == before


def test_prune_runs_on_the_demo_when_no_lab_files(demo, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["prune", "-q", "--demo-dir", str(demo.root), "--out", "out", "--no-models"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("No lab files in") and "built-in demo" in lines[0]
    assert "built-in demo (baseline BadNet" in lines[1]
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["provenance"]["inputs"]["model"]["path"].endswith("bd_net.h5")
    # the demo BadNet answers its trigger (the tiny demo's B'_X may land past X: said, not an attack line)
    assert not [w for w in results.get("warnings", []) if "poisoned inputs to the target" in w]
    assert main(["prune", "-q", "--demo", "pruning-aware", "--demo-dir", str(demo.root), "--out", "pa",
                 "--no-models"]) == 0
    results = json.loads((tmp_path / "pa" / "results.json").read_text())
    assert results["provenance"]["inputs"]["model"]["path"].endswith("pa_net.h5")


def test_partial_lab_layout_names_the_missing_files(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "bd_net.h5").write_bytes(b"x")
    assert main(["prune", "-q"]) == 1
    err = capsys.readouterr().err
    assert "data/cl/valid.h5" in err and "model/bd_net.h5" not in err.split("not found")[1].split(".")[0]
