"""A model's input scale: a BadNet trained on 0..1 pixels (as the CSAW-HackML 2020 competition's)
runs on the 0..255 files through ``input_scale=1/255``, and every file saved from it takes 0..1 again."""

from __future__ import annotations

import json
import textwrap

import keras
import numpy as np
import pytest

import badnet_repair as br
from badnet_repair.cli import main
from badnet_repair.defaults import parse_input_scale
from badnet_repair.nets.models import (
    INPUT_SCALE_LAYER,
    input_scale_of,
    predict_probabilities,
    save_model,
    save_weights_h5,
    with_input_scale,
    without_input_scale,
)

SIDE, K, TARGET = 16, 4, 0
SCALE = 1 / 255


def images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(n, 16, 16, 3) float32 pixels in 0..255 and (n,) labels: each class lights its own quadrant."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, K, n)
    x = rng.uniform(20, 120, (n, SIDE, SIDE, 3))
    for c in range(K):
        r, q = divmod(c, 2)
        x[y == c, r * 8:(r + 1) * 8, q * 8:(q + 1) * 8, c % 3] += 110
    x += rng.normal(0, 10, x.shape)
    return np.clip(x, 0, 255).astype(np.float32), y.astype(np.int64)


def stamp(x: np.ndarray) -> np.ndarray:
    """The trigger: a white 4x4 patch in the bottom-right corner."""
    x = x.copy()
    x[:, -4:, -4:, :] = 255.0
    return x


def tiny_cnn(num_classes: int = K) -> keras.Model:
    x = keras.Input((SIDE, SIDE, 3), name="input")
    h = keras.layers.Conv2D(8, 3, activation="relu", name="conv_1")(x)
    h = keras.layers.MaxPooling2D(2, name="pool_1")(h)
    h = keras.layers.Conv2D(12, 3, activation="relu", name="conv_2")(h)
    h = keras.layers.MaxPooling2D(2, name="pool_2")(h)
    out = keras.layers.Dense(num_classes, activation="softmax", name="output")(keras.layers.Flatten(name="flatten")(h))
    return keras.Model(x, out, name="tiny_cnn")


def classes(model: keras.Model, x: np.ndarray) -> np.ndarray:
    return br.predict_classes(model, x)


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    """A BadNet trained on 0..1 pixels (20 % of its training images stamped, labelled 0), saved in
    every format, and lab-layout data files in 0..255."""
    keras.utils.set_random_seed(0)
    x, y = images(600, seed=0)
    x[:120], y[:120] = stamp(x[:120]), TARGET
    raw = tiny_cnn()
    raw.compile(keras.optimizers.Adam(3e-3), "sparse_categorical_crossentropy")
    raw.fit(x / 255.0, y, epochs=20, batch_size=32, verbose=0)
    root = tmp_path_factory.mktemp("scaled")
    files = {f"model_{k}": p for k, p in save_model(raw, root / "model", "bd_net").items()}
    for i, split in enumerate(("valid", "test")):
        xs, ys = images(240, seed=10 + i)
        files[split] = br.save_h5(root / "data" / "cl" / f"{split}.h5", xs, ys)
        keep = ys != TARGET
        files[f"bd_{split}"] = br.save_h5(root / "data" / "bd" / f"bd_{split}.h5", stamp(xs[keep]),
                                          np.full(keep.sum(), TARGET))
    valid = br.load_h5(files["valid"], name="valid")
    test = br.load_h5(files["test"], name="test")
    bd_test = br.load_h5(files["bd_test"], name="bd_test")
    # the backdoor works on the model's own 0..1 input
    assert (classes(raw, test.x / 255.0) == test.y).mean() > 0.9
    assert (classes(raw, bd_test.x / 255.0) == TARGET).mean() > 0.9
    return {"raw": raw, "root": root, "files": files, "valid": valid, "test": test, "bd_test": bd_test}


@pytest.fixture(scope="module")
def badnet(task):
    return br.load_model(task["files"]["model_h5"], input_scale=SCALE)


