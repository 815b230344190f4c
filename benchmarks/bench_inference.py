"""The forward pass every prediction takes: the eager Keras call against the traced one
(``nets.models.inference_call``, what ``predict_probabilities`` and ``predict_classes`` use once a
model has been called on ``TRACE_AFTER`` images; here from the start).

A DeepID with 1,283 classes (seeded random weights: the cost is the network's shape, not what it
learnt) on random 55 x 47 images in 0..255, in batches of 1,024, each way twice in turns; prints
each run's images per second, the ratio of the best runs, and whether the outputs are the same
bits. Not a test.

Usage:
    .venv/bin/python benchmarks/bench_inference.py [--images 16384] [--classes 1283]
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=16384)
    ap.add_argument("--classes", type=int, default=1283)
    ap.add_argument("--batch-size", type=int, default=1024)
    args = ap.parse_args()

    import keras

    import badnet_repair as br
    from badnet_repair.nets.models import TRACE_AFTER, inference_call, predict_probabilities

    keras.utils.set_random_seed(0)
    model = br.deepid(num_classes=args.classes)
    x = np.random.default_rng(0).uniform(0, 255, (args.images, 55, 47, 3)).astype(np.float32)
    b = args.batch_size

    def eager() -> np.ndarray:
        return np.concatenate([keras.ops.convert_to_numpy(model(x[i:i + b], training=False))
                               for i in range(0, len(x), b)])

    def traced() -> np.ndarray:
        return predict_probabilities(model, x, batch_size=b)

    inference_call(model, TRACE_AFTER)  # as if it had been called on that many images: traced from here
    eager(), traced()  # start-up and tracing, outside the timings
    best = {"eager": np.inf, "traced": np.inf}
    out = {}
    for _ in range(2):
        for name, fn in (("eager", eager), ("traced", traced)):
            t = time.perf_counter()
            out[name] = fn()
            dt = time.perf_counter() - t
            best[name] = min(best[name], dt)
            print(f"{name:7s} {dt:6.2f} s  {len(x) / dt:7.0f} images/s", flush=True)
    print(f"ratio eager / traced (best runs): {best['eager'] / best['traced']:.2f}x; outputs the same bits: "
          f"{bool(np.array_equal(out['eager'], out['traced']))}")
    print(f"{os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
