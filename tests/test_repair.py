"""The repair command (workflow.repair): one defense on files, the model saved before the test
sets are opened, its results file, and its refusals."""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest

import badnet_repair as br
from badnet_repair.cli import main
from badnet_repair.defenses import make_defense
from badnet_repair.workflow import repair as repair_module
from badnet_repair.workflow.repair import repair_paths, run_repair, uses_only_keras_layers


def _files(demo) -> list[str]:
    return ["--model", str(demo.model), "--valid", str(demo.valid), "--test", str(demo.test),
            "--bd-test", str(demo.bd_test)]


def test_repair_saves_the_model_then_evaluates_it_and_writes_its_results(small_demo, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["repair", "-q", *_files(small_demo), "--out", str(out), "--defense", "feature-gate",
                 "--set", "feature-gate.drop=2"]) == 0
    printed = capsys.readouterr().out
    assert "| feature-gate |" in printed and "| G (feature-gate) |" in printed
    paths = repair_paths(out, make_defense("feature-gate"))
    assert paths["keras"].exists() and paths["h5"].exists()  # the gate is built of Keras's own layers
    results = json.loads(paths["results"].read_text())
    assert results["defense"] == "feature-gate" and results["parameters"]["drop"] == 2.0
    assert [e["model"] for e in results["evaluations"]] == ["no defense", "feature-gate", "G (feature-gate)"]
    assert results["record"]["choices"]["tried"] and set(results["provenance"]["inputs"]) == {
        "model", "valid", "test", "bd_test"}
    assert results["models"] == {"feature-gate": {"keras": str(paths["keras"]), "h5": str(paths["h5"])}}
    # the saved model is the repaired one: its accuracy on the test set is the one reported
    b = br.load_model(small_demo.model)
    test = br.load_data_for(b, small_demo.test)
    saved = keras.models.load_model(paths["keras"])
    accuracy = 100.0 * np.mean(np.argmax(saved.predict(test.x, verbose=0), axis=1) == test.y)
    assert accuracy == results["evaluations"][1]["clean_accuracy"]
    # and so is the .h5 that the lab's Keras 2 eval.py loads
    tf_keras = pytest.importorskip("tf_keras", reason="tf-keras (Keras 2) is not installed; .ci/run installs it")
    k2 = tf_keras.models.load_model(paths["h5"], compile=False)
    assert 100.0 * np.mean(np.argmax(k2.predict(test.x, verbose=0), axis=1) == test.y) == accuracy


def test_the_test_sets_are_opened_only_after_the_models_are_saved(small_demo, tmp_path, monkeypatch):
    seen = []
    real = repair_module.open_evaluation_sets

    def spy(repairs, badnet, files, **kw):  # type: ignore[no-untyped-def]
        seen.append(sorted(p.name for p in (tmp_path / "out").iterdir()))
        return real(repairs, badnet, files, **kw)

    monkeypatch.setattr(repair_module, "open_evaluation_sets", spy)
    run_repair(small_demo.model, small_demo.valid, make_defense("pruning", thresholds=(4.0,)), test=small_demo.test,
               bd_test=small_demo.bd_test, out_dir=tmp_path / "out", progress=False)
    # pruning's B' is plain Keras layers: .h5 beside .keras; the results file comes after the evaluation
    assert seen == [["pruning.h5", "pruning.keras"]]
    assert (tmp_path / "out" / "pruning_results.json").exists()


def test_only_keras_layers_means_a_plain_network(small_deepid):
    assert uses_only_keras_layers(small_deepid)
    x = keras.Input((2,))
    inner = keras.Model(x, keras.layers.Dense(2)(x))
    outer_in = keras.Input((2,))
    plain = keras.Model(outer_in, inner(outer_in))
    assert uses_only_keras_layers(plain)
    from badnet_repair.nets.layers import RunnerUpWhereFlagged

    p = keras.Input((3,))
    f = keras.Input(())
    assert not uses_only_keras_layers(keras.Model([p, f], RunnerUpWhereFlagged()([p, f])))


def test_repair_refuses_existing_outputs_and_unknown_settings_before_repairing(small_demo, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "two_gates_results.json").write_text("{}")  # the default defense's (issue 31's round 18)
    assert main(["repair", "-q", *_files(small_demo), "--out", str(out)]) != 0
    err = capsys.readouterr().err
    assert "--overwrite" in err and "two_gates_results.json" in err and "Traceback" not in err
    assert not (out / "two_gates.keras").exists()  # refused before the repair
    with pytest.raises(SystemExit):  # the command line's own refusal, before anything runs
        main(["repair", "-q", *_files(small_demo), "--out", str(out), "--overwrite", "--set", "two-gates.colour=1"])
    assert "has no setting 'colour'" in capsys.readouterr().err
    assert main(["repair", "-q", *_files(small_demo), "--out", str(out), "--set", "fine-tuning.epochs=1"]) != 0
    assert "--defense leaves out" in capsys.readouterr().err
