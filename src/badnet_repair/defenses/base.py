"""The defense interface: one class per defense, its settings typed fields, one verb.

As in scikit-learn, a defense is configured once (its settings are keyword arguments of
``__init__``, readable back with :meth:`Defense.get_params`) and then applied:
``repair(model, clean)`` sees only the BadNet and clean labelled data, never test or
poisoned data, and returns a :class:`Repair`. Defenses are frozen dataclasses, so their
settings are typed, compared by value and cannot change after construction.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from ..formats.data import Dataset

__all__ = ["Defense", "Repair", "Repaired"]


@dataclass(frozen=True, eq=False)
class Repaired:
    """One repaired model a defense returns.

    Attributes:
        label: how it is shown in tables: the defense's name, plus ``X=2`` and so on where a
            defense returns several (pruning: one per threshold).
        model: the repaired Keras model, (N, H, W, C) -> (N, K) probabilities.
        channels_pruned: channels of the pruned layer zeroed in it (0 where none).
        threshold: the pruning threshold X it was chosen for, where there is one.
    """

    label: str
    model: Any
    channels_pruned: int = 0
    threshold: float | None = None


@dataclass(frozen=True, eq=False)
class Repair:
    """What :meth:`Defense.repair` returns.

    Attributes:
        defense: the defense's registry name.
        models: the repaired models, in the defense's order (pruning: one per threshold
            at which validation accuracy fell far enough; others: one).
        record: JSON-able: ``{"defense", "settings", "choices", "history"}``; what was set,
            what was chosen on the clean data, and how the defense got there.
        artifacts: other results by name, not JSON-able (Neural Cleanse unlearning: the
            ``"scan"``); empty for most defenses.
        warnings: loud lines the user must see (a result that fell more than the clean-accuracy
            budget below B, and what was returned instead); the command line, ``results.json``,
            the report and the comparison carry them.
    """

    defense: str
    models: tuple[Repaired, ...]
    record: Mapping[str, Any]
    artifacts: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    warnings: tuple[str, ...] = ()

    @property
    def model(self) -> Any:
        """The repaired model, for defenses that return one."""
        if len(self.models) != 1:
            raise ValueError(f"{self.defense} returned {len(self.models)} models; pick one from .models")
        return self.models[0].model


class Defense(abc.ABC):
    """A backdoor defense: settings in ``__init__``, then ``repair(model, clean)``.

    Subclasses are frozen dataclasses that set :attr:`name` (the registry name, used by the
    CLI and configuration files) and :attr:`summary` (one line for tables and ``--help``).
    """

    name: ClassVar[str]
    summary: ClassVar[str]

    def get_params(self) -> dict[str, Any]:
        """The settings, by name (JSON-able; tuples as lists)."""
        out = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            v = getattr(self, f.name)
            out[f.name] = list(v) if isinstance(v, tuple) else v
        return out

    @classmethod
    def settings(cls) -> dict[str, dataclasses.Field[Any]]:
        """The settings this defense takes: name -> dataclass field (type and default)."""
        return {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]

    @abc.abstractmethod
    def repair(self, model: Any, clean: Dataset, *, progress: bool = False) -> Repair:
        """Repair ``model`` using clean labelled data only.

        Args:
            model: the BadNet B (not changed).
            clean: clean labelled images (N, H, W, C); the defense's only data.
            progress: progress bars on long work.

        Returns:
            Repair with the repaired model(s) and the record.
        """

    def make_record(self, choices: Mapping[str, Any], history: Any = ()) -> dict[str, Any]:
        """The :attr:`Repair.record` of a repair with these choices and history."""
        return {"defense": self.name, "settings": self.get_params(), "choices": dict(choices),
                "history": list(history)}
