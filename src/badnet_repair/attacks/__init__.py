"""Making BadNets: triggers (:mod:`.triggers`), the baseline poisoning attack and the
pruning-aware attack (:mod:`.badnets`)."""

from __future__ import annotations

from . import triggers
from .badnets import AttackResult, poison_training_set, train_badnet, train_model, train_pruning_aware_badnet
from .triggers import Trigger, drawn_sunglasses, load_trigger, poison

__all__ = ["AttackResult", "Trigger", "drawn_sunglasses", "load_trigger", "poison", "poison_training_set",
           "train_badnet", "train_model", "train_pruning_aware_badnet", "triggers"]
