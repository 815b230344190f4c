"""Where the backdoor lives, relative to the pruning defense's ranking (an analysis, not a defense).

Makes the real-face BadNets of benchmarks/real_faces*.toml (the ``faces`` recipe of
``badnet_repair.workflow.recipes``: Extended Yale B split 60/20/20 % per person, the real
sunglasses trigger, target 0; cached in ``--cache``) for each ``--badnet-seed`` and, for conv_3
and conv_4, lists the channels whose
mean activation rises most when the trigger is pasted on the clean test images
(:func:`badnet_repair.trigger_response`), with each channel's place in the pruning order
(0 = pruned first: the lowest mean activation on the held-out clean images), and whether
fine-pruning's prune step (to a 10-point held-out accuracy drop, seed 0's split) prunes it.
The poisoned images are used here only to explain the defense's results; the defenses never
see them.

    python experiments/backdoor_channels.py [--badnet-seed N ...] [--out FILE] [--cache DIR]
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
FACES = SHARED / "faces" / "yaleb_55x47.npz"
TRIGGER = SHARED / "lab" / "sunglasses_trigger.png"
DROP = 10.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--badnet-seed", type=int, action="append", help="BadNet training seed (repeatable; default 0)")
    ap.add_argument("--top", type=int, default=5, help="channels listed per layer (default 5)")
    ap.add_argument("--out", default=str(ROOT / "docs" / "research" / "backdoor_channels.md"))
    ap.add_argument("--cache", default=str(ROOT / "bench" / "badnets"), help="where the made BadNets are kept")
    args = ap.parse_args()
    if not FACES.exists() or not TRIGGER.exists():
        print(f"skipped: needs {FACES} and {TRIGGER}")
        return 0
    from matplotlib.figure import Figure

    import badnet_repair as br
    from badnet_repair.defenses.sweep import prune_sweep, rank_channels
    from badnet_repair.defenses.tuning import split_clean
    from badnet_repair.workflow.recipes import make_recipe

    cmd = shlex.join(["python", "experiments/backdoor_channels.py", *sys.argv[1:]])
    lines = ["# Where the backdoor lives in the real-face BadNets", "", f"Reproduce: `{cmd}` (needs ../shared).", "",
             "For each BadNet: the channels whose mean activation over the poisoned test images exceeds "
             "their mean over the same clean images by the most ('rise'), their mean clean activation, their "
             "place in the pruning order (0 = pruned first, 59 or 79 = pruned last) and, for conv_3, whether "
             f"fine-pruning's prune step (to a {DROP:g}-point drop in held-out accuracy, the seed-0 split) "
             "prunes them. Poisoned images are used only for this analysis. The figure "
             f"({Path(args.out).with_suffix('.png').name}) shows every conv_3 channel's rise in pruning order.", "",
             "| BadNet | layer | channel | rise under the trigger | clean mean | place in pruning order | "
             "pruned |", "|---|---|---:|---:|---:|---:|---:|"]
    seeds = args.badnet_seed or [0]
    fig = Figure(figsize=(12, 3.6 * len(seeds)), layout="constrained")
    panels = iter(np.ravel(fig.subplots(len(seeds), 2, squeeze=False)))
    for seed in seeds:
        for kind in ("baseline", "pruning-aware"):
            files = make_recipe("faces", kind, {"faces": str(FACES), "trigger": str(TRIGGER), "training_seed": seed},
                                Path(args.cache) / f"faces_{kind}_s{seed}")
            model = br.load_model(files["model"])
            valid, test = br.load_h5(files["valid"]), br.load_h5(files["test"])
            bd_test = br.load_h5(files["bd_test"])
            holdout = split_clean(valid, seed=0)[1]
            sweep = prune_sweep(model, holdout, thresholds=[DROP], progress=False)
            sel = sweep.selections[DROP]
            rankings = {"conv_3": sweep.ranking, "conv_4": rank_channels(model, holdout, layer="conv_4", at="conv")}
            pruned = {int(c) for c in (sel.channels if sel is not None else sweep.ranking.order)}
            name = f"{kind}, seed {seed} ({len(pruned)} of conv_3's channels pruned)"
            print(name, flush=True)
            for layer in ("conv_3", "conv_4"):
                # the poisoned set leaves out the target's own images; compare with the same clean ones
                r = br.trigger_response(model, test.x[test.y != 0], bd_test, layer=layer, ranking=rankings[layer])
                if layer == "conv_3":
                    br.plot_trigger_response(r, channels_pruned=len(pruned), ax=next(panels), title=name)
                for c in r.top(args.top):
                    mark = ("yes" if c in pruned else "no") if layer == "conv_3" else "-"
                    lines.append(f"| {name} | {layer} | {c} | {r.rise[c]:+.1f} | {r.clean_mean[c]:.2f} | "
                                 f"{r.place[c]} | {mark} |")
    fig.savefig(Path(args.out).with_suffix(".png"), dpi=110)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
