"""Neural Cleanse, its unlearning, STRIP and their GoodNets on the tuning and held-out BadNets,
on two clean models, and on the real lab B.

For each model, from its clean validation data only (the lab B: the first half of the Yale B
faces, labelled by B): the Neural Cleanse scan; Neural Cleanse unlearning with that scan
(nc-unlearning's defaults) and pruning by it (nc-pruning's); STRIP at a 2.5 % false-alarm rate;
then, on the test files opened afterwards, B's, the unlearned and the pruned model's clean
accuracy and attack success, and the GoodNet of each detector alone and of both (flag where
either flags): detection and false alarms. The BadNets are made by the benchmark's recipes
(cached in --work): the demo's three (baseline,
pruning-aware, multi-target) and real-face ones trained on ../shared's Yale B faces with the real
sunglasses trigger (the multi-target one adds drawn eyebrows and lipstick). Tuning BadNets (the
demo's baseline and pruning-aware, real-face training seed 0) are where settings may be chosen;
the others are held out. Each model's record is saved as <work>/<name>.json and its scan's
files under <work>/<name>/; markdown tables are printed.

    python experiments/neural_cleanse.py [--work .experiments/nc] [--only NAME ...]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
FACES, TRIGGER = SHARED / "faces" / "yaleb_55x47.npz", SHARED / "lab" / "sunglasses_trigger.png"

#: name -> (split, recipe, kind, training seed)
MODELS = {
    "demo-baseline": ("tuning", "demo", "baseline", 0),
    "demo-pruning-aware": ("tuning", "demo", "pruning-aware", 0),
    "faces-baseline-s0": ("tuning", "faces", "baseline", 0),
    "faces-pruning-aware-s0": ("tuning", "faces", "pruning-aware", 0),
    "demo-multi-target": ("held-out", "demo", "multi-target", 0),
    "faces-baseline-s4": ("held-out", "faces", "baseline", 4),
    "faces-pruning-aware-s4": ("held-out", "faces", "pruning-aware", 4),
    "faces-multi-target-s4": ("held-out", "faces", "multi-target", 4),
    "faces-clean-s4": ("held-out", "faces", "clean", 4),
    "faces-clean-s5": ("held-out", "faces", "clean", 5),
    "lab-B": ("held-out", "lab", "baseline", -1),
}


def targets_of(recipe: str, kind: str, num_classes: int) -> list[int]:
    from badnet_repair.attacks import multi_targets

    if kind == "clean":
        return []
    return list(multi_targets(num_classes)) if kind == "multi-target" else [0]


def load(name: str, work: Path) -> tuple[Any, Any, Any, Any]:
    """B, its clean validation data, and its clean and poisoned test data."""
    import badnet_repair as br
    from badnet_repair.workflow.recipes import make_recipe

    _, recipe, kind, seed = MODELS[name]
    if recipe == "lab":
        b = br.load_model(SHARED / "lab" / "bd_weights.h5")
        with np.load(FACES) as d:
            x = np.asarray(d["data"], np.float32).transpose(0, 2, 3, 1)
        y = br.predict_classes(b, x)
        order = np.random.default_rng(0).permutation(len(x))
        fit, held = np.sort(order[: len(x) // 2]), np.sort(order[len(x) // 2:])
        test = br.Dataset(x[held], y[held], "test")
        return b, br.Dataset(x[fit], y[fit], "valid"), test, br.poison(test, br.load_trigger(TRIGGER), target=0)
    settings = ({"demo_dir": str(ROOT / ".demo")} if recipe == "demo" else
                {"faces": str(FACES), "trigger": str(TRIGGER), "training_seed": seed})
    files = make_recipe(recipe, kind, settings, work / "badnets" / name)
    b = br.load_model(files["model"])
    bd, _ = br.poisoned_labels(br.load_data_for(b, files["bd_test"], name="bd_test"), None, several=True)
    return (b, br.load_data_for(b, files["valid"], name="valid"), br.load_data_for(b, files["test"], name="test"),
            bd)


def evaluate(name: str, work: Path) -> dict[str, Any]:
    """Scan, unlearn, fit STRIP (clean data only), then score everything on the test sets."""
    import badnet_repair as br
    from badnet_repair.detectors import ReversedTriggerDetector
    from badnet_repair.workflow.detect import detector_evaluations

    b, valid, test, bd = load(name, work)
    start = time.perf_counter()
    scan = br.NeuralCleanse().scan(b, valid, progress=True)
    br.write_cleanse(scan, work / name, valid.x[0], title=f"Neural Cleanse of {name}", overwrite=True)
    unlearning = br.NeuralCleanseUnlearning()
    t0 = time.perf_counter()
    unlearned = unlearning.repair(b, valid, scan=scan, progress=True)
    unlearn_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    pruned = br.NeuralCleansePruning().repair(b, valid, scan=scan, progress=True)
    prune_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    parts = {"reversed-trigger": ReversedTriggerDetector(unlearned.model, scan).fit(b, valid),
             "strip": br.Strip(false_alarm=2.5).fit(b, valid)}
    strip_s = time.perf_counter() - t0
    # only now: the test sets
    split, recipe, kind, _ = MODELS[name]
    targets = targets_of(recipe, kind, br.num_classes(b))
    ev = {"B": (b, test, bd), "nc-unlearning": (unlearned.model, test, bd), "nc-pruning": (pruned.model, test, bd)}
    scores = {k: {"clean_accuracy": br.accuracy(br.predict_classes(m, t.x), t.y),
                  "attack_success": br.attack_success_rate(br.predict_classes(m, p.x), p.y)}
              for k, (m, t, p) in ev.items()}
    goodnets = [e.as_dict() for e in detector_evaluations(b, parts, test, bd)]
    return {"name": name, "split": split, "targets": targets,
            "screen_ranks": [scan.screen_rank(t) for t in targets] if scan.screened else None,
            "scan_seconds": round(scan.seconds, 1), "unlearning_seconds": round(unlearn_s, 1),
            "strip_seconds": round(strip_s, 1), "pruning_seconds": round(prune_s, 1),
            "channels_pruned": pruned.record["choices"]["channels_pruned"],
            "total_seconds": round(time.perf_counter() - start, 1),
            "models": scores, "goodnets": goodnets, "kept_epoch": unlearned.record["choices"]["kept_epoch"],
            "summary": scan.summary()}


def redo_pruning(record: dict[str, Any], work: Path) -> dict[str, Any]:
    """nc-pruning again, with the scan read back from the model's saved scan files."""
    import badnet_repair as br

    b, valid, test, bd = load(record["name"], work)
    scan = br.read_cleanse(work / record["name"])
    t0 = time.perf_counter()
    pruned = br.NeuralCleansePruning().repair(b, valid, scan=scan)
    m = pruned.model
    record["models"]["nc-pruning"] = {"clean_accuracy": br.accuracy(br.predict_classes(m, test.x), test.y),
                                      "attack_success": br.attack_success_rate(br.predict_classes(m, bd.x), bd.y)}
    record["channels_pruned"] = pruned.record["choices"]["channels_pruned"]
    record["pruning_seconds"] = round(time.perf_counter() - t0, 1)
    return record


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=ROOT / ".experiments" / "nc")
    ap.add_argument("--only", nargs="+", choices=list(MODELS))
    ap.add_argument("--redo-pruning", action="store_true",
                    help="run nc-pruning again with each stored model's saved scan (after a fix to it)")
    args = ap.parse_args()
    if not FACES.exists():
        print(f"skipped: needs {FACES} and {TRIGGER}")
        return 0

    args.work.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.only or MODELS:
        out = args.work / f"{name}.json"
        if not out.exists():
            out.write_text(json.dumps(evaluate(name, args.work), indent=1))
        elif args.redo_pruning:
            out.write_text(json.dumps(redo_pruning(json.loads(out.read_text()), args.work), indent=1))
        rows.append(json.loads(out.read_text()))
    print("| model | split | true targets | flagged | screen rank of the targets | target norms (anomaly index) "
          "| scan (s) |\n|---|---|---|---|---|---|---:|")
    for r in rows:
        by_class = {o["class"]: o for o in r["summary"]["optimised"]}
        norms = ", ".join(f"{by_class[t]['norm']:.0f} ({by_class[t]['anomaly_index']:.2f})" if t in by_class
                          else "not optimised" for t in r["targets"]) or "-"
        ranks = ", ".join(map(str, r["screen_ranks"])) if r["screen_ranks"] else "no screen"
        print(f"| {r['name']} | {r['split']} | {', '.join(map(str, r['targets'])) or 'none'} | "
              f"{', '.join(map(str, r['summary']['flagged'])) or 'none'} | {ranks if r['targets'] else '-'} | "
              f"{norms} | {r['scan_seconds']:.0f} |")
    print("\n| model | split | B clean / attack (%) | nc-unlearning clean / attack (%) | nc-pruning | "
          "G (reversed trigger) detection / false alarm (%) | G (strip) | G (both) |\n"
          "|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        m, g = r["models"], {row["model"]: row for row in r["goodnets"]}

        def pair(d: dict[str, Any], a: str, b: str) -> str:
            return f"{d[a]:.2f} / {d[b]:.2f}"

        gs = [pair(g[k], "detection_rate", "false_alarm_rate") for k in
              ("G (reversed-trigger)", "G (strip)", "G (reversed-trigger + strip)")]
        print(f"| {r['name']} | {r['split']} | {pair(m['B'], 'clean_accuracy', 'attack_success')} | "
              f"{pair(m['nc-unlearning'], 'clean_accuracy', 'attack_success')} | "
              f"{pair(m['nc-pruning'], 'clean_accuracy', 'attack_success')} ({r['channels_pruned']} ch.) | "
              f"{' | '.join(gs)} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