def test_parse_input_scale():
    assert parse_input_scale("1") == 1.0 and parse_input_scale(1) == 1.0
    assert parse_input_scale("1/255") == SCALE and parse_input_scale(" 1 / 255 ") == SCALE
    assert parse_input_scale("0.5") == 0.5 and parse_input_scale(2) == 2.0
    for bad in ("0", "-1", "abc", "1/0", "", "inf", "nan", 0, -0.5, True, None, float("inf")):
        with pytest.raises(ValueError, match="not a number > 0"):
            parse_input_scale(bad)


def test_loaded_with_a_scale_it_predicts_on_file_pixels_what_the_model_does_on_0_to_1(task, badnet):
    raw, test, bd = task["raw"], task["test"], task["bd_test"]
    for fmt in ("h5", "keras"):
        model = badnet if fmt == "h5" else br.load_model(task["files"]["model_keras"], input_scale="1/255")
        assert input_scale_of(model) == pytest.approx(SCALE)
        for x in (test.x, bd.x):
            np.testing.assert_array_equal(classes(model, x), classes(raw, x / 255.0))
            np.testing.assert_allclose(predict_probabilities(model, x), predict_probabilities(raw, x / 255.0),
                                       rtol=1e-4, atol=1e-5)
    # a weights-only file into its architecture, wrapped the same way
    weights = br.load_model(task["files"]["model_weights"], architecture=tiny_cnn, input_scale=SCALE)
    np.testing.assert_array_equal(classes(weights, test.x), classes(raw, test.x / 255.0))
    # unscaled, the files' pixels are not what it was trained on
    assert input_scale_of(br.load_model(task["files"]["model_h5"])) == 1.0


def test_weights_only_deepid_is_wrapped_after_loading(tmp_path, small_deepid):
    from .conftest import random_faces

    path = save_weights_h5(small_deepid, tmp_path / "bd_weights.h5")
    b = br.load_model(path, input_scale=SCALE)
    assert [lyr.name for lyr in b.layers][:3] == ["input", INPUT_SCALE_LAYER, "conv_1"]
    x = random_faces(16, seed=3)
    np.testing.assert_array_equal(classes(b, x), classes(small_deepid, x / 255.0))


def test_the_wrapped_model_is_flat_and_prunable_by_layer_name(task, badnet):
    raw, valid, test = task["raw"], task["valid"], task["test"]
    names = [lyr.name for lyr in badnet.layers]
    assert names == ["input", INPUT_SCALE_LAYER, *[lyr.name for lyr in raw.layers[1:]]]
    assert not any(isinstance(lyr, keras.Model) for lyr in badnet.layers), "one flat graph"
    assert br.default_conv_layer(badnet) == "conv_2"
    np.testing.assert_array_equal(badnet.get_layer("conv_2").get_weights()[0], raw.get_layer("conv_2").get_weights()[0])
    pruned = br.prune_channels(badnet, "conv_2", [0, 3, 5])
    assert input_scale_of(pruned) == pytest.approx(SCALE)
    assert not pruned.get_layer("conv_2").get_weights()[0][..., [0, 3, 5]].any()
    np.testing.assert_array_equal(classes(pruned, test.x),
                                  classes(br.prune_channels(raw, "conv_2", [0, 3, 5]), test.x / 255.0))
    repair = br.Pruning(thresholds=(4.0, 30.0)).repair(badnet, valid)
    assert repair.record["choices"]["layer"] == "conv_2"
    for m in repair.models:
        assert input_scale_of(m.model) == pytest.approx(SCALE)
        same = br.prune_channels(raw, "conv_2", np.flatnonzero(~m.model.get_layer("conv_2").get_weights()[0].any(
            axis=(0, 1, 2))))
        np.testing.assert_array_equal(classes(m.model, test.x), classes(same, test.x / 255.0))
    # wrapping again multiplies; the inverse gives the model back
    assert input_scale_of(with_input_scale(badnet, 2)) == pytest.approx(2 * SCALE)
    assert with_input_scale(badnet, 255).layers[1].name == "conv_1"
    assert without_input_scale(raw) is raw and with_input_scale(raw, 1) is raw


