"""Safe output writing: atomic replace, no silent overwrite, content hashes."""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import os
import platform
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__
from ..errors import OutputExistsError

__all__ = ["atomic_path", "check_writable", "folder_lock", "sha256_file", "to_csv", "versions", "write_json",
           "write_results", "write_text"]


def check_writable(paths: Iterable[str | os.PathLike[str]], *, overwrite: bool = False) -> None:
    """Raise :class:`OutputExistsError` naming every path that exists, unless ``overwrite``.

    Called before any work starts, so a run that would clobber earlier results fails in a
    second instead of after the sweep.
    """
    outputs = [Path(p) for p in paths]
    for p in outputs:  # an output folder that is a file: found now, not by the first write after the work
        blocked = next((a for a in p.parents if a.exists() and not a.is_dir()), None)
        if blocked is not None:
            raise OutputExistsError(f"{blocked}: is a file, not a folder; choose another output folder")
    if overwrite:
        return
    existing = [str(p) for p in outputs if p.exists()]
    if existing:
        listed = ", ".join(existing[:5]) + (f" and {len(existing) - 5} more" if len(existing) > 5 else "")
        raise OutputExistsError(
            f"{listed} already exist{'s' if len(existing) == 1 else ''}; "
            "pass --overwrite (overwrite=True) to replace, or choose another output folder"
        )


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it onto ``path``.

    The temporary name keeps the final suffix (Keras picks the format from it) and starts
    with a dot, so an interrupted run never leaves a half-written file under the final name.
    """
    final = Path(path)
    check_writable([final], overwrite=overwrite)
    final.parent.mkdir(parents=True, exist_ok=True)
    suffix = ".weights.h5" if final.name.endswith(".weights.h5") else final.suffix
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.stem}.partial-", suffix=suffix, dir=final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    # Keras and h5py refuse or append to an existing file; give them a fresh name.
    tmp.unlink()
    try:
        yield tmp
        if not tmp.exists():
            raise RuntimeError(f"nothing was written to {final}")
        os.replace(tmp, final)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike[str]) -> Iterator[Path]:
    """Hold an exclusive lock on ``folder`` (created if missing) while the block runs.

    Processes that make the same files (a benchmark's workers making BadNets of one demo)
    take turns: the second waits, then finds the first one's files. The lock is the
    operating system's on ``folder/.lock`` (``fcntl`` on POSIX, ``msvcrt`` on Windows), so a
    process that dies releases it. A folder where the lock file cannot be written (read-only) is
    one no process can write to either: the block then runs without a lock. Yields the folder.
    """
    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    try:
        handle = open(root / ".lock", "a+b")
    except OSError:
        yield root
        return
    with handle:
        if os.name == "nt":  # pragma: no cover - exercised on Windows only
            import msvcrt

            handle.seek(0)
            while True:
                try:
                    msvcrt.locking(handle.fileno(), msvcrt.LK_LOCK, 1)  # type: ignore[attr-defined]
                    break
                except OSError:  # LK_LOCK gives up after 10 s; keep waiting
                    continue
            try:
                yield root
            finally:
                handle.seek(0)
                msvcrt.locking(handle.fileno(), msvcrt.LK_UNLCK, 1)  # type: ignore[attr-defined]
        else:
            import fcntl

            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                yield root
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def write_text(path: str | os.PathLike[str], text: str, *, overwrite: bool = False) -> Path:
    """Write ``text`` to ``path`` atomically (UTF-8, ``\\n`` line ends)."""
    with atomic_path(path, overwrite=overwrite) as tmp:
        tmp.write_text(text, encoding="utf-8", newline="\n")
    return Path(path)


def write_json(path: str | os.PathLike[str], obj: Any, *, overwrite: bool = False) -> Path:
    """Write ``obj`` as indented, key-sorted JSON, atomically; byte-identical for equal input."""
    return write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n", overwrite=overwrite)


def sha256_file(path: str | os.PathLike[str], *, block_size: int = 1 << 20) -> str:
    """Return the hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(block_size), b""):
            h.update(block)
    return h.hexdigest()


def versions() -> dict[str, str]:
    """Versions of Python and the libraries that decide the numbers."""
    import h5py
    import keras

    out = {"python": platform.python_version(), "badnet_repair": __version__,
           "numpy": np.__version__, "keras": keras.__version__, "h5py": h5py.__version__}
    try:
        import tensorflow as tf

        out["tensorflow"] = tf.__version__
    except ImportError:  # pragma: no cover - another Keras backend
        pass
    return out


def to_csv(rows: Sequence[Mapping[str, Any]]) -> str:
    """Rows of equal keys as CSV text (``\\n`` line ends, None as empty)."""
    if not rows:
        return ""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
    return buf.getvalue()


def write_results(outputs: Mapping[Path, Any], *, overwrite: bool = False) -> dict[str, Path]:
    """The one writer of a run's outputs, each atomically, by the path's suffix.

    ``.csv``: a sequence of rows (mappings with equal keys); ``.json``: any JSON-able
    object; ``.md`` and ``.txt``: text; ``.png``: a matplotlib Figure; ``.npz``: a mapping of
    name -> array. Every path is checked
    before anything is written, so an existing output stops the run whole (unless
    ``overwrite``).

    Returns:
        The paths written, by their file name.
    """
    paths = {Path(p): content for p, content in outputs.items()}
    check_writable(paths, overwrite=overwrite)
    # a figure written to several paths is rendered once, so the copies are the same bytes (a
    # layout that settles on its first draw would otherwise differ between them)
    rendered: dict[int, bytes] = {}
    for path, content in paths.items():
        suffix = path.suffix.lower()
        if suffix == ".csv":
            write_text(path, to_csv(content), overwrite=overwrite)
        elif suffix == ".json":
            write_json(path, content, overwrite=overwrite)
        elif suffix in (".md", ".txt"):
            write_text(path, content, overwrite=overwrite)
        elif suffix == ".png":
            if id(content) not in rendered:
                import io

                buf = io.BytesIO()
                content.savefig(buf, format="png", dpi=content.get_dpi())
                rendered[id(content)] = buf.getvalue()
            with atomic_path(path, overwrite=overwrite) as tmp:
                Path(tmp).write_bytes(rendered[id(content)])
        elif suffix == ".npz":
            import numpy as np

            with atomic_path(path, overwrite=overwrite) as tmp, open(tmp, "wb") as f:
                np.savez_compressed(f, **content)
        else:
            raise ValueError(f"write_results cannot write {path.name}: unknown suffix {suffix!r}")
    return {p.name: p for p in paths}
