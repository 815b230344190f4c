"""Neural Cleanse's scan at the lab's scale, with and without the label pre-selection.

A DeepID with 1283 classes (seeded random weights: the scan's cost is set by its step counts,
not by what the network has learnt) and 3 random smooth clean images per class. Times
``NeuralCleanse(preselect=None).scan`` (every class screened: the scan as it was before the
pre-selection) and ``NeuralCleanse().scan`` (the defaults), back to back in one process, and
prints each one's wall time, its process CPU time (both cores' work; on an otherwise idle
machine the wall time would be about CPU / cores) and the ratios. Not a test.

Usage:
    .venv/bin/python benchmarks/nc_scan_speed.py [--classes 1283] [--per-class 3]
        [--order before-after|after-before] [--only before|after] [--set name=value ...]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def smooth_faces(n: int, seed: int) -> np.ndarray:
    """(n, 55, 47, 3) float32 images in 0..255: blocky structure plus noise (not pure noise)."""
    rng = np.random.default_rng(seed)
    base = rng.uniform(0, 255, size=(n, 11, 8, 3))
    img = np.kron(base, np.ones((1, 5, 6, 1)))[:, :55, :47, :]
    return np.clip(img + rng.normal(0, 12, img.shape), 0, 255).astype(np.float32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--classes", type=int, default=1283)
    ap.add_argument("--per-class", type=int, default=3)
    ap.add_argument("--order", choices=("before-after", "after-before"), default="before-after")
    ap.add_argument("--only", choices=("before", "after"), default=None)
    ap.add_argument("--set", nargs="*", default=[], metavar="NAME=VALUE",
                    help="NeuralCleanse settings for both runs, e.g. steps=20 (for a quick try)")
    ap.add_argument("--json", default=None, help="also write the numbers to this file")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    import keras

    import badnet_repair as br
    from badnet_repair.detectors.neural_cleanse import NeuralCleanse

    extra = {k: json.loads(v) for k, v in (s.split("=", 1) for s in args.set)}
    keras.utils.set_random_seed(0)
    model = br.deepid(num_classes=args.classes)
    n = args.classes * args.per_class
    x = smooth_faces(n, seed=1)
    y = np.repeat(np.arange(args.classes), args.per_class)
    clean = br.Dataset(x, y, name="clean")
    br.predict_classes(model, x[:64])  # TensorFlow's start-up cost, outside both timings

    runs = {"before": dict(preselect=None), "after": {}}
    order = ["before", "after"] if args.order == "before-after" else ["after", "before"]
    if args.only:
        order = [args.only]
    out: dict[str, dict[str, float]] = {}
    for name in order:
        scanner = NeuralCleanse(**{**extra, **runs[name]})
        wall, cpu = time.perf_counter(), time.process_time()
        scan = scanner.scan(model, clean)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        screened = len(scan.preselected) if scan.preselected is not None else args.classes
        out[name] = {"wall_s": wall, "cpu_s": cpu, "screened_classes": screened,
                     "fully_optimised": len(scan.triggers)}
        print(f"{name:6s} ({'preselect=None' if name == 'before' else 'defaults'}): wall {wall:7.1f} s, "
              f"CPU {cpu:7.1f} s, {screened} classes screened, {len(scan.triggers)} optimised fully", flush=True)
    if len(out) == 2:
        print(f"ratio before/after: wall {out['before']['wall_s'] / out['after']['wall_s']:.2f}x, "
              f"CPU {out['before']['cpu_s'] / out['after']['cpu_s']:.2f}x")
    print(f"{os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.1f} at the end")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"classes": args.classes, "images": n, "settings": extra, "order": order, **out}, f, indent=1)


if __name__ == "__main__":
    main()