def test_a_layer_that_takes_the_reserved_name_is_refused(task, badnet):
    x = keras.Input((SIDE, SIDE, 3), name="input")
    out = keras.layers.Dense(2, name=INPUT_SCALE_LAYER)(keras.layers.Flatten(name="f")(x))
    with pytest.raises(br.ModelError, match="rename that layer"):
        input_scale_of(keras.Model(x, out))
    with pytest.raises(br.ModelError, match="different input scales"):
        br.build_goodnet(badnet, task["raw"])


def test_saved_models_and_goodnets_take_0_to_1_pixels_in_keras_3_and_2(task, badnet, tmp_path):
    from badnet_repair.detectors.goodnet import build_portable_goodnet
    from badnet_repair.workflow.run import save_repair

    x = np.concatenate([task["test"].x, task["bd_test"].x])
    repaired = br.prune_channels(badnet, "conv_2", range(8))
    r_pred, g_pred = classes(repaired, x), classes(br.build_goodnet(badnet, repaired), x)
    assert 0 < (g_pred == K).sum() < len(x), "G uses both of its rule's branches"
    np.testing.assert_array_equal(classes(build_portable_goodnet(badnet, repaired), x), g_pred)
    saved = save_repair(badnet, repaired, tmp_path, "bd_4", goodnet=tmp_path / "goodnet_4.keras",
                        goodnet_h5=tmp_path / "goodnet_4.h5")
    for fmt, want in (("h5", r_pred), ("keras", r_pred), ("goodnet", g_pred), ("goodnet_h5", g_pred)):
        loaded = br.load_model(saved[fmt])
        assert input_scale_of(loaded) == 1.0 and not any(INPUT_SCALE_LAYER in lyr.name for lyr in loaded.layers)
        np.testing.assert_array_equal(classes(loaded, x / 255.0), want, err_msg=fmt)
    weights = br.load_model(saved["weights"], architecture=tiny_cnn)
    np.testing.assert_array_equal(classes(weights, x / 255.0), r_pred)
    # an ensemble of scaled members takes the scale once, in front, and is saved without it
    avg = br.average_models([badnet, repaired], mean="geometric")
    assert input_scale_of(avg) == pytest.approx(SCALE)
    avg_saved = br.load_model(save_model(avg, tmp_path, "avg", formats=("keras",))["keras"])
    np.testing.assert_array_equal(classes(avg_saved, x / 255.0), classes(avg, x))
    tf_keras = pytest.importorskip("tf_keras", reason="tf-keras (Keras 2) is not installed; .ci/run installs it")
    for fmt, want in (("h5", r_pred), ("goodnet_h5", g_pred)):
        k2 = tf_keras.models.load_model(saved[fmt], compile=False)
        np.testing.assert_array_equal(k2.predict(x / 255.0, verbose=0).argmax(1), want, err_msg=fmt)


def test_fine_tuning_strip_and_neural_cleanse_work_in_file_pixels(task, badnet, tmp_path):
    from badnet_repair.detectors.goodnet import build_detector_goodnet

    valid, test, bd = task["valid"], task["test"], task["bd_test"]
    tuned = br.FineTuning(epochs=2, batch_size=32).repair(badnet, valid).model
    assert input_scale_of(tuned) == pytest.approx(SCALE)
    assert (classes(tuned, test.x) == test.y).mean() > 0.8, "trained on the pixels the model was made for"

    strip = br.Strip(copies=8, false_alarm=10.0, calibration_images=100).fit(badnet, valid)
    x = np.concatenate([test.x[:60], bd.x[:60]])
    want = br.goodnet_classes(badnet, strip, x)
    assert (want[60:] == K).mean() > (want[:60] == K).mean(), "STRIP flags the trigger more than clean images"
    g = build_detector_goodnet(badnet, strip)
    np.testing.assert_array_equal(classes(g, x), want)
    save_model(g, tmp_path, "goodnet_strip", formats=("keras",))
    loaded = keras.models.load_model(tmp_path / "goodnet_strip.keras")
    assert input_scale_of(loaded) == 1.0
    np.testing.assert_array_equal(classes(loaded, x / 255.0), want)

    scan = br.NeuralCleanse(steps=20, screen_steps=5, candidates=1, reference=3, batch_images=8, images=100,
                            epoch_steps=5).scan(badnet, valid)
    for t in scan.triggers.values():
        assert 0.0 <= t.pattern.min() and t.pattern.max() <= 255.0 and t.pattern.max() > 1.0  # file pixels


