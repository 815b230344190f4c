"""Quiet TensorFlow's C++ logging before Keras imports it.

TensorFlow 2.21 prints start-up lines (oneDNN, absl) from C++ straight to the process's
stderr on import, whatever TF_CPP_MIN_LOG_LEVEL says, and its graph optimizer prints
harmless "empty op name" errors on compiled calls. They bury the CLI's output and the
notebook's cells. We import TensorFlow once with file descriptor 2 pointed at /dev/null;
Python exceptions still propagate. Set BADNET_REPAIR_TF_LOGS=1 to see everything.
"""

from __future__ import annotations

import contextlib
import os
import sys

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

if os.environ.get("BADNET_REPAIR_TF_LOGS", "0") != "1":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if "tensorflow" not in sys.modules and os.environ["KERAS_BACKEND"] == "tensorflow":
        saved = None
        try:
            sys.stderr.flush()
            saved = os.dup(2)
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 2)
            os.close(devnull)
            with contextlib.suppress(ImportError):
                import tensorflow  # noqa: F401
        except OSError:  # no usable file descriptor 2 (embedded interpreters)
            pass
        finally:
            if saved is not None:
                os.dup2(saved, 2)
                os.close(saved)
