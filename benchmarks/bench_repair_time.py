"""Benchmark: how long each defense, with its defaults, takes to repair a demo BadNet.

Issue 19's target: every defense repairs a demo BadNet in under 3 minutes on 2 CPU cores. Each
defense in the registry (or those named) repairs the demo's baseline BadNet (100 identities,
1,000 clean validation images) from its clean validation data, timed from the call to the
returned repair (the model already loaded; TensorFlow's start-up and the first trace included, as
a user would see them). Run it with nothing else on the machine. Prints seconds and the ratio to
the 180 s budget, per defense.

    python benchmarks/bench_repair_time.py                   # every defense
    python benchmarks/bench_repair_time.py ft-sam i-bau      # only these

Issue 31's other time target, 15 minutes on the lab-density BadNet (1,283 classes, 11,547 clean
images; made by ``badnet-repair bench benchmarks/removal31_tuning.toml``):

    python benchmarks/bench_repair_time.py fine-tuning --badnet \
        .experiments/removal31_tuning/badnets/lab_density_baseline_s0 --budget 900

Settings other than the defaults go with ``--set SETTING=VALUE`` (TOML values), for every defense named:

    python benchmarks/bench_repair_time.py discriminant-gate --set folds=10

Besides wall seconds it prints the process's CPU seconds: where other jobs share the cores, CPU / 2
is what the wall time would be on 2 idle cores if the work kept both busy (an estimate, said so).
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
    parser.add_argument("--badnet", help="a recipe's BadNet folder (bd_net.h5, valid.h5) instead of the demo's")
    parser.add_argument("--budget", type=float, default=BUDGET_S, help="the time target in seconds (default 180)")
    parser.add_argument("--set", action="append", default=[], metavar="SETTING=VALUE",
                        help="a setting of the defenses named, its value as TOML reads it (repeatable)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    import badnet_repair as br
    from badnet_repair.defenses import REGISTRY, make_defense
    from badnet_repair.workflow.recipes import make_recipe

    if args.badnet:
        files = {"model": str(Path(args.badnet) / "bd_net.h5"), "valid": str(Path(args.badnet) / "valid.h5")}
        title = Path(args.badnet).name
    else:
        files = make_recipe("demo", args.kind, {"demo_dir": args.demo_dir}, args.demo_dir)
        title = f"demo {args.kind}"
    b = br.load_model(files["model"])
    valid = br.load_data_for(b, files["valid"], name="valid")
    print(f"{title} BadNet, {len(valid)} clean images, {br.num_classes(b)} classes; {os.cpu_count()} CPU cores; "
          f"load average at the start {os.getloadavg()[0]:.1f}")
    print(f"| defense | seconds | / {args.budget:g} s | CPU seconds | CPU / 2 / {args.budget:g} s |")
    print("|---|---:|---:|---:|---:|")
    settings = dict(_setting(text) for text in args.set)
    if settings and not args.defenses:
        parser.error("--set needs the defenses it applies to named")
    for name in args.defenses or list(REGISTRY):
        start, cpu = time.perf_counter(), time.process_time()
        make_defense(name, **settings).repair(b, valid)
        s, c = time.perf_counter() - start, time.process_time() - cpu
        label = " ".join([name, *args.set])
        print(f"| {label} | {s:.1f} | {s / args.budget:.2f} | {c:.1f} | {c / 2 / args.budget:.2f} |", flush=True)


def _setting(text: str) -> tuple[str, object]:
    """``SETTING=VALUE`` as (setting, value), the value as the CLI's ``--set`` reads it (a list as a tuple)."""
    from badnet_repair.defaults import setting_value

    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise SystemExit(f"--set {text!r}: expected SETTING=VALUE, e.g. folds=10")
    value = setting_value(raw)
    return key.strip(), tuple(value) if isinstance(value, list) else value


if __name__ == "__main__":
    main()
