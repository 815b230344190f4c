"""BadNets a benchmark can make itself: the built-in demo's, BadNets trained on a face file, and
BadNets trained on the demo's synthetic faces at the lab's density (1,283 identities).

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

__all__ = ["RECIPES", "TRIGGER_KINDS", "make_recipe", "recipe_problems", "split_per_person"]

log = logging.getLogger(__name__)

#: the trigger settings of the recipes that train: ``trigger_kind`` ``"image"`` (the ``trigger``
#: image file at ``trigger_x``, ``trigger_y``; default the lab's place, x=0, y=15), ``"blended"``
#: (:func:`~badnet_repair.attacks.triggers.blended_trigger` over the whole image, ``blend_alpha``)
#: or ``"patch"`` (:func:`~badnet_repair.attacks.triggers.patch_trigger`, ``patch_size`` pixels
#: square, by default near the bottom-right corner, else at ``trigger_x``, ``trigger_y``).
_TRIGGER_SETTINGS: dict[str, Any] = {"trigger": None, "trigger_kind": "image", "trigger_x": None, "trigger_y": None,
                                     "blend_alpha": 0.2, "patch_size": 4}
#: recipe name -> its settings (besides ``kind``) and their defaults.
RECIPES: dict[str, dict[str, Any]] = {
    "demo": {"demo_dir": ".demo"},
    "faces": {"faces": None, **_TRIGGER_SETTINGS, "target": 0, "training_seed": 0, "epochs": 60,
              "poison_rate": 0.05},
    # The lab's shape (1,283 identities; 9 validation images each, the lab's 11,547; 10 test images
    # each, its 12,830) on the demo's synthetic faces. train_per_identity 40 and 20 epochs (51,320
    # training images, no augmentation, as the demo's) were measured 2026-12-03 with train_badnet as
    # make_recipe calls it (seed 0, 5 % poisoned, the drawn sunglasses), on these faces drawn in one
    # go with 80 per identity (the first 40 kept): 98.06 % clean test accuracy (97.94 % validation;
    # the lab's B: about 98.6 %), 100 % attack success. Training took 1,279 s wall on the project's
    # 2-core machine while another job's tests shared both cores (this one had 78 % of the CPU,
    # 1,091 CPU-seconds in all); at the demo's 5.5e-4 s per image-epoch on 2 free cores
    # (demo/make.py) that is about 600 s, 10 minutes. Drawing the 75,697 faces adds about 2.5 ms
    # each (3 minutes); a pruning-aware BadNet trains about 1.2 times as long.
    "lab-density": {"num_identities": 1283, "train_per_identity": 40, "valid_per_identity": 9,
                    "test_per_identity": 10, "faces_seed": 0, **_TRIGGER_SETTINGS, "target": 0,
                    "training_seed": 0, "epochs": 20, "poison_rate": 0.05},
}
KINDS = ("baseline", "pruning-aware", "multi-target", "clean")
TRIGGER_KINDS = ("image", "blended", "patch")
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


def _whole(v: Any, low: int | None = None) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and (low is None or v >= low)


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def recipe_problems(recipe: str, kind: str | None, settings: Mapping[str, Any]) -> list[str]:
    """What is wrong with a training recipe's settings (``faces``, ``lab-density``), one line each.

    Checks the trigger settings (a known ``trigger_kind``; the ``trigger`` file where the kind
    needs it, and that it exists; no image file, and no multi-target BadNet, for the other
    kinds), the types and ranges of the numbers, and the ``faces`` file. Unknown setting names
    and unknown kinds are the caller's to check (:func:`~badnet_repair.workflow.bench.load_config`
    does). File paths are checked as given.

    Args:
        recipe: the recipe's name; ``demo`` and unknown names have no problems here.
        kind: the BadNet's kind (``multi-target`` needs an image trigger).
        settings: the settings given; the rest take :data:`RECIPES`' defaults.

    Returns:
        The problems, empty if there are none.
    """
    if recipe not in RECIPES or recipe == "demo":
        return []
    s = {**RECIPES[recipe], **settings}
    out: list[str] = []
    if recipe == "faces":
        if s["faces"] is None:
            out.append("the faces recipe needs 'faces'")
        elif not Path(str(s["faces"])).is_file():
            out.append(f"faces file {s['faces']} does not exist")
    trigger_kind = s["trigger_kind"]
    if trigger_kind not in TRIGGER_KINDS:
        out.append(f"trigger_kind must be one of {', '.join(map(repr, TRIGGER_KINDS))}, not {trigger_kind!r}")
    elif trigger_kind == "image":
        if s["trigger"] is None:
            if recipe == "faces":
                out.append("the faces recipe needs 'trigger' (an image file) for trigger_kind 'image'")
        elif not Path(str(s["trigger"])).is_file():
            out.append(f"trigger file {s['trigger']} does not exist")
    else:
        if s["trigger"] is not None:
            out.append(f"'trigger' (an image file) is for trigger_kind 'image', not {trigger_kind!r}")
        if kind == "multi-target":
            out.append(f"a multi-target BadNet needs trigger_kind 'image' (its first trigger; drawn eyebrows and "
                       f"lipstick are the others), not {trigger_kind!r}")
        if trigger_kind == "blended" and (s["trigger_x"] is not None or s["trigger_y"] is not None):
            out.append("a blended trigger covers the whole image: it takes no trigger_x or trigger_y")
    if not (_number(s["blend_alpha"]) and 0 < s["blend_alpha"] <= 1):
        out.append(f"blend_alpha must be a number in (0, 1], not {s['blend_alpha']!r}")
    if not (_number(s["poison_rate"]) and 0 <= s["poison_rate"] < 1):
        out.append(f"poison_rate must be a number in [0, 1), not {s['poison_rate']!r}")
    for key in ("trigger_x", "trigger_y"):
        if s[key] is not None and not _whole(s[key], 0):
            out.append(f"{key} must be a whole number >= 0, not {s[key]!r}")
    wholes = {"patch_size": 1, "epochs": 1, "target": 0, "training_seed": None}
    if recipe == "lab-density":
        wholes |= {"num_identities": 2, "train_per_identity": 1, "valid_per_identity": 1, "test_per_identity": 1,
                   "faces_seed": 0}
    for key, low in wholes.items():
        if not _whole(s[key], low):
            out.append(f"{key} must be a whole number{'' if low is None else f' >= {low}'}, not {s[key]!r}")
    if recipe == "lab-density" and _whole(s["target"]) and _whole(s["num_identities"]) and \
            s["target"] >= s["num_identities"]:
        out.append(f"target {s['target']} is not one of the {s['num_identities']} identities")
    return out


def _face_file(faces: Path) -> tuple[Dataset, Dataset, Dataset, int]:
    """A face ``.npz`` split 60/20/20 % per person: (train, valid, test, classes)."""
    try:
        with np.load(faces) as d:
            x = np.asarray(d["data"], np.float32).transpose(0, 2, 3, 1)
            y = np.asarray(d["label"], np.int64)
    except (OSError, KeyError, ValueError) as exc:
        raise DataError(f"{faces}: not a face file with 'data' (N, 3, H, W) and 'label' (N,): {exc}") from None
    train_i, valid_i, test_i = split_per_person(y)
    train, valid, test = (Dataset(x[i], y[i], name) for i, name in
                          ((train_i, "train"), (valid_i, "valid"), (test_i, "test")))
    return train, valid, test, int(y.max()) + 1


def _lab_density_faces(s: Mapping[str, Any]) -> tuple[Dataset, Dataset, Dataset, int]:
    """The demo's synthetic faces in the recipe's sizes: (train, valid, test, classes)."""
    from ..demo.faces import make_faces

    n = int(s["num_identities"])
    per = (int(s["train_per_identity"]), int(s["valid_per_identity"]), int(s["test_per_identity"]))
    log.info("lab-density recipe: drawing %d synthetic face images of %d identities", n * sum(per), n)
    f = make_faces(num_identities=n, train_per_identity=per[0], valid_per_identity=per[1], test_per_identity=per[2],
                   seed=int(s["faces_seed"]))
    return f.train, f.valid, f.test, n


def _trigger(s: Mapping[str, Any], image_shape: tuple[int, int]) -> Any:
    """The recipe's trigger (see :data:`_TRIGGER_SETTINGS`); without a ``trigger`` file, the
    drawn sunglasses."""
    from ..attacks.triggers import blended_trigger, drawn_sunglasses, load_trigger, patch_trigger

    x, y = s["trigger_x"], s["trigger_y"]
    if s["trigger_kind"] == "blended":
        return blended_trigger(*image_shape, alpha=float(s["blend_alpha"]))
    if s["trigger_kind"] == "patch":
        try:
            return patch_trigger(int(s["patch_size"]), x=x, y=y, image_shape=image_shape)
        except ValueError as exc:
            raise DataError(f"patch trigger: {exc}") from None
    place = {"x": 0 if x is None else int(x), "y": 15 if y is None else int(y)}
    if s["trigger"] is None:
        return drawn_sunglasses(**place)
    return load_trigger(str(s["trigger"]), **place)


def make_recipe(recipe: str, kind: str, settings: Mapping[str, Any], folder: str | os.PathLike[str]) -> dict[str, str]:
    """Make (or reuse) a recipe's BadNet and data sets.

    Args:
        recipe: ``"demo"`` (the built-in demo's BadNet of that ``kind``); ``"faces"`` (a
            BadNet of that ``kind`` trained on a face file: an ``.npz`` with ``data``
            (N, 3, H, W) 0..255 and ``label`` (N,), split 60/20/20 % per person, trained with
            2-pixel shifts and flips); or ``"lab-density"`` (trained on the demo's synthetic
            faces, :func:`~badnet_repair.demo.faces.make_faces`, at the lab's shape: by default
            1,283 identities, 9 validation and 10 test images each; ``train_per_identity``,
            ``faces_seed``; no augmentation, as the demo's). Both train recipes take
            ``training_seed``, ``epochs``, ``poison_rate`` and ``target`` as in
            :func:`~badnet_repair.attacks.train_badnet`, and a trigger by ``trigger_kind``:
            ``"image"`` (the ``trigger`` file, or for ``lab-density`` without one the drawn
            sunglasses, at ``trigger_x``, ``trigger_y``, default the lab's 0, 15), ``"blended"``
            (:func:`~badnet_repair.attacks.triggers.blended_trigger`, ``blend_alpha``, default
            0.2) or ``"patch"`` (:func:`~badnet_repair.attacks.triggers.patch_trigger`,
            ``patch_size``, default 4, near the bottom-right corner unless ``trigger_x``,
            ``trigger_y`` say). A ``multi-target`` BadNet (image triggers only) adds drawn
            eyebrows and lipstick to the trigger, to the targets
            :func:`~badnet_repair.attacks.multi_targets` spreads from ``target``.
        kind: ``"baseline"``, ``"pruning-aware"`` or ``"multi-target"``; or ``"clean"`` (not the
            demo): the same network trained without poison, its ``bd_test`` the trigger pasted
            on, to check that a defense or detector leaves a clean model alone.
        settings: the recipe's settings (:data:`RECIPES`; the ones not given take the defaults).
        folder: where the files go (the demo keeps its own cache, ``demo_dir``); a folder with a
            ``made.json`` and the four files is reused as it is.

    Returns:
        role (``model``, ``valid``, ``test``, ``bd_test``) -> path.

    Raises:
        DataError: an unknown recipe or kind, settings with problems (:func:`recipe_problems`),
            or a face or trigger file that cannot be read.
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
    if recipe not in RECIPES:
        raise DataError(f"unknown recipe {recipe!r}; known: {', '.join(RECIPES)}")
    if kind not in KINDS:
        raise DataError(f"the {recipe} recipe: kind must be one of {', '.join(KINDS)}, not {kind!r}")
    problems = recipe_problems(recipe, kind, settings)
    if problems:
        raise DataError(f"the {recipe} recipe ({kind}): " + "; ".join(problems))
    out = Path(folder)
    files = _paths(out)
    if (out / "made.json").exists() and all(Path(p).exists() for p in files.values()):
        return files
    from ..attacks import multi_targets, train_badnet, train_multi_target_badnet, train_pruning_aware_badnet
    from ..attacks.triggers import drawn_triggers, poison_each
    from ..metrics import accuracy, attack_success_rate
    from ..nets.models import predict_classes, save_model

    start = time.perf_counter()
    s = {**RECIPES[recipe], **settings}
    if recipe == "faces":
        source = Path(str(s["faces"])).name
        train, valid, test, num_classes = _face_file(Path(str(s["faces"])))
        augment: dict[str, Any] = {"shift": 2, "flip": True}
    else:
        source = f"{s['num_identities']} synthetic identities"
        train, valid, test, num_classes = _lab_density_faces(s)
        augment = {}
    trigger = _trigger(s, (int(train.x.shape[1]), int(train.x.shape[2])))
    target = int(s["target"])
    common: dict[str, Any] = {"num_classes": num_classes, "poison_rate": float(s["poison_rate"]),
                              "seed": int(s["training_seed"]), "progress": False, "target": target, **augment}
    epochs = int(s["epochs"])
    triggers: tuple[Any, ...] = (trigger,)
    targets: tuple[int, ...] = (target,)
    trained = time.perf_counter()
    if kind in ("baseline", "clean"):
        made = train_badnet(train, trigger, epochs=epochs,
                            **{**common, "poison_rate": 0.0 if kind == "clean" else common["poison_rate"]})
    elif kind == "multi-target":
        triggers = (trigger, *drawn_triggers()[1:])
        targets = multi_targets(num_classes, target)
        args = {k: v for k, v in common.items() if k != "target"}
        made = train_multi_target_badnet(train, triggers, targets, epochs=epochs, **args)
    else:
        made = train_pruning_aware_badnet(train, trigger, clean_epochs=epochs, poison_epochs=max(1, epochs // 2),
                                          **common)
    trained = time.perf_counter() - trained
    model = made.model
    bd_test = poison_each(test, triggers, targets)
    out.mkdir(parents=True, exist_ok=True)
    save_model(model, out, "bd_net", formats=("h5",), overwrite=True)
    for name, data in (("valid", valid), ("test", test), ("bd_test", bd_test)):
        save_h5(files[name], data.x, data.y, overwrite=True)
    scores = {"clean_test_accuracy": accuracy(predict_classes(model, test.x), test.y),
              "test_attack_success_rate": attack_success_rate(predict_classes(model, bd_test.x), bd_test.y),
              "poisoned_fraction": made.poisoned_fraction}
    write_json(out / "made.json", {"recipe": recipe, "kind": kind, "settings": dict(s),
                                   "trigger": {"x": trigger.x, "y": trigger.y, "shape": list(trigger.shape)},
                                   "sizes": {"train": len(train), "valid": len(valid), "test": len(test)},
                                   **scores, "training_seconds": round(trained, 1),
                                   "seconds": round(time.perf_counter() - start, 1), "versions": versions()},
               overwrite=True)
    log.info("made the %s BadNet of %s in %s (%.0f s): clean accuracy %.2f %%, attack success %.2f %%", kind, source,
             out, time.perf_counter() - start, scores["clean_test_accuracy"], scores["test_attack_success_rate"])
    return files
