"""Fine-pruning on both demo BadNets across seeds: attack success, clean accuracy and time.

For each demo BadNet (baseline and pruning-aware) and each seed, runs
``badnet_repair.fine_prune`` with the defaults (``badnet_repair.defaults.FINE_TUNING``) on
the demo's clean validation data only, then scores the repaired model on the demo's test
sets. The seed changes the tuning / held-out split, the shuffling and the augmentation.
Prints a markdown table with the wall-clock time of each run (2-core CPU here); with several
members, also the arithmetic mean of the same members' probabilities (the repaired model takes
their geometric mean, the default).

    python experiments/demo_fine_pruning.py [--seeds 3] [--demo-dir .demo]
        [--members K] [--distill W] [--accuracy-drop X] [--epochs E] [--weight-decay D]
        [--learning-rate R]
"""

from __future__ import annotations

import argparse
import functools
import time
from typing import Any


def _score(model: Any, *, test: Any, bd: Any, target: int) -> tuple[float, float]:
    """(clean test accuracy, attack success) in %."""
    import badnet_repair as br

    return (br.accuracy(br.predict_classes(model, test.x), test.y),
            br.attack_success_rate(br.predict_classes(model, bd.x), target))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--demo-dir", default=".demo")
    ap.add_argument("--members", type=int, default=None, help="networks averaged (default: the defaults')")
    ap.add_argument("--distill", type=float, default=None, help="distillation weight (default: the defaults')")
    ap.add_argument("--accuracy-drop", type=float, default=None, help="prune drop in points (default: the defaults')")
    ap.add_argument("--epochs", type=int, default=None, help="fine-tuning epochs (default: the defaults')")
    ap.add_argument("--weight-decay", type=float, default=None, help="AdamW weight decay (default: the defaults')")
    ap.add_argument("--learning-rate", type=float, default=None, help="peak learning rate (default: the defaults')")
    args = ap.parse_args()
    import numpy as np

    import badnet_repair as br
    from badnet_repair.defaults import FINE_TUNING
    from badnet_repair.workflow.layout import resolve_inputs

    given = {k: v for k, v in (("members", args.members), ("distill", args.distill),
                               ("accuracy_drop", args.accuracy_drop), ("epochs", args.epochs),
                               ("weight_decay", args.weight_decay), ("learning_rate", args.learning_rate))
             if v is not None}
    print(f"settings: {FINE_TUNING | given}\n")
    print("channels pruned and epoch kept: one per member network\n")
    print("| BadNet | seed | channels pruned | epoch kept | clean accuracy (%) | attack success (%) | "
          "B's clean accuracy (%) | meets target | time (s) | arithmetic mean (clean / attack %) |")
    print("|---|---:|---:|---:|---:|---:|---:|---|---:|---|")
    for demo in ("baseline", "pruning-aware"):
        files = resolve_inputs(demo=demo, demo_dir=args.demo_dir).files
        model = br.load_model(files["model"])
        valid = br.load_h5(files["valid"])
        test, bd = br.load_h5(files["test"]), br.load_h5(files["bd_test"])
        base = br.accuracy(br.predict_classes(model, test.x), test.y)
        target = int(np.unique(bd.y)[0])
        score = functools.partial(_score, test=test, bd=bd, target=target)
        for seed in range(args.seeds):
            t = time.perf_counter()
            r = br.fine_prune(model, valid, seed=seed, progress=False, **given)
            seconds = time.perf_counter() - t
            acc, asr = score(r.model)
            arith = ("{:.2f} / {:.2f}".format(*score(br.average_models([m.model for m in r.members])))
                     if len(r.members) > 1 else "")
            ok = "yes" if asr <= 5.0 and acc >= base - 3.0 else "no"
            pruned = "/".join(str(len(m.pruned_channels)) for m in r.members)
            epochs = "/".join(str(e) for e in r.kept_epochs)
            print(f"| {demo} | {seed} | {pruned} | {epochs} | {acc:.2f} | {asr:.2f} | "
                  f"{base:.2f} | {ok} | {seconds:.0f} | {arith} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
