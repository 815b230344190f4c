"""The benchmark: configuration checks, the grid, and a tiny matrix through a local Dask cluster."""

from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path

import keras
import numpy as np
import pytest

import badnet_repair as br
from badnet_repair.cli import main
from badnet_repair.reporting.leaderboard import entries, leaderboard_markdown, mixed_badnets
from badnet_repair.reporting.reference import weights_fingerprint
from badnet_repair.workflow.bench import ConfigError, load_config, read_store, run_bench


def _tuning_badnet(demo) -> str:
    """A ``[[badnet]]`` entry: the demo's baseline BadNet, split tuning."""
    return '\n[[badnet]]\nname = "baseline"\nsplit = "tuning"\n' + _files(demo)


def _files(demo, which: str = "model") -> str:
    model = demo.model if which == "model" else demo.pruning_aware_model
    return textwrap.dedent(f"""
        model = "{model}"
        valid = "{demo.valid}"
        test = "{demo.test}"
        bd_test = "{demo.bd_test}"
    """)


@pytest.fixture
def tiny_config(small_demo, tmp_path):
    text = ("seeds = [0, 1]\n[target]\nattack_success = 5.0\naccuracy_drop = 3.0\n" + _tuning_badnet(small_demo)
            + textwrap.dedent("""
        [[badnet]]
        name = "pruning-aware"
        split = "held-out"
    """) + _files(small_demo, "pa") + textwrap.dedent("""
        [[defense]]
        name = "pruning"
        thresholds = [[2, 4]]

        [[defense]]
        name = "fine-tuning"
        epochs = 2

        [[defense]]
        name = "pruning"
        label = "broken"
        layer = "no_such_layer"
    """))
    path = tmp_path / "tiny.toml"
    path.write_text(text)
    return path


def test_the_grid_expands_lists_and_keeps_list_settings_whole(small_demo, tmp_path):
    path = tmp_path / "grid.toml"
    path.write_text("[[badnet]]\nname = 'b'\nsplit = 'tuning'\n" + _files(small_demo) + textwrap.dedent("""
        [[defense]]
        name = "fine-pruning"
        epochs = [2, 3]
        distill = [0.0, 0.3]

        [[defense]]
        name = "pruning"
        thresholds = [2, 4]

        [[defense]]
        name = "pruning"
        label = "two grids"
        thresholds = [[2], [4, 10]]
    """))
    config = load_config(path)
    labels = [d.label for d in config.defenses]
    assert labels[:4] == ["fine-pruning (epochs=2, distill=0.0)", "fine-pruning (epochs=2, distill=0.3)",
                          "fine-pruning (epochs=3, distill=0.0)", "fine-pruning (epochs=3, distill=0.3)"]
    assert config.defenses[4].label == "pruning" and config.defenses[4].settings["thresholds"] == (2, 4)
    assert [d.settings["thresholds"] for d in config.defenses[5:]] == [(2,), (4, 10)]
    # seeded defenses run once per seed, the others once
    assert len(config.cells()) == 4 + 1 + 2


