"""Making BadNets: triggers (:mod:`.triggers`), the baseline poisoning attack, the
pruning-aware attack and the multi-trigger, multi-target attack (:mod:`.badnets`)."""

from __future__ import annotations

from . import triggers
from .badnets import (
    AttackResult,
    poison_training_set,
    train_badnet,
    train_model,
    train_multi_target_badnet,
    train_pruning_aware_badnet,
)
from .triggers import (
    Trigger,
    blended_trigger,
    drawn_sunglasses,
    drawn_triggers,
    load_trigger,
    patch_trigger,
    poison,
    poison_each,
)

__all__ = ["AttackResult", "Trigger", "blended_trigger", "drawn_sunglasses", "drawn_triggers", "load_trigger",
           "multi_targets", "patch_trigger", "poison", "poison_each", "poison_training_set", "train_badnet",
           "train_model", "train_multi_target_badnet", "train_pruning_aware_badnet", "triggers"]


def multi_targets(num_classes: int, first: int = 0, count: int = 3) -> tuple[int, ...]:
    """The targets of a multi-target BadNet: ``first`` and ``count - 1`` more spread evenly
    over the classes (demo, 100 classes: 0, 33, 66)."""
    return tuple((first + i * num_classes // count) % num_classes for i in range(count))
