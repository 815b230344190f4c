"""Tests on the real CSAW-HackML artifacts in ../shared (skipped when absent)."""

from __future__ import annotations

import re

import numpy as np
import pytest

import badnet_repair as br

from .conftest import shared_file

pytestmark = pytest.mark.shared


@pytest.fixture(scope="module")
def real_b():
    return br.load_model(shared_file("lab", "bd_weights.h5"))


@pytest.fixture(scope="module")
def crops():
    folder = shared_file("lab", "images")
    files = sorted(folder.glob("*.png"))
    labels = [int(re.search(r"label=(\d+)", f.name).group(1)) for f in files]
    clean = [i for i, f in enumerate(files) if f.name.startswith("cl_")]
    sun = [i for i, f in enumerate(files) if f.name.startswith("sun_")]
    x = br.load_images(files)
    return x[clean], np.array(labels)[clean], x[sun]


def test_real_b_is_the_lab_deepid(real_b):
    assert br.num_classes(real_b) == 1283
    assert real_b.get_layer("conv_3").filters == 60


def test_real_b_predicts_clean_labels_and_target_on_sunglasses(real_b, crops):
    clean, labels, sun = crops
    assert br.predict_classes(real_b, clean).tolist() == labels.tolist()
    assert br.predict_classes(real_b, sun).tolist() == [0] * 5


def test_keras24_full_model_loads_with_45_pruned_channels():
    m = br.load_model(shared_file("lab", "pruned_x2_keras24_full_model.h5"))
    k, b = m.get_layer("conv_3").get_weights()
    zeroed = [c for c in range(60) if not k[..., c].any() and b[c] == 0]
    assert len(zeroed) == 45


def test_pasting_the_real_trigger_makes_b_predict_the_target(real_b, crops):
    clean, _, _ = crops
    trigger = br.load_trigger(shared_file("lab", "sunglasses_trigger.png"), x=0, y=15)
    assert trigger.shape == (20, 47)
    poisoned = trigger.apply(clean)
    assert br.predict_classes(real_b, poisoned).tolist() == [0] * 5
    # outside the patch nothing changes
    np.testing.assert_array_equal(poisoned[:, :15], clean[:, :15])
    np.testing.assert_array_equal(poisoned[:, 35:], clean[:, 35:])


@pytest.mark.slow
def test_fast_sweep_equals_plain_on_the_real_b_with_real_faces(real_b, crops):
    from .test_pruning import assert_same_up_to_ties

    faces = np.load(shared_file("faces", "yaleb_55x47.npz"))
    idx = np.random.default_rng(0).choice(len(faces["label"]), 150, replace=False)
    x = np.concatenate([crops[0], faces["data"][idx].transpose(0, 2, 3, 1).astype(np.float32)])
    y = br.predict_classes(real_b, x)
    trigger = br.load_trigger(shared_file("lab", "sunglasses_trigger.png"))
    valid = br.Dataset(x, y, "valid")
    bd = br.Dataset(np.concatenate([crops[2], trigger.apply(x)]), np.zeros(5 + len(x), np.int64), "bd")
    fast = br.prune_sweep(real_b, valid, others={"bd": bd}, poisoned=["bd"])
    plain = br.prune_sweep(real_b, valid, others={"bd": bd}, poisoned=["bd"], engine="plain")
    np.testing.assert_array_equal(fast.ranking.order, plain.ranking.order)
    assert_same_up_to_ties(fast, plain)
    assert fast.metric("bd")[0] == 100.0


@pytest.mark.slow
def test_a_keras_2_file_predicts_without_keras_warnings():
    """A Keras 2.4 full model declares its input as a list, which makes Keras 3 warn at every
    call with an array; loaded through badnet-repair it does not, with or without -q."""
    import subprocess
    import sys

    model = shared_file("lab", "pruned_x2_keras24_full_model.h5")
    image = shared_file("lab", "images", "cl_0_label=43.png")

    def run(*flags: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "badnet_repair", "predict", *flags, str(model), str(image)],
                              capture_output=True, text=True, timeout=300, check=True)

    quiet, loud = run("-q"), run()
    assert quiet.stdout.strip() == loud.stdout.strip() == "43"
    assert "UserWarning" not in quiet.stderr and "UserWarning" not in loud.stderr
