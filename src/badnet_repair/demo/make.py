"""The embedded demo: synthetic faces and two BadNets, made offline in the lab's formats.

``make_demo`` writes, into a cache folder (``.demo/`` by default, ignored by git):

    model/bd_net.h5, model/bd_weights.h5   the baseline BadNet (Gu et al. 2017)
    model/pa_net.h5, model/pa_weights.h5   the pruning-aware BadNet (Liu et al. 2018)
    model/mt_net.h5, model/mt_weights.h5   the multi-trigger, multi-target BadNet
    data/cl/train.h5, valid.h5, test.h5    clean synthetic faces
    data/bd/bd_valid.h5, bd_test.h5        poisoned: non-target images + trigger, label = target
    data/bd/bd_mt_valid.h5, bd_mt_test.h5  the multi-target BadNet's: each trigger, its own target
    trigger.png                            the drawn sunglasses trigger
    demo.json                              parameters, versions and the BadNets' accuracy

The faces and the trigger come first; each BadNet is made the first time it is asked for
(``make_demo(badnets=...)``), so a command that needs only the baseline BadNet does not wait
for the pruning-aware one. ``demo.json`` is written once the data is complete and gains a
BadNet's entry once that BadNet's files are saved: a demo without ``demo.json`` is made
again, and a BadNet without its entry is trained again.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Collection, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BadNetRepairError
from ..formats.data import Dataset, save_h5
from ..formats.files import folder_lock, write_json

__all__ = ["DEMO_BADNETS", "DemoConfig", "DemoPaths", "demo_paths", "load_demo_manifest", "make_demo"]

log = logging.getLogger(__name__)

DEFAULT_DIR = ".demo"
DEMO_BADNETS = ("baseline", "pruning-aware", "multi-target")
# Seconds per training image per epoch on 2 CPU cores (measured for docs/benchmarks.md);
# only for telling the user how long a BadNet will take.
_SECONDS_PER_IMAGE_EPOCH = 5.5e-4


@dataclass(frozen=True)
class DemoConfig:
    """What the demo is made of. The defaults are the shipped demo; tests use small ones.

    The epochs were chosen as an attacker would, on the demo's validation sets
    (docs/benchmarks.md).
    """

    num_identities: int = 100
    train_per_identity: int = 80
    valid_per_identity: int = 10
    test_per_identity: int = 10
    target: int = 0
    poison_rate: float = 0.05
    epochs: int = 6
    clean_epochs: int = 6
    poison_epochs: int = 5
    prune_drop: float = 4.0
    batch_size: int = 64
    learning_rate: float = 1e-3
    seed: int = 0


def _file(*parts: str) -> Any:
    """A DemoPaths attribute: ``root`` joined with ``parts``."""
    return property(lambda self: self.root.joinpath(*parts))


@dataclass(frozen=True)
class DemoPaths:
    """Where the demo's files are: attributes are paths under ``root``."""

    root: Path

    model = _file("model", "bd_net.h5")
    pruning_aware_model = _file("model", "pa_net.h5")
    multi_target_model = _file("model", "mt_net.h5")
    train = _file("data", "cl", "train.h5")
    valid = _file("data", "cl", "valid.h5")
    test = _file("data", "cl", "test.h5")
    bd_valid = _file("data", "bd", "bd_valid.h5")
    bd_test = _file("data", "bd", "bd_test.h5")
    bd_mt_valid = _file("data", "bd", "bd_mt_valid.h5")
    bd_mt_test = _file("data", "bd", "bd_mt_test.h5")
    trigger = _file("trigger.png")
    manifest = _file("demo.json")


def demo_paths(root: str | os.PathLike[str] = DEFAULT_DIR) -> DemoPaths:
    """The demo's file layout under ``root``."""
    return DemoPaths(Path(root))


def load_demo_manifest(root: str | os.PathLike[str] = DEFAULT_DIR) -> dict[str, Any] | None:
    """The demo's ``demo.json``, or None where no complete demo is."""
    p = demo_paths(root).manifest
    if not p.exists():
        return None
    try:
        return dict(json.loads(p.read_text()))
    except ValueError:
        return None


def _evaluate(model: Any, clean: Dataset, bd: Dataset) -> dict[str, float]:
    from ..metrics import accuracy, attack_success_rate
    from ..nets.models import predict_classes

    return {"clean_test_accuracy": accuracy(predict_classes(model, clean.x), clean.y),
            "test_attack_success_rate": attack_success_rate(predict_classes(model, bd.x), bd.y)}


def _manifest_key(badnet: str) -> str:
    return badnet.replace("-", "_")


