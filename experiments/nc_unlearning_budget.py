"""Does nc-unlearning give B back on the demo's baseline BadNet (a tuning BadNet)?

Runs Neural Cleanse unlearning with its defaults on the demo's baseline BadNet (made with
`badnet-repair demo` into .demo/ first) and prints its warnings, its choices and whether the
returned model is B (the same weights); then, for the record, the returned model's and B's
attack success on the poisoned test set. Found the reversed-trigger detector's bug
(docs/research/detection32.md):

    python experiments/nc_unlearning_budget.py [DEMO_DIR]
"""

import logging
import sys

import numpy as np

from badnet_repair.defenses.cleanse import NeuralCleanseUnlearning
from badnet_repair.nets.models import load_data_for, load_model, predict_classes

logging.basicConfig(level=logging.WARNING)
d = sys.argv[1] if len(sys.argv) > 1 else ".demo"
b = load_model(f"{d}/model/bd_net.h5")
valid = load_data_for(b, f"{d}/data/cl/valid.h5", name="valid")
rep = NeuralCleanseUnlearning(seed=0).repair(b, valid, progress=False)
print("warnings:", rep.warnings)
print("choices:", {k: v for k, v in rep.record["choices"].items() if k != "scan"})
m = rep.models[0].model
print("the returned model is B (same weights):",
      all(np.array_equal(u, v) for u, v in zip(b.get_weights(), m.get_weights(), strict=True)))
bd = load_data_for(b, f"{d}/data/bd/bd_test.h5", name="bd_test")
print(f"attack success: B {100 * (predict_classes(b, bd.x) == bd.y).mean():.2f} %, "
      f"returned {100 * (predict_classes(m, bd.x) == bd.y).mean():.2f} %")
