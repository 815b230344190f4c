"""BadNets a benchmark can make itself: the built-in demo's, and BadNets trained on a face file.

Each recipe writes the lab's files (a full model ``.h5`` and lab-format ``valid.h5``, ``test.h5``,
``bd_test.h5``) into a folder of its own, once: a folder with a ``made.json`` is reused. Cells
then load the files as they load any BadNet given by path.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError
from ..formats.data import Dataset, save_h5
from ..formats.files import versions, write_json

__all__ = ["RECIPES", "make_recipe", "split_per_person"]

log = logging.getLogger(__name__)

#: recipe name -> its settings (besides ``kind``) and their defaults.
RECIPES: dict[str, dict[str, Any]] = {
    "demo": {"demo_dir": ".demo"},
    "faces": {"faces": None, "trigger": None, "trigger_x": 0, "trigger_y": 15, "target": 0,
              "training_seed": 0, "epochs": 60, "poison_rate": 0.05},
}
KINDS = ("baseline", "pruning-aware", "multi-target", "clean")
FILES = ("model", "valid", "test", "bd_test")


def split_per_person(y: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Indices of a per-class 60 / 20 / 20 % train / valid / test split, each sorted."""
    rng = np.random.default_rng(seed)
    parts: list[list[int]] = [[], [], []]
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        a, b = int(0.6 * len(idx)), int(0.8 * len(idx))
        parts[0] += idx[:a].tolist()
        parts[1] += idx[a:b].tolist()
        parts[2] += idx[b:].tolist()
    return tuple(np.sort(np.array(p, dtype=np.int64)) for p in parts)  # type: ignore[return-value]


def _paths(folder: Path) -> dict[str, str]:
    return {"model": str(folder / "bd_net.h5"), "valid": str(folder / "valid.h5"),
            "test": str(folder / "test.h5"), "bd_test": str(folder / "bd_test.h5")}


def make_recipe(recipe: str, kind: str, settings: Mapping[str, Any], folder: str | os.PathLike[str]) -> dict[str, str]:
    """Make (or reuse) a recipe's BadNet and data sets.

    Args:
        recipe: ``"demo"`` (the built-in demo's BadNet of that ``kind``) or ``"faces"`` (a
            BadNet of that ``kind`` trained on a face file: an ``.npz`` with ``data``
            (N, 3, H, W) 0..255 and ``label`` (N,), split 60/20/20 % per person; the trigger
            image pasted at ``trigger_x``, ``trigger_y``; ``training_seed``, ``epochs``,
            ``poison_rate`` as in :func:`~badnet_repair.attacks.train_badnet`; a ``multi-target``
            BadNet adds drawn eyebrows and lipstick to the trigger, to the targets
            :func:`~badnet_repair.attacks.multi_targets` spreads from ``target``).
        kind: ``"baseline"``, ``"pruning-aware"`` or ``"multi-target"``; or ``"clean"`` (faces
            only): the same network trained without poison, its ``bd_test`` the trigger pasted
            on, to check that a defense or detector leaves a clean model alone.
        settings: the recipe's settings (:data:`RECIPES`).
        folder: where the files go (the demo keeps its own cache, ``demo_dir``).

    Returns:
        role (``model``, ``valid``, ``test``, ``bd_test``) -> path.
    """
    if recipe == "demo":
        from ..demo.make import make_demo

        if kind == "clean":
            raise DataError("the demo recipe has no clean model; use the faces recipe's")
        paths = make_demo(settings.get("demo_dir", ".demo"), badnets=(kind,), progress=False)
        model = {"pruning-aware": paths.pruning_aware_model, "multi-target": paths.multi_target_model}.get(
            kind, paths.model)
        return {"model": str(model), "valid": str(paths.valid), "test": str(paths.test),
                "bd_test": str(paths.bd_mt_test if kind == "multi-target" else paths.bd_test)}
    if recipe != "faces":
        raise DataError(f"unknown recipe {recipe!r}; known: {', '.join(RECIPES)}")
    out = Path(folder)
    files = _paths(out)
    if (out / "made.json").exists() and all(Path(p).exists() for p in files.values()):
        return files
    from ..attacks import multi_targets, train_badnet, train_multi_target_badnet, train_pruning_aware_badnet
    from ..attacks.triggers import drawn_triggers, load_trigger, poison_each
    from ..nets.models import save_model

    start = time.perf_counter()
    s = {**RECIPES["faces"], **settings}
    faces = Path(str(s["faces"]))
    try:
        with np.load(faces) as d:
            x = np.asarray(d["data"], np.float32).transpose(0, 2, 3, 1)
            y = np.asarray(d["label"], np.int64)
    except (OSError, KeyError, ValueError) as exc:
        raise DataError(f"{faces}: not a face file with 'data' (N, 3, H, W) and 'label' (N,): {exc}") from None
    train_i, valid_i, test_i = split_per_person(y)
    train, valid, test = (Dataset(x[i], y[i], name) for i, name in
                          ((train_i, "train"), (valid_i, "valid"), (test_i, "test")))
    trigger = load_trigger(str(s["trigger"]), x=int(s["trigger_x"]), y=int(s["trigger_y"]))
    target = int(s["target"])
    common: dict[str, Any] = {"num_classes": int(y.max()) + 1, "poison_rate": float(s["poison_rate"]), "shift": 2,
                              "flip": True, "seed": int(s["training_seed"]), "progress": False, "target": target}
    epochs = int(s["epochs"])
    triggers: tuple[Any, ...] = (trigger,)
    targets: tuple[int, ...] = (target,)
    if kind in ("baseline", "clean"):
        model = train_badnet(train, trigger, epochs=epochs,
                             **{**common, "poison_rate": 0.0 if kind == "clean" else common["poison_rate"]}).model
    elif kind == "multi-target":
        triggers = (trigger, *drawn_triggers()[1:])
        targets = multi_targets(int(y.max()) + 1, target)
        args = {k: v for k, v in common.items() if k != "target"}
        model = train_multi_target_badnet(train, triggers, targets, epochs=epochs, **args).model
    else:
        model = train_pruning_aware_badnet(train, trigger, clean_epochs=epochs, poison_epochs=max(1, epochs // 2),
                                           **common).model
    out.mkdir(parents=True, exist_ok=True)
    save_model(model, out, "bd_net", formats=("h5",), overwrite=True)
    for name, data in (("valid", valid), ("test", test), ("bd_test", poison_each(test, triggers, targets))):
        save_h5(files[name], data.x, data.y, overwrite=True)
    write_json(out / "made.json", {"recipe": recipe, "kind": kind, "settings": dict(s),
                                   "seconds": round(time.perf_counter() - start, 1), "versions": versions()},
               overwrite=True)
    log.info("made the %s BadNet of %s in %s (%.0f s)", kind, faces.name, out, time.perf_counter() - start)
    return files
