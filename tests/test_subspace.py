"""Clean-subspace projection (defenses.subspace, nets.models.first_dense_layers and
project_dense_inputs): the layers found from the graph, the projection folded into a Dense layer
against the plain computation, the principal directions and folds by hand, and a hand-built BadNet
whose trigger drives features clean images never vary along: the projection cuts it and keeps
every clean prediction."""

from __future__ import annotations

import keras
import numpy as np
import pytest

import badnet_repair as br
from badnet_repair.defenses import REGISTRY, make_defense
from badnet_repair.defenses.subspace import (
    CleanSubspaceProjection,
    SubspaceFineTuning,
    cross_fit_folds,
    principal_directions,
    projected_copy,
)
from badnet_repair.errors import DataError, ModelError
from badnet_repair.nets.models import as_functional, first_dense_layers, project_dense_inputs

from .conftest import LoggedRepair, assert_no_test_or_poisoned_image_is_read_while_repairing

K, TARGET = 4, 0


def test_the_first_dense_layers_are_found_from_the_graph():
    assert first_dense_layers(br.deepid(num_classes=5)) == ["fc_1", "fc_2"]
    hidden = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Conv2D(4, 3), keras.layers.Flatten(),
                               keras.layers.Dense(6, name="hidden"), keras.layers.Dense(3, name="out")])
    assert first_dense_layers(as_functional(hidden)) == ["hidden"]
    inp = keras.Input((8, 8, 3))
    flat = keras.layers.Flatten()(keras.layers.Conv2D(2, 3)(inp))
    straight = keras.Model(inp, keras.layers.Dense(3, name="head")(flat))
    assert first_dense_layers(straight) == ["head"]
    convs_only = keras.Model(inp, keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(3, 3)(inp)))
    assert first_dense_layers(convs_only) == []
    # a Dense layer on a feature map works at each position, as a 1x1 convolution: part of the body
    pointwise = keras.layers.Dense(5, name="pointwise")(keras.layers.Conv2D(4, 3)(inp))
    per_position = keras.Model(inp, keras.layers.Dense(3, name="classifier")(
        keras.layers.GlobalAveragePooling2D()(pointwise)))
    assert first_dense_layers(per_position) == ["classifier"]


def test_the_projection_folded_into_a_dense_layer_is_the_plain_computation():
    inp = keras.Input((3,))
    model = keras.Model(inp, keras.layers.Dense(2, name="d")(inp))
    w = np.array([[1.0, 2.0], [3.0, -1.0], [0.5, 4.0]], np.float32)
    b = np.array([0.25, -0.5], np.float32)
    model.get_layer("d").set_weights([w, b])
    mean = np.array([1.0, 2.0, -1.0])
    basis = np.array([[1.0], [0.0], [0.0]])  # keep the first coordinate's deviation only
    project_dense_inputs(model, "d", mean, basis)
    a = np.array([[5.0, 7.0, 9.0], [-2.0, 0.0, 3.0]], np.float32)
    # the input becomes mean + P (a - mean): its first coordinate, the mean's others
    kept = np.column_stack([a[:, 0], np.full(2, 2.0), np.full(2, -1.0)])
    np.testing.assert_allclose(model.predict(a, verbose=0), kept @ w + b, rtol=1e-6)
    with pytest.raises(ModelError, match="takes 3 inputs"):
        project_dense_inputs(model, "d", np.zeros(2), np.zeros((2, 1)))


def test_principal_directions_and_the_share_of_variance_by_hand():
    rng = np.random.default_rng(0)
    z = rng.standard_normal((400, 2))
    z = (z - z.mean(0)) / z.std(0)  # exactly unit variance on both
    x = np.column_stack([3.0 * z[:, 0] + 5.0, z[:, 1], np.full(400, 7.0)])  # variances 9, 1, 0
    d = principal_directions(x)
    np.testing.assert_allclose(d.mean, [5.0, 0.0, 7.0], atol=1e-12)
    assert d.basis.shape == (3, 2)  # the constant coordinate holds nothing and is dropped
    np.testing.assert_allclose(d.cumulative, [0.9, 1.0], atol=0.01)  # the two not exactly uncorrelated
    np.testing.assert_allclose(np.abs(d.basis[:, 0]), [1.0, 0.0, 0.0], atol=0.01)
    assert d.directions_for(0.85) == 1 and d.directions_for(0.95) == 2 and d.directions_for(1.0) == 2


def test_folds_deal_each_class_evenly():
    labels = np.repeat(np.arange(6), [1, 2, 5, 9, 3, 7])
    fold = cross_fit_folds(labels, 5, seed=1)
    sizes = np.bincount(fold, minlength=5)
    assert sizes.max() - sizes.min() <= 1
    for c in np.unique(labels):
        per = np.bincount(fold[labels == c], minlength=5)
        assert per.max() - per.min() <= 1
    np.testing.assert_array_equal(cross_fit_folds(labels, 5, seed=1), fold)


