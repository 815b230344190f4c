"""Benchmark: how long each defense, with its defaults, takes to repair a demo BadNet.

Issue 19's target: every defense repairs a demo BadNet in under 3 minutes on 2 CPU cores. Each
defense in the registry (or those named) repairs the demo's baseline BadNet (100 identities,
1,000 clean validation images) from its clean validation data, timed from the call to the
returned repair (the model already loaded; TensorFlow's start-up and the first trace included, as
a user would see them). Run it with nothing else on the machine. Prints seconds and the ratio to
the 180 s budget, per defense.

    python benchmarks/bench_repair_time.py                   # every defense
    python benchmarks/bench_repair_time.py ft-sam i-bau      # only these
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUDGET_S = 180.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("defenses", nargs="*", help="registry names (default all)")
    parser.add_argument("--demo-dir", default=str(ROOT / ".demo"))
    parser.add_argument("--kind", default="baseline", choices=["baseline", "pruning-aware", "multi-target"])
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    import badnet_repair as br
    from badnet_repair.defenses import REGISTRY, make_defense
    from badnet_repair.workflow.recipes import make_recipe

    files = make_recipe("demo", args.kind, {"demo_dir": args.demo_dir}, args.demo_dir)
    b = br.load_model(files["model"])
    valid = br.load_data_for(b, files["valid"], name="valid")
    print(f"demo {args.kind} BadNet, {len(valid)} clean images, {br.num_classes(b)} classes; "
          f"{os.cpu_count()} CPU cores")
    print("| defense | seconds | / 180 s |")
    print("|---|---:|---:|")
    for name in args.defenses or list(REGISTRY):
        start = time.perf_counter()
        make_defense(name).repair(b, valid)
        s = time.perf_counter() - start
        print(f"| {name} | {s:.1f} | {s / BUDGET_S:.2f} |", flush=True)


if __name__ == "__main__":
    main()
