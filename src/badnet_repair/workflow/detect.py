"""GoodNets from detectors: fit the detectors on clean data, combine them, save G, and score
it (and each detector alone) on the test sets opened afterwards."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..defenses import Repair
from ..detectors import DEFAULT_DETECTORS, DEFAULT_FALSE_ALARM, REGISTRY, AnyOf, Detector, make_detector
from ..formats.data import Dataset
from ..metrics import Evaluation, auroc, evaluate_predictions
from ..nets.models import num_classes, predict_classes

__all__ = ["DetectionResult", "detect_paths", "detection_warnings", "detector_evaluations", "fit_detectors",
           "make_detectors", "run_detection", "write_detection"]

log = logging.getLogger(__name__)

@dataclass(frozen=True, eq=False)
class DetectionResult:
    """Fitted detectors and the GoodNet built from them.

    Attributes:
        model: B.
        parts: detector name -> fitted detector, in the order given.
        detector: the detector G uses: the one part, or :class:`AnyOf` the parts.
        goodnet: G as one Keras model, (N, H, W, C) -> (N, K+1), where every part has a Keras
            form; else None (G is saved as B plus the detectors' file).
        scan: the Neural Cleanse scan, where a detector ran one.
        seconds: fitting time per detector.
    """

    model: Any
    parts: dict[str, Detector]
    detector: Detector
    goodnet: Any
    scan: Any
    seconds: dict[str, float]


def make_detectors(names: Sequence[str], *, false_alarm: float = DEFAULT_FALSE_ALARM, seed: int = 0,
                   settings: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, Detector]:
    """The registered detectors ``names``, with G's false-alarm budget spent across them.

    The rule (declared before any detector was measured with it): G flags an input where any of
    its k detectors does, so their false alarms add up at most; each of the k gets ``false_alarm / k``
    %. A detector with a ``false_alarm`` setting is set to its share; one without (disagreement,
    the reversed trigger: their false alarms are where B and a repaired model disagree on clean
    inputs) keeps its share unspent. A setting given in ``settings`` wins over the rule, and
    ``seed`` goes to every detector that takes one.

    Args:
        names: registry names (:data:`~badnet_repair.detectors.REGISTRY`), in table order.
        false_alarm: G's false-alarm budget on held-out clean data, %, default
            :data:`~badnet_repair.detectors.DEFAULT_FALSE_ALARM`.
        seed: the detectors' seed, default 0.
        settings: name -> {setting: value}, over the above.

    Raises:
        ValueError: for an unknown detector or setting, or settings of a detector not named.
    """
    settings = dict(settings or {})
    unused = sorted(set(settings) - set(names))
    if unused:
        raise ValueError(f"settings given for {', '.join(unused)}, which is not among the detectors "
                         f"({', '.join(names)})")
    if not names or len(set(names)) != len(names):
        raise ValueError(f"name each detector once, at least one: {list(names)}")
    out: dict[str, Detector] = {}
    for name in names:
        cls = REGISTRY.get(name)
        if cls is None:
            raise ValueError(f"unknown detector {name!r}; known: {', '.join(REGISTRY)}")
        own = cls.settings()
        rule = {"false_alarm": false_alarm / len(names), "seed": seed}
        out[name] = make_detector(name, **{**{k: v for k, v in rule.items() if k in own}, **settings.get(name, {})})
    return out


def fit_detectors(model: Any, valid: Dataset, detectors: Sequence[str] | Mapping[str, Detector], *,
                  false_alarm: float = DEFAULT_FALSE_ALARM, seed: int = 0,
                  settings: Mapping[str, Mapping[str, Any]] | None = None, repairs: Sequence[Repair] = (),
                  progress: bool = False) -> tuple[dict[str, Detector], dict[str, float], Any]:
    """Fit the detectors on B and the clean data (nothing else is read).

    Args:
        model: B.
        valid: clean labelled data.
        detectors: registry names (made by :func:`make_detectors` with ``false_alarm``, ``seed``
            and ``settings``), or name -> detector objects, used as they are.
        false_alarm, seed, settings: see :func:`make_detectors`.
        repairs: finished repairs of B that detectors may reuse
            (:meth:`~badnet_repair.detectors.Detector.reuse`: an ``nc-unlearning`` repair's model
            and scan serve the reversed-trigger detector instead of running it again).
        progress: progress bars.

    Returns:
        (name -> fitted detector, name -> seconds, the Neural Cleanse scan or None).
    """
    parts = (dict(detectors) if isinstance(detectors, Mapping)
             else make_detectors(detectors, false_alarm=false_alarm, seed=seed, settings=settings))
    seconds: dict[str, float] = {}
    for name, det in parts.items():
        start = time.perf_counter()
        det.progress = progress
        det.reuse(repairs)
        det.fit(model, valid)
        seconds[name] = round(time.perf_counter() - start, 1)
        log.info("detector %s fitted in %.0f s", name, seconds[name])
    scans = [scan for d in parts.values() if (scan := getattr(d, "scan", None)) is not None]
    return parts, seconds, scans[0] if scans else None


def run_detection(model: Any, valid: Dataset, *, detectors: Sequence[str] | Mapping[str, Detector] = DEFAULT_DETECTORS,
                  false_alarm: float = DEFAULT_FALSE_ALARM, seed: int = 0,
                  settings: Mapping[str, Mapping[str, Any]] | None = None, progress: bool = False) -> DetectionResult:
    """Fit the detectors (:func:`fit_detectors`), combine them (an input is flagged where any
    flags it) and build G as one Keras model where every detector has a Keras form
    (:func:`~badnet_repair.detectors.goodnet.build_detector_goodnet`)."""
    from ..detectors.goodnet import build_detector_goodnet, has_keras_form

    parts, seconds, scan = fit_detectors(model, valid, detectors, false_alarm=false_alarm, seed=seed,
                                         settings=settings, progress=progress)
    detector: Detector = next(iter(parts.values())) if len(parts) == 1 else AnyOf(*parts.values())
    goodnet = build_detector_goodnet(model, detector, name="goodnet_detect") if has_keras_form(detector) else None
    return DetectionResult(model=model, parts=parts, detector=detector, goodnet=goodnet, scan=scan, seconds=seconds)


def detector_evaluations(model: Any, parts: Mapping[str, Detector], test: Dataset,
                         bd_test: Dataset) -> list[Evaluation]:
    """G's rows on the test sets for each detector alone and, with several, for all combined
    (an input flagged where any flags it): clean accuracy, attack success, detection and
    false alarms (:func:`~badnet_repair.detectors.goodnet_classes`), and each detector's AUROC
    (its scores on the poisoned against the clean test images; none for the combination)."""
    n = num_classes(model)
    clean_cls, bd_cls = predict_classes(model, test.x), predict_classes(model, bd_test.x)
    measured = {name: (d.scores_and_flags(test.x), d.scores_and_flags(bd_test.x)) for name, d in parts.items()}
    rows: list[tuple[str, np.ndarray, np.ndarray, float | None]] = [
        (name, c[1], b[1], auroc(c[0], b[0])) for name, (c, b) in measured.items()]
    if len(measured) > 1:
        rows.append((" + ".join(measured), np.any([r[1] for r in rows], axis=0),
                     np.any([r[2] for r in rows], axis=0), None))
    return [evaluate_predictions(model=f"G ({name})", kind="goodnet", clean_pred=np.where(fc, n, clean_cls),
                                 clean_labels=test.y, poisoned_pred=np.where(fb, n, bd_cls),
                                 poisoned_labels=bd_test.y, alarm_class=n, clean_set=test.name,
                                 poisoned_set=bd_test.name, auroc=area)
            for name, fc, fb, area in rows]


def detection_warnings(parts: Mapping[str, Detector], rows: Sequence[Evaluation]) -> list[str]:
    """The loud lines of a GoodNet from detectors: each detector whose threshold rests on too few
    clean images (its ``calibration_warning``), and each G (a detector alone, or all combined)
    that flags clean test images far beyond its false-alarm budget: more than twice the budget
    and 2 points over it. The combination's budget is the sum of its detectors' rates, a detector
    without one (the reversed trigger) counted at their mean, as :func:`make_detectors` splits it.

    Args:
        parts: the fitted detectors, by name.
        rows: their rows on the test sets (:func:`detector_evaluations`).

    Returns:
        The lines, detectors' first. The G lines are logged as warnings here; the detectors
        logged theirs when fitted.
    """
    lines = [d.calibration_warning for d in parts.values() if d.calibration_warning]
    budgets = {f"G ({name})": float(fa) for name, d in parts.items()
               if isinstance(fa := getattr(d, "false_alarm", None), (int, float))}
    if len(parts) > 1 and budgets:  # a detector without a rate (the reversed trigger) had an equal share
        budgets[f"G ({' + '.join(parts)})"] = sum(budgets.values()) * len(parts) / len(budgets)
    for e in rows:
        budget, measured = budgets.get(e.model), e.false_alarm_rate
        if budget is not None and measured is not None and measured > max(2.0 * budget, budget + 2.0):
            line = (f"{e.model} flags {measured:.2f} % of the clean test images, far beyond its false-alarm "
                    f"budget of {budget:.2f} %: its outputs on clean inputs are not to be trusted")
            log.warning(line)
            lines.append(line)
    return lines


def detect_paths(out_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """The files :func:`write_detection` may write: ``json``, ``md``, ``goodnet`` (G as one Keras
    model, or of the detectors with a Keras form), and, for detectors without one, ``goodnet_model``
    and ``goodnet_detectors`` (:func:`~badnet_repair.detectors.goodnet.save_split_goodnet`)."""
    from ..detectors.goodnet import split_goodnet_paths

    d = Path(out_dir)
    split = split_goodnet_paths(d, "goodnet_detect")
    return {"json": d / "detect.json", "md": d / "detect.md", "goodnet": split["keras"],
            "goodnet_model": split["model"], "goodnet_detectors": split["detectors"]}


def write_detection(result: DetectionResult, test: Dataset, bd_test: Dataset, out_dir: str | os.PathLike[str], *,
                    title: str = "BadNet", overwrite: bool = False) -> dict[str, Path]:
    """Score G and each detector on the test sets; write ``detect.json``, ``detect.md``, G as
    ``goodnet_detect.keras`` and, where Neural Cleanse ran, its scan
    (:func:`~badnet_repair.reporting.cleanse.write_cleanse`).

    Returns:
        The paths written, by name.
    """
    from ..detectors.goodnet import save_split_goodnet
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
    warnings = detection_warnings(result.parts, rows)
    md += [f"\n**Warning: {line}.**" for line in warnings]
    if flagged is not None:
        md += ["", f"Neural Cleanse flagged: {', '.join(map(str, flagged)) or 'nothing'}."]
    if result.goodnet is None:
        md += ["", "Some detectors have no Keras form: G is saved as B (`goodnet_detect_model.keras`), G of the "
               "others (`goodnet_detect.keras`, where there are some) and the rest's fitted state "
               "(`goodnet_detect.detectors.npz`); `badnet_repair.detectors.goodnet.load_split_goodnet` reads them."]
    summary = {"badnet": title, "detectors": list(result.parts), "seconds": result.seconds,
               "settings": {name: d.get_params() for name, d in result.parts.items()},
               "neural_cleanse_flagged": flagged, "warnings": warnings, "rows": [e.as_dict() for e in rows]}
    if result.goodnet is not None:
        save_model(result.goodnet, out_dir, "goodnet_detect", formats=("keras",), overwrite=overwrite)
        written = {"goodnet": paths["goodnet"]}
    else:
        split = save_split_goodnet(result.model, result.detector, out_dir, "goodnet_detect", overwrite=overwrite)
        written = {{"keras": "goodnet", "model": "goodnet_model", "detectors": "goodnet_detectors"}[k]: v
                   for k, v in split.items()}
    write_results({paths["json"]: summary, paths["md"]: "\n".join(md) + "\n"}, overwrite=overwrite)
    out = {"json": paths["json"], "md": paths["md"], **written}
    if result.scan is not None:
        scan_paths = write_cleanse(result.scan, out_dir, test.x[0], title=f"Neural Cleanse of {title}",
                                   overwrite=overwrite)
        out.update({f"cleanse_{k}": v for k, v in scan_paths.items()})
    return out
