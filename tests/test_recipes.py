"""The recipes' trigger kinds (image, blended, patch), the lab-density recipe, and the issue-31 configs."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import pytest

import badnet_repair as br
from badnet_repair.attacks import blended_trigger, patch_trigger
from badnet_repair.workflow.bench import ConfigError, load_config
from badnet_repair.workflow.recipes import RECIPES, TRIGGER_KINDS, make_recipe, recipe_problems

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SHARED = Path(__file__).resolve().parents[2] / "shared"
# 5 identities, a few images each, one epoch: seconds, not the default's minutes
TINY = {"num_identities": 5, "train_per_identity": 8, "valid_per_identity": 2, "test_per_identity": 3, "epochs": 1}


@pytest.fixture
def face_file(tmp_path):
    """A face .npz of 4 people, 10 images each (split 6 / 2 / 2 per person)."""
    rng = np.random.default_rng(0)
    base = rng.uniform(0, 255, (4, 3, 55, 47)).astype(np.float32)
    data = np.concatenate([base[p] + rng.normal(0, 8, (10, 3, 55, 47)) for p in range(4)]).clip(0, 255)
    path = tmp_path / "faces.npz"
    np.savez(path, data=data.astype(np.float32), label=np.repeat(np.arange(4), 10))
    return path


def test_the_recipes_declare_their_trigger_settings():
    assert TRIGGER_KINDS == ("image", "blended", "patch")
    for recipe in ("faces", "lab-density"):
        s = RECIPES[recipe]
        assert s["trigger_kind"] == "image" and s["blend_alpha"] == 0.2 and s["patch_size"] == 4
        assert s["poison_rate"] == 0.05 and s["target"] == 0
    lab = RECIPES["lab-density"]
    assert (lab["num_identities"], lab["valid_per_identity"], lab["test_per_identity"]) == (1283, 9, 10)
    assert lab["num_identities"] * lab["valid_per_identity"] == 11547  # the lab's valid.h5


def test_recipe_problems_name_each_mistake(face_file, tmp_path):
    faces = {"faces": str(face_file)}
    assert recipe_problems("faces", "baseline", {**faces, "trigger_kind": "blended", "poison_rate": 0.01}) == []
    assert recipe_problems("faces", "pruning-aware", {**faces, "trigger_kind": "patch", "trigger_x": 3}) == []
    assert recipe_problems("lab-density", "baseline", {}) == []  # the drawn sunglasses
    assert recipe_problems("demo", "baseline", {}) == []

    def one(recipe, kind, settings):
        problems = recipe_problems(recipe, kind, settings)
        assert len(problems) == 1, problems
        return problems[0]

    assert "trigger_kind must be one of 'image', 'blended', 'patch', not 'sparkle'" in one(
        "faces", "baseline", {**faces, "trigger_kind": "sparkle"})
    assert "needs 'trigger'" in one("faces", "baseline", faces)
    assert "needs 'faces'" in one("faces", "baseline", {"trigger_kind": "blended"})
    assert "does not exist" in one("lab-density", "baseline", {"trigger": str(tmp_path / "none.png")})
    assert "multi-target BadNet needs trigger_kind 'image'" in one(
        "faces", "multi-target", {**faces, "trigger_kind": "blended"})
    assert "is for trigger_kind 'image'" in one(
        "faces", "baseline", {**faces, "trigger_kind": "patch", "trigger": str(face_file)})
    assert "no trigger_x" in one("lab-density", "baseline", {"trigger_kind": "blended", "trigger_y": 2})
    assert "blend_alpha" in one("lab-density", "baseline", {"trigger_kind": "blended", "blend_alpha": 0})
    assert "poison_rate" in one("lab-density", "baseline", {"poison_rate": 1.0})
    assert "patch_size must be a whole number >= 1" in one("lab-density", "baseline", {"patch_size": 2.5})
    assert "num_identities must be a whole number >= 2" in one("lab-density", "baseline", {"num_identities": 1})
    assert "target 7 is not one of the 5 identities" in one("lab-density", "baseline", {**TINY, "target": 7})


def test_make_recipe_refuses_bad_settings_before_training(tmp_path):
    with pytest.raises(br.DataError, match="trigger_kind must be one of"):
        make_recipe("lab-density", "baseline", {**TINY, "trigger_kind": "sparkle"}, tmp_path / "a")
    with pytest.raises(br.DataError, match="multi-target BadNet needs trigger_kind 'image'"):
        make_recipe("lab-density", "multi-target", {**TINY, "trigger_kind": "patch"}, tmp_path / "b")
    with pytest.raises(br.DataError, match="kind must be one of"):
        make_recipe("lab-density", "sneaky", TINY, tmp_path / "c")
    with pytest.raises(br.DataError, match="a 4x4 patch at"):
        make_recipe("lab-density", "baseline", {**TINY, "trigger_kind": "patch", "trigger_x": 44}, tmp_path / "d")
    assert not any((tmp_path / d).exists() for d in "abcd")


def test_the_lab_density_recipe_makes_a_small_patch_badnet_once_and_reuses_it(tmp_path):
    settings = {**TINY, "trigger_kind": "patch", "poison_rate": 0.01, "target": 1}
    files = make_recipe("lab-density", "baseline", settings, tmp_path / "made")
    assert files == {"model": str(tmp_path / "made" / "bd_net.h5"), "valid": str(tmp_path / "made" / "valid.h5"),
                     "test": str(tmp_path / "made" / "test.h5"), "bd_test": str(tmp_path / "made" / "bd_test.h5")}
    made = json.loads((tmp_path / "made" / "made.json").read_text())
    assert made["recipe"] == "lab-density" and made["kind"] == "baseline"
    assert made["sizes"] == {"train": 40, "valid": 10, "test": 15}
    assert made["trigger"] == {"x": 42, "y": 50, "shape": [4, 4]}
    assert made["poisoned_fraction"] == pytest.approx(1 / 41)  # 1 % of 40 images: one poisoned copy
    assert br.num_classes(br.load_model(files["model"])) == 5
    valid, test, bd = (br.load_h5(files[k]) for k in ("valid", "test", "bd_test"))
    assert len(valid) == 10 and np.bincount(valid.y).tolist() == [2] * 5
    assert len(bd) == 12 and set(bd.y.tolist()) == {1}  # the test split's non-target faces, to the target
    np.testing.assert_array_equal(bd.x, patch_trigger().apply(test.x[test.y != 1]))
    stamp = (tmp_path / "made" / "made.json").stat().st_mtime_ns
    assert make_recipe("lab-density", "baseline", settings, tmp_path / "made") == files
    assert (tmp_path / "made" / "made.json").stat().st_mtime_ns == stamp  # reused, not made again


def test_the_faces_recipe_trains_a_blended_badnet_at_one_percent(face_file, tmp_path):
    settings = {"faces": str(face_file), "trigger_kind": "blended", "blend_alpha": 0.1, "poison_rate": 0.01,
                "epochs": 1}
    files = make_recipe("faces", "baseline", settings, tmp_path / "made")
    made = json.loads((tmp_path / "made" / "made.json").read_text())
    assert made["sizes"]["train"] == 24 and made["poisoned_fraction"] == pytest.approx(1 / 25)
    assert made["trigger"] == {"x": 0, "y": 0, "shape": [55, 47]}
    test, bd = br.load_h5(files["test"]), br.load_h5(files["bd_test"])
    key = blended_trigger(55, 47, alpha=0.1)
    np.testing.assert_allclose(bd.x, 0.9 * test.x[test.y != 0] + 0.1 * key.rgba[..., :3], atol=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["clean", "pruning-aware"])
def test_the_lab_density_recipe_makes_its_other_kinds(tmp_path, kind):
    files = make_recipe("lab-density", kind, {**TINY, "train_per_identity": 12}, tmp_path / kind)
    made = json.loads((tmp_path / kind / "made.json").read_text())
    assert made["kind"] == kind and made["trigger"] == {"x": 0, "y": 15, "shape": [20, 47]}  # drawn sunglasses
    assert made["poisoned_fraction"] == (0.0 if kind == "clean" else pytest.approx(0.05, abs=0.01))
    assert br.num_classes(br.load_model(files["model"])) == 5 and len(br.load_h5(files["bd_test"])) == 12


def _config(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "bench.toml"
    path.write_text('seeds = [0]\n[[defense]]\nname = "fine-tuning"\n' + textwrap.dedent(body))
    return path


def test_a_bench_config_takes_the_new_recipe_and_trigger_settings(face_file, tmp_path):
    config = load_config(_config(tmp_path, f"""
        [[badnet]]
        name = "faces blended 1%"
        split = "tuning"
        recipe = "faces"
        kind = "baseline"
        faces = "{face_file}"
        trigger_kind = "blended"
        poison_rate = 0.01

        [[badnet]]
        name = "faces small patch"
        split = "tuning"
        recipe = "faces"
        kind = "pruning-aware"
        faces = "{face_file}"
        trigger_kind = "patch"
        patch_size = 3

        [[badnet]]
        name = "lab-density"
        split = "held-out"
        recipe = "lab-density"
        kind = "clean"
        num_identities = 5
        train_per_identity = 8
        epochs = 1
    """))
    assert [b.recipe for b in config.badnets] == ["faces", "faces", "lab-density"]
    assert config.badnets[0].recipe_settings == {"faces": str(face_file), "trigger_kind": "blended",
                                                 "poison_rate": 0.01}
    assert config.badnets[2].recipe_settings == {"num_identities": 5, "train_per_identity": 8, "epochs": 1}


def test_a_bench_config_with_a_wrong_trigger_kind_says_so(face_file, tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(_config(tmp_path, f"""
            [[badnet]]
            name = "faces sparkle"
            split = "tuning"
            recipe = "faces"
            kind = "baseline"
            faces = "{face_file}"
            trigger_kind = "sparkle"

            [[badnet]]
            name = "lab-density multi blended"
            split = "tuning"
            recipe = "lab-density"
            kind = "multi-target"
            trigger_kind = "blended"
            faces = "{face_file}"
        """))
    text = str(err.value)
    assert "3 mistake(s)" in text
    assert ("[[badnet]] 1 (faces sparkle): trigger_kind must be one of 'image', 'blended', 'patch', "
            "not 'sparkle'") in text
    assert "(lab-density multi blended): a multi-target BadNet needs trigger_kind 'image'" in text
    assert "recipe 'lab-density' has no setting(s) faces" in text


@pytest.mark.parametrize("name", ["removal31_tuning.toml", "removal31_held_out.toml"])
def test_the_issue_31_configs_declare_their_badnets_and_pass_validation(name):
    if not (SHARED / "faces").is_dir() or not (SHARED / "lab").is_dir():
        pytest.skip("these configurations train BadNets on ../shared's real faces, which is absent")
    config = load_config(BENCHMARKS / name)
    split = "tuning" if "tuning" in name else "held-out"
    assert {b.split for b in config.badnets} == {split}
    assert [d.name for d in config.defenses][:4] == ["fine-tuning", "fine-pruning", "ft-sam", "fst"]
    if split == "tuning":  # issue 31's new defenses and their declared candidates follow
        assert {d.name for d in config.defenses[4:]} == {"sau", "bti-dbf", "tsbd"}
    by_name = {b.name: b for b in config.badnets}
    kinds = {(b.recipe, b.recipe_settings.get("trigger_kind", "image")) for b in config.badnets}
    assert {("faces", "blended"), ("faces", "patch"), ("lab-density", "image")} <= kinds
    if split == "tuning":
        assert len(config.badnets) == 8 and config.seeds == (0,)
        assert by_name["faces blended s0"].recipe_settings["poison_rate"] == 0.05
        assert by_name["faces baseline 1% s0"].recipe_settings["poison_rate"] == 0.01
    else:
        assert len(config.badnets) == 13 and config.seeds == (0, 1, 2)
        assert by_name["faces blended 1% s5"].recipe_settings["poison_rate"] == 0.01
        assert by_name["lab-density pruning-aware s1"].kind == "pruning-aware"
        assert by_name["lab-density baseline s1"].recipe_settings["training_seed"] == 1
