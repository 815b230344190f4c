"""Does the notebook's bounded step still repair when its defense's epochs are cut to the budget?

The notebook's "beyond the lab" step runs one removal defense with its epochs cut to fit
``BEYOND_MINUTES`` (``workflow.plan.fit_to_budget``). This runs that step's defense(s) on a
tuning BadNet (never a held-out one) at a given number of epochs, as the cut would, and prints
clean accuracy and attack success on its test sets, with the repair's wall and CPU seconds
(docs/research/removal31.md, "The notebook's bounded step"):

    python experiments/bounded_step.py .experiments/removal31_tuning/badnets/lab_density_baseline_s0 \
        --epochs 23 fine-tuning fine-pruning

``--epochs`` defaults to what ``fit_to_budget`` picks here for ``--minutes`` (timed on this machine,
so other jobs sharing the cores lower it; pass the number an idle machine picks to check that).
"""

import argparse
import dataclasses
import logging
import time
from pathlib import Path

from badnet_repair.defenses import make_defense
from badnet_repair.nets.models import load_data_for, load_model
from badnet_repair.reporting.report import evaluation_table
from badnet_repair.workflow.compare import evaluate_repairs
from badnet_repair.workflow.plan import fit_to_budget, measure_speed

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("badnet", help="a recipe's BadNet folder (bd_net.h5, valid.h5, test.h5, bd_test.h5)")
parser.add_argument("defenses", nargs="+", help="registry names")
parser.add_argument("--epochs", type=int, help="epochs (default: what fit_to_budget picks here)")
parser.add_argument("--minutes", type=float, default=3.0, help="the budget fit_to_budget fits (default 3)")
args = parser.parse_args()
logging.basicConfig(level=logging.WARNING)
d = Path(args.badnet)
b = load_model(d / "bd_net.h5")
valid = load_data_for(b, d / "valid.h5", name="valid")
test = load_data_for(b, d / "test.h5", name="test")
bd_test = load_data_for(b, d / "bd_test.h5", name="bd_test")
speed = measure_speed(b, valid)
for name in args.defenses:
    defense, estimate = fit_to_budget(make_defense(name), valid, speed, minutes=args.minutes)
    if args.epochs is not None:
        defense = dataclasses.replace(defense, epochs=args.epochs)  # type: ignore[type-var]
    print(f"{name}: {defense.get_params()['epochs']} epochs; fit_to_budget here: {estimate}", flush=True)
    start, cpu = time.perf_counter(), time.process_time()
    repair = defense.repair(b, valid)
    print(f"{name}: repair {time.perf_counter() - start:.1f} s wall, {time.process_time() - cpu:.1f} s CPU; "
          f"warnings: {list(repair.warnings)}", flush=True)
    print(evaluation_table(evaluate_repairs(b, [repair], test, bd_test, name=d.name).evaluations), flush=True)