def _check_badnets(badnets: Collection[str]) -> tuple[str, ...]:
    if isinstance(badnets, str):
        badnets = (badnets,)
    unknown = sorted(set(badnets) - set(DEMO_BADNETS))
    if unknown:
        raise ValueError(f"demo BadNets must be among {DEMO_BADNETS}, not {unknown}")
    return tuple(b for b in DEMO_BADNETS if b in badnets)


def _config_of(manifest: dict[str, Any], root: Path) -> DemoConfig:
    """The DemoConfig a demo was made with (to train its missing BadNets the same way)."""
    try:
        return DemoConfig(**manifest["config"])
    except (KeyError, TypeError):
        raise BadNetRepairError(
            f"{root} holds a demo made by another version of badnet-repair; pass --regenerate "
            "(regenerate=True) to make it anew"
        ) from None


def make_demo(
    root: str | os.PathLike[str] = DEFAULT_DIR,
    *,
    config: DemoConfig | None = None,
    regenerate: bool = False,
    progress: bool = True,
    badnets: Collection[str] = DEMO_BADNETS,
) -> DemoPaths:
    """Make the demo's data and the BadNets asked for, each once.

    A demo's files are reused when no ``config`` is given or it was made with the same one;
    a BadNet not made yet is trained with the demo's own settings. ``regenerate`` makes
    everything asked for anew.

    Args:
        root: the cache folder, default ``.demo``.
        config: sizes, seeds and training settings; default :class:`DemoConfig`'s for a new
            demo, and any existing demo's own otherwise.
        regenerate: make it again even if it exists.
        progress: show progress bars.
        badnets: which BadNets to have, from ``("baseline", "pruning-aware", "multi-target")``
            (default all three).

    Returns:
        DemoPaths of the demo's files.
    """
    wanted = _check_badnets(badnets)
    paths = demo_paths(root)
    # one maker at a time: a benchmark's workers may ask for two BadNets of one demo at once
    with folder_lock(paths.root):
        return _make_locked(paths, config, regenerate, progress, wanted)


def _make_locked(paths: DemoPaths, config: DemoConfig | None, regenerate: bool, progress: bool,
                 wanted: Sequence[str]) -> DemoPaths:
    manifest = None if regenerate else load_demo_manifest(paths.root)
    if manifest is not None:
        if config is not None and manifest.get("config") != asdict(config):
            raise BadNetRepairError(
                f"{paths.root} holds a demo made with other settings; pass --regenerate "
                "(regenerate=True) to replace it"
            )
        missing = [b for b in wanted if _manifest_key(b) not in manifest]
        if not missing:
            log.info("reusing the demo in %s", paths.root)
            return paths
        cfg = _config_of(manifest, paths.root)
    else:
        cfg = config or DemoConfig()
        manifest = _make_data(paths, cfg)
        missing = list(wanted)
    for badnet in missing:
        manifest = _make_badnet(paths, cfg, manifest, badnet, progress)
    return paths


def _make_data(paths: DemoPaths, cfg: DemoConfig) -> dict[str, Any]:
    """Write the faces, the poisoned sets and the trigger; return the new manifest."""
    from ..attacks.triggers import drawn_sunglasses, poison
    from ..formats.files import versions
    from .faces import make_faces

    if paths.root.exists():
        for sub in ("model", "data"):
            shutil.rmtree(paths.root / sub, ignore_errors=True)
        for f in (paths.manifest, paths.trigger):
            f.unlink(missing_ok=True)
    start = time.perf_counter()
    n = cfg.num_identities * (cfg.train_per_identity + cfg.valid_per_identity + cfg.test_per_identity)
    log.info("making the demo in %s: %d synthetic face images of %d people", paths.root, n, cfg.num_identities)
    faces = make_faces(num_identities=cfg.num_identities, train_per_identity=cfg.train_per_identity,
                       valid_per_identity=cfg.valid_per_identity, test_per_identity=cfg.test_per_identity,
                       seed=cfg.seed)
    trigger = drawn_sunglasses()
    # The lab's valid.h5 is float64; the demo keeps that for the clean sets.
    save_h5(paths.train, faces.train.x, faces.train.y)
    save_h5(paths.valid, faces.valid.x, faces.valid.y, dtype="float64")
    save_h5(paths.test, faces.test.x, faces.test.y, dtype="float64")
    save_h5(paths.bd_valid, *_arrays(poison(faces.valid, trigger, target=cfg.target)))
    save_h5(paths.bd_test, *_arrays(poison(faces.test, trigger, target=cfg.target)))
    _save_trigger_png(trigger.rgba, paths.trigger)
    manifest: dict[str, Any] = {
        "config": asdict(cfg),
        "versions": versions(),
        "trigger": {"x": trigger.x, "y": trigger.y, "shape": list(trigger.shape)},
        "seconds": {"data": round(time.perf_counter() - start, 1)},
    }
    write_json(paths.manifest, manifest, overwrite=True)
    return manifest


