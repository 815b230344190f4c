"""Discriminant fusion and gate (defenses.discriminant, nets.models.with_linear_scores and
with_gated_scores): the discriminant against its plain formula, the fused and gated models against
their plain computations and through a saved file, the copies it is fitted on, and a hand-built
BadNet whose trigger only its head reads: fusion and gate overrule it and keep every clean
prediction."""

from __future__ import annotations

import keras
import numpy as np
import pytest

import badnet_repair as br
from badnet_repair.defenses import REGISTRY, make_defense
from badnet_repair.defenses.discriminant import (
    DiscriminantFusion,
    DiscriminantGate,
    augmented,
    cross_fit_discriminants,
    feature_layers,
    fit_discriminant,
    gate_margins,
    gated_classes,
    share_pairs,
    walk_shares,
)
from badnet_repair.defenses.subspace import dense_inputs
from badnet_repair.detectors.features import ledoit_wolf
from badnet_repair.errors import DataError, ModelError
from badnet_repair.nets.models import body_layer, predict_probabilities, with_gated_scores, with_linear_scores

from .conftest import LoggedRepair, assert_no_test_or_poisoned_image_is_read_while_repairing
from .test_subspace import corner_images, corner_test_images

K, TARGET = 4, 0


def assert_keras_2_loads_the_same(model, x: np.ndarray, tmp_path, label: str = "bd_gated") -> None:
    """Saved as .h5 and loaded by Keras 2 (tf-keras, the lab's eval.py), ``model`` predicts as it does here."""
    tf_keras = pytest.importorskip("tf_keras", reason="tf-keras (Keras 2) is not installed; .ci/run installs it")
    paths = br.save_model(model, tmp_path, label, formats=("h5",))
    k2 = tf_keras.models.load_model(paths["h5"], compile=False)
    np.testing.assert_allclose(k2.predict(x, verbose=0), predict_probabilities(model, x), rtol=1e-4, atol=1e-6)


def test_the_discriminant_is_fishers_formula_on_standardised_features():
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 8)
    f = rng.normal(size=(24, 5)) * [1.0, 2.0, 0.5, 3.0, 1.0] + np.eye(3, 5)[y] * 4.0
    disc = fit_discriminant(f, y, 4)  # class 3 has no image
    mean, sd = f.mean(0), f.std(0)
    s = (f - mean) / sd
    means = np.stack([s[y == c].mean(0) for c in range(3)])
    cov, _ = ledoit_wolf(s - means[y])
    p = np.linalg.inv(cov)
    plain = s @ p @ means.T - 0.5 * np.einsum("kd,de,ke->k", means, p, means)
    got = disc.scores(f)
    np.testing.assert_allclose(got[:, :3], plain, rtol=1e-6, atol=1e-6)
    # the class without an image: the mean of the others' scores, neither favoured nor excluded
    np.testing.assert_allclose(got[:, 3], plain.mean(1), rtol=1e-6, atol=1e-6)
    assert (got[:, :3].argmax(1) == y).mean() >= 0.9


def test_the_fitting_copies_are_mirrors_and_one_pixel_shifts():
    x = np.arange(2 * 3 * 4 * 1, dtype=np.float32).reshape(2, 3, 4, 1)
    assert len(augmented(x, "none")) == 1
    flipped = augmented(x, "flip")
    np.testing.assert_array_equal(flipped[1][0, :, :, 0], x[0, :, ::-1, 0])
    shifted = augmented(x, "flip+shift")
    assert len(shifted) == 6
    np.testing.assert_array_equal(shifted[2][0, 1:, :, 0], x[0, :-1, :, 0])  # moved down one row
    with pytest.raises(ValueError, match="augment"):
        augmented(x, "rotate")