def corner_badnet() -> keras.Model:
    """(8, 8, 3) -> K classes from the 2x2 average-pooled image's 12 values: classes from the
    three top and left cells' channel means, and a huge vote for TARGET from the bottom-right cell
    (the trigger, which clean images keep black)."""
    inp = keras.Input((8, 8, 3))
    pooled = keras.layers.Flatten()(keras.layers.AveragePooling2D(4)(inp))  # cells (0,0), (0,1), (1,0), (1,1) x RGB
    model = keras.Model(inp, keras.layers.Softmax()(keras.layers.Dense(K, name="head")(pooled)))
    w = np.zeros((12, K), np.float32)
    for c in range(K):  # class c: the red of cell c (cells 0..2), blue for class 3
        w[c * 3 if c < 3 else 2, c] = 1.0
    w[9:12, TARGET] = 10.0  # the trigger cell
    model.get_layer("head").set_weights([w, np.zeros(K, np.float32)])
    return model


def corner_images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Clean images of K classes: one colour channel of one cell bright, the rest dim; the
    bottom-right cell black."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % K
    x = rng.uniform(0, 60, (n, 8, 8, 3)).astype(np.float32)
    for i, c in enumerate(y):
        r, col = [(0, 0), (0, 4), (4, 0), (0, 0)][c]
        x[i, r : r + 4, col : col + 4, 0 if c < 3 else 2] += 150.0
    x[:, 4:, 4:, :] = 0.0
    return x, y


def corner_test_images() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """40 clean test images, their labels, and the same images with the trigger cell white."""
    test_x, test_y = corner_images(40, seed=2)
    poisoned = test_x.copy()
    poisoned[:, 4:, 4:, :] = 255.0
    return test_x, test_y, poisoned


def test_the_projection_cuts_a_trigger_clean_images_never_vary_along():
    b = corner_badnet()
    x, y = corner_images(80, seed=1)
    weights = [w.copy() for w in b.get_weights()]
    repair = CleanSubspaceProjection(drop=1.0).repair(b, br.Dataset(x, y, "valid"))
    for before, after in zip(weights, b.get_weights(), strict=True):
        np.testing.assert_array_equal(before, after)  # the caller's model is not changed
    choices = repair.record["choices"]
    assert choices["layers"] == ["head"] and choices["kept_variance"] is not None
    assert choices["directions"]["head"] <= 9  # the three trigger values hold no clean variance
    test_x, test_y, poisoned = corner_test_images()
    assert br.attack_success_rate(br.predict_classes(b, poisoned), np.full(40, TARGET)) == 100.0
    fixed = repair.model
    # every clean image keeps B's class, and the trigger no longer sends anything to the target
    np.testing.assert_array_equal(br.predict_classes(fixed, test_x), br.predict_classes(b, test_x))
    np.testing.assert_array_equal(br.predict_classes(fixed, poisoned), test_y)
    assert not repair.warnings or all(w.startswith("CAUTION") for w in repair.warnings)


def test_a_projection_past_the_drop_gives_b_back_with_a_loud_line():
    b = corner_badnet()
    x, y = corner_images(80, seed=1)
    repair = CleanSubspaceProjection(drop=0.0, kept_variance=(0.3,)).repair(b, br.Dataset(x, y, "valid"))
    assert repair.model is b and repair.record["choices"]["kept_variance"] is None
    assert repair.record["choices"]["tried"][0]["accuracy"] < 100.0
    assert any("backdoor is NOT removed" in w for w in repair.warnings)


def test_the_copy_projects_each_fold_without_touching_b():
    b = corner_badnet()
    x, _ = corner_images(40, seed=3)
    features = np.asarray(keras.Model(b.inputs, b.get_layer("head").input).predict(x, verbose=0))
    d = principal_directions(features)
    copy = projected_copy(b, {"head": d}, {"head": 2})
    assert copy is not b
    kernel = copy.get_layer("head").get_weights()[0]
    p = d.basis[:, :2] @ d.basis[:, :2].T
    np.testing.assert_allclose(kernel, p @ b.get_layer("head").get_weights()[0], atol=1e-5)
    # reused for another level: the same weights as a fresh copy at that level
    again = projected_copy(b, {"head": d}, {"head": 5}, into=copy)
    fresh = projected_copy(b, {"head": d}, {"head": 5})
    assert again is copy
    for w, w0 in zip(again.get_weights(), fresh.get_weights(), strict=True):
        np.testing.assert_array_equal(w, w0)


