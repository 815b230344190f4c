"""The lab's known figures and the comparison of a run with them."""

from __future__ import annotations

import keras
import numpy as np

import badnet_repair as br
from badnet_repair.reporting.reference import LAB, check_against_reference, reference_table, weights_fingerprint

from .conftest import shared_file


def lab_rows(**changed):
    rows = [{"model": m, "clean_accuracy": c, "attack_success_rate": a, "channels_pruned": k}
            for m, (c, a, k) in LAB.figures.items()]
    for r in rows:
        r.update(changed.get(r["model"], {}))
    return rows


def test_fingerprint_ignores_names_and_order_but_not_weights(small_deepid):
    copy = keras.models.clone_model(small_deepid)
    copy.set_weights(small_deepid.get_weights())
    assert weights_fingerprint(copy) == weights_fingerprint(small_deepid)
    pruned = br.prune_channels(small_deepid, "conv_3", [0])
    assert weights_fingerprint(pruned) != weights_fingerprint(small_deepid)


def test_a_run_on_the_labs_files_is_compared_figure_by_figure():
    same = check_against_reference(lab_rows(), fingerprint=LAB.badnet_fingerprint, valid_images=11547,
                                   test_images=12830, valid_accuracy=98.65, dormant_channels=33, layer="conv_3")
    assert same.applies and same.lab_badnet and not same.differs and "every figure matches" in same.message
    # a figure off by 0.05 points and a channel count off by one are named
    off = check_against_reference(lab_rows(**{"B'_4": {"clean_accuracy": 92.34, "channels_pruned": 49}}),
                                  fingerprint=LAB.badnet_fingerprint, valid_images=11547, test_images=12830,
                                  valid_accuracy=98.65, dormant_channels=33)
    assert off.differs == ("B'_4: clean test accuracy (%): 92.34 here, 92.29 published",
                           "B'_4: channels pruned: 49 here, 48 published")
    table = reference_table(off)
    assert table.count("**differs**") == 2 and "| B'_4: clean test accuracy (%) | 92.29 | 92.34 | +0.05 **differs** |" \
        in table


def test_other_badnets_or_other_data_are_shown_for_orientation_only():
    other = check_against_reference(lab_rows(**{"B": {"clean_accuracy": 50.0}}), fingerprint="0" * 64,
                                    valid_images=11547, test_images=12830)
    assert not other.applies and not other.differs and "not on the lab's BadNet" in other.message
    data = check_against_reference(lab_rows(), fingerprint=LAB.badnet_fingerprint, valid_images=900, test_images=900)
    assert not data.applies and data.lab_badnet and "not the lab's files" in data.message
    assert "**differs**" not in reference_table(data)


def test_the_real_lab_badnet_is_recognised():
    b = br.load_model(shared_file("lab", "bd_weights.h5"))
    assert weights_fingerprint(b) == LAB.badnet_fingerprint
    x = np.zeros((1, 55, 47, 3), np.float32)
    assert br.predict_classes(b, x).shape == (1,)
