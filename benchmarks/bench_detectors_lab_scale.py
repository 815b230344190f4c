"""Benchmark: fit and scoring time of each input-level detector at the lab's scale (issue 32's aim:
each under 2 minutes on 2 cores).

Makes (once) the lab-sized task of ``bench_lab_scale.py``: B is the real lab B where ``../shared`` is
present, else a DeepID of 1,283 classes with seeded random weights (the same cost); 11,547 clean
validation images (9 per class) and 12,830 clean test images, plus the poisoned test set. Each detector
is fitted on the validation file (as ``detect`` does) and scores the clean and poisoned test files
(25,660 images), timed separately. ``--score-sample N`` scores only the first N images of each test
file and prints the time measured on them and, marked as such, the time scaled to the whole files.

    python benchmarks/bench_detectors_lab_scale.py
    python benchmarks/bench_detectors_lab_scale.py --detectors teco --score-sample 1000
    python benchmarks/bench_detectors_lab_scale.py --detectors strip --score-sample 2000 --set strip.copies=16
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import time
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="/tmp/badnet_repair_lab_scale", help="where the lab-sized files are made")
    ap.add_argument("--detectors", nargs="+", default=["feature-distance", "scale-up", "strip", "teco"])
    ap.add_argument("--score-sample", type=int, default=None,
                    help="score only this many images of each test file (default all)")
    ap.add_argument("--set", action="append", default=[], metavar="DETECTOR.SETTING=VALUE",
                    help="a detector's setting, the value as TOML reads it (repeatable)")
    args = ap.parse_args()
    settings: dict[str, dict[str, object]] = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        name, dot, setting = key.partition(".")
        if not (sep and dot and name and setting):
            ap.error(f"--set {item!r}: expected DETECTOR.SETTING=VALUE")
        settings.setdefault(name, {})[setting] = tomllib.loads(f"v = {value}")["v"]

    spec = importlib.util.spec_from_file_location("bench_lab_scale", ROOT / "benchmarks" / "bench_lab_scale.py")
    assert spec and spec.loader
    lab = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lab)
    b, valid, test, bd = lab.lab_task(Path(args.out))
    import badnet_repair as br

    n = args.score_sample
    test_s = test if n is None else test.subset(slice(0, n))
    bd_s = bd if n is None else bd.subset(slice(0, n))
    full = len(test) + len(bd)
    print(f"B: {br.num_classes(b)} classes; valid {len(valid)}, scored {len(test_s) + len(bd_s)} of {full} "
          f"test images; {os.cpu_count()} cores\n")
    print("| detector | fit (s) | scoring (s) | scoring, scaled to the whole test files (s) | fit + scoring (s) |")
    print("|---|---:|---:|---:|---:|")
    for name in args.detectors:
        det = br.make_detector(name, **settings.get(name, {}))
        start = time.perf_counter()
        det.fit(b, valid)
        fit = time.perf_counter() - start
        start = time.perf_counter()
        det.scores(test_s.x)
        det.scores(bd_s.x)
        score = time.perf_counter() - start
        scaled = score * full / (len(test_s) + len(bd_s))
        shown = name + "".join(f", {k}={v}" for k, v in settings.get(name, {}).items())
        print(f"| {shown} | {fit:.1f} | {score:.1f} | {scaled:.1f}{'' if n is None else ' (scaled)'} | "
              f"{fit + scaled:.1f} |", flush=True)


if __name__ == "__main__":
    main()
