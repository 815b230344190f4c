"""Benchmark: peak memory of ranking + the full sweep at 1x and 10x the lab's validation size.

Writes lab-format validation files of N = 11,547 (1x) and 115,470 (10x) images (float32
pixels; the real faces of ../shared/faces resampled, else smooth synthetic images), then
in a fresh subprocess per size loads the file lazily, ranks conv_3's channels and runs the
60-step sweep. Prints each run's peak RSS next to the size of the conv_3 activations the
fast sweep caches (N x 10 x 8 x 60 float32), so one can see that memory grows with the
cache, not with the images (10x would add about 3.2 GB of float32 images if they were
held).

    python benchmarks/bench_memory.py            # writes about 4 GB under a temp folder
    python benchmarks/bench_memory.py --dir /big/disk --keep
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
LAB_N = 11547


def write_file(path: Path, n: int, chunk: int = 4096) -> None:
    import h5py

    faces = SHARED / "faces" / "yaleb_55x47.npz"
    src = np.load(faces)["data"].astype(np.float32) if faces.exists() else None
    rng = np.random.default_rng(0)
    with h5py.File(path, "w") as f:
        data = f.create_dataset("data", shape=(n, 3, 55, 47), dtype="float32", chunks=(64, 3, 55, 47))
        labels = np.zeros(n, np.float64)
        for i in range(0, n, chunk):
            k = min(chunk, n - i)
            if src is not None:
                block = src[rng.integers(0, len(src), k)]
            else:
                base = rng.uniform(0, 255, (k, 3, 11, 8))
                block = np.kron(base, np.ones((1, 1, 5, 6)))[:, :, :55, :47]
                block = np.pad(block, ((0, 0), (0, 0), (0, 0), (0, 47 - block.shape[3])), mode="edge")
            data[i : i + k] = np.clip(block + rng.normal(0, 2, block.shape), 0, 255)
        f.create_dataset("label", data=labels)


CHILD = r"""
import json, resource, sys, time
import numpy as np
import badnet_repair as br
path, model_path = sys.argv[1], sys.argv[2]
model = br.load_model(model_path) if model_path != "-" else None
if model is None:
    import keras
    keras.utils.set_random_seed(0)
    model = br.deepid(num_classes=1283)
valid = br.load_h5(path, lazy=True)
# labels: B's own predictions, so the sweep has something to measure
valid = br.Dataset(valid.x, br.predict_classes(model, valid.x, batch_size=2048), "valid")
t = time.perf_counter()
ranking = br.rank_channels(model, valid, layer="conv_3")
sweep = br.prune_sweep(model, valid, ranking=ranking, layer="conv_3", batch_size=2048)
print(json.dumps({"n": len(valid), "seconds": time.perf_counter() - t,
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "cache_mib": len(valid) * 10 * 8 * 60 * 4 / 2**20,
                  "x4": [s.channels_pruned if s else None for s in sweep.selections.values()]}))
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", help="where to write the files (default a temp folder)")
    ap.add_argument("--keep", action="store_true", help="keep the files")
    ap.add_argument("--scales", type=int, nargs="+", default=[1, 10])
    args = ap.parse_args()
    work = Path(args.dir or tempfile.mkdtemp(prefix="bench_memory_"))
    work.mkdir(parents=True, exist_ok=True)
    weights = SHARED / "lab" / "bd_weights.h5"
    model = str(weights) if weights.exists() else "-"
    print(f"model: {model if model != '-' else 'random DeepID (../shared absent)'}; files in {work}")
    rows = []
    try:
        for scale in args.scales:
            path = work / f"valid_x{scale}.h5"
            t = time.perf_counter()
            write_file(path, LAB_N * scale)
            print(f"wrote {path.name}: {LAB_N * scale} images, {path.stat().st_size / 2**30:.2f} GiB "
                  f"in {time.perf_counter() - t:.0f} s", flush=True)
            out = subprocess.run([sys.executable, "-c", CHILD, str(path), model], check=True,
                                 capture_output=True, text=True).stdout
            row = json.loads(out.strip().splitlines()[-1])
            rows.append(row)
            print(f"x{scale}: N={row['n']}, ranking + sweep {row['seconds']:.0f} s, peak RSS "
                  f"{row['peak_rss_mib']:.0f} MiB, cached activations {row['cache_mib']:.0f} MiB, "
                  f"peak RSS minus cache {row['peak_rss_mib'] - row['cache_mib']:.0f} MiB", flush=True)
            if not args.keep:
                path.unlink()
    finally:
        if not args.keep and not args.dir:
            shutil.rmtree(work, ignore_errors=True)
    if len(rows) >= 2:
        a, b = rows[0], rows[-1]
        growth = b["peak_rss_mib"] - a["peak_rss_mib"]
        cache_growth = b["cache_mib"] - a["cache_mib"]
        images = (b["n"] - a["n"]) * 55 * 47 * 3 * 4 / 2**20
        print(f"peak RSS grew {growth:.0f} MiB from x{args.scales[0]} to x{args.scales[-1]}; the cache grew "
              f"{cache_growth:.0f} MiB; holding the images would have added {images:.0f} MiB more")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