def test_settings_are_checked_and_the_defense_is_registered(small_deepid):
    assert REGISTRY["subspace"] is CleanSubspaceProjection
    assert make_defense("subspace", drop=3.0).drop == 3.0
    for bad in ({"drop": -1.0}, {"kept_variance": ()}, {"kept_variance": (1.5,)}, {"folds": 1}, {"budget": -1.0},
                {"batch_size": 0}):
        with pytest.raises(ValueError):
            CleanSubspaceProjection(**bad)
    inp = keras.Input((8, 8, 3))
    no_dense = keras.Model(inp, keras.layers.Softmax()(keras.layers.GlobalAveragePooling2D()(
        keras.layers.Conv2D(3, 3)(inp))))
    x, y = corner_images(10, seed=4)
    with pytest.raises(ModelError, match="no Dense layer"):
        CleanSubspaceProjection().repair(no_dense, br.Dataset(x, y % 3, "valid"))
    with pytest.raises(DataError, match="folds"):
        CleanSubspaceProjection().repair(corner_badnet(), br.Dataset(x[:3], y[:3], "valid"))


class _LoggedSubspace(LoggedRepair, CleanSubspaceProjection):
    pass


def test_no_test_or_poisoned_image_is_read_while_subspace_repairs(small_deepid):
    assert_no_test_or_poisoned_image_is_read_while_repairing(small_deepid, [_LoggedSubspace(budget=None)])


@pytest.mark.slow
def test_subspace_repairs_the_small_demo_within_its_drop(small_demo):
    b = br.load_model(small_demo.model)
    valid = br.load_h5(small_demo.valid)
    r = CleanSubspaceProjection(drop=2.0, budget=None).repair(b, valid)
    choices = r.record["choices"]
    assert choices["layers"] == ["fc_1", "fc_2"]
    # the level kept is within the drop on the cross-fitted clean images, and never fitted on the test set
    if choices["kept_variance"] is not None:
        assert choices["base_holdout_accuracy"] - choices["holdout_accuracy"] <= 2.0
    test = br.load_h5(small_demo.test)
    acc = 100 * np.mean(br.predict_classes(r.model, test.x) == test.y)
    base = 100 * np.mean(br.predict_classes(b, test.x) == test.y)
    assert acc >= base - 10.0


def test_fine_tuning_from_the_projected_start_keeps_the_trigger_cut():
    b = corner_badnet()
    x, y = corner_images(80, seed=1)
    d = SubspaceFineTuning(kept_variance=0.999, epochs=3, budget=None, shift=0, flip=False)
    repair = d.repair(b, br.Dataset(x, y, "valid"))
    notes = repair.record["choices"]
    assert "projected_directions" in str(notes) and repair.model is not b
    test_x, test_y, poisoned = corner_test_images()
    # fine-tuning on clean images does not put back the directions the start cut
    assert br.attack_success_rate(br.predict_classes(repair.model, poisoned), np.full(40, TARGET)) <= 30.0
    assert 100 * np.mean(br.predict_classes(repair.model, test_x) == test_y) >= 90.0
    with pytest.raises(ValueError, match="kept_variance"):
        SubspaceFineTuning(kept_variance=0.0)
    assert REGISTRY["subspace-ft"] is SubspaceFineTuning


class _LoggedSubspaceFT(LoggedRepair, SubspaceFineTuning):
    pass


def test_no_test_or_poisoned_image_is_read_while_subspace_ft_repairs(small_deepid):
    assert_no_test_or_poisoned_image_is_read_while_repairing(small_deepid, [_LoggedSubspaceFT(epochs=1, budget=None)])


def test_layers_called_in_another_graph_are_not_shared_in_b():
    b = br.deepid(num_classes=5)
    # another network built on B's own layer objects (as a detector may build one) calls them again
    inp = keras.Input((55, 47, 3))
    h = inp
    for name in ("conv_1", "pool_1", "conv_2", "pool_2", "conv_3", "pool_3"):
        h = b.get_layer(name)(h)
    keras.Model(inp, b.get_layer("fc_1")(b.get_layer("flatten_1")(h)))
    assert len(b.get_layer("fc_1")._inbound_nodes) == 2
    assert first_dense_layers(b) == ["fc_1", "fc_2"]
    assert br.default_conv_layer(b) == "conv_3"
    # a Dense layer called twice in the model's own graph is still refused
    x = keras.Input((4,))
    twice = keras.layers.Dense(4, name="twice")
    both = keras.layers.Concatenate()([twice(x), twice(keras.layers.Activation("relu")(x))])
    shared = keras.Model(x, keras.layers.Dense(2)(both))
    with pytest.raises(ModelError, match="shared"):
        first_dense_layers(shared)
