"""The demo's two BadNets under the pruning defense, side by side.

Makes the demo (or reuses it; --regenerate times a fresh one), runs the main job
(`badnet-repair prune` on the baseline BadNet) and the same sweep on the pruning-aware
BadNet, prints the numbers, and writes docs/research/demo_attacks.png and docs/research/demo_attacks.md.

    python experiments/demo_attacks.py --regenerate
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--demo-dir", default=str(ROOT / ".demo"))
    ap.add_argument("--regenerate", action="store_true", help="make the demo anew and time it")
    ap.add_argument("--docs", default=str(ROOT / "docs" / "research"))
    args = ap.parse_args()
    exe = [sys.executable, "-m", "badnet_repair"]

    t = time.perf_counter()
    subprocess.run([*exe, "make-demo", "-q", "--demo-dir", args.demo_dir]
                   + (["--regenerate"] if args.regenerate else []), check=True)
    t_make = time.perf_counter() - t

    from matplotlib.figure import Figure

    import badnet_repair as br
    from badnet_repair.demo import demo_paths, load_demo_manifest

    manifest = load_demo_manifest(args.demo_dir)
    paths = demo_paths(args.demo_dir)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for which in ("baseline", "pruning-aware"):
            t = time.perf_counter()
            subprocess.run([*exe, "prune", "-q", "--demo", which, "--demo-dir", args.demo_dir,
                            "--out", f"{tmp}/{which}"], check=True, stdout=subprocess.DEVNULL)
            results[which] = (json.loads(Path(f"{tmp}/{which}/results.json").read_text()),
                              time.perf_counter() - t)

    valid, test = br.load_h5(paths.valid), br.load_h5(paths.test)
    bd_valid, bd_test = br.load_h5(paths.bd_valid), br.load_h5(paths.bd_test)
    fig = Figure(figsize=(12, 4.4), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    for ax, which, model in zip(axes, ("baseline", "pruning-aware"),
                                (paths.model, paths.pruning_aware_model), strict=True):
        sweep = br.prune_sweep(br.load_model(model), valid, others={"bd_valid": bd_valid, "test": test,
                               "bd_test": bd_test}, poisoned=["bd_valid", "bd_test"])
        br.plot_sweep(sweep, ax=ax)
        ax.set_title(f"{which} BadNet")
    docs = Path(args.docs)
    docs.mkdir(exist_ok=True)
    fig.savefig(docs / "demo_attacks.png", dpi=100)

    lines = ["# The demo's BadNets under the pruning defense", "",
             f"Reproduce: `python experiments/demo_attacks.py{' --regenerate' if args.regenerate else ''}`"
             " (2-core CPU machine).", "",
             "| | baseline BadNet | pruning-aware BadNet |", "|---|---:|---:|"]
    b, p = manifest["baseline"], manifest["pruning_aware"]
    lines.append(f"| clean test accuracy (%) | {b['clean_test_accuracy']:.2f} | {p['clean_test_accuracy']:.2f} |")
    lines.append(f"| attack success rate (%) | {b['test_attack_success_rate']:.2f} | "
                 f"{p['test_attack_success_rate']:.2f} |")
    for x in ("2", "4", "10"):
        row = []
        for which in ("baseline", "pruning-aware"):
            ev = {e["model"]: e for e in results[which][0]["evaluations"]}[f"B'_{x}"]
            row.append(f"{ev['clean_accuracy']:.2f} / {ev['attack_success_rate']:.2f} ({ev['channels_pruned']} ch.)")
        lines.append(f"| B'_{x}: clean accuracy / ASR (%) | {row[0]} | {row[1]} |")
    for which in ("baseline", "pruning-aware"):
        ev = {e["model"]: e for e in results[which][0]["evaluations"]}["G_4"]
        lines.append(f"| G_4 ({which}): detection / false alarm (%) | "
                     + (f"{ev['detection_rate']:.2f} / {ev['false_alarm_rate']:.2f} | |" if which == "baseline"
                        else f"| {ev['detection_rate']:.2f} / {ev['false_alarm_rate']:.2f} |"))
    s = manifest["seconds"]
    lines += ["", f"`make-demo`: {t_make:.0f} s end to end" + (" (fresh)" if args.regenerate else " (reused)")
              + f"; inside it data {s['data']} s, baseline BadNet {s['baseline']} s, "
              f"pruning-aware BadNet {s['pruning_aware']} s.",
              f"Main job (`badnet-repair prune` on the made demo): {results['baseline'][1]:.1f} s "
              f"(pruning-aware: {results['pruning-aware'][1]:.1f} s), including Python and TensorFlow start-up.",
              "", "![pruning curves of both BadNets](demo_attacks.png)", ""]
    (docs / "demo_attacks.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
