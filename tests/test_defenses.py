"""The defense and detector interfaces, the registry, and compare built on them."""

from __future__ import annotations

import json
from dataclasses import FrozenInstanceError, dataclass
from typing import Any, ClassVar

import numpy as np
import pytest

import badnet_repair as br
from badnet_repair.defaults import setting
from badnet_repair.defenses import (
    REGISTRY,
    Defense,
    FinePruning,
    FineTuning,
    Pruning,
    Repair,
    Repaired,
    make_defense,
    register_defense,
)
from badnet_repair.defenses.finetuning import Member, TrainingPlan
from badnet_repair.detectors import Disagreement, goodnet_classes
from badnet_repair.nets.trainer import Part
from badnet_repair.workflow.compare import compare_defenses

from .conftest import SpyArray, random_faces, tiny_conv_model


def test_registry_names_and_settings():
    assert list(REGISTRY) == ["fine-tuning", "pruning", "fine-pruning", "nc-unlearning", "nc-pruning", "ft-sam",
                              "i-bau", "fst", "fst-fp", "sau", "bti-dbf", "tsbd", "rnp", "subspace", "subspace-ft",
                              "discriminant", "discriminant-gate", "feature-gate", "two-gates"]
    assert {"epochs", "learning_rate", "distill", "weight_decay", "members", "seed", "layer"} <= set(
        FineTuning.settings())
    assert {"budget", "holdout_fraction", "schedule", "clipnorm"} <= set(FineTuning.settings())
    assert set(FinePruning.settings()) == set(FineTuning.settings()) | {"accuracy_drop", "prune_fraction",
                                                                       "keep_pruned_start"}
    assert FinePruning().keep_pruned_start is False
    assert set(Pruning.settings()) == {"thresholds", "layer", "rank_at", "descending", "engine", "batch_size"}
    for cls in REGISTRY.values():
        assert cls.summary and cls.__doc__


def test_settings_read_back_and_rebuild_the_same_defense():
    d = make_defense("fine-pruning", epochs=3, learning_rate=1e-3, accuracy_drop=2.0)
    params = d.get_params()
    assert params["epochs"] == 3 and params["accuracy_drop"] == 2.0 and params["members"] == 1
    assert make_defense("fine-pruning", **params) == d
    assert make_defense("pruning", **Pruning(thresholds=(1.0, 5.0)).get_params()) == Pruning(thresholds=(1.0, 5.0))
    json.dumps(params)
    with pytest.raises(FrozenInstanceError):
        d.epochs = 5  # type: ignore[misc]


def test_unknown_defense_and_setting_are_named():
    with pytest.raises(ValueError, match="unknown defense 'neural-cleanse'; known: fine-tuning, pruning"):
        make_defense("neural-cleanse")
    with pytest.raises(ValueError, match="unknown setting.*accuracy_drop.*'fine-tuning'"):
        make_defense("fine-tuning", accuracy_drop=4.0)


def test_pruning_defense_returns_b_prime_per_threshold(small_deepid):
    x = random_faces(60, seed=6)
    y = br.predict_classes(small_deepid, x)
    clean = br.Dataset(x, y, "valid")
    repair = Pruning(thresholds=(2.0, 10.0)).repair(small_deepid, clean)
    sweep = br.prune_sweep(small_deepid, clean, thresholds=(2.0, 10.0))
    assert [m.label for m in repair.models] == ["pruning X=2", "pruning X=10"]
    for m in repair.models:
        sel = sweep.selections[m.threshold]
        assert m.channels_pruned == sel.channels_pruned
        np.testing.assert_array_equal(br.predict_classes(m.model, x), sweep.predictions["valid"][sel.channels_pruned])
    rec = repair.record
    assert rec["defense"] == "pruning" and rec["choices"]["layer"] == "conv_3"
    assert rec["settings"]["thresholds"] == [2.0, 10.0]
    assert len(rec["history"]) == 61 and rec["history"][0]["valid_accuracy"] == 100.0
    json.dumps(rec)
    with pytest.raises(ValueError, match="returned 2 models"):
        _ = repair.model


@pytest.mark.slow
def test_fine_tuning_defenses_return_one_model_and_their_choices(small_demo):
    b = br.load_model(small_demo.model)
    valid = br.load_h5(small_demo.valid)
    for d in (FineTuning(epochs=2), FinePruning(epochs=2, prune_fraction=0.5)):
        r = d.repair(b, valid)
        assert r.defense == d.name and len(r.models) == 1 and r.models[0].label == d.name
        (member,) = r.record["choices"]["members"]
        assert member["channels_pruned"] == (30 if d.name == "fine-pruning" else 0)
        assert r.models[0].channels_pruned == member["channels_pruned"]
        assert 0 <= member["kept_epoch"] <= 2 and len(r.record["history"][0]) == 3
        json.dumps(r.record)


