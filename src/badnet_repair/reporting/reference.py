"""The lab's known figures, and how a run compares with them.

Several independent solutions of the CSAW-HackML / NYU lab, run on the lab's real files
(``model/bd_net.h5``, ``data/cl/valid.h5`` with 11,547 and ``data/cl/test.h5`` with 12,830 images,
channels of ``conv_3`` ranked by ascending mean ``pool_3`` activation on ``valid.h5``), report
the same numbers. A student can only tell whether a run is right by comparing with them, so the
notebook and the report show them beside the run's own and say where the two differ.

A run is compared only where it is on the lab's files: B is recognised by its weights'
fingerprint (:func:`weights_fingerprint`, independent of layer names and file format), and the
data by the clean sets' sizes. Elsewhere (the demo, other BadNets) the table is shown for
orientation only.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

__all__ = ["LAB", "LabReference", "ReferenceCheck", "check_against_reference", "reference_table",
           "weights_fingerprint"]


@dataclass(frozen=True)
class LabReference:
    """The published results of the pruning defense on the lab's real files.

    Attributes:
        badnet_fingerprint: :func:`weights_fingerprint` of the lab's B (``bd_net.h5`` /
            ``bd_weights.h5``).
        valid_images, test_images: the clean validation and test files' sizes.
        layer, channels: the pruned layer and its channel count.
        dormant_channels: channels whose mean activation on ``valid.h5`` is exactly zero.
        valid_accuracy: B's clean validation accuracy, %.
        figures: model (``B``, ``B'_2``, ``G_2``, ...) -> (clean test accuracy %, attack success %
            on ``bd_test.h5``, channels pruned or None).
        tolerance: the largest difference, in points, that still matches (the figures are
            published to two decimals).
    """

    badnet_fingerprint: str
    valid_images: int
    test_images: int
    layer: str
    channels: int
    dormant_channels: int
    valid_accuracy: float
    figures: Mapping[str, tuple[float, float, int | None]]
    tolerance: float = 0.01


#: The lab's figures, as the issue tracker and ``../shared/README.md`` record them.
LAB = LabReference(
    badnet_fingerprint="30b18b7753c97a52a244657e4018007abcf3dc730777176bed2cd777953f28e8",
    valid_images=11547,
    test_images=12830,
    layer="conv_3",
    channels=60,
    dormant_channels=33,
    valid_accuracy=98.65,
    figures={
        "B": (98.62, 100.0, 0),
        "B'_2": (95.90, 100.0, 45),
        "B'_4": (92.29, 99.98, 48),
        "B'_10": (84.54, 77.21, 52),
        "G_2": (95.74, 100.0, 45),
        "G_4": (92.13, 99.98, 48),
        "G_10": (84.33, 77.21, 52),
    },
)


def weights_fingerprint(model: Any) -> str:
    """SHA-256 of a model's weights, independent of layer names, weight order and file format.

    The sorted digests of every weight array (as little-endian float32) are hashed together, so
    the lab's ``bd_net.h5``, ``bd_weights.h5`` loaded into DeepID, and a Keras 3 copy of either
    give the same fingerprint, and any changed weight gives another.
    """
    digests = sorted(hashlib.sha256(np.ascontiguousarray(w, dtype="<f4").tobytes()).hexdigest()
                     for w in model.get_weights())
    return hashlib.sha256("".join(digests).encode()).hexdigest()


@dataclass(frozen=True)
class ReferenceCheck:
    """A run beside the lab's known figures.

    Attributes:
        applies: True where the run is on the lab's B and clean files of the lab's sizes, so its
            numbers should equal the reference's (the files' contents are not known here: other
            data of the same sizes shows up as differing figures, B's validation accuracy first).
        lab_badnet: whether B is the lab's (by :func:`weights_fingerprint`).
        rows: one per reference figure: ``{"what", "reference", "run", "difference", "matches"}``
            (``run`` None where the run has no such number).
        differs: the rows that do not match, described in a phrase each (empty where
            ``applies`` is False).
        message: one sentence for the notebook and the report.
    """

    applies: bool
    lab_badnet: bool
    rows: tuple[Mapping[str, Any], ...]
    differs: tuple[str, ...]
    message: str

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "rows": [dict(r) for r in self.rows]}


def _row(what: str, reference: float, run: float | None, tolerance: float) -> dict[str, Any]:
    diff = None if run is None else round(float(run) - reference, 4)
    return {"what": what, "reference": reference, "run": None if run is None else float(run), "difference": diff,
            "matches": None if diff is None else abs(diff) <= tolerance + 1e-9}


def check_against_reference(
    evaluations: Sequence[Any],
    *,
    badnet: Any = None,
    fingerprint: str | None = None,
    valid_images: int | None = None,
    test_images: int | None = None,
    valid_accuracy: float | None = None,
    dormant_channels: int | None = None,
    layer: str | None = None,
    reference: LabReference = LAB,
) -> ReferenceCheck:
    """Compare a lab run with the lab's known figures.

    Args:
        evaluations: the run's :class:`~badnet_repair.metrics.Evaluation` rows (or their dicts)
            on the test sets, labelled ``B``, ``B'_X`` and ``G_X``.
        badnet: B, to fingerprint (or give ``fingerprint``).
        fingerprint: B's :func:`weights_fingerprint`, where B is not given.
        valid_images, test_images: the clean validation and test sets' sizes.
        valid_accuracy: B's clean validation accuracy, %.
        dormant_channels: channels of the pruned layer with zero mean activation on the
            validation set.
        layer: the pruned layer.
        reference: the figures, default :data:`LAB`.

    Returns:
        ReferenceCheck.
    """
    if fingerprint is None and badnet is not None:
        fingerprint = weights_fingerprint(badnet)
    lab_badnet = fingerprint == reference.badnet_fingerprint
    lab_data = valid_images == reference.valid_images and test_images == reference.test_images
    applies = lab_badnet and lab_data and layer in (None, reference.layer)
    by_model = {(e["model"] if isinstance(e, Mapping) else e.model): e for e in evaluations}

    def get(e: Any, field: str) -> Any:
        return None if e is None else (e.get(field) if isinstance(e, Mapping) else getattr(e, field))

    tol = reference.tolerance
    rows: list[dict[str, Any]] = [_row("B: clean validation accuracy (%)", reference.valid_accuracy, valid_accuracy,
                                       tol)]
    rows.append({"what": f"{reference.layer}: channels with zero mean activation on valid",
                 "reference": reference.dormant_channels, "run": dormant_channels,
                 "difference": None if dormant_channels is None else dormant_channels - reference.dormant_channels,
                 "matches": None if dormant_channels is None else dormant_channels == reference.dormant_channels})
    for model, (clean, attack, pruned) in reference.figures.items():
        e = by_model.get(model)
        rows.append(_row(f"{model}: clean test accuracy (%)", clean, get(e, "clean_accuracy"), tol))
        rows.append(_row(f"{model}: attack success (%)", attack, get(e, "attack_success_rate"), tol))
        if pruned and not model.startswith("G"):
            got = get(e, "channels_pruned")
            rows.append({"what": f"{model}: channels pruned", "reference": pruned, "run": got,
                         "difference": None if got is None else int(got) - pruned,
                         "matches": None if got is None else int(got) == pruned})
    differs = tuple(f"{r['what']}: {r['run']:g} here, {r['reference']:g} published" for r in rows
                    if applies and r["matches"] is False)
    if applies:
        message = ("B is the lab's BadNet and the data has the lab's sizes, so the published figures should be "
                   "reproduced: " + ("every figure matches." if not differs else
                                     f"{len(differs)} figure(s) differ (marked below). If these are the lab's "
                                     "own files, check the thresholds, the layer and the input scale; a validation "
                                     f"accuracy of B other than {reference.valid_accuracy:g} % means other data."))
    elif lab_badnet:
        message = (f"B is the lab's BadNet, but the data is not the lab's files ({valid_images} validation and "
                   f"{test_images} test images, against {reference.valid_images} and {reference.test_images}): the "
                   "published figures are shown for orientation, not compared.")
    else:
        message = ("This run is not on the lab's BadNet, so its figures are not expected to equal the published "
                   "ones, shown for orientation.")
    return ReferenceCheck(applies=applies, lab_badnet=lab_badnet, rows=tuple(rows), differs=differs,
                          message=message)


def reference_table(check: ReferenceCheck | Mapping[str, Any]) -> str:
    """The check as markdown: its sentence, then figure, published value, this run's, and the difference."""
    c = check.as_dict() if isinstance(check, ReferenceCheck) else dict(check)

    def fmt(v: Any) -> str:
        return "" if v is None else (f"{v:g}" if isinstance(v, int) else f"{v:.2f}")

    lines = [c["message"], "", "| figure | published | this run | difference |", "|---|---:|---:|---:|"]
    for r in c["rows"]:
        mark = " **differs**" if c["applies"] and r["matches"] is False else ""
        diff = "" if r["difference"] is None else f"{r['difference']:+g}"
        lines.append(f"| {r['what']} | {fmt(r['reference'])} | {fmt(r['run'])} | {diff}{mark} |")
    return "\n".join(lines) + "\n"
