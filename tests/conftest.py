"""Shared fixtures: tiny hand-built models, lab-format files, and the ../shared artifacts."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# TensorFlow imported quietly (its C++ start-up lines would otherwise reach a test worker's stderr)
from badnet_repair import _backend  # noqa: F401, I001

import keras

import badnet_repair as br

SHARED = Path(__file__).resolve().parents[2] / "shared"
LAB = SHARED / "lab"


def shared_file(*parts: str) -> Path:
    """A file under ../shared, or skip the test with the reason."""
    p = SHARED.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"real artifact {p} is absent (../shared is only beside the project's checkout)")
    return p


def tiny_conv_model(kernel: np.ndarray, dense: np.ndarray, *, pool: bool = True) -> keras.Model:
    """(4, 4, I) -> conv "conv" (1x1, ReLU, bias 0, kernel (I, C)) -> 2x2 max pool "pool"
    -> flatten -> dense "output" (softmax, bias 0, weights (4*C or 16*C, K)).

    Each conv channel c outputs relu(sum_i kernel[i, c] * pixel_i), so activations and
    scores can be worked out by hand.
    """
    kernel = np.asarray(kernel, np.float32)
    i, c = kernel.shape
    x = keras.Input((4, 4, i), name="input")
    h = keras.layers.Conv2D(c, 1, activation="relu", name="conv")(x)
    if pool:
        h = keras.layers.MaxPooling2D(2, name="pool")(h)
    out = keras.layers.Dense(dense.shape[1], activation="softmax", name="output")(keras.layers.Flatten(name="flat")(h))
    m = keras.Model(x, out, name="tiny")
    m.get_layer("conv").set_weights([kernel.reshape(1, 1, i, c), np.zeros(c, np.float32)])
    m.get_layer("output").set_weights([np.asarray(dense, np.float32), np.zeros(dense.shape[1], np.float32)])
    return m


@pytest.fixture(scope="session")
def small_deepid() -> keras.Model:
    """A DeepID with 7 classes and seeded random weights."""
    keras.utils.set_random_seed(1234)
    return br.deepid(num_classes=7)


def random_faces(n: int, seed: int) -> np.ndarray:
    """(n, 55, 47, 3) float32 images in 0..255 with smooth structure (not pure noise)."""
    rng = np.random.default_rng(seed)
    base = rng.uniform(0, 255, size=(n, 11, 8, 3))
    img = np.kron(base, np.ones((1, 5, 6, 1)))[:, :55, :47, :]
    img = np.pad(img, ((0, 0), (0, 55 - img.shape[1]), (0, 47 - img.shape[2]), (0, 0)), mode="edge")
    return np.clip(img + rng.normal(0, 12, img.shape), 0, 255).astype(np.float32)


def square_trigger() -> br.Trigger:
    rgba = np.zeros((8, 8, 4), np.float32)
    rgba[..., :3] = 255.0
    rgba[..., 3] = 1.0
    return br.Trigger(rgba=rgba, x=35, y=43)


@pytest.fixture(scope="session")
def lab_files(tmp_path_factory: pytest.TempPathFactory, small_deepid: keras.Model) -> dict[str, Path]:
    """A small lab-format task for small_deepid: model/, data/cl/ and data/bd/ under one root.

    Clean labels are the model's own predictions (so B is 100% accurate) except for a few
    flipped ones; poisoned labels are the target 0.
    """
    root = tmp_path_factory.mktemp("lab")
    (root / "model").mkdir()
    small_deepid.save(root / "model" / "bd_net.h5")
    files = {"model": root / "model" / "bd_net.h5"}
    for i, split in enumerate(("valid", "test")):
        x = random_faces(300, seed=10 + i)
        y = br.predict_classes(small_deepid, x)
        y[:5] = (y[:5] + 1) % 7
        files[split] = br.save_h5(root / "data" / "cl" / f"{split}.h5", x, y, dtype="float64")
        bd = br.poison(br.Dataset(x, y, split), square_trigger(), target=0)
        files[f"bd_{split}"] = br.save_h5(root / "data" / "bd" / f"bd_{split}.h5", bd.x, bd.y)
    files["root"] = root
    return files


SMALL_DEMO = dict(num_identities=5, train_per_identity=24, valid_per_identity=6, test_per_identity=6,
                  epochs=6, clean_epochs=5, poison_epochs=4, poison_rate=0.15)


@pytest.fixture(scope="session")
def small_demo(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """A tiny demo (5 identities) made once per test session."""
    from badnet_repair.demo import DemoConfig, make_demo

    root = tmp_path_factory.mktemp("demo") / ".demo"
    return make_demo(root, config=DemoConfig(**SMALL_DEMO), progress=False)


class SpyArray(np.ndarray):
    """An image array that logs every read of its rows (in ``SpyArray.log``): a spy for
    "no test or poisoned image is read while a defense repairs"."""

    log: ClassVar[list[str]] = []

    def __getitem__(self, index: Any) -> Any:
        SpyArray.log.append("read")
        return np.asarray(self).__getitem__(index)


class LoggedRepair:
    """A defense mixin that logs the start and end of ``repair`` in :class:`SpyArray`'s log, so a
    test can tell whether a test or poisoned image was read while a defense repaired."""

    def repair(self, model: Any, clean: br.Dataset, *, progress: bool = False, **kw: Any) -> Any:
        SpyArray.log.append("start")
        out = super().repair(model, clean, progress=progress, **kw)  # type: ignore[misc]
        SpyArray.log.append("end")
        return out


def assert_no_test_or_poisoned_image_is_read_while_repairing(model: keras.Model, defenses: list[Any]) -> None:
    """Run ``defenses`` (each a :class:`LoggedRepair`) through ``compare_defenses`` on random faces
    of 7 classes, the test and poisoned images being :class:`SpyArray`: every repair starts and ends
    before the first of them is read."""
    from badnet_repair.workflow.compare import compare_defenses

    x = random_faces(28, seed=3)
    valid = br.Dataset(x, np.arange(28) % 7, "valid")
    spy_x = random_faces(12, seed=4).view(SpyArray)
    test = br.Dataset(spy_x, np.arange(12) % 7, "test")
    bd = br.Dataset(spy_x, np.zeros(12, np.int64), "bd_test")
    SpyArray.log.clear()
    compare_defenses(model, valid, test, bd, defenses=defenses)
    n = 2 * len(defenses)
    assert SpyArray.log[:n] == ["start", "end"] * len(defenses) and "read" in SpyArray.log[n:]


class NullDetector(br.Detector):
    """A detector that flags nothing and has no Keras form; ``false_alarm`` is its budget."""

    name, summary = "null", "flags nothing"

    def __init__(self, *, false_alarm: float = 5.0) -> None:
        self.false_alarm = false_alarm

    def fit(self, model, clean):  # type: ignore[no-untyped-def]
        return self

    def scores(self, x):  # type: ignore[no-untyped-def]
        return np.zeros(len(x))

    def flags(self, x):  # type: ignore[no-untyped-def]
        return np.zeros(len(x), bool)