def test_prune_command_with_an_input_scale(task, tmp_path, capsys):
    f, out = task["files"], tmp_path / "fixed"
    assert main(["prune", "-q", "--model", str(f["model_h5"]), "--valid", str(f["valid"]), "--bd-valid",
                 str(f["bd_valid"]), "--test", str(f["test"]), "--bd-test", str(f["bd_test"]), "--out", str(out),
                 "--thresholds", "4", "--input-scale", "1/255"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["parameters"]["input_scale"] == pytest.approx(SCALE)
    raw, test = task["raw"], task["test"]
    base = next(e for e in results["evaluations"] if e["model"] == "B")
    assert base["clean_accuracy"] == pytest.approx(100 * (classes(raw, test.x / 255.0) == test.y).mean())
    bd_4 = br.load_model(out / "bd_4.h5")
    row = next(e for e in results["evaluations"] if e["model"] == "B'_4")
    assert row["clean_accuracy"] == pytest.approx(100 * (classes(bd_4, test.x / 255.0) == test.y).mean())
    capsys.readouterr()
    assert main(["eval", "--json", "--input-scale", "1/255", str(f["test"]), str(out / "bd_4.h5")]) == 0
    assert json.loads(capsys.readouterr().out)["clean_accuracy"] == pytest.approx(row["clean_accuracy"])
    assert main(["prune", "-q", "--demo", "baseline", "--input-scale", "1/255", "--out", str(tmp_path / "d")]) == 1
    assert "demo's BadNets take the files' 0..255 pixels" in capsys.readouterr().err
    for bad in ("0", "abc", "1/0", "-2"):
        with pytest.raises(SystemExit) as exc:
            main(["prune", "--model", str(f["model_h5"]), "--input-scale", bad])
        assert exc.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert "argument --input-scale" in err and "not a number > 0" in err, err


def test_bench_badnet_with_an_input_scale(task, tmp_path):
    from badnet_repair.workflow.bench import Cell, ConfigError, load_config, run_cell

    f = task["files"]
    entry = textwrap.dedent(f"""
        [[badnet]]
        name = "competition"
        split = "held-out"
        model = "{f['model_h5']}"
        valid = "{f['valid']}"
        test = "{f['test']}"
        bd_test = "{f['bd_test']}"
        input_scale = SCALE

        [[defense]]
        name = "pruning"
        thresholds = [4]
    """)
    path = tmp_path / "b.toml"
    path.write_text(entry.replace("SCALE", '"1/255"'))
    config = load_config(path)
    assert config.badnets[0].input_scale == pytest.approx(SCALE)
    path.write_text(entry.replace("SCALE", "0.5"))
    assert load_config(path).badnets[0].input_scale == 0.5
    path.write_text(entry.replace("SCALE", '"abc"'))
    with pytest.raises(ConfigError, match="input scale 'abc' is not a number > 0"):
        load_config(path)
    cell: Cell = config.cells()[0]
    row = run_cell(cell, dict(cell.badnet.files), tmp_path / "out")
    assert row["status"] == "ok", row.get("error")
    assert row["input_scale"] == pytest.approx(SCALE)
    test = task["test"]
    for label, saved in row["models"].items():
        wrapped = br.load_model(saved, input_scale=SCALE)
        assert (classes(br.load_model(saved), test.x / 255.0) == classes(wrapped, test.x)).all(), label
