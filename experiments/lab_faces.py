"""Write the real lab B's evaluation files for the removal benchmark (benchmarks/removal_lab.toml).

The lab's own face data is not here; ../shared holds the real lab B and the real sunglasses
trigger, and Yale B faces. The faces are labelled by B (its answer is the "true" class: B's clean
accuracy is 100 % by construction), split in two halves with seed 0 (the same split as
experiments/neural_cleanse.py): the first is the defenses' clean validation data, the second the
clean test set; the poisoned test set is the second half's images B does not put in class 0,
with the real trigger pasted, labelled 0. ``valid_without_0.h5`` is the first half less the faces B
puts in class 0: a diagnostic only (docs/research/removal31.md, "The lab B's clean faces in class 0"),
since no defense knows the target.

    python experiments/lab_faces.py [--out .experiments/removal/lab]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


def main() -> None:
    import badnet_repair as br

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / ".experiments" / "removal" / "lab"))
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    b = br.load_model(SHARED / "lab" / "bd_weights.h5")
    with np.load(SHARED / "faces" / "yaleb_55x47.npz") as d:
        x = np.asarray(d["data"], np.float32).transpose(0, 2, 3, 1)
    y = br.predict_classes(b, x)
    order = np.random.default_rng(0).permutation(len(x))
    fit, held = np.sort(order[: len(x) // 2]), np.sort(order[len(x) // 2:])
    test = br.Dataset(x[held], y[held], "test")
    bd = br.poison(test, br.load_trigger(SHARED / "lab" / "sunglasses_trigger.png"), target=0)
    keep = fit[y[fit] != 0]
    for name, data in (("valid", br.Dataset(x[fit], y[fit], "valid")), ("test", test), ("bd_test", bd),
                       ("valid_without_0", br.Dataset(x[keep], y[keep], "valid"))):
        print(br.save_h5(out / f"{name}.h5", data.x, data.y, overwrite=True), len(data))
    print(f"B labels the faces with {len(np.unique(y))} of its classes")
    # Yale B's people are not the lab's: B's class 0 (its backdoor's target) on a clean face is a face
    # it reads as triggered, such as one whose eyes are in shadow
    target = np.flatnonzero(y == 0)
    with np.load(SHARED / "faces" / "yaleb_55x47.npz") as d:
        people = np.asarray(d["label"])[target]
    print(f"B puts {len(target)} clean faces of {len(np.unique(people))} Yale B people in class 0, "
          f"{int(np.isin(target, fit).sum())} of them in the clean validation half")


if __name__ == "__main__":
    main()
