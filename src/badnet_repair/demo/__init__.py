"""The embedded demo: synthetic faces (:mod:`.faces`) and BadNets made offline in the lab's
formats (:mod:`.make`)."""

from __future__ import annotations

from . import faces
from .faces import make_faces
from .make import DEMO_BADNETS, DemoConfig, DemoPaths, demo_paths, load_demo_manifest, make_demo

__all__ = ["DEMO_BADNETS", "DemoConfig", "DemoPaths", "demo_paths", "faces", "load_demo_manifest", "make_demo",
           "make_faces"]