def _arrays(ds: Dataset) -> tuple[np.ndarray, np.ndarray]:
    return ds.x, ds.y


def _make_badnet(paths: DemoPaths, cfg: DemoConfig, manifest: dict[str, Any], badnet: str,
                 progress: bool) -> dict[str, Any]:
    """Train one demo BadNet, save its files, and record it in the manifest (returned)."""
    from ..attacks.badnets import train_badnet, train_pruning_aware_badnet
    from ..attacks.triggers import drawn_sunglasses
    from ..formats.data import load_h5
    from ..nets.models import save_model

    train = load_h5(paths.train, name="train")
    trigger = drawn_sunglasses()  # the PNG's alpha is rounded to 8 bits; train with the exact one
    epochs = cfg.epochs if badnet == "baseline" else cfg.clean_epochs + cfg.poison_epochs
    estimate = _SECONDS_PER_IMAGE_EPOCH * len(train) / (1.0 - cfg.poison_rate) * epochs
    log.info("training the demo's %s BadNet: %d epochs on %d images (about %s on 2 CPU cores; once)",
             badnet, epochs, len(train), _duration(estimate))
    start = time.perf_counter()
    common: dict[str, Any] = dict(num_classes=cfg.num_identities, target=cfg.target, poison_rate=cfg.poison_rate,
                                  batch_size=cfg.batch_size, learning_rate=cfg.learning_rate, seed=cfg.seed,
                                  progress=progress)
    if badnet == "baseline":
        made = train_badnet(train, trigger, epochs=cfg.epochs, **common)
        stem, extra = "bd", dict[str, Any]()
    elif badnet == "multi-target":
        made, extra = _make_multi_target(paths, cfg, train, common)
        stem = "mt"
    else:
        made = train_pruning_aware_badnet(train, trigger, clean_epochs=cfg.clean_epochs,
                                          poison_epochs=cfg.poison_epochs, prune_drop=cfg.prune_drop, **common)
        stem, extra = "pa", {"reinstated_channels": list(made.pruned_channels)}
    save_model(made.model, paths.root / "model", f"{stem}_net", formats=("h5",), overwrite=True)
    save_model(made.model, paths.root / "model", stem, formats=("weights",), overwrite=True)
    seconds = time.perf_counter() - start
    test = load_h5(paths.test, name="test")
    bd_test = load_h5(paths.bd_mt_test if badnet == "multi-target" else paths.bd_test, name="bd_test")
    manifest = {**manifest, _manifest_key(badnet): {**_evaluate(made.model, test, bd_test),
                                                    "poisoned_fraction": made.poisoned_fraction, **extra},
                "seconds": {**manifest["seconds"], _manifest_key(badnet): round(seconds, 1)}}
    write_json(paths.manifest, manifest, overwrite=True)
    log.info("demo %s BadNet made in %.0f s", badnet, seconds)
    return manifest


def _make_multi_target(paths: DemoPaths, cfg: DemoConfig, train: Dataset,
                       common: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """Train the multi-target BadNet (three drawn triggers, each to its own target) and write
    its poisoned sets."""
    from ..attacks import multi_targets
    from ..attacks.badnets import train_multi_target_badnet
    from ..attacks.triggers import drawn_triggers, poison_each
    from ..formats.data import load_h5

    triggers, targets = drawn_triggers(), multi_targets(cfg.num_identities, cfg.target)
    for clean, out in ((paths.valid, paths.bd_mt_valid), (paths.test, paths.bd_mt_test)):
        save_h5(out, *_arrays(poison_each(load_h5(clean), triggers, targets)), overwrite=True)
    args = {k: v for k, v in common.items() if k != "target"}
    made = train_multi_target_badnet(train, triggers, targets, epochs=cfg.epochs, **args)
    return made, {"targets": list(targets)}


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} minutes"


def _save_trigger_png(rgba: np.ndarray, path: Path) -> None:
    from PIL import Image

    from ..formats.files import atomic_path

    out = np.concatenate([rgba[..., :3], rgba[..., 3:] * 255.0], axis=-1)
    with atomic_path(path, overwrite=True) as tmp:
        Image.fromarray(np.clip(np.round(out), 0, 255).astype(np.uint8), "RGBA").save(tmp, format="PNG")
