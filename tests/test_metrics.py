from __future__ import annotations

import numpy as np
import pytest

import badnet_repair as br
from badnet_repair.metrics import evaluate_predictions


def test_rates_by_hand():
    pred = np.array([0, 1, 2, 3, 0, 5, 5, 5])
    labels = np.array([0, 1, 2, 0, 0, 0, 5, 1])
    assert br.accuracy(pred, labels) == 62.5          # 5 of 8
    assert br.attack_success_rate(pred, 0) == 25.0     # 2 of 8 are the target 0
    assert br.attack_success_rate(pred, labels) == 62.5
    assert br.detection_rate(pred, 5) == 37.5          # 3 of 8 are the alarm class
    assert br.false_alarm_rate(pred[:4], 5) == 0.0
    with pytest.raises(ValueError, match="zero inputs"):
        br.accuracy(np.array([]), np.array([]))


def test_evaluate_predictions_sets_alarm_rates_only_for_goodnets():
    clean_pred, clean_y = np.array([1, 2, 3, 3]), np.array([1, 2, 2, 3])
    bd_pred, bd_y = np.array([0, 3, 3, 0]), np.zeros(4, int)
    plain = evaluate_predictions(model="B", kind="badnet", clean_pred=clean_pred, clean_labels=clean_y,
                                 poisoned_pred=bd_pred, poisoned_labels=bd_y)
    assert (plain.clean_accuracy, plain.attack_success_rate) == (75.0, 50.0)
    assert plain.detection_rate is None and plain.false_alarm_rate is None
    g = evaluate_predictions(model="G", kind="goodnet", clean_pred=clean_pred, clean_labels=clean_y,
                             poisoned_pred=bd_pred, poisoned_labels=bd_y, alarm_class=3)
    assert (g.detection_rate, g.false_alarm_rate) == (50.0, 50.0)
