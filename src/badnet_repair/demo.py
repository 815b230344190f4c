"""The embedded demo: synthetic faces and two BadNets, made offline in the lab's formats.

``make_demo`` writes, into a cache folder (``.demo/`` by default, ignored by git):

    model/bd_net.h5, model/bd_weights.h5   the baseline BadNet (Gu et al. 2017)
    model/pa_net.h5, model/pa_weights.h5   the pruning-aware BadNet (Liu et al. 2018)
    data/cl/train.h5, valid.h5, test.h5    clean synthetic faces
    data/bd/bd_valid.h5, bd_test.h5        poisoned: non-target images + trigger, label = target
    trigger.png                            the drawn sunglasses trigger
    demo.json                              parameters, versions and the BadNets' accuracy

``demo.json`` is written last, so a demo without it is incomplete and is made again.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .data import Dataset, save_h5
from .errors import BadNetRepairError
from .io import write_json

__all__ = ["DemoConfig", "DemoPaths", "demo_paths", "load_demo_manifest", "make_demo"]

log = logging.getLogger(__name__)

DEFAULT_DIR = ".demo"


@dataclass(frozen=True)
class DemoConfig:
    """What the demo is made of. The defaults are the shipped demo; tests use small ones."""

    num_identities: int = 100
    train_per_identity: int = 80
    valid_per_identity: int = 10
    test_per_identity: int = 10
    target: int = 0
    poison_rate: float = 0.05
    epochs: int = 10
    clean_epochs: int = 10
    poison_epochs: int = 8
    prune_drop: float = 4.0
    batch_size: int = 64
    learning_rate: float = 1e-3
    seed: int = 0


@dataclass(frozen=True)
class DemoPaths:
    """Where the demo's files are."""

    root: Path

    @property
    def model(self) -> Path:
        return self.root / "model" / "bd_net.h5"

    @property
    def pruning_aware_model(self) -> Path:
        return self.root / "model" / "pa_net.h5"

    @property
    def train(self) -> Path:
        return self.root / "data" / "cl" / "train.h5"

    @property
    def valid(self) -> Path:
        return self.root / "data" / "cl" / "valid.h5"

    @property
    def test(self) -> Path:
        return self.root / "data" / "cl" / "test.h5"

    @property
    def bd_valid(self) -> Path:
        return self.root / "data" / "bd" / "bd_valid.h5"

    @property
    def bd_test(self) -> Path:
        return self.root / "data" / "bd" / "bd_test.h5"

    @property
    def trigger(self) -> Path:
        return self.root / "trigger.png"

    @property
    def manifest(self) -> Path:
        return self.root / "demo.json"


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
    from .metrics import accuracy, attack_success_rate
    from .models import predict_classes

    return {"clean_test_accuracy": accuracy(predict_classes(model, clean.x), clean.y),
            "test_attack_success_rate": attack_success_rate(predict_classes(model, bd.x), bd.y)}


def make_demo(
    root: str | os.PathLike[str] = DEFAULT_DIR,
    *,
    config: DemoConfig | None = None,
    regenerate: bool = False,
    progress: bool = True,
) -> DemoPaths:
    """Make the demo (once): synthetic faces, the drawn trigger, and both BadNets.

    A complete demo is reused when no ``config`` is given or it was made with the same
    one; ``regenerate`` makes it anew.

    Args:
        root: the cache folder, default ``.demo``.
        config: sizes, seeds and training settings; default :class:`DemoConfig`'s for a new
            demo, and any existing complete demo is reused.
        regenerate: make it again even if a complete one exists.
        progress: show progress bars.

    Returns:
        DemoPaths of the files written.
    """
    from .attacks import train_badnet, train_pruning_aware_badnet
    from .defense import versions
    from .faces import make_faces
    from .models import save_model
    from .triggers import drawn_sunglasses, poison

    cfg = config or DemoConfig()
    paths = demo_paths(root)
    manifest = load_demo_manifest(root)
    if manifest is not None and not regenerate:
        if config is None or manifest.get("config") == asdict(cfg):
            log.info("reusing the demo in %s", paths.root)
            return paths
        raise BadNetRepairError(
            f"{paths.root} holds a demo made with other settings; pass --regenerate "
            "(regenerate=True) to replace it"
        )
    if paths.root.exists():
        for sub in ("model", "data"):
            shutil.rmtree(paths.root / sub, ignore_errors=True)
        for f in (paths.manifest, paths.trigger):
            f.unlink(missing_ok=True)
    start = time.perf_counter()
    faces = make_faces(num_identities=cfg.num_identities, train_per_identity=cfg.train_per_identity,
                       valid_per_identity=cfg.valid_per_identity, test_per_identity=cfg.test_per_identity,
                       seed=cfg.seed)
    trigger = drawn_sunglasses()
    # The lab's valid.h5 is float64; the demo keeps that for the clean sets.
    save_h5(paths.train, faces.train.x, faces.train.y)
    save_h5(paths.valid, faces.valid.x, faces.valid.y, dtype="float64")
    save_h5(paths.test, faces.test.x, faces.test.y, dtype="float64")
    bd_valid = poison(faces.valid, trigger, target=cfg.target)
    bd_test = poison(faces.test, trigger, target=cfg.target)
    save_h5(paths.bd_valid, bd_valid.x, bd_valid.y)
    save_h5(paths.bd_test, bd_test.x, bd_test.y)
    _save_trigger_png(trigger.rgba, paths.trigger)
    t_data = time.perf_counter() - start

    common: dict[str, Any] = dict(num_classes=cfg.num_identities, target=cfg.target, poison_rate=cfg.poison_rate,
                  batch_size=cfg.batch_size, learning_rate=cfg.learning_rate, seed=cfg.seed, progress=progress)
    base = train_badnet(faces.train, trigger, epochs=cfg.epochs, **common)
    save_model(base.model, paths.root / "model", "bd_net", formats=("h5",))
    save_model(base.model, paths.root / "model", "bd", formats=("weights",))
    t_base = time.perf_counter() - start - t_data
    aware = train_pruning_aware_badnet(faces.train, trigger, clean_epochs=cfg.clean_epochs,
                                       poison_epochs=cfg.poison_epochs, prune_drop=cfg.prune_drop, **common)
    save_model(aware.model, paths.root / "model", "pa_net", formats=("h5",))
    save_model(aware.model, paths.root / "model", "pa", formats=("weights",))
    t_aware = time.perf_counter() - start - t_data - t_base
    write_json(paths.manifest, {
        "config": asdict(cfg),
        "versions": versions(),
        "trigger": {"x": trigger.x, "y": trigger.y, "shape": list(trigger.shape)},
        "baseline": {**_evaluate(base.model, faces.test, bd_test),
                     "poisoned_fraction": base.poisoned_fraction},
        "pruning_aware": {**_evaluate(aware.model, faces.test, bd_test),
                          "poisoned_fraction": aware.poisoned_fraction,
                          "reinstated_channels": list(aware.pruned_channels)},
        "seconds": {"data": round(t_data, 1), "baseline": round(t_base, 1), "pruning_aware": round(t_aware, 1)},
    }, overwrite=True)
    log.info("demo made in %s in %.0f s", paths.root, time.perf_counter() - start)
    return paths


def _save_trigger_png(rgba: np.ndarray, path: Path) -> None:
    from PIL import Image

    from .io import atomic_path

    out = np.concatenate([rgba[..., :3], rgba[..., 3:] * 255.0], axis=-1)
    with atomic_path(path, overwrite=True) as tmp:
        Image.fromarray(np.clip(np.round(out), 0, 255).astype(np.uint8), "RGBA").save(tmp, format="PNG")
