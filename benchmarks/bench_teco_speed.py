"""TeCo's scoring, this tree's against an earlier revision's (default 6071c4d, before the
corruptions shared their work across severities, ran side by side on the cores, and B was asked
only up to each copy's first change), on the lab-sized files of ``bench_lab_scale.py``.

The earlier ``detectors/teco.py`` is read with ``git show REV:...`` and loaded beside this one.
Both compute the first-change severities of the same ``--images`` clean and ``--images``
poisoned test images, in turns, twice; prints each run's seconds, the ratio of the best runs
and whether the severities are the same. Not a test.

Usage:
    .venv/bin/python benchmarks/bench_teco_speed.py [--images 300] [--before 6071c4d]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parents[1]


def load_before(rev: str) -> object:
    """The module ``detectors/teco.py`` at ``rev``, loaded as a sibling of today's (its relative
    imports resolve in the installed package)."""
    source = subprocess.run(["git", "show", f"{rev}:src/badnet_repair/detectors/teco.py"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout
    path = Path(tempfile.mkdtemp()) / "teco_before.py"
    path.write_text(source)
    name = "badnet_repair.detectors._teco_before"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=300, help="clean and as many poisoned test images")
    ap.add_argument("--before", default="6071c4d", help="the earlier revision")
    ap.add_argument("--out", default="/tmp/badnet_repair_lab_scale", help="where the lab-sized files are made")
    args = ap.parse_args()

    spec = importlib.util.spec_from_file_location("bench_lab_scale", ROOT / "benchmarks" / "bench_lab_scale.py")
    assert spec and spec.loader
    lab = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lab)
    root = Path(args.out)
    b, _, test, bd = lab.lab_task(root)

    import badnet_repair as br
    from badnet_repair.detectors.teco import TeCo

    x = np.concatenate([test.x[: args.images], bd.x[: args.images]])
    before_module = load_before(args.before)
    detectors = {"before": before_module.TeCo(), "now": TeCo()}  # type: ignore[attr-defined]
    for det in detectors.values():
        det.model, det.pixel_max = b, 255.0
    # past the traced call's threshold first, so both runs use the same forward pass
    br.predict_classes(b, np.concatenate([x] * (1 + 40_000 // len(x)))[:40_000])
    made = (root / "MADE").read_text().strip() if (root / "MADE").exists() else "?"
    print(f"B: {br.num_classes(b)} classes ({made}); {len(x)} images; {os.cpu_count()} cores\n")
    seconds: dict[str, list[float]] = {"before": [], "now": []}
    out: dict[str, np.ndarray] = {}
    for turn in range(2):
        for name, det in detectors.items():
            start = time.perf_counter()
            out[name] = det.severities(x)
            seconds[name].append(time.perf_counter() - start)
            print(f"run {turn + 1}, {name}: {seconds[name][-1]:.1f} s", flush=True)
    print(f"\nratio (best before / best now): {min(seconds['before']) / min(seconds['now']):.2f}x; "
          f"same severities: {np.array_equal(out['before'], out['now'])}")


if __name__ == "__main__":
    main()
