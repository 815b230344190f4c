"""GoodNets from detectors: fit the detectors on clean data, combine them, save G, and score
it (and each detector alone) on the test sets opened afterwards."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..defenses import Repair
from ..detectors import AnyOf, Detector, Disagreement, ReversedTriggerDetector, Strip
from ..formats.data import Dataset
from ..metrics import Evaluation, evaluate_predictions
from ..nets.models import num_classes, predict_classes

__all__ = ["DETECTORS", "DetectionResult", "detect_paths", "detector_evaluations", "fit_detectors",
           "run_detection", "write_detection"]

log = logging.getLogger(__name__)

#: The detectors a GoodNet can be built from by name, in table order.
DETECTORS = ("disagreement", "strip", "reversed-trigger")


@dataclass(frozen=True, eq=False)
class DetectionResult:
    """Fitted detectors and the GoodNet built from them.

    Attributes:
        model: B.
        parts: detector name -> fitted detector, in the order given.
        detector: the detector G uses: the one part, or :class:`AnyOf` the parts.
        goodnet: G as one Keras model, (N, H, W, C) -> (N, K+1).
        scan: the Neural Cleanse scan, where the reversed-trigger detector ran.
        seconds: fitting time per detector.
    """

    model: Any
    parts: dict[str, Detector]
    detector: Detector
    goodnet: Any
    scan: Any
    seconds: dict[str, float]


def fit_detectors(model: Any, valid: Dataset, names: Sequence[str], *, false_alarm: float = 2.5,
                  accuracy_drop: float = 4.0, seed: int = 0, repairs: Sequence[Repair] = (),
                  progress: bool = False) -> tuple[dict[str, Detector], dict[str, float], Any]:
    """Fit the named detectors on B and the clean data (nothing else is read).

    Args:
        model: B.
        valid: clean labelled data.
        names: from :data:`DETECTORS`.
        false_alarm: STRIP's false-alarm rate on held-out clean data, %, default 2.5.
        accuracy_drop: the disagreement rule's B' is B pruned until accuracy on ``valid`` falls
            this many points, default 4.
        seed: seeds of STRIP and of Neural Cleanse unlearning, default 0.
        repairs: finished repairs of B to reuse: an ``nc-unlearning`` repair's model and scan
            serve the reversed-trigger detector instead of running it again.
        progress: progress bars.

    Returns:
        (name -> fitted detector, name -> seconds, the Neural Cleanse scan or None).
    """
    unknown = [n for n in names if n not in DETECTORS]
    if unknown or not names:
        raise ValueError(f"detectors must be among {', '.join(DETECTORS)}, not {unknown or 'none'}")
    parts: dict[str, Detector] = {}
    seconds: dict[str, float] = {}
    scan = None
    for name in names:
        start = time.perf_counter()
        if name == "strip":
            parts[name] = Strip(false_alarm=false_alarm, seed=seed).fit(model, valid)
        elif name == "disagreement":
            from ..defenses.sweep import prune_sweep
            from ..nets.models import prune_channels

            sweep = prune_sweep(model, valid, thresholds=[accuracy_drop], progress=progress)
            pruned = prune_channels(model, sweep.layer, sweep.channels_at(accuracy_drop))
            parts[name] = Disagreement(pruned).fit(model, valid)
        else:
            unlearned = next((r for r in repairs if r.defense == "nc-unlearning"), None)
            if unlearned is None:
                from ..defenses import NeuralCleanseUnlearning

                unlearned = NeuralCleanseUnlearning(seed=seed).repair(model, valid, progress=progress)
            scan = unlearned.artifacts["scan"]
            parts[name] = ReversedTriggerDetector(unlearned.model, scan).fit(model, valid)
        seconds[name] = round(time.perf_counter() - start, 1)
        log.info("detector %s fitted in %.0f s", name, seconds[name])
    return parts, seconds, scan


def run_detection(model: Any, valid: Dataset, *, detectors: Sequence[str] = ("strip", "reversed-trigger"),
                  false_alarm: float = 2.5, accuracy_drop: float = 4.0, seed: int = 0,
                  progress: bool = False) -> DetectionResult:
    """Fit the detectors (:func:`fit_detectors`), combine them and build G
    (:func:`~badnet_repair.detectors.goodnet.build_detector_goodnet`)."""
    from ..detectors.goodnet import build_detector_goodnet

    parts, seconds, scan = fit_detectors(model, valid, detectors, false_alarm=false_alarm,
                                         accuracy_drop=accuracy_drop, seed=seed, progress=progress)
    detector: Detector = next(iter(parts.values())) if len(parts) == 1 else AnyOf(*parts.values())
    goodnet = build_detector_goodnet(model, detector, name="goodnet_detect")
    return DetectionResult(model=model, parts=parts, detector=detector, goodnet=goodnet, scan=scan, seconds=seconds)


def detector_evaluations(model: Any, parts: dict[str, Detector], test: Dataset, bd_test: Dataset) -> list[Evaluation]:
    """G's rows on the test sets for each detector alone and, with several, for all combined
    (an input flagged where any flags it): clean accuracy, attack success, detection and
    false alarms (:func:`~badnet_repair.detectors.goodnet_classes`)."""
    n = num_classes(model)
    clean_cls, bd_cls = predict_classes(model, test.x), predict_classes(model, bd_test.x)
    flags = {name: (d.flags(test.x), d.flags(bd_test.x)) for name, d in parts.items()}
    rows = list(flags.items())
    if len(flags) > 1:
        rows.append((" + ".join(flags), (np.any([f[0] for f in flags.values()], axis=0),
                                         np.any([f[1] for f in flags.values()], axis=0))))
    return [evaluate_predictions(model=f"G ({name})", kind="goodnet", clean_pred=np.where(fc, n, clean_cls),
                                 clean_labels=test.y, poisoned_pred=np.where(fb, n, bd_cls),
                                 poisoned_labels=bd_test.y, alarm_class=n, clean_set=test.name,
                                 poisoned_set=bd_test.name)
            for name, (fc, fb) in rows]


def detect_paths(out_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """The files :func:`write_detection` writes: ``json``, ``md`` and ``goodnet``."""
    d = Path(out_dir)
    return {"json": d / "detect.json", "md": d / "detect.md", "goodnet": d / "goodnet_detect.keras"}


def write_detection(result: DetectionResult, test: Dataset, bd_test: Dataset, out_dir: str | os.PathLike[str], *,
                    title: str = "BadNet", overwrite: bool = False) -> dict[str, Path]:
    """Score G and each detector on the test sets; write ``detect.json``, ``detect.md``, G as
    ``goodnet_detect.keras`` and, where Neural Cleanse ran, its scan
    (:func:`~badnet_repair.reporting.cleanse.write_cleanse`).

    Returns:
        The paths written, by name.
    """
    from ..formats.files import check_writable, write_results
    from ..nets.models import save_model
    from ..reporting.cleanse import write_cleanse
    from ..reporting.report import evaluation_table

    paths = detect_paths(out_dir)
    check_writable(paths.values(), overwrite=overwrite)
    rows = detector_evaluations(result.model, result.parts, test, bd_test)
    flagged = list(result.scan.flagged) if result.scan is not None else None
    md = [f"# Detectors on {title}", "",
          "Every detector was fitted on the clean validation data only; the rows are G (B's class, or the "
          "alarm class N where the detector flags the input) on the test sets.", "",
          evaluation_table([e.as_dict() for e in rows])]
    if flagged is not None:
        md += ["", f"Neural Cleanse flagged: {', '.join(map(str, flagged)) or 'nothing'}."]
    summary = {"badnet": title, "detectors": list(result.parts), "seconds": result.seconds,
               "neural_cleanse_flagged": flagged, "rows": [e.as_dict() for e in rows]}
    save_model(result.goodnet, out_dir, "goodnet_detect", formats=("keras",), overwrite=overwrite)
    write_results({paths["json"]: summary, paths["md"]: "\n".join(md) + "\n"}, overwrite=overwrite)
    out = dict(paths)
    if result.scan is not None:
        scan_paths = write_cleanse(result.scan, out_dir, test.x[0], title=f"Neural Cleanse of {title}",
                                   overwrite=overwrite)
        out.update({f"cleanse_{k}": v for k, v in scan_paths.items()})
    return out
