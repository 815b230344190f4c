"""Arithmetic from Keras's own layers (nets.plain): each step against values worked out by hand,
the hard cases of float32 included (a saturated softmax's tiny and zero values, a threshold's
neighbours), and a Keras 2 load of a model made of them."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from badnet_repair.nets.plain import constant_dense, first_of_marks, minus_scaled, select, step_above, top_mark


def _run(build, *arrays: np.ndarray) -> np.ndarray:
    inputs = [keras.Input(shape=a.shape[1:]) for a in arrays]
    model = keras.Model(inputs, build(*inputs))
    return np.asarray(model.predict(list(arrays) if len(arrays) > 1 else arrays[0], verbose=0))


def test_top_mark_marks_the_largest_even_among_tiny_and_zero_values():
    tiny = np.float32(1e-30)
    smallest = np.finfo(np.float32).tiny  # the smallest normal float32 (a CPU may flush smaller ones to 0)
    scores = np.array([
        [0.1, 0.6, 0.3, 0.0],
        [tiny, 2 * tiny, 0.0, -1.0],  # a saturated softmax less twice its top: the runner-up among 1e-30s
        [0.0, smallest, 0.0, -1.0],
        [0.0, 0.0, 0.0, -1.0],  # an exact tie: every tied class is marked
        [-5e17, 3e17, 1.0, 0.0],  # large values within the documented range
    ], np.float32)
    want = np.array([[0, 1, 0, 0], [0, 1, 0, 0], [0, 1, 0, 0], [1, 1, 1, 0], [0, 1, 0, 0]], np.float32)
    np.testing.assert_array_equal(_run(lambda s: top_mark(s, 4, "t"), scores), want)


def test_first_of_marks_keeps_each_rows_first_mark():
    marks = np.array([[1, 1, 0, 1], [0, 0, 1, 1], [0, 0, 0, 1], [0, 0, 0, 0]], np.float32)
    want = np.array([[1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1], [0, 0, 0, 0]], np.float32)
    np.testing.assert_array_equal(_run(lambda m: first_of_marks(m, 4, "f"), marks), want)


def test_step_above_is_strictly_above_the_threshold_to_the_last_float32_bit():
    t = np.float32(2.5)
    x = np.array([[t], [np.nextafter(t, np.float32(np.inf))], [np.nextafter(t, np.float32(-np.inf))], [100.0],
                  [-100.0]], np.float32)
    np.testing.assert_array_equal(_run(lambda v: step_above(v, 2.5, "s"), x)[:, 0], [0, 1, 0, 1, 0])
    # at a threshold of 0 values down to about 2**-100 still count as above
    x0 = np.array([[0.0], [1e-30], [-1e-30], [1e-29]], np.float32)
    np.testing.assert_array_equal(_run(lambda v: step_above(v, 0.0, "z"), x0)[:, 0], [0, 1, 0, 1])


def test_minus_scaled_select_and_constant_dense_by_hand():
    a = np.array([[1.0, 2.0, 3.0], [0.5, 0.0, -1.0]], np.float32)
    b = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]], np.float32)
    np.testing.assert_array_equal(_run(lambda p, q: minus_scaled(p, q, 2.0, 3, "m"), a, b),
                                  [[1.0, 0.0, 3.0], [-1.5, 0.0, -1.0]])
    flags = np.array([[1.0], [0.0]], np.float32)
    np.testing.assert_array_equal(_run(lambda f, p, q: select(f, q, p, 3, "s"), flags, a, b),
                                  [[0.0, 1.0, 0.0], [0.5, 0.0, -1.0]])
    w, bias = np.array([[1.0, -1.0], [2.0, 0.0], [0.0, 3.0]]), np.array([0.5, -0.5])
    np.testing.assert_allclose(_run(lambda p: constant_dense(p, w, bias, "d"), a), a @ w + bias)


def test_a_model_of_these_steps_loads_in_keras_2(tmp_path):
    """The point of the module: Keras 2 (tf-keras, the lab's eval.py) rebuilds it from its .h5."""
    import badnet_repair as br

    tf_keras = pytest.importorskip("tf_keras", reason="tf-keras (Keras 2) is not installed; .ci/run installs it")
    x = keras.Input(shape=(4,), name="input")
    top = top_mark(x, 4, "t")
    flag = step_above(constant_dense(x, np.ones((4, 1)), None, "total"), 1.05, "s")
    out = select(flag, first_of_marks(top_mark(minus_scaled(x, top, 2.0, 4, "m"), 4, "r"), 4, "r"), x, 4, "o")
    model = keras.Model(x, out)
    scores = np.array([[0.1, 0.6, 0.2, 0.1], [0.9, 0.0, 0.0, 0.0], [0.3, 0.3, 0.2, 0.4]], np.float32)
    # sums 1.0, 0.9, 1.2: only the last is flagged, and becomes one-hot at its runner-up (the first of two 0.3s)
    want = np.array([[0.1, 0.6, 0.2, 0.1], [0.9, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]], np.float32)
    np.testing.assert_allclose(model.predict(scores, verbose=0), want, atol=1e-7)
    paths = br.save_model(model, tmp_path, "plain", formats=("h5",))
    k2 = tf_keras.models.load_model(paths["h5"], compile=False)
    np.testing.assert_allclose(k2.predict(scores, verbose=0), want, atol=1e-7)
