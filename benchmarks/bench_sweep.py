"""Benchmark: the fast pruning sweep against the plain one, at lab scale, in one process.

Both engines run the full 60-step conv_3 sweep with validation accuracy and attack success
rate at every step on N clean + N poisoned 55x47x3 inputs (N = 11,547, the lab's valid.h5).
The plain engine clones B, zeroes the channels and runs the whole model at every step.

Cases:
  a  realistic: the real lab BadNet (../shared/lab/bd_weights.h5) on real faces
     (../shared/faces/yaleb_55x47.npz resampled to N), poisoned with the real sunglasses
     trigger. Labels are B's own predictions on the clean faces (YaleB people are not lab
     identities), so validation accuracy starts at 100% and falls as channels go.
  b  worst case: a DeepID whose conv_3 channels are active on every input (bias pushed
     up), so no step can skip any input. Synthetic smooth images; labels as in (a).

Prints, per case: both times, their ratio, the process's peak RSS after each engine, the
fraction of (input, channel) pairs active, and how many per-step predictions differ.

    python benchmarks/bench_sweep.py            # both cases, N = 11547
    python benchmarks/bench_sweep.py --case b --n 2000
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def realistic(n: int):  # type: ignore[no-untyped-def]
    import badnet_repair as br

    weights = SHARED / "lab" / "bd_weights.h5"
    faces = SHARED / "faces" / "yaleb_55x47.npz"
    if not weights.exists() or not faces.exists():
        print(f"case a skipped: needs {weights} and {faces}")
        return None
    model = br.load_model(weights)
    d = np.load(faces)
    idx = np.random.default_rng(0).choice(len(d["label"]), size=n, replace=True)
    x = d["data"][idx].transpose(0, 2, 3, 1).astype(np.float32)
    trigger = br.load_trigger(SHARED / "lab" / "sunglasses_trigger.png", x=0, y=15)
    return model, x, trigger.apply(x)


def worst_case(n: int):  # type: ignore[no-untyped-def]
    import keras

    import badnet_repair as br

    keras.utils.set_random_seed(0)
    model = br.deepid(num_classes=1283)
    rng = np.random.default_rng(1)
    base = rng.uniform(0, 255, size=(n, 11, 8, 3))
    x = np.kron(base, np.ones((1, 5, 6, 1)))[:, :55, :47, :]
    x = np.clip(np.pad(x, ((0, 0), (0, 0), (0, 47 - x.shape[2]), (0, 0)), mode="edge")
                + rng.normal(0, 10, (len(x), 55, 47, 3)), 0, 255).astype(np.float32)
    # Raise conv_3's bias just enough that every channel is non-zero somewhere on every input.
    k, b = model.get_layer("conv_3").get_weights()
    conv = keras.Model(model.inputs, model.get_layer("conv_3").output)
    for shift in (0.0, 0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500):
        model.get_layer("conv_3").set_weights([k, b + shift])
        if all(conv.predict(x[i:i + 2048], verbose=0).reshape(-1, 80, 60).any(axis=1).all()
               for i in range(0, n, 2048)):
            break
    print(f"worst case: conv_3 bias raised by {shift}")
    poisoned = x.copy()
    poisoned[:, 40:48, 35:43, :] = 255.0
    return model, x, poisoned


def run_case(name: str, case, batch_size: int) -> None:  # type: ignore[no-untyped-def]
    import badnet_repair as br

    if case is None:
        return
    model, x, xb = case
    y = br.predict_classes(model, x, batch_size=batch_size)
    valid = br.Dataset(x, y, "valid")
    bd = br.Dataset(xb, np.zeros(len(xb), np.int64), "bd_valid")
    kwargs = dict(others={"bd_valid": bd}, poisoned=["bd_valid"], batch_size=batch_size)
    print(f"\n== case {name}: {len(x)} clean + {len(xb)} poisoned inputs, "
          f"peak RSS before sweeps {peak_rss_mib():.0f} MiB", flush=True)

    t = time.perf_counter()
    fast = br.prune_sweep(model, valid, progress=True, **kwargs)
    t_fast = time.perf_counter() - t
    rss_fast = peak_rss_mib()
    print(f"fast : {t_fast:8.2f} s   peak RSS {rss_fast:.0f} MiB", flush=True)

    import keras

    conv = keras.Model(model.inputs, model.get_layer("conv_3").output)
    acts = np.concatenate([conv.predict(valid.x[i:i + 2048], verbose=0).reshape(-1, 80, 60).any(axis=1)
                           for i in range(0, len(x), 2048)])
    t = time.perf_counter()
    plain = br.prune_sweep(model, valid, ranking=fast.ranking, engine="plain", progress=True, **kwargs)
    t_plain = time.perf_counter() - t
    print(f"plain: {t_plain:8.2f} s   peak RSS {peak_rss_mib():.0f} MiB", flush=True)

    diffs = {n: int(np.count_nonzero(fast.predictions[n] != plain.predictions[n])) for n in fast.predictions}
    total = sum(p.size for p in fast.predictions.values())
    print(f"speed-up (plain / fast): {t_plain / t_fast:.1f}x")
    print(f"active (input, channel) pairs on clean valid: {acts.mean():.3f}; "
          f"channels never active: {int((~acts.any(axis=0)).sum())} of 60")
    print(f"per-step predictions that differ: {diffs} of {total} "
          f"({sum(diffs.values()) / total:.2e}; tie rule allows 1e-4)")
    same = all(fast.selections[x] == plain.selections[x] for x in fast.selections)
    print(f"same B'_X selections: {same}: " + ", ".join(
        f"X={x:g}: {s.channels_pruned if s else None}" for x, s in fast.selections.items()))
    print("validation accuracy / ASR every 10 steps (fast):",
          np.round(fast.metric("valid")[::10], 2).tolist(), np.round(fast.metric("bd_valid")[::10], 2).tolist())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", choices=["a", "b", "both"], default="both")
    ap.add_argument("--n", type=int, default=11547, help="clean inputs (poisoned: as many)")
    ap.add_argument("--batch-size", type=int, default=1024)
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    if args.case in ("a", "both"):
        run_case("a (real B, real faces)", realistic(args.n), args.batch_size)
    if args.case in ("b", "both"):
        run_case("b (worst case: every channel active)", worst_case(args.n), args.batch_size)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
