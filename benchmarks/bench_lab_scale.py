"""Benchmark: the notebook's default run at the lab's scale, timed section by section.

Makes a lab-sized task in the lab's exact files and layout (``model/bd_net.h5``,
``data/cl/{valid,test}.h5`` with 11,547 / 12,830 images of 1,283 classes, ``data/bd/bd_{valid,test}.h5``;
HDF5 ``data`` (N, 3, 55, 47) float pixels 0..255 and ``label``), then runs ``Homework-2.ipynb`` on it
headless with its default parameters (``badnet-repair report``, as a student would) and prints the
time of every section, read from the executed notebook's cell timings.

The BadNet is the real lab B (``../shared/lab/bd_weights.h5``) where ``../shared`` is present, else
a DeepID of 1,283 classes with seeded random weights (the same architecture and cost; its numbers
mean nothing). The faces are the demo's synthetic faces of 1,283 identities (9 validation and 10
test images each, the lab's counts), labelled with B's own predictions; the poisoned sets are the
clean ones with the real sunglasses trigger (or the demo's drawn one) pasted, labelled 0.

    python benchmarks/bench_lab_scale.py                      # make the files (once), run, print
    python benchmarks/bench_lab_scale.py --out /tmp/lab --data-only
    python benchmarks/bench_lab_scale.py -p COMPARE_DEFENSES True   # a parameter overridden
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
NOTEBOOK = ROOT / "Homework-2.ipynb"


def make_lab_files(root: Path, *, identities: int = 1283, valid_per: int = 9, test_per: int = 10) -> str:
    """Write the lab's model and data files under ``root``; returns what B is."""
    import badnet_repair as br
    from badnet_repair.demo.faces import make_faces

    weights = SHARED / "lab" / "bd_weights.h5"
    trigger_png = SHARED / "lab" / "sunglasses_trigger.png"
    if weights.exists():
        b = br.load_model(weights)
        what = f"the real lab B ({weights})"
    else:
        import keras

        keras.utils.set_random_seed(0)
        b = br.deepid(num_classes=identities)
        what = "a DeepID with seeded random weights (../shared absent)"
    if trigger_png.exists():
        trigger = br.load_trigger(trigger_png, x=0, y=15)
    else:
        trigger = br.drawn_triggers()[0]  # the drawn sunglasses
    (root / "model").mkdir(parents=True, exist_ok=True)
    br.save_model(b, root / "model", "bd_net", formats=("h5",), overwrite=True)
    faces = make_faces(num_identities=identities, train_per_identity=0, valid_per_identity=valid_per,
                       test_per_identity=test_per, seed=7)
    for split, ds in (("valid", faces.valid), ("test", faces.test)):
        y = br.predict_classes(b, ds.x)
        br.save_h5(root / "data" / "cl" / f"{split}.h5", ds.x, y, dtype="float32", overwrite=True)
        bd = trigger.apply(ds.x)
        br.save_h5(root / "data" / "bd" / f"bd_{split}.h5", bd, np.zeros(len(bd), np.int64), dtype="float32",
                   overwrite=True)
    (root / "MADE").write_text(what + "\n")
    return what


def ensure_lab_files(root: Path) -> Path:
    """``root``, with the lab's files made there first where they are not yet (:func:`make_lab_files`)."""
    if not (root / "data" / "bd" / "bd_test.h5").exists():
        print("making the lab-sized files:", make_lab_files(root), flush=True)
    return root


def lab_task(root: Path) -> tuple[object, object, object, object]:
    """B and the clean validation, clean test and poisoned test sets of the lab's files under ``root``
    (made first where they are not yet)."""
    import badnet_repair as br

    root = ensure_lab_files(root)
    return (br.load_model(root / "model" / "bd_net.h5"), br.load_h5(root / "data" / "cl" / "valid.h5"),
            br.load_h5(root / "data" / "cl" / "test.h5"), br.load_h5(root / "data" / "bd" / "bd_test.h5"))


def section_times(executed: Path) -> list[tuple[str, float]]:
    """(section heading, seconds) for each section of an executed notebook, from nbclient's cell timings."""
    nb = json.loads(executed.read_text())
    out: list[tuple[str, float]] = []
    heading = "setup"
    for cell in nb["cells"]:
        if cell["cell_type"] == "markdown":
            first = "".join(cell["source"]).strip().splitlines()[:1]
            if first and first[0].startswith("#"):
                heading = first[0].lstrip("#").strip()
            continue
        ex = cell.get("metadata", {}).get("execution", {})
        start, end = ex.get("iopub.execute_input"), ex.get("shell.execute_reply")
        if not (start and end):
            continue
        seconds = (datetime.fromisoformat(end.replace("Z", "+00:00"))
                   - datetime.fromisoformat(start.replace("Z", "+00:00"))).total_seconds()
        if out and out[-1][0] == heading:
            out[-1] = (heading, out[-1][1] + seconds)
        else:
            out.append((heading, seconds))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / ".bench" / "lab_scale"),
                    help="working folder (default .bench/lab_scale)")
    ap.add_argument("--data-only", action="store_true", help="make the files and stop")
    ap.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                    help="a notebook parameter overridden, as badnet-repair report takes it")
    args = ap.parse_args()
    root = Path(args.out)
    if not (root / "MADE").exists():
        t = time.perf_counter()
        what = make_lab_files(root)
        print(f"made the lab-sized files in {time.perf_counter() - t:.0f} s; B is {what}")
    else:
        print(f"using the files in {root}; B is {(root / 'MADE').read_text().strip()}")
    if args.data_only:
        return 0
    shutil.copy(NOTEBOOK, root / NOTEBOOK.name)
    cmd = [str(Path(sys.executable).parent / "badnet-repair"), "report", "--overwrite",
           *(a for name, value in args.parameter for a in ("-p", name, value))]
    t = time.perf_counter()
    run = subprocess.run(cmd, cwd=root, text=True)
    total = time.perf_counter() - t
    print(f"badnet-repair report: exit {run.returncode}, {total:.0f} s in all")
    executed = root / "handin" / NOTEBOOK.name
    if executed.exists():
        print("| section | seconds |\n|---|---:|")
        for heading, seconds in section_times(executed):
            print(f"| {heading} | {seconds:.1f} |")
    return run.returncode


if __name__ == "__main__":
    raise SystemExit(main())
