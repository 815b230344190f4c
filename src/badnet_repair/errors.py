"""The project's exception and warning types.

Every problem with a user's input surfaces as a :class:`BadNetRepairError` whose message
names the file and what is wrong, so the CLI can print one line instead of a traceback
from deep inside h5py or Keras.
"""

from __future__ import annotations

__all__ = [
    "BadNetRepairError",
    "DataError",
    "DataWarning",
    "ModelError",
    "OutputExistsError",
    "UnsafeModelError",
]


class BadNetRepairError(Exception):
    """Base class of every error this package raises on bad input."""


class DataError(BadNetRepairError, ValueError):
    """A data set or image file is missing, unreadable or malformed."""


class ModelError(BadNetRepairError, ValueError):
    """A model file is missing, unreadable, or does not fit what was asked of it."""


class UnsafeModelError(ModelError):
    """A model file would run code it carries (a Lambda or an unknown custom layer)."""


class OutputExistsError(BadNetRepairError, FileExistsError):
    """An output file exists already and ``overwrite`` was not given."""


class DataWarning(UserWarning):
    """Data that loads but looks wrong (for example pixels scaled to 0..1)."""