def test_a_config_with_mistakes_names_each(small_demo, tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text(textwrap.dedent(f"""
        seeds = [0]
        [[badnet]]
        name = "a"
        split = "tuning"
        model = "{small_demo.model}"
        valid = "{small_demo.valid}"
        test = "nowhere/test.h5"
        bd_test = "{small_demo.bd_test}"

        [[badnet]]
        name = "a-again"
        split = "held-out"
        model = "{small_demo.model}"
        valid = "{small_demo.valid}"
        test = "{small_demo.test}"
        bd_test = "{small_demo.bd_test}"

        [[badnet]]
        name = "made"
        split = "sometimes"
        recipe = "cooking"

        [[badnet]]
        name = "no clean demo"
        split = "held-out"
        recipe = "demo"
        kind = "clean"

        [[defense]]
        name = "magic"

        [[defense]]
        name = "fine-pruning"
        epoch = 3
        learning_rate = "fast"
    """))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    text = str(err.value)
    for needle in ("test file", "does not exist", "marked 'held-out' but also 'tuning'", "split must be",
                   "unknown recipe 'cooking'", "unknown defense 'magic'", "no setting 'epoch'",
                   "'learning_rate' = 'fast' must be a number", "demo recipe has no clean model"):
        assert needle in text, needle
    assert text.count("\n  ") >= 9  # one line per mistake
    with pytest.raises(ConfigError, match="not valid TOML"):
        (tmp_path / "broken.toml").write_text("seeds = [")
        load_config(tmp_path / "broken.toml")


@pytest.mark.slow
def test_a_tiny_matrix_runs_on_a_local_dask_cluster(tiny_config, small_demo, tmp_path, capsys):
    config = load_config(tiny_config)
    out = tmp_path / "out"
    result = run_bench(config, out, workers=2, progress=False)
    assert result.workers == 2
    rows = read_store(out)
    assert len(rows) == len(config.cells()) == 8 and len(result.ran) == 8
    failed = [r for r in rows if r["status"] != "ok"]
    assert len(failed) == 2 and all("no_such_layer" in r["error"] for r in failed)
    ok = [r for r in rows if r["status"] == "ok"]
    assert {r["seed"] for r in ok if r["defense"] == "fine-tuning"} == {0, 1}
    # each row names the B it ran on: one fingerprint a BadNet, that of its weights
    for name, path in (("baseline", small_demo.model), ("pruning-aware", small_demo.pruning_aware_model)):
        prints = {r["badnet_weights_sha256"] for r in ok if r["badnet"] == name}
        assert len(prints) == 1
        assert prints == {weights_fingerprint(br.load_model(path))}
    assert mixed_badnets(rows) == []
    for r in ok:
        assert r["badnet_attack_success"] > 50 and r["results"] and r["versions"]["keras"]
        # the repair's loud lines (a fallback to B under the budget, a caution) travel with its row
        assert isinstance(r["warnings"], list) and all(w.startswith(("WARNING", "CAUTION")) for w in r["warnings"])
        for path in r["models"].values():
            assert (out / "cells" / r["cell"]).exists() and path.endswith(".keras")
    # pruning is deterministic: the same numbers run here, in this process
    serial = run_bench(config, tmp_path / "serial", serial=True, cells="pruning$|/ pruning", progress=False)
    here = {r["cell"]: r for r in serial.rows if r["status"] == "ok"}
    assert here
    for key, r in here.items():
        there = next(x for x in rows if x["cell"] == key)
        assert [e["clean_accuracy"] for e in r["results"]] == [e["clean_accuracy"] for e in there["results"]]
    # a rerun runs nothing
    again = run_bench(config, out, workers=2, progress=False)
    assert again.ran == () and len(again.skipped) == 8
    # the leaderboard: both splits, every BadNet x defense, the failures listed
    md = leaderboard_markdown(rows)
    assert "## tuning BadNets (1)" in md and "## held-out BadNets (1)" in md and "## Failed cells" in md
    es = entries(rows)
    assert {(e.badnet, e.defense) for e in es} == {(b, d) for b in ("baseline", "pruning-aware")
                                                   for d in ("pruning X=2", "pruning X=4", "fine-tuning")}
    ft = next(e for e in es if e.defense == "fine-tuning" and e.badnet == "baseline")
    assert ft.seeds == 2
    # the command line: a rerun, then the leaderboard rebuilt from the store alone
    assert main(["bench", str(tiny_config), "--out", str(out), "-q"]) == 0
    assert "ran 0 cells" in capsys.readouterr().out
    (out / "leaderboard.md").unlink()
    assert main(["bench", "--report", str(out / "store.jsonl")]) == 0
    assert (out / "leaderboard.md").exists() and (out / "leaderboard.png").stat().st_size > 1000
    assert json.loads((out / "bench.json").read_text())["cells"] == 8


def test_split_per_person_is_a_disjoint_60_20_20_split():
    import numpy as np

    from badnet_repair.workflow.recipes import split_per_person

    y = np.repeat(np.arange(4), 10)
    train, valid, test = split_per_person(y, seed=3)
    assert len(train) == 24 and len(valid) == 8 and len(test) == 8
    assert not set(train) & set(valid) and not set(valid) & set(test) and not set(train) & set(test)
    for part, each in ((train, 6), (valid, 2), (test, 2)):
        assert np.bincount(y[part]).tolist() == [each] * 4


@pytest.mark.slow
def test_the_faces_recipe_makes_a_badnet_once_and_reuses_it(tmp_path):
    import numpy as np
    from PIL import Image

    from badnet_repair.workflow.recipes import make_recipe

    rng = np.random.default_rng(0)
    people, per = 4, 10
    faces = tmp_path / "faces.npz"
    base = rng.uniform(0, 255, (people, 3, 55, 47)).astype(np.float32)
    data = np.concatenate([base[p] + rng.normal(0, 8, (per, 3, 55, 47)) for p in range(people)]).clip(0, 255)
    np.savez(faces, data=data.astype(np.float32), label=np.repeat(np.arange(people), per))
    trigger = tmp_path / "trigger.png"
    Image.new("RGBA", (10, 6), (255, 0, 255, 255)).save(trigger)
    settings = {"faces": str(faces), "trigger": str(trigger), "trigger_x": 30, "trigger_y": 40, "epochs": 2,
                "poison_rate": 0.2}
    files = make_recipe("faces", "baseline", settings, tmp_path / "made")
    assert set(files) == {"model", "valid", "test", "bd_test"} and all(Path(p).exists() for p in files.values())
    import badnet_repair as br

    b = br.load_model(files["model"])
    assert br.num_classes(b) == people
    bd = br.load_h5(files["bd_test"])
    assert set(bd.y.tolist()) == {0} and len(bd) == 2 * (people - 1)  # the test split's non-target faces
    stamp = (tmp_path / "made" / "made.json").stat().st_mtime_ns
    assert make_recipe("faces", "baseline", settings, tmp_path / "made") == files
    assert (tmp_path / "made" / "made.json").stat().st_mtime_ns == stamp  # reused, not made again
    with pytest.raises(br.DataError, match="not a face file"):
        (tmp_path / "bad.npz").write_bytes(b"not a zip")
        make_recipe("faces", "baseline", {**settings, "faces": str(tmp_path / "bad.npz")}, tmp_path / "other")


@pytest.mark.parametrize("config", sorted((Path(__file__).resolve().parents[1] / "benchmarks").glob("*.toml")),
                         ids=lambda p: p.name)
def test_the_projects_benchmark_configs_load(config):
    if "shared/" in config.read_text() and not (config.parents[2] / "shared").is_dir():
        pytest.skip("this configuration trains BadNets on ../shared's real faces, which is absent")
    made = re.findall(r'"(\.\./\.experiments/[^"]+)"', config.read_text())
    if any(not (config.parent / m).exists() for m in made):
        pytest.skip(f"{config.name} reads files an experiments/ script writes first (see its header)")
    loaded = load_config(config)
    assert loaded.cells() and {b.split for b in loaded.badnets} <= {"tuning", "held-out"}


def test_detector_cells_fit_on_clean_data_and_make_their_own_leaderboard(small_demo, tmp_path, capsys):
    from badnet_repair.reporting.leaderboard import detection_entries

    text = ("seeds = [0]\n[target]\ndetection = 90.0\nfalse_alarm = 10.0\n" + _tuning_badnet(small_demo)
            + textwrap.dedent("""
        [[detector]]
        detectors = ["strip", "feature-distance"]
        false_alarm = 10.0
        set = { strip = { copies = 8, calibration_images = 200 } }
    """))
    path = tmp_path / "detect.toml"
    path.write_text(text)
    config = load_config(path)
    assert [c.title for c in config.cells()] == ["baseline / strip + feature-distance / seed 0"]
    out = tmp_path / "out"
    run_bench(config, out, serial=True, progress=False)
    (row,) = read_store(out)
    assert row["status"] == "ok" and row["kind"] == "detection", row.get("error")
    assert "scan" not in row  # no Neural Cleanse among these detectors
    # the budget of 10 % split in two; the copies as set
    assert row["settings"]["detectors"]["strip"]["false_alarm"] == 5.0
    assert row["settings"]["detectors"]["feature-distance"]["false_alarm"] == 5.0
    assert row["settings"]["detectors"]["strip"]["copies"] == 8
    models = [r["model"] for r in row["results"]]
    assert models == ["G (strip)", "G (feature-distance)", "G (strip + feature-distance)"]
    es = detection_entries([row], detection=90.0, false_alarm=10.0)
    assert [e.goodnet for e in es] == ["G (strip) in strip + feature-distance",
                                       "G (feature-distance) in strip + feature-distance", models[-1]]
    both = es[-1]
    assert both.auroc is None and both.detection >= max(e.detection for e in es[:2])
    assert all(0.0 <= e.auroc <= 1.0 for e in es[:2])  # type: ignore[operator]
    assert both.meets == (both.detection >= 90.0 and both.false_alarm <= 10.0)
    assert main(["bench", "--report", str(out / "store.jsonl")]) == 0
    md = (out / "leaderboard.md").read_text()
    assert "## GoodNets from detectors" in md and "G (strip + feature-distance)" in md
    assert (out / "detection.png").stat().st_size > 1000 and not (out / "leaderboard.png").exists()


def test_clean_per_class_gives_the_cells_fewer_clean_images_of_the_same_badnet(small_demo, tmp_path):
    entry = _tuning_badnet(small_demo)
    text = ("seeds = [0]\n" + entry + entry.replace('"baseline"', '"baseline, 2 a class"') + "clean_per_class = 2\n"
            + textwrap.dedent("""
        [[detector]]
        detectors = ["feature-distance"]
    """))
    path = tmp_path / "few.toml"
    path.write_text(text)
    config = load_config(path)
    full, few = config.badnets
    assert (full.clean_per_class, few.clean_per_class) == (None, 2)
    assert few.folder_name == "baseline" and full.folder_name == "baseline"  # one BadNet, made once
    cells = config.cells()
    assert len({c.key for c in cells}) == 2
    out = tmp_path / "out"
    run_bench(config, out, serial=True, progress=False)
    rows = {r["badnet"]: r for r in read_store(out)}
    classes = len(np.unique(br_load_valid(small_demo)))
    assert rows["baseline, 2 a class"]["clean_images"] == 2 * classes and "clean_images" not in rows["baseline"]
    assert all(r["status"] == "ok" for r in rows.values())
    bad = tmp_path / "bad.toml"
    for value in ("0", '"two"', "true"):
        bad.write_text("seeds = [0]\n" + entry + f"clean_per_class = {value}\n"
                       + '[[detector]]\ndetectors = ["feature-distance"]\n')
        with pytest.raises(ConfigError, match="clean_per_class must be a whole number"):
            load_config(bad)


def test_entries_of_one_recipe_share_the_badnet_made_once(tmp_path):
    text = "seeds = [0]\n" + "".join(textwrap.dedent(f"""
        [[badnet]]
        name = "{name}"
        split = "tuning"
        recipe = "demo"
        kind = "{kind}"
        {extra}
    """) for name, kind, extra in [("a", "baseline", ""), ("b", "baseline", "clean_per_class = 3"),
                                   ("c", "pruning-aware", "")]) + '[[detector]]\ndetectors = ["feature-distance"]\n'
    path = tmp_path / "recipes.toml"
    path.write_text(text)
    assert [b.folder_name for b in load_config(path).badnets] == ["a", "a", "c"]


def br_load_valid(demo) -> np.ndarray:
    import badnet_repair as br

    return br.load_h5(demo.valid).y


def test_a_detector_entry_with_mistakes_is_refused_with_each_named(small_demo, tmp_path):
    text = _tuning_badnet(small_demo) + textwrap.dedent("""
        [[detector]]
        detectors = ["strip", "nope"]

        [[detector]]
        detectors = ["strip"]
        set = { strip = { colour = 1 } }

        [[detector]]
        detectors = ["strip"]
        false_alarm = 150
    """)
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert "unknown detector 'nope'" in message and "colour" in message
    assert "false_alarm must be a percentage" in message


def test_a_detector_setting_of_none_is_written_as_the_string_none(small_demo, tmp_path):
    text = _tuning_badnet(small_demo) + textwrap.dedent("""
        [[detector]]
        label = "one split"
        detectors = ["feature-ensemble"]
        set = { feature-ensemble = { folds = "none", splits = 2 } }

        [[detector]]
        label = "five folds"
        detectors = ["feature-ensemble"]
        set = { feature-ensemble = { folds = 5 } }
    """)
    path = tmp_path / "none.toml"
    path.write_text(text)
    one, five = load_config(path).detectors
    assert one.settings["set"] == {"feature-ensemble": {"folds": None, "splits": 2}}
    assert five.settings["set"] == {"feature-ensemble": {"folds": 5}}


def test_a_defense_setting_of_none_is_written_as_the_string_none(small_demo, tmp_path):
    text = _tuning_badnet(small_demo) + textwrap.dedent("""
        [[defense]]
        name = "discriminant-gate"
        label = "one"
        second_depth = "none"
        augment = "none"

        [[defense]]
        name = "discriminant-gate"
        label = "two"
        second_depth = 2
    """)
    path = tmp_path / "none.toml"
    path.write_text(text)
    one, two = load_config(path).defenses
    # None where the setting takes None; the string where the setting takes that string
    assert one.settings == {"second_depth": None, "augment": "none"} and two.settings == {"second_depth": 2}


def test_a_scan_summary_places_each_target_in_the_preselection_and_the_screen():
    from badnet_repair.detectors.neural_cleanse import CleanseScan
    from badnet_repair.workflow.bench import scan_summary

    nan = float("nan")
    # 6 classes: the pre-selection passed 4, 2, 0, 5 on (in that order); the screen's norms rank
    # them 5 (1.0), 0 (2.0), 4 (3.0), 2 (9.0); classes 5 and 0 were optimised fully
    scan = CleanseScan(
        flagged=(5,), seconds=12.34, preselected=(4, 2, 0, 5),
        preselect_share=np.array([0.5, 0.0, 0.6, 0.1, 0.9, 0.4]),
        screen_norms=np.array([2.0, nan, 9.0, nan, 3.0, 1.0]),
        norms=np.array([2.5, nan, 9.0, nan, 3.0, 0.5]),
        anomaly=np.array([0.7, nan, nan, nan, nan, 4.2]),
        candidates=(5, 0), reference=(), triggers={0: None, 5: None}, screened=True)  # type: ignore[dict-item]
    got = scan_summary(scan, np.array([0, 0, 3, 0]))
    assert got["flagged"] == [5] and got["seconds"] == 12.3
    assert got["targets"]["0"] == {"preselection_place": 3, "screen_place": 2, "optimised": True,
                                   "norm": 2.5, "anomaly": 0.7}
    # a class the pre-selection left out has no place, norm or anomaly
    assert got["targets"]["3"] == {"preselection_place": None, "screen_place": None, "optimised": False,
                                   "norm": None, "anomaly": None}


def test_rows_of_one_badnet_name_run_on_different_bs_are_named():
    def row(name, clean, attack, sha=None):
        r = {"badnet": name, "status": "ok", "badnet_clean_accuracy": clean, "badnet_attack_success": attack,
             "cell": f"{name}{clean}", "split": "tuning", "defense": "d", "label": "d", "seed": 0,
             "results": [{"kind": "repaired", "model": "d", "clean_accuracy": clean - 1, "attack_success_rate": 1.0}]}
        return r if sha is None else {**r, "badnet_weights_sha256": sha}

    same = [row("a", 90.0, 100.0, "x"), row("a", 90.0, 100.0, "x"), row("b", 80.0, 99.0)]
    assert mixed_badnets(same) == []
    figures = [*same, row("b", 81.0, 99.0)]  # a store row of another machine's B, before fingerprints
    (line,) = mixed_badnets(figures)
    assert "'b'" in line and "80.00 % / 99.00 %" in line and "81.00 % / 99.00 %" in line
    weights = [*same, row("a", 90.0, 100.0, "y")]  # the same figures, other weights
    (line,) = mixed_badnets(weights)
    assert "'a'" in line and "2 different B's" in line
    failed = [*same, {"badnet": "b", "status": "failed"}]
    assert mixed_badnets(failed) == []
    assert "2 different B's" in leaderboard_markdown(figures)


def test_the_fingerprint_is_of_the_weights_not_the_file(tmp_path):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="d")])
    model.save(tmp_path / "a.h5")
    model.save(tmp_path / "b.keras")
    prints = {weights_fingerprint(br.load_model(tmp_path / f)) for f in ("a.h5", "b.keras")}
    assert prints == {weights_fingerprint(model)}
    model.get_layer("d").set_weights([w + 1e-7 for w in model.get_layer("d").get_weights()])
    assert weights_fingerprint(model) not in prints
