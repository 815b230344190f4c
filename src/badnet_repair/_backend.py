"""Quiet TensorFlow's C++ logging before Keras imports it.

TensorFlow 2.21's graph optimizer prints harmless "empty op name" errors on every compiled
call; they would bury the CLI's output. A user's own setting of the variables wins.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
