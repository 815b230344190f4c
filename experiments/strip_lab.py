"""STRIP on the real CSAW-HackML lab BadNet, with real faces labelled by it and the real trigger.

The lab's data cannot be reached, so (as ../shared/README.md describes) the Extended Yale B faces
stand in for it: each face is labelled with the real B's own prediction, split in two halves
(seeded): STRIP is fitted on the first half only (clean, labelled by B); the second half gives the
false-alarm rate, and the same faces with the real sunglasses trigger pasted at (0, 15), those B
does not already send to the target 0, the detection rate. Prints a markdown table.

    python experiments/strip_lab.py [--blend add|mix]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

SHARED = Path(__file__).resolve().parents[2] / "shared"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blend", choices=["add", "mix"], default="add")
    args = ap.parse_args()
    weights, faces, trigger = (SHARED / "lab" / "bd_weights.h5", SHARED / "faces" / "yaleb_55x47.npz",
                               SHARED / "lab" / "sunglasses_trigger.png")
    if not all(p.exists() for p in (weights, faces, trigger)):
        print(f"skipped: needs {weights}, {faces} and {trigger}")
        return 0
    import badnet_repair as br

    b = br.load_model(weights)
    with np.load(faces) as d:
        x = np.asarray(d["data"], np.float32).transpose(0, 2, 3, 1)
    y = br.predict_classes(b, x)
    order = np.random.default_rng(0).permutation(len(x))
    fit_i, eval_i = np.sort(order[: len(x) // 2]), np.sort(order[len(x) // 2 :])
    fit, held = br.Dataset(x[fit_i], y[fit_i], "fit"), br.Dataset(x[eval_i], y[eval_i], "held-out")
    t = br.load_trigger(trigger, x=0, y=15)
    poisoned = br.poison(held, t, target=0)
    asr = br.attack_success_rate(br.predict_classes(b, poisoned.x), 0)
    start = time.perf_counter()
    strip = br.Strip(blend=args.blend).fit(b, fit)
    fit_s = time.perf_counter() - start
    start = time.perf_counter()
    false_alarm, detection = 100 * strip.flags(held.x).mean(), 100 * strip.flags(poisoned.x).mean()
    print(f"real lab B on Yale B faces labelled by B: {len(fit)} to fit, {len(held)} held out, {len(poisoned)} "
          f"poisoned (B's attack success on them {asr:.2f} %)")
    print("| entropy threshold (bits) | false alarm on held-out faces (%) | detection on poisoned faces (%) "
          "| fit (s) | scoring (s) |\n|---:|---:|---:|---:|---:|")
    print(f"| {strip.threshold:.3f} | {false_alarm:.2f} | {detection:.2f} | {fit_s:.1f} | "
          f"{time.perf_counter() - start:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