def test_disagreement_detector_by_hand():
    # two 1x1-conv nets on (4, 4, 1) inputs: B follows the pixel sum, B' is blind to it
    b = tiny_conv_model(np.array([[1.0]]), np.array([[1.0, -1.0]] * 4))
    r = tiny_conv_model(np.array([[0.0]]), np.array([[1.0, -1.0]] * 4))
    x = np.stack([np.full((4, 4, 1), v, np.float32) for v in (-1.0, 2.0, 3.0)])
    # B: relu(v) pooled -> logits (4 relu(v), -4 relu(v)): class 0 if v > 0 else tie -> 0; B' always ties -> 0
    det = Disagreement(r)
    with pytest.raises(RuntimeError, match="fit"):
        det.flags(x)
    det.fit(b, br.Dataset(x, np.zeros(3, np.int64), "clean"))
    assert det.flags(x).tolist() == [False, False, False]
    b_flip = tiny_conv_model(np.array([[1.0]]), np.array([[-1.0, 1.0]] * 4))  # class 1 where v > 0
    det = Disagreement(r).fit(b_flip, br.Dataset(x, np.zeros(3, np.int64), "clean"))
    assert det.flags(x).tolist() == [False, True, True]
    assert det.scores(x).tolist() == [0.0, 1.0, 1.0]
    assert goodnet_classes(b_flip, det, x).tolist() == [0, 2, 2]
    np.testing.assert_array_equal(goodnet_classes(b_flip, det, x), br.goodnet_predict(
        br.predict_classes(b_flip, x), br.predict_classes(r, x), 2))


@dataclass(frozen=True)
class _SpyDefense(Defense):
    name: ClassVar[str] = "spy"
    summary: ClassVar[str] = "returns B unchanged"

    def repair(self, model: Any, clean: br.Dataset, *, progress: bool = False) -> Repair:
        SpyArray.log.append(f"repair {self.name}")
        return Repair(defense=self.name, models=(Repaired(label=self.name, model=model),), record={})


def test_compare_repairs_everything_before_reading_test_or_poisoned_data(small_deepid):
    x = random_faces(30, seed=7)
    y = br.predict_classes(small_deepid, x)
    valid = br.Dataset(x, y, "valid")
    spy_x = random_faces(20, seed=8).view(SpyArray)
    test = br.Dataset(spy_x, br.predict_classes(small_deepid, np.asarray(spy_x)), "test")
    bd = br.Dataset(spy_x, np.zeros(20, np.int64), "bd_test")
    SpyArray.log.clear()
    comp = compare_defenses(small_deepid, valid, test, bd, defenses=[_SpyDefense(), Pruning(thresholds=(5.0,))])
    log = SpyArray.log
    assert log[0] == "repair spy" and "read" in log
    assert "repair spy" not in log[log.index("read"):]
    rows = [e.model for e in comp.evaluations]
    assert rows[:3] == ["no defense", "spy", "G (spy)"]
    spy_row = comp.evaluations[1]
    assert spy_row.clean_accuracy == 100.0 and spy_row.channels_pruned == 0


# -- a defense from outside the package: one class, one registration ---------------------------


class _ShrinkHead(Part):
    """A toy part: an L2 penalty on the classifier head's kernel."""

    def __init__(self, weight: float) -> None:
        self.weight = weight

    def penalty(self, network: Any) -> Any:
        import tensorflow as tf

        return self.weight * tf.reduce_sum(tf.square(network.get_layer("output").kernel))


@dataclass(frozen=True)
class ToyShrink(FineTuning):
    """A toy defense for the tests: fine-tuning with an L2 penalty on the head (not a real defense)."""

    name: ClassVar[str] = "toy-shrink"
    summary: ClassVar[str] = "fine-tuning with the head's kernel pulled to zero (a test's toy)"

    shrink: float = setting(1.0, "weight of the penalty on the head's squared kernel")

    def plan(self, member: Member, start: Any, pruned: tuple[int, ...]) -> TrainingPlan:
        base = super().plan(member, start, pruned)
        return TrainingPlan(parts=(*base.parts, _ShrinkHead(self.shrink)), step=base.step)


@pytest.fixture
def toy_registered():
    register_defense(ToyShrink)
    yield ToyShrink
    REGISTRY.pop(ToyShrink.name, None)


def test_a_defense_registered_from_outside_runs_through_compare_and_a_tiny_bench(toy_registered, lab_files,
                                                                                  tmp_path):
    from badnet_repair.workflow.bench import load_config, read_store, run_bench

    with pytest.raises(ValueError, match="registered already"):
        register_defense(type("Other", (ToyShrink,), {"name": "fine-tuning", "__module__": __name__}))
    with pytest.raises(ValueError, match="not a Defense"):
        register_defense(int)  # type: ignore[arg-type]
    toy = make_defense("toy-shrink", epochs=2, shrink=5.0, shift=0, budget=None)
    b = br.load_model(lab_files["model"])
    valid, test, bd = (br.load_h5(lab_files[k]) for k in ("valid", "test", "bd_test"))
    plain = make_defense("fine-tuning", epochs=2, shift=0, budget=None).repair(b, valid).model
    comparison = compare_defenses(b, valid, test, bd, defenses=[toy])
    assert [e.model for e in comparison.evaluations][:2] == ["no defense", "toy-shrink"]
    again = toy.repair(b, valid).model

    def norm(m: Any) -> float:
        return float(np.linalg.norm(m.get_layer("output").kernel.numpy()))

    assert norm(again) < norm(plain)  # its part was applied
    config = tmp_path / "bench.toml"
    config.write_text("\n".join([
        "seeds = [0]", "[[badnet]]", 'name = "tiny"', 'split = "tuning"',
        *(f'{k} = "{lab_files[k]}"' for k in ("model", "valid", "test", "bd_test")),
        "[[defense]]", 'name = "toy-shrink"', "epochs = 1", "shrink = [0.5, 2.0]"]))
    result = run_bench(load_config(config), tmp_path / "out", serial=True, progress=False)
    rows = read_store(tmp_path / "out")
    assert len(result.ran) == 2 and all(r["status"] == "ok" for r in rows), rows
    assert {r["defense"] for r in rows} == {"toy-shrink"}
