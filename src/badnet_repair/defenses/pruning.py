"""The pruning defense as a :class:`~badnet_repair.defenses.Defense`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from ..defaults import LAYER_HELP, setting
from ..formats.data import Dataset
from .base import Defense, Repair, Repaired

if TYPE_CHECKING:
    from .sweep import SweepResult

# The sweep and the surgery (TensorFlow) are imported when a repair runs, so the command line
# can list this class's settings without loading TensorFlow.

__all__ = ["Pruning", "sweep_of"]


@dataclass(frozen=True)
class Pruning(Defense):
    """The pruning defense of Liu, Dolan-Gavitt and Garg ("Fine-Pruning", RAID 2018).

    Ranks ``layer``'s channels by mean activation on the clean data, prunes them in
    ascending order, and returns B'_X at the first step where clean accuracy falls at least
    X points below B's, for each X in ``thresholds`` (see
    :func:`~badnet_repair.defenses.sweep.prune_sweep`).

    Args:
        thresholds: the accuracy drops X, in points, default (2, 4, 10).
        layer: the conv layer, default found from the graph (``conv_3`` in DeepID).
        rank_at: ``"pooled"`` (default; the pooling after the layer) or ``"conv"``.
        descending: prune the most active channels first, default False.
        engine: ``"fast"`` (default) or ``"plain"`` (the slow reference).
        batch_size: inputs per forward pass, default 1024.
    """

    name: ClassVar[str] = "pruning"
    summary: ClassVar[str] = "prune the least active channels of the last pooled conv layer (Liu et al. 2018)"

    thresholds: tuple[float, ...] = setting((2.0, 4.0, 10.0), "accuracy drops in points")
    layer: str | None = setting(None, LAYER_HELP)
    rank_at: Literal["pooled", "conv"] = setting(
        "pooled", "measure activations at the layer's pooling output or its own output")
    descending: bool = setting(False, "prune the most active channels first")
    engine: Literal["fast", "plain"] = setting(
        "fast", "fast (cached activations) or plain (re-run the whole model per step)")
    batch_size: int = setting(1024, "inputs per forward pass of the sweep")

    def repair(self, model: Any, clean: Dataset, *, progress: bool = False) -> Repair:
        """B'_X for each threshold X; the record holds the ranking, the choices and the sweep's
        validation accuracy per step; ``artifacts["sweep"]`` the sweep itself."""
        from ..nets.models import prune_channels
        from .sweep import prune_sweep

        sweep = prune_sweep(model, clean, layer=self.layer, thresholds=self.thresholds, at=self.rank_at,
                            descending=self.descending, engine=self.engine, batch_size=self.batch_size,
                            progress=progress)
        models = tuple(
            Repaired(label=f"{self.name} X={x:g}", model=prune_channels(model, sweep.layer, sel.channels),
                     channels_pruned=sel.channels_pruned, threshold=x)
            for x, sel in sweep.selections.items() if sel is not None
        )
        choices = {
            "layer": sweep.layer, "measured_at": sweep.ranking.measured_at,
            "order": [int(c) for c in sweep.ranking.order],
            "mean_activation": [float(v) for v in sweep.ranking.mean_activation],
            "selections": [{"threshold": x, "channels_pruned": None if s is None else s.channels_pruned,
                            "valid_accuracy": None if s is None else s.valid_accuracy} for x, s in
                           sweep.selections.items()],
        }
        history = [{"channels_pruned": s.channels_pruned, "valid_accuracy": s.metrics[sweep.valid_set]}
                   for s in sweep.steps]
        return Repair(defense=self.name, models=models, record=self.make_record(choices, history),
                      artifacts={"sweep": sweep})


def sweep_of(repair: Repair) -> SweepResult:
    """The sweep a :class:`Pruning` repair ran on the clean data (to measure its steps on other
    data afterwards with :func:`~badnet_repair.defenses.sweep.extend_sweep`, as ``badnet-repair
    prune`` does, without sweeping the clean data again)."""
    if repair.defense != Pruning.name or "sweep" not in repair.artifacts:
        raise ValueError(f"a {repair.defense!r} repair has no pruning sweep")
    return repair.artifacts["sweep"]
