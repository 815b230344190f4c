"""Benchmark: ``badnet-repair prune`` at the lab's scale against its floor, in one run.

The floor is what any pruning defense must do: read the clean and the poisoned validation files
and run B up to the pruned layer once over both. The command does that, sweeps the 60 steps,
saves B'_X and G_X and writes the report. Both are timed here on the same files (the lab-sized
ones ``benchmarks/bench_lab_scale.py --data-only`` makes), each in a fresh process so that
TensorFlow's import counts in both, and the ratio is printed.

    python benchmarks/bench_lab_scale.py --data-only     # once: the lab-sized files
    python benchmarks/bench_prune_floor.py
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

FLOOR = r"""
import sys, time
import numpy as np
import badnet_repair as br
import keras
from badnet_repair.nets.models import channel_chain
model, valid, bd_valid = sys.argv[1:4]
b = br.load_model(model)
end = keras.Model(b.inputs[0], channel_chain(b, None).end.output)
for f in (valid, bd_valid):
    x = br.load_data_for(b, f).x
    for i in range(0, len(x), 1024):
        end(np.asarray(x[i:i + 1024]), training=False)
"""


def timed(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lab", default=str(ROOT / ".bench" / "lab_scale"), help="the lab-sized files' folder")
    args = ap.parse_args()
    lab = Path(args.lab)
    files = [lab / "model" / "bd_net.h5", lab / "data" / "cl" / "valid.h5", lab / "data" / "bd" / "bd_valid.h5"]
    missing = [str(f) for f in files if not f.exists()]
    if missing:
        print(f"missing {', '.join(missing)}: run benchmarks/bench_lab_scale.py --data-only first")
        return 1
    exe = Path(sys.executable)
    floor = timed([str(exe), "-c", FLOOR, *map(str, files)])
    out = Path(tempfile.mkdtemp())
    try:
        prune = timed([str(exe.parent / "badnet-repair"), "prune", "-q", "--model", str(files[0]), "--valid",
                       str(files[1]), "--bd-valid", str(files[2]), "--out", str(out / "fixed_models")])
    finally:
        shutil.rmtree(out, ignore_errors=True)
    print(f"floor (read both files, one pass to the pruned layer, TensorFlow's import): {floor:.1f} s")
    print(f"badnet-repair prune (sweep, B'_X and G_X saved, report): {prune:.1f} s")
    print(f"ratio: {prune / floor:.2f}x the floor")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