def head_badnet(trigger_weight: float = 0.25) -> keras.Model:
    """(8, 8, 3) -> K classes from the 2x2 average-pooled image's 12 values: class c from the red
    (class 3: blue) of cell c, and a vote for TARGET from the bottom-right cell, the trigger, which
    clean images keep black: only the head reads it."""
    inp = keras.Input((8, 8, 3))
    pooled = keras.layers.Flatten(name="cells")(keras.layers.AveragePooling2D(4)(inp))
    model = keras.Model(inp, keras.layers.Dense(K, activation="softmax", name="head")(pooled))
    w = np.zeros((12, K), np.float32)
    for c in range(K):
        w[c * 3 if c < 3 else 2, c] = 1.0
    w[9:12, TARGET] = trigger_weight
    model.get_layer("head").set_weights([w, np.zeros(K, np.float32)])
    return model


def test_the_fused_model_is_the_plain_sum_of_scores_and_survives_a_saved_file(tmp_path):
    b = head_badnet()
    rng = np.random.default_rng(1)
    kernel, bias = rng.normal(size=(12, K)), rng.normal(size=K)
    fused = with_linear_scores(b, ["head"], kernel, bias)
    x, _ = corner_images(10, seed=3)
    cells = x.reshape(10, 2, 4, 2, 4, 3).mean(axis=(2, 4)).reshape(10, 12)
    w, c = b.get_layer("head").get_weights()
    z = cells @ w + c + cells @ kernel + bias
    plain = np.exp(z - z.max(1, keepdims=True))
    plain /= plain.sum(1, keepdims=True)
    np.testing.assert_allclose(predict_probabilities(fused, x), plain, rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(b.get_layer("head").get_weights()[0], w)  # B is not changed
    paths = br.save_model(fused, tmp_path, "fused")
    for kind, path in paths.items():
        if kind == "weights":
            continue  # weights alone load into DeepID, not into this network
        np.testing.assert_allclose(predict_probabilities(br.load_model(path), x), plain, rtol=1e-4, atol=1e-6)
    with pytest.raises(ModelError, match="kernel"):
        with_linear_scores(b, ["head"], kernel[:5], bias)
    inp = keras.Input((4,))
    sigmoid = keras.Model(inp, keras.layers.Dense(3, activation="sigmoid", name="out")(inp))
    with pytest.raises(ModelError, match="softmax"):
        with_linear_scores(sigmoid, ["out"], np.zeros((4, 3)), np.zeros(3))


def test_the_fusion_overrules_a_trigger_only_the_head_reads():
    b = head_badnet()
    x, y = corner_images(80, seed=1)
    weights = [w.copy() for w in b.get_weights()]
    # the cells are not mirror images of each other: the discriminant is fitted on the images alone
    repair = DiscriminantFusion(augment="none").repair(b, br.Dataset(x, y, "valid"))
    for before, after in zip(weights, b.get_weights(), strict=True):
        np.testing.assert_array_equal(before, after)  # the caller's model is not changed
    choices = repair.record["choices"]
    assert choices["layers"] == ["head"] and choices["features"] == 12 and choices["weight"] is not None
    # the weight kept is the largest before the cross-fitted accuracy first fell more than drop below B's
    tried = choices["tried"]
    base = choices["base_holdout_accuracy"]
    assert all(base - t["accuracy"] <= 2.0 for t in tried if t["weight"] <= choices["weight"])
    assert tried[-1]["weight"] == choices["weight"] or base - tried[-1]["accuracy"] > 2.0
    test_x, test_y, poisoned = corner_test_images()
    assert br.attack_success_rate(br.predict_classes(b, poisoned), np.full(40, TARGET)) == 100.0
    fixed = repair.model
    np.testing.assert_array_equal(br.predict_classes(fixed, test_x), br.predict_classes(b, test_x))
    np.testing.assert_array_equal(br.predict_classes(fixed, poisoned), test_y)


def test_a_weight_past_the_drop_gives_b_back_with_a_loud_line():
    b = head_badnet()
    x, y = corner_images(80, seed=1)
    assert (br.predict_classes(b, x) == y).all()  # B is right on every clean image
    # mirrored, class 0's bright cell sits where class 1's does: a discriminant fitted on the mirror images
    # confuses the two, and at a weight of 500 it overrules B on some of them
    repair = DiscriminantFusion(weights=(500.0,), drop=0.0, augment="flip").repair(b, br.Dataset(x, y, "valid"))
    assert repair.record["choices"]["tried"][0]["accuracy"] < 100.0
    assert repair.model is b and repair.record["choices"]["weight"] is None
    assert len(repair.warnings) == 1 and "backdoor is NOT removed" in repair.warnings[0]


def test_settings_are_checked_and_the_defense_is_registered():
    assert REGISTRY["discriminant"] is DiscriminantFusion
    assert make_defense("discriminant", augment="flip").augment == "flip"
    for bad in ({"drop": -1.0}, {"weights": ()}, {"weights": (0.0,)}, {"folds": 1}, {"augment": "rotate"},
                {"budget": -1.0}, {"batch_size": 0}):
        with pytest.raises(ValueError):
            DiscriminantFusion(**bad)
    x, y = corner_images(10, seed=4)
    with pytest.raises(DataError, match="1 clean image.*at least 2"):
        DiscriminantFusion().repair(head_badnet(), br.Dataset(x[:1], y[:1], "valid"))


class _LoggedDiscriminant(LoggedRepair, DiscriminantFusion):
    pass


class _LoggedGate(LoggedRepair, DiscriminantGate):
    pass


def test_no_test_or_poisoned_image_is_read_while_discriminant_repairs(small_deepid):
    assert_no_test_or_poisoned_image_is_read_while_repairing(
        small_deepid, [_LoggedDiscriminant(budget=None, augment="flip"), _LoggedGate(budget=None, augment="flip")])


def test_the_fused_deepid_loads_in_keras_2_and_predicts_the_same(tmp_path, small_deepid):
    """A repaired model is handed in as .h5 and graded by a Keras 2 eval.py."""
    from .conftest import random_faces

    width = 1200 + 960  # flatten(pool_3) and flatten(conv_4), fc_1's and fc_2's inputs
    classes = br.num_classes(small_deepid)
    rng = np.random.default_rng(2)
    kernel, bias = rng.normal(size=(width, classes)) * 1e-3, rng.normal(size=classes)
    x = random_faces(16, seed=9)
    for label, net in (("bd_fused", with_linear_scores(small_deepid, ["fc_1", "fc_2"], kernel, bias)),
                       ("bd_gated", with_gated_scores(small_deepid, ["fc_1", "fc_2"], kernel, bias, 0.5))):
        assert_keras_2_loads_the_same(net, x, tmp_path, label)


def test_the_gate_overrules_b_where_the_margin_exceeds_the_threshold():
    logits = np.array([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0], [1.0, 0.0, 5.0]])
    scores = np.array([[0.0, 9.0, 1.0], [0.0, 2.5, 2.0], [4.0, 0.0, 3.9]])
    # B's classes 0, 1, 2; the discriminant's best minus its score of B's class: 9, 0, 0.1
    np.testing.assert_allclose(gate_margins(logits, scores), [9.0, 0.0, 0.1])
    np.testing.assert_array_equal(gated_classes(logits, scores, 5.0), [1, 1, 2])
    np.testing.assert_array_equal(gated_classes(logits, scores, 0.05), [1, 1, 0])
    np.testing.assert_array_equal(gated_classes(logits, scores, 10.0), [0, 1, 2])


