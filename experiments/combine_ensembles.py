"""Score FST-FP cells from the FST and fine-pruning ensembles a benchmark already trained.

FST-FP (``fst-fp``) averages FST's three networks and fine-pruning's three geometrically. With
the same seed its networks are exactly those of the ``fst 3 members`` cell and the ``fine-pruning
3 members distill+decay tuned epoch`` cell of benchmarks/removal_held_out.toml (member i of each
uses seed + 1000 i and the same split; tests/test_purification.py checks that the parts equal the
two defenses run alone, and docs/research/removal.md lists the runner's own fst-fp cells against
this script's rows). Where both cells ran, this writes the fst-fp cell's store row from their
saved models instead of training the six networks again: every member of the two saved models
averaged into one model, then B, that model and its GoodNet evaluated on the BadNet's test files
with the runner's own ``evaluate_repairs``, the row in the runner's format (plus
``combined_from``: the two cells' keys).

    python experiments/combine_ensembles.py benchmarks/removal_held_out.toml \
        --stores .experiments/removal_fst3/store.jsonl .experiments/removal_opt2/store.jsonl \
        --badnets .experiments/removal_fst3 --out .experiments/removal_fstfp_combined/store.jsonl \
        --check .experiments/removal_fstfp/store.jsonl
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
LABEL = "fst-fp"
PARTS = ("fst 3 members", "fine-pruning 3 members distill+decay tuned epoch")


def _rows(paths: list[str]) -> dict[tuple[str, str, int], dict[str, Any]]:
    """(badnet, label, seed) -> the first finished row with it in the stores, in order."""
    out: dict[tuple[str, str, int], dict[str, Any]] = {}
    for path in paths:
        for line in Path(path).read_text().splitlines():
            r = json.loads(line)
            if r.get("status") == "ok":
                out.setdefault((r["badnet"], r["label"], r["seed"]), r)
    return out


def _members(model: Any) -> list[Any]:
    """The member networks nested in a saved ensemble (``average_models``), in order."""
    import keras

    nested = [layer for layer in model.layers if isinstance(layer, keras.Model)]
    return nested or [model]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", help="the benchmark's TOML (its fst-fp cells are scored)")
    parser.add_argument("--stores", nargs="+", required=True, help="stores holding the two parts' rows")
    parser.add_argument("--badnets", required=True, help="a benchmark output folder whose badnets/ made the parts")
    parser.add_argument("--out", required=True, help="the store to write (appended; cells already in it skipped)")
    parser.add_argument("--check", nargs="*", default=[], help="stores with the runner's own fst-fp rows to compare")
    args = parser.parse_args()

    import numpy as np

    import badnet_repair as br
    from badnet_repair.defenses import Repair, Repaired, make_defense
    from badnet_repair.formats.files import versions
    from badnet_repair.workflow.bench import load_config
    from badnet_repair.workflow.compare import evaluate_repairs
    from badnet_repair.workflow.recipes import make_recipe

    config = load_config(args.config)
    parts = _rows(args.stores)
    runner = _rows(args.check) if args.check else {}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = {json.loads(line)["cell"] for line in out.read_text().splitlines()} if out.exists() else set()
    for cell in config.cells():
        if cell.defense.label != LABEL or cell.key in done:
            continue
        found = [parts.get((cell.badnet.name, label, cell.seed)) for label in PARTS]
        if not all(found):
            print(f"{cell.title}: missing {[p for p, f in zip(PARTS, found, strict=True) if not f]}")
            continue
        start = time.perf_counter()
        b = cell.badnet
        slug = re.sub(r"[^A-Za-z0-9]+", "_", b.name).strip("_")
        files = (dict(b.files) if b.recipe is None else
                 make_recipe(b.recipe, str(b.kind), b.recipe_settings, str(Path(args.badnets) / "badnets" / slug)))
        model = br.load_model(files["model"])
        test = br.load_data_for(model, files["test"], name="test")
        bd_test, target = br.poisoned_labels(br.load_data_for(model, files["bd_test"], name="bd_test"), b.target,
                                             several=b.kind == "multi-target")
        networks = [m for r in found for m in _members(br.load_model(next(iter(r["models"].values())), trust=True))]
        combined = br.average_models(networks, name="fst_fp", mean="geometric")
        pruned = next(e for e in found[1]["results"] if e["kind"] == "repaired")["channels_pruned"]
        repair = Repair(defense=LABEL, models=(Repaired(label=LABEL, model=combined, channels_pruned=pruned),),
                        record={})
        evaluations = evaluate_repairs(model, [repair], test, bd_test, name=b.name).evaluations
        settings = make_defense(cell.defense.name, **dict(cell.defense.settings), seed=cell.seed).get_params()
        row = {"cell": cell.key, "badnet": b.name, "split": b.split, "defense": cell.defense.name,
               "label": cell.defense.label, "settings": settings, "seed": cell.seed, "status": "ok",
               "target": target, "badnet_clean_accuracy": evaluations[0].clean_accuracy,
               "badnet_attack_success": evaluations[0].attack_success_rate,
               "results": [{k: v for k, v in e.as_dict().items() if k not in ("clean_set", "poisoned_set")}
                           for e in evaluations[1:]],
               "models": {}, "combined_from": [r["cell"] for r in found], "members": len(networks),
               "seconds": round(sum(r["seconds"] for r in found) + time.perf_counter() - start, 2),
               "versions": versions(), "peak_rss_mib": None, "worker": "experiments/combine_ensembles.py"}
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        got = row["results"][0]
        line = f"{cell.title}: {got['clean_accuracy']:.2f} / {got['attack_success_rate']:.2f}"
        own = runner.get((b.name, LABEL, cell.seed))
        if own is not None:
            # every figure of the model and of its GoodNet
            keys = ("clean_accuracy", "attack_success_rate", "detection_rate", "false_alarm_rate")
            mine = [[np.nan if e[k] is None else e[k] for k in keys] for e in row["results"]]
            theirs = [[np.nan if e[k] is None else e[k] for k in keys] for e in own["results"]]
            same = len(mine) == len(theirs) and np.allclose(mine, theirs, atol=1e-9, equal_nan=True)
            line += (f"; the runner's cell: {theirs[0][0]:.2f} / {theirs[0][1]:.2f}, G included "
                     f"{'the same' if same else 'DIFFERENT'}")
        print(line, flush=True)


if __name__ == "__main__":
    main()
