"""Progress bars for long work: tqdm, live in terminals and notebooks, finished in saved runs.

Interactive use gets ``tqdm.auto`` bars that disappear when done. A headless notebook run
(``badnet-repair report``) sets ``BADNET_REPAIR_PROGRESS=text`` for its kernel: plain text
bars that stay, so the saved notebook shows each bar finished instead of a widget frozen at
0% (a saved notebook keeps no widget state).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

__all__ = ["ENV", "bar"]

#: The environment variable: ``text`` for bars that stay, ``off`` for none.
ENV = "BADNET_REPAIR_PROGRESS"


def bar(iterable: Iterable[Any] | None = None, *, total: int | None = None, desc: str = "",
        unit: str = "it", disable: bool = False) -> Any:
    """A tqdm bar over ``iterable`` (or one updated by hand up to ``total``); none shown
    where ``disable``."""
    mode = os.environ.get(ENV, "auto")
    if mode == "off" or disable:
        from tqdm.std import tqdm as plain

        return plain(iterable, total=total, desc=desc, unit=unit, disable=True)
    if mode == "text":
        import sys

        from tqdm.std import tqdm as text

        return text(iterable, total=total, desc=desc, unit=unit, leave=True, file=sys.stderr,
                    mininterval=1.0, dynamic_ncols=False, ncols=90)
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit=unit, leave=False)