def test_the_gated_model_is_the_plain_gate_and_survives_a_saved_file(tmp_path):
    b = head_badnet()
    rng = np.random.default_rng(1)
    kernel, bias = rng.normal(size=(12, K)) * 0.05, rng.normal(size=K)
    x, _ = corner_images(30, seed=3)
    cells = x.reshape(30, 2, 4, 2, 4, 3).mean(axis=(2, 4)).reshape(30, 12)
    w, c = b.get_layer("head").get_weights()
    z, s = cells @ w + c, cells @ kernel + bias
    margins = gate_margins(z, s)
    threshold = float(np.median(margins))  # half the images overruled
    over = margins > threshold
    assert 0 < over.sum() < 30 and np.min(np.abs(margins - threshold)[margins != threshold]) > 1e-3

    def softmax(v: np.ndarray) -> np.ndarray:
        e = np.exp(v - v.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    plain = np.where(over[:, None], softmax(s), softmax(z))
    gated = with_gated_scores(b, ["head"], kernel, bias, threshold)
    at_threshold = margins == threshold  # the gate is half open exactly at the threshold
    np.testing.assert_allclose(predict_probabilities(gated, x)[~at_threshold], plain[~at_threshold], rtol=1e-4,
                               atol=1e-5)
    np.testing.assert_array_equal(br.predict_classes(gated, x), gated_classes(z, s, threshold))
    np.testing.assert_array_equal(b.get_layer("head").get_weights()[0], w)  # B is not changed
    paths = br.save_model(gated, tmp_path, "gated")
    for kind, path in paths.items():
        if kind == "weights":
            continue
        np.testing.assert_allclose(predict_probabilities(br.load_model(path), x), predict_probabilities(gated, x),
                                   rtol=1e-4, atol=1e-6)
    with pytest.raises(ModelError, match="threshold"):
        with_gated_scores(b, ["head"], kernel, bias, float("nan"))


def test_the_gate_overrules_a_trigger_only_the_head_reads():
    b = head_badnet(trigger_weight=1.0)  # a strong trigger, which no small weight of fusion outvotes
    x, y = corner_images(80, seed=1)
    weights = [w.copy() for w in b.get_weights()]
    repair = DiscriminantGate(augment="none").repair(b, br.Dataset(x, y, "valid"))
    for before, after in zip(weights, b.get_weights(), strict=True):
        np.testing.assert_array_equal(before, after)  # the caller's model is not changed
    choices = repair.record["choices"]
    assert choices["layers"] == ["head"] and choices["quantile"] is not None and not repair.warnings
    # the share kept is the largest before the cross-fitted accuracy first fell more than drop below B's
    tried = choices["tried"]
    base = choices["base_holdout_accuracy"]
    drop = DiscriminantGate().drop
    assert all(base - t["accuracy"] <= drop for t in tried if t["quantile"] <= choices["quantile"])
    assert tried[-1]["quantile"] == choices["quantile"] or base - tried[-1]["accuracy"] > drop
    test_x, test_y, poisoned = corner_test_images()
    assert br.attack_success_rate(br.predict_classes(b, poisoned), np.full(40, TARGET)) == 100.0
    fixed = repair.model
    np.testing.assert_array_equal(br.predict_classes(fixed, test_x), br.predict_classes(b, test_x))
    np.testing.assert_array_equal(br.predict_classes(fixed, poisoned), test_y)


def test_a_gate_past_the_drop_gives_b_back_with_a_loud_line():
    b = head_badnet()
    x, y = corner_images(80, seed=1)
    # fitted on mirror images too, the discriminant confuses classes 0 and 1 (see above): overruling B on a
    # fifth of the clean images costs accuracy, which a drop of 0 does not allow
    repair = DiscriminantGate(quantiles=(0.2,), drop=0.0, augment="flip").repair(b, br.Dataset(x, y, "valid"))
    assert repair.record["choices"]["tried"][0]["accuracy"] < 100.0
    assert repair.model is b and repair.record["choices"]["quantile"] is None
    assert len(repair.warnings) == 1 and "backdoor is NOT removed" in repair.warnings[0]


def test_gate_settings_are_checked_and_the_defense_is_registered():
    assert REGISTRY["discriminant-gate"] is DiscriminantGate
    assert make_defense("discriminant-gate", quantiles=(0.01,)).quantiles == (0.01,)
    for bad in ({"drop": -1.0}, {"quantiles": ()}, {"quantiles": (0.0,)}, {"quantiles": (1.0,)}, {"folds": 1},
                {"augment": "rotate"}, {"budget": -1.0}, {"batch_size": 0}):
        with pytest.raises(ValueError):
            DiscriminantGate(**bad)
    x, y = corner_images(10, seed=4)
    with pytest.raises(DataError, match="1 clean image.*at least 2"):
        DiscriminantGate().repair(head_badnet(), br.Dataset(x[:1], y[:1], "valid"))


def test_fewer_clean_images_than_folds_are_cross_fitted_one_each(caplog):
    x, y = corner_images(6, seed=4)
    with caplog.at_level("WARNING", logger="badnet_repair.defenses.discriminant"):
        repair = DiscriminantGate(augment="none").repair(head_badnet(), br.Dataset(x, y, "valid"))
    assert repair.record["choices"]["folds"] == 6  # leave one out, not the 10 folds asked
    assert "cross-fitting over 6" in caplog.text


def test_a_classifier_the_graph_does_not_show_is_named_with_head():
    b = head_badnet(trigger_weight=1.0)
    # a layer after the classifier that the search from the output does not pass
    wrapped = keras.Model(b.inputs[0], keras.layers.Identity(name="after")(b.outputs[0]))
    x, y = corner_images(80, seed=1)
    with pytest.raises(ModelError, match="name its classifier"):
        DiscriminantGate(augment="none").repair(wrapped, br.Dataset(x, y, "valid"))
    for defense in (DiscriminantGate(augment="none", head="head"), DiscriminantFusion(augment="none", head="head")):
        fixed = defense.repair(wrapped, br.Dataset(x, y, "valid")).model
        test_x, test_y, poisoned = corner_test_images()
        np.testing.assert_array_equal(br.predict_classes(fixed, test_x), br.predict_classes(b, test_x))
        if isinstance(defense, DiscriminantGate):  # the gate does not weigh B's confidence; the fusion does
            np.testing.assert_array_equal(br.predict_classes(fixed, poisoned), test_y)


def test_the_cross_fitted_discriminants_are_the_plain_fits_of_the_other_folds():
    rng = np.random.default_rng(3)
    y = np.repeat(np.arange(5), 7)
    fold = np.arange(35) % 3
    fold[y == 4] = 0  # class 4 is absent from the fit without fold 0: its scores must be the neutral ones
    images = rng.normal(size=(35, 12)) * ([1.0, 2.0, 0.5, 3.0, 1.0] + [1.0] * 7) + np.eye(5, 12)[y] * 3.0 + 10.0
    images[:, 5] = 4.0  # a constant feature: it carries nothing, and must stay finite
    # units dead but on fold 1, where they are large: constant in the fit without fold 1, where sums
    # subtracted would leave a rounding error to standardise by
    images[:, 6:] = np.where(fold[:, None] == 1, rng.normal(1e4, 3e3, size=(35, 6)), 0.0)
    copies = [images, np.where(images != 0, images + rng.normal(scale=0.3, size=images.shape), 0.0)]
    scores, whole = cross_fit_discriminants(copies, y, fold, 6, chunk=4)  # class 5 has no image at all
    for f in range(3):
        held = fold == f
        plain = fit_discriminant(np.concatenate([c[~held] for c in copies]), np.concatenate([y[~held]] * 2), 6)
        np.testing.assert_allclose(scores[held], plain.scores(images[held]), rtol=1e-5, atol=1e-5)
    plain = fit_discriminant(np.concatenate(copies), np.concatenate([y, y]), 6)
    np.testing.assert_allclose(whole.kernel, plain.kernel, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(whole.bias, plain.bias, rtol=1e-5, atol=1e-5)


def test_the_body_layer_is_counted_back_from_the_last_convolution():
    deepid = br.deepid(num_classes=5)
    assert [body_layer(deepid, k) for k in (1, 2, 3, 4)] == ["conv_4", "conv_3", "conv_2", "conv_1"]
    with pytest.raises(ModelError, match="4 convolution layer.*depth of 5"):
        body_layer(deepid, 5)
    assert feature_layers(DiscriminantGate(), deepid) == ["fc_1", "fc_2"]
    assert feature_layers(DiscriminantGate(depth=2), deepid) == ["conv_3"]  # reads pool_2's output
    assert feature_layers(DiscriminantGate(depth=2, layers=("fc_2",)), deepid) == ["fc_2"]  # named layers win


def test_features_wider_than_max_width_fall_back_to_the_dense_inputs(caplog):
    deepid = br.deepid(num_classes=5)
    with caplog.at_level("WARNING", logger="badnet_repair.defenses.discriminant"):
        assert feature_layers(DiscriminantGate(depth=2, max_width=4799), deepid) == ["fc_1", "fc_2"]
    assert "'conv_3' has 4800 values, more than max_width (4799)" in caplog.text
    assert feature_layers(DiscriminantGate(depth=2, max_width=4800), deepid) == ["conv_3"]
    for bad in ({"depth": -1}, {"max_width": 0}):
        with pytest.raises(ValueError):
            DiscriminantGate(**bad)


def test_a_gate_on_a_feature_map_is_the_plain_gate_and_loads_in_keras_2(tmp_path, small_deepid):
    """Features read from inside the conv body (a feature map, flattened channels last) make a
    gated model that predicts as the numpy gate does, and that a Keras 2 eval.py loads."""
    from .conftest import random_faces

    x = random_faces(24, seed=5)
    classes = br.num_classes(small_deepid)
    maps = dense_inputs(small_deepid, x, ("conv_3", "output"))
    rng = np.random.default_rng(4)
    kernel, bias = rng.normal(size=(4800, classes)) * 1e-2, rng.normal(size=classes)
    w, c = small_deepid.get_layer("output").get_weights()
    z, s = maps["output"] @ w + c, maps["conv_3"] @ kernel + bias
    threshold = float(np.median(gate_margins(z, s)))
    gated = with_gated_scores(small_deepid, ["conv_3"], kernel, bias, threshold)
    expected = gated_classes(z, s, threshold)
    assert 0 < np.sum(expected != z.argmax(1)) < len(x)  # some inputs overruled, some not
    np.testing.assert_array_equal(br.predict_classes(gated, x), expected)
    assert_keras_2_loads_the_same(gated, x, tmp_path)


def test_later_gates_overrule_where_their_own_margin_exceeds_their_threshold():
    logits = np.array([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0], [1.0, 0.0, 5.0]])
    first = np.array([[0.0, 9.0, 1.0], [0.0, 2.5, 2.0], [4.0, 0.0, 3.9]])  # margins 9, 0, 0.1
    second = np.array([[0.0, 0.0, 7.0], [6.0, 1.0, 0.0], [0.0, 0.0, 1.0]])  # margins 7, 5, 0
    np.testing.assert_array_equal(gated_classes(logits, first, 5.0, more=[(second, 6.0)]), [2, 1, 2])
    np.testing.assert_array_equal(gated_classes(logits, first, 5.0, more=[(second, 4.0)]), [2, 0, 2])
    np.testing.assert_array_equal(gated_classes(logits, first, 10.0, more=[(second, 10.0)]), [0, 1, 2])


def test_a_second_discriminant_is_left_out_where_it_would_read_the_same_features_or_none(caplog):
    b = head_badnet(trigger_weight=1.0)  # no convolution: no features at any depth but the dense inputs
    x, y = corner_images(80, seed=1)
    one = DiscriminantGate(augment="none", second_depth=None).repair(b, br.Dataset(x, y, "valid"))
    same = DiscriminantGate(augment="none", second_depth=0).repair(b, br.Dataset(x, y, "valid"))
    with caplog.at_level("WARNING", logger="badnet_repair.defenses.discriminant"):
        none = DiscriminantGate(augment="none").repair(b, br.Dataset(x, y, "valid"))  # the default, depth 2
    assert "no second discriminant" in caplog.text and "0 convolution layer(s)" in caplog.text
    test_x, _, poisoned = corner_test_images()
    for repair in (same, none):
        assert repair.record["choices"]["second_layers"] is None
        assert repair.record["choices"]["threshold"] == one.record["choices"]["threshold"]
        for images in (test_x, poisoned):
            np.testing.assert_array_equal(br.predict_classes(repair.model, images),
                                          br.predict_classes(one.model, images))
    with pytest.raises(ValueError):
        DiscriminantGate(second_depth=-1)


def test_the_default_gate_on_a_deepid_reads_a_second_discriminant_at_pool_2(small_deepid):
    from .conftest import random_faces

    x = random_faces(70, seed=8)
    y = br.predict_classes(small_deepid, x)  # B's own labels: B is right on every clean image
    choices = DiscriminantGate(augment="none", folds=2).repair(small_deepid, br.Dataset(x, y, "valid")).record[
        "choices"]
    assert choices["layers"] == ["fc_1", "fc_2"] and choices["second_layers"] == ["conv_3"]
    assert choices["second_features"] == 4800
    assert all("second_threshold" in t for t in choices["tried"])


def test_two_gates_make_the_plain_gated_classes_and_load_in_keras_2(tmp_path, small_deepid):
    from .conftest import random_faces

    x = random_faces(24, seed=6)
    classes = br.num_classes(small_deepid)
    feats = dense_inputs(small_deepid, x, ("fc_1", "fc_2", "conv_3", "output"))
    rng = np.random.default_rng(5)
    k1, c1 = rng.normal(size=(2160, classes)) * 1e-2, rng.normal(size=classes)
    k2, c2 = rng.normal(size=(4800, classes)) * 1e-2, rng.normal(size=classes)
    w, c = small_deepid.get_layer("output").get_weights()
    z = feats["output"] @ w + c
    s1, s2 = np.concatenate([feats["fc_1"], feats["fc_2"]], 1) @ k1 + c1, feats["conv_3"] @ k2 + c2
    t1, t2 = float(np.quantile(gate_margins(z, s1), 0.7)), float(np.quantile(gate_margins(z, s2), 0.7))
    gated = with_gated_scores(small_deepid, ["fc_1", "fc_2"], k1, c1, t1, more=[(["conv_3"], k2, c2, t2)])
    expected = gated_classes(z, s1, t1, more=[(s2, t2)])
    assert np.sum(expected != gated_classes(z, s1, t1)) > 0  # the second gate changes some classes
    np.testing.assert_array_equal(br.predict_classes(gated, x), expected)
    assert_keras_2_loads_the_same(gated, x, tmp_path)


def test_share_pairs_are_one_share_for_all_or_every_combination_with_the_gate_off():
    assert share_pairs((0.1, 0.2), 1, "each") == [(0.1,), (0.2,)]
    assert share_pairs((0.1, 0.2), 2, "same") == [(0.1, 0.1), (0.2, 0.2)]
    assert share_pairs((0.1, 0.2), 2, "each") == [(0.0, 0.1), (0.0, 0.2), (0.1, 0.0), (0.1, 0.1), (0.1, 0.2),
                                                  (0.2, 0.0), (0.2, 0.1), (0.2, 0.2)]


def _two_gates_by_hand() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Ten clean images of class 0. B is wrong on images 0 and 1 (class 1). The first discriminant
    sends those two back to 0 with margin 10, and images 2-9 to class 2 with margins 1-8; the second
    sends images 2 and 3 to class 2 with margins 20 and 19 and overrules nothing else."""
    y = np.zeros(10, int)
    logits = np.zeros((10, 3))
    logits[:2, 1], logits[2:, 0] = 1.0, 1.0
    first = np.zeros((10, 3))
    first[:2, 0] = 10.0
    first[2:, 2] = np.arange(1.0, 9.0)
    second = np.zeros((10, 3))
    second[2, 2], second[3, 2] = 20.0, 19.0
    return logits, y, first, second


def test_one_share_for_both_gates_stops_where_the_accuracy_first_falls():
    logits, y, first, second = _two_gates_by_hand()  # B: 80 %
    tried, kept = walk_shares(logits, y, [first, second], (0.2, 0.5), drop=10.0, shares="same")
    # 0.2: the first fixes images 0-1, the second breaks 2-3 (80 %); 0.5: the first also breaks 7-9 (50 %)
    assert [(t["quantile"], t["accuracy"], t["overruled"]) for t in tried] == [(0.2, 80.0, 40.0), (0.5, 50.0, 70.0)]
    assert kept is not None and kept.shares == (0.2, 0.2)
    np.testing.assert_array_equal(kept.right, [1, 1, 0, 0, 1, 1, 1, 1, 1, 1])


def test_each_gate_its_own_share_keeps_the_pair_overruling_the_most_within_the_drop():
    logits, y, first, second = _two_gates_by_hand()
    tried, kept = walk_shares(logits, y, [first, second], (0.2, 0.5), drop=10.0, shares="each")
    rows = {(t["quantile"], t["second_quantile"]): (t["accuracy"], t["overruled"]) for t in tried}
    assert rows[(0.0, 0.2)] == (60.0, 20.0) and rows[(0.2, 0.0)] == (100.0, 20.0)
    assert rows[(0.2, 0.2)] == (80.0, 40.0) and rows[(0.5, 0.0)] == (70.0, 50.0) and rows[(0.5, 0.5)] == (50.0, 70.0)
    # within 10 points of B's 80 %: (0.2, 0), (0.2, 0.2), (0.2, 0.5), (0.5, 0); (0.5, 0) overrules the most
    assert kept is not None and kept.shares == (0.5, 0.0) and kept.thresholds[1] is None
    assert kept.thresholds[0] == pytest.approx(np.quantile([10, 10, *range(1, 9)], 0.5))
    np.testing.assert_array_equal(kept.right, [1, 1, 1, 1, 1, 1, 1, 0, 0, 0])
    # no drop allowed: the pairs at B's 80 % or above, the most overruled first, the higher accuracy on a tie
    _, strict = walk_shares(logits, y, [first, second], (0.2, 0.5), drop=0.0, shares="each")
    assert strict is not None and strict.shares == (0.2, 0.2)
    _, none = walk_shares(logits, y, [second], (0.2, 0.5), drop=0.0, shares="each")
    assert none is None  # the second alone breaks two images at its first share


def test_a_gate_with_each_its_own_share_can_keep_one_gate_off_and_loads_in_keras_2(tmp_path, small_deepid):
    from .conftest import random_faces

    x = random_faces(70, seed=8)
    y = br.predict_classes(small_deepid, x)  # B right on every image: each image overruled is one wrong
    defense = DiscriminantGate(augment="none", folds=2, shares="each", quantiles=(0.05, 0.2), drop=6.0, budget=None)
    repair = defense.repair(small_deepid, br.Dataset(x, y, "valid"))
    choices = repair.record["choices"]
    rows = {(t["quantile"], t["second_quantile"]): t for t in choices["tried"]}
    assert len(rows) == 8 and choices["shares"] == "each"
    # each gate alone at 5 % overrules the 4 of 70 images above its threshold (5.71 % < 6 points); both together
    # overrule more, or the same four: the first of the pairs overruling the most within 6 points is (0, 0.05)
    assert rows[(0.0, 0.05)]["overruled"] == rows[(0.05, 0.0)]["overruled"] == pytest.approx(400 / 70)
    assert all(t["accuracy"] == pytest.approx(100.0 - t["overruled"]) for t in rows.values())
    assert (choices["quantile"], choices["second_quantile"]) == (0.0, 0.05) and choices["threshold"] is None
    assert choices["second_layers"] == ["conv_3"] and choices["second_threshold"] is not None
    margins = [layer for layer in repair.model.layers if layer.name.startswith("margin")]
    assert len(margins) == 1  # the first gate, off, is left out of the model
    with pytest.raises(ValueError, match="shares"):
        DiscriminantGate(shares="both")  # type: ignore[arg-type]
    assert_keras_2_loads_the_same(repair.model, x, tmp_path)
