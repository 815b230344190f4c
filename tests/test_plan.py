"""Time estimates before long steps, and fitting fine-tuning's epochs to a budget."""

from __future__ import annotations

import logging

import numpy as np
import pytest

import badnet_repair as br
from badnet_repair.workflow.plan import ModelSpeed, estimate_detector, estimate_repair, fit_to_budget, measure_speed

from .conftest import tiny_conv_model

SPEED = ModelSpeed(predict=0.001, train=0.004, batch_size=64)


def test_estimate_of_fine_pruning_by_hand():
    # 1000 images, 20 % held out: 800 tuning x 4 ms + 200 held-out x 1 ms = 3.4 s an epoch, x 50 epochs
    est = estimate_repair(br.FinePruning(), 1000, SPEED)
    assert est is not None and est.seconds == pytest.approx(50 * 3.4)
    # distillation adds a forward pass over the tuning part; three members triple it
    est = estimate_repair(br.FinePruning(distill=0.3, members=3, epochs=10), 1000, SPEED)
    assert est is not None and est.seconds == pytest.approx(3 * 10 * (800 * 0.005 + 200 * 0.001))
    assert estimate_repair(br.Pruning(), 1000, SPEED) is None
    assert "about 2.8 min" in str(estimate_repair(br.FinePruning(), 1000, SPEED))


def test_strip_estimate_by_hand():
    assert estimate_detector(32, 1000, SPEED).seconds == pytest.approx(32.0)


def test_fit_to_budget_cuts_epochs_and_says_so(caplog):
    d = br.FinePruning()
    same, est = fit_to_budget(d, 1000, SPEED, minutes=5)
    assert same is d and est is not None and est.seconds == pytest.approx(170)
    with caplog.at_level(logging.WARNING):
        cut, est = fit_to_budget(d, 1000, SPEED, minutes=1)
    assert cut.epochs == 17 and cut == br.FinePruning(epochs=17)  # 50 x 60 / 170 = 17.6
    assert est is not None and est.seconds <= 60 and "50 epochs would take about 2.8 min" in est.detail
    assert "fit the 1-minute budget" in caplog.text
    assert fit_to_budget(d, 1000, SPEED, minutes=None)[0] is d
    assert fit_to_budget(br.Pruning(), 1000, SPEED, minutes=0.001)[0] == br.Pruning()


def test_measure_speed_times_a_model_without_changing_it():
    m = tiny_conv_model(np.eye(3), np.ones((12, 2)))
    before = [w.copy() for w in m.get_weights()]
    x = np.random.default_rng(0).uniform(0, 1, (128, 4, 4, 3)).astype(np.float32)
    s = measure_speed(m, x, batch_size=32, images=128)
    assert s.predict > 0 and s.train > 0 and s.batch_size == 32
    for w, w0 in zip(m.get_weights(), before, strict=True):
        np.testing.assert_array_equal(w, w0)
    with pytest.raises(ValueError, match="no images"):
        measure_speed(m, x[:0])
