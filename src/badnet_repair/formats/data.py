"""Reading and writing the lab's data formats: HDF5 data sets and PNG/JPEG images.

The CSAW-HackML lab stores images as HDF5 with a dataset ``data`` of shape (N, 3, H, W)
holding float pixel values in 0..255 (channel-first) and ``label`` of shape (N,). Models
take channel-last float32 input with no scaling, so loading transposes to (N, H, W, 3).
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ..errors import DataError, DataWarning
from .files import atomic_path

__all__ = ["IMAGE_SUFFIXES", "Dataset", "LazyImages", "load_h5", "load_images", "pixel_range", "poisoned_labels",
           "save_h5"]

log = logging.getLogger(__name__)

Layout = Literal["nchw", "nhwc", "auto"]
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


@dataclass(frozen=True, eq=False)
class Dataset:
    """Images and labels in model layout.

    Attributes:
        x: (N, H, W, C) float32 pixels, 0..255 for the lab's data.
        y: (N,) int64 labels.
        name: a short name for tables and logs (the file name by default).
        path: the file it was read from, if any.
    """

    x: np.ndarray
    y: np.ndarray
    name: str = "data"
    path: str | None = None

    def __post_init__(self) -> None:
        if self.x.ndim != 4:
            raise DataError(f"{self.name}: images must be (N, H, W, C), got shape {self.x.shape}")
        if self.y.shape != (self.x.shape[0],):
            raise DataError(
                f"{self.name}: {self.x.shape[0]} images but labels of shape {self.y.shape}"
            )

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def subset(self, index: np.ndarray | slice, *, name: str | None = None) -> Dataset:
        """Return the images and labels at ``index`` as a new Dataset."""
        return Dataset(self.x[index], self.y[index], name=name or self.name, path=self.path)

    def per_class(self, n: int, *, seed: int = 0) -> Dataset:
        """At most ``n`` images of each class, drawn at random (``seed``), in file order: a
        smaller clean set of the same classes (a class with fewer keeps all of its images)."""
        if isinstance(n, bool) or int(n) != n or n < 1:
            raise ValueError(f"images a class must be a whole number >= 1, not {n!r}")
        rng = np.random.default_rng(seed)
        keep = [rng.permutation(np.flatnonzero(self.y == c))[: int(n)] for c in np.unique(self.y)]
        index = np.sort(np.concatenate(keep)) if keep else np.zeros(0, np.int64)
        return self.subset(index, name=f"{self.name} ({int(n)} a class)")


class LazyImages:
    """Images of a lab HDF5 file, read in chunks when sliced, never all at once.

    Behaves as a read-only (N, H, W, C) float32 array for slicing with a slice or an index
    array: ``images[i:j]`` reads, transposes and checks those images only. Used by the sweep
    so that memory holds the cached activations, not the images.
    """

    def __init__(self, path: Path, data_key: str, fmt: str, shape: tuple[int, int, int, int]) -> None:
        self.path, self.data_key, self.fmt = path, data_key, fmt
        self.shape = shape
        self.ndim = 4
        self.dtype = np.dtype(np.float32)
        self._checked_scale = False

    def __len__(self) -> int:
        return self.shape[0]

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        """All the images at once (``np.asarray(images)``), for code that needs an array."""
        whole = self[:]
        return whole if dtype is None else whole.astype(dtype, copy=False)

    def __getitem__(self, index: Any) -> np.ndarray:
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step == 1:
                return self._read(slice(start, stop), start)
            index = np.arange(start, stop, step)
        idx = np.asarray(index)
        idx = (np.flatnonzero(idx) if idx.dtype == bool else idx.astype(np.int64)).reshape(-1)
        if idx.size == 0:
            return np.empty((0, *self.shape[1:]), np.float32)
        # h5py reads increasing, unique indices; put the rows back in the order asked
        uniq, inverse = np.unique(idx, return_inverse=True)
        return self._read(uniq.tolist(), 0)[inverse]

    def _read(self, rows: Any, offset: int) -> np.ndarray:
        with _open_h5(self.path) as f:
            try:
                chunk = f[self.data_key][rows]
            except Exception as exc:
                raise _fail(self.path, f"could not read the data (truncated or corrupt?): {exc}") from None
        if self.fmt == "nchw":
            chunk = chunk.transpose(0, 2, 3, 1)
        block = np.ascontiguousarray(chunk, dtype=np.float32)
        finite = np.isfinite(block).reshape(len(block), -1).all(axis=1)
        if not finite.all():
            bad = int(np.flatnonzero(~finite)[0])
            where = rows[bad] if isinstance(rows, list) else offset + bad
            raise _fail(self.path, f"image {where} has non-finite pixel values (NaN or inf)")
        if not self._checked_scale and block.size:
            self._checked_scale = True
            _warn_if_scaled(str(self.path), block)
        return block


def _fail(path: str | os.PathLike[str], problem: str) -> DataError:
    return DataError(f"{path}: {problem}")


def _check_file(path: Path) -> None:
    if not path.exists():
        raise _fail(path, "no such file")
    if path.is_dir():
        raise _fail(path, "is a folder, not a file")


def _open_h5(path: Path) -> Any:
    import h5py

    _check_file(path)
    try:
        if not h5py.is_hdf5(path):
            raise _fail(path, "is not an HDF5 file (wrong format, or an incomplete download)")
        return h5py.File(path, "r")
    except DataError:
        raise
    except Exception as exc:  # h5py raises OSError with C-level detail
        raise _fail(path, f"cannot be read as HDF5 (truncated or corrupt?): {exc}") from None


def _resolve_layout(path: Path, shape: tuple[int, ...], layout: Layout, channels: int) -> str:
    first, last = shape[1] == channels, shape[3] == channels
    if layout == "nchw":
        if first:
            return "nchw"
        if last:
            raise _fail(
                path,
                f"data has shape {shape}, which looks channel-last (N, H, W, {channels}) but "
                f"channel-first (N, {channels}, H, W) was expected; pass layout='nhwc' "
                "(--layout nhwc) if that is how it is stored",
            )
    elif layout == "nhwc":
        if last:
            return "nhwc"
        if first:
            raise _fail(
                path,
                f"data has shape {shape}, which looks channel-first (N, {channels}, H, W) but "
                "layout='nhwc' was given; use layout='nchw' (--layout nchw)",
            )
    elif layout == "auto":
        if first and not last:
            return "nchw"
        if last and not first:
            return "nhwc"
        if first and last:
            raise _fail(path, f"data shape {shape} is ambiguous; pass layout='nchw' or 'nhwc'")
    else:
        raise ValueError(f"layout must be 'nchw', 'nhwc' or 'auto', not {layout!r}")
    raise _fail(
        path,
        f"data has shape {shape}: no axis of size {channels} for the colour channels "
        f"(expected (N, {channels}, H, W))",
    )


def _labels_to_int(path: Path, raw: np.ndarray, num_classes: int | None) -> np.ndarray:
    if raw.dtype.kind not in "biuf":
        raise _fail(path, f"labels have dtype {raw.dtype}, expected integers")
    if raw.dtype.kind == "f":
        if not np.all(np.isfinite(raw)):
            bad = int(np.flatnonzero(~np.isfinite(raw))[0])
            raise _fail(path, f"label {bad} is {raw[bad]}, not an integer")
        if raw.size and np.abs(raw).max() >= 2**53:
            bad = int(np.argmax(np.abs(raw)))
            raise _fail(path, f"label {bad} is {raw[bad]:g}, far outside any class range")
        if not np.all(raw == np.round(raw)):
            bad = int(np.flatnonzero(raw != np.round(raw))[0])
            raise _fail(path, f"label {bad} is {raw[bad]}, not an integer")
    y = raw.astype(np.int64)
    if y.size and y.min() < 0:
        raise _fail(path, f"labels must be >= 0, found {int(y.min())}")
    if num_classes is not None and y.size and y.max() >= num_classes:
        raise _fail(
            path,
            f"labels must be in [0, {num_classes}) for a model with {num_classes} classes, "
            f"found {int(y.max())}",
        )
    return y


def _warn_if_scaled(path: str, x: np.ndarray) -> None:
    if x.size and float(x.max()) <= 1.0:
        warnings.warn(
            f"{path}: every pixel is in 0..1, but data files should hold raw 0..255 pixels; the data may "
            "have been scaled (multiply it by 255 if so). A model trained on 0..1 pixels takes the 0..255 "
            "files as they are with --input-scale 1/255 (input_scale=1/255)",
            DataWarning,
            stacklevel=3,
        )


def load_h5(
    path: str | os.PathLike[str],
    *,
    data_key: str = "data",
    label_key: str = "label",
    layout: Layout = "nchw",
    num_classes: int | None = None,
    image_shape: tuple[int, int, int] | None = None,
    chunk_size: int = 1024,
    limit: int | None = None,
    lazy: bool = False,
    name: str | None = None,
    progress: bool = False,
) -> Dataset:
    """Load a lab-format HDF5 data set as (N, H, W, C) float32 images and int64 labels.

    Reads ``chunk_size`` images at a time into one preallocated float32 array, so a
    716 MB float64 file never exists twice in memory. Pixels are not rescaled.

    Args:
        path: the ``.h5`` file.
        data_key: name of the image dataset, default ``"data"``.
        label_key: name of the label dataset, default ``"label"``.
        layout: how ``data`` is stored: ``"nchw"`` (the lab's, default), ``"nhwc"``, or
            ``"auto"`` (whichever axis has ``C`` channels).
        num_classes: if given, labels must lie in ``[0, num_classes)``.
        image_shape: if given, the (H, W, C) every image must have (a model's input).
        chunk_size: images read per chunk, default 1024.
        limit: read only the first ``limit`` images (for a quick look), default all.
        lazy: check the file now but read images only when sliced (``x`` is a
            :class:`LazyImages`); pixels are then checked as they are read.
        name: name of the returned Dataset, default the file name.
        progress: show a tqdm progress bar.

    Returns:
        Dataset with ``x`` (N, H, W, C) float32 and ``y`` (N,) int64.

    Raises:
        DataError: naming the file, for a missing or non-HDF5 file, missing keys (listing
            those found), wrong rank or channel count, mismatched lengths, no images,
            non-finite pixels, labels that are not integers or lie outside the classes.
    """
    p = Path(path)
    if lazy and limit is not None:
        raise ValueError("limit and lazy cannot be combined")
    channels = image_shape[2] if image_shape else 3
    with _open_h5(p) as f:
        keys = sorted(f.keys())
        for key in (data_key, label_key):
            if key not in f:
                raise _fail(p, f"has no dataset {key!r}; entries found: {keys or 'none'}")
            if not hasattr(f[key], "shape"):
                raise _fail(p, f"{key!r} is a group, not a dataset; entries found: {keys}")
        dset, lset = f[data_key], f[label_key]
        shape = tuple(int(s) for s in dset.shape)
        if len(shape) != 4:
            raise _fail(p, f"{data_key!r} has shape {shape}; expected 4 axes (N, C, H, W)")
        if dset.dtype.kind not in "biuf":
            raise _fail(p, f"{data_key!r} has dtype {dset.dtype}, expected numbers")
        n = shape[0]
        if n == 0:
            raise _fail(p, "contains no images")
        if len(lset.shape) != 1:
            if len(lset.shape) == 2 and lset.shape[1] == 1:
                pass  # (N, 1) labels are common; flattened below
            else:
                raise _fail(p, f"{label_key!r} has shape {lset.shape}; expected (N,)")
        if lset.shape[0] != n:
            raise _fail(p, f"{n} images but {lset.shape[0]} labels")
        fmt = _resolve_layout(p, shape, layout, channels)
        if limit is not None:
            n = max(0, min(n, int(limit)))
        hwc = (shape[2], shape[3], shape[1]) if fmt == "nchw" else shape[1:]
        if image_shape is not None and tuple(hwc) != tuple(image_shape):
            raise _fail(p, f"images are {hwc[0]}x{hwc[1]}x{hwc[2]} (HxWxC) but the model expects "
                        f"{image_shape[0]}x{image_shape[1]}x{image_shape[2]}")
        try:
            y = _labels_to_int(p, np.asarray(lset[:n]).reshape(n), num_classes)
            if lazy:
                return Dataset(x=LazyImages(p, data_key, fmt, (n, *hwc)), y=y,  # type: ignore[arg-type]
                               name=name or p.stem, path=str(p))
            x = np.empty((n, *hwc), dtype=np.float32)
            starts = range(0, n, max(1, int(chunk_size)))
            if progress:
                from ..progress import bar

                starts = bar(starts, desc=f"reading {p.name}", unit="chunk")
            for i in starts:
                chunk = dset[i : min(i + chunk_size, n)]
                if fmt == "nchw":
                    chunk = chunk.transpose(0, 2, 3, 1)
                x[i : i + chunk.shape[0]] = chunk
                block = x[i : i + chunk.shape[0]]
                if not np.isfinite(block).all():
                    bad = i + int(np.flatnonzero(~np.isfinite(block).reshape(len(block), -1).all(1))[0])
                    raise _fail(p, f"image {bad} has non-finite pixel values (NaN or inf)")
        except DataError:
            raise
        except Exception as exc:  # read errors inside a damaged file
            raise _fail(p, f"could not read the data (truncated or corrupt?): {exc}") from None
    _warn_if_scaled(str(p), x)
    log.info("loaded %s: %d images %s", p, n, x.shape[1:])
    return Dataset(x=x, y=y, name=name or p.stem, path=str(p))


def save_h5(
    path: str | os.PathLike[str],
    x: np.ndarray,
    y: np.ndarray,
    *,
    dtype: str = "float32",
    overwrite: bool = False,
) -> Path:
    """Write images in the lab's HDF5 format, atomically.

    Args:
        path: the ``.h5`` file to write.
        x: (N, H, W, C) images in 0..255.
        y: (N,) integer labels.
        dtype: stored pixel dtype, default ``"float32"`` (the lab's valid.h5 is float64).
        overwrite: replace an existing file.

    Returns:
        The path written. The file holds ``data`` (N, C, H, W) and ``label`` (N,).
    """
    import h5py

    x = np.asarray(x)
    y = np.asarray(y)
    if x.ndim != 4 or y.shape != (x.shape[0],):
        raise DataError(f"{path}: need x (N, H, W, C) and y (N,), got {x.shape} and {y.shape}")
    with atomic_path(path, overwrite=overwrite) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("data", data=x.transpose(0, 3, 1, 2).astype(dtype))
        f.create_dataset("label", data=y.astype(np.float64 if dtype.startswith("float") else np.int64))
    return Path(path)


def load_images(
    paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    *,
    image_shape: tuple[int, int, int] | None = (55, 47, 3),
    resize: bool = False,
) -> np.ndarray:
    """Load PNG/JPEG images as a (n, H, W, C) float32 array of 0..255 pixels.

    Grey and RGBA images are converted to RGB (alpha dropped). A folder loads every image
    in it, sorted by name.

    Args:
        paths: one image file or folder, or a sequence of them.
        image_shape: the (H, W, C) expected, default (55, 47, 3); ``None`` accepts any
            size (all images must then share one).
        resize: resize images of another size to ``image_shape`` instead of failing.

    Returns:
        (n, H, W, C) float32 array.
    """
    from PIL import Image, UnidentifiedImageError

    items = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    files: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            found = sorted(q for q in p.iterdir() if q.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise _fail(p, "folder holds no PNG or JPEG images")
            files.extend(found)
        else:
            _check_file(p)
            files.append(p)
    if not files:
        raise DataError("no image files given")
    out = []
    for p in files:
        try:
            with Image.open(p) as im:
                im.load()
                rgb = im.convert("RGB") if (image_shape is None or image_shape[2] == 3) else im.convert("L")
        except UnidentifiedImageError:
            raise _fail(p, "is not an image Pillow can read (PNG, JPEG, ...)") from None
        except OSError as exc:
            raise _fail(p, f"cannot be read as an image (truncated?): {exc}") from None
        if image_shape is not None and (rgb.height, rgb.width) != tuple(image_shape[:2]):
            if not resize:
                raise _fail(
                    p,
                    f"image is {rgb.height}x{rgb.width} (HxW) but {image_shape[0]}x{image_shape[1]} "
                    "is expected; pass resize=True (--resize) to resize it",
                )
            rgb = rgb.resize((image_shape[1], image_shape[0]), Image.Resampling.BILINEAR)
        arr = np.asarray(rgb, dtype=np.float32)
        out.append(arr[..., None] if arr.ndim == 2 else arr)
    shapes = {a.shape for a in out}
    if len(shapes) > 1:
        raise DataError(f"images have different sizes {sorted(shapes)}; pass image_shape to check")
    return np.stack(out)


def poisoned_labels(data: Dataset, target: int | None, *, several: bool = False) -> tuple[Dataset, int]:
    """Labels of a poisoned set: all ``target`` if given, else the file's single label.

    With ``several`` (a multi-target BadNet's poisoned set) and no ``target``, the file's labels
    are kept as each input's target; the smallest is returned as the target.

    Raises:
        DataError: if no target is given and the file's labels are not all one class (unless
            ``several``).
    """
    seen = np.unique(data.y)
    if target is None and several:
        if seen.size == 0:
            raise DataError(f"{data.path or data.name}: the poisoned set is empty")
        return data, int(seen[0])
    if target is None:
        if seen.size != 1:
            shown = ", ".join(str(int(v)) for v in seen[:10]) + (" ..." if seen.size > 10 else "")
            raise DataError(
                f"{data.path or data.name}: a poisoned set's labels should all be the attack's "
                f"target, but {seen.size} different labels were seen ({shown}); pass the target "
                "explicitly (--target)"
            )
        return data, int(seen[0])
    if seen.size != 1 or int(seen[0]) != target:
        log.info("%s: scoring attack success against target %d", data.name, target)
    y = np.full(len(data), target, dtype=np.int64)
    return Dataset(data.x, y, name=data.name, path=data.path), int(target)


def pixel_range(x: Any) -> float:
    """The pixel range of images: 255 where any pixel is above 1.5 (0..255 files), else 1 (0..1).

    Perturbation bounds and steps in the defenses are in units of this range, so a paper's
    settings for 0..1 images carry over to the lab's 0..255 pixels.

    Args:
        x: (N, H, W, C) images (an array or a lazily read dataset's images).
    """
    arr = x if isinstance(x, np.ndarray) else np.asarray(x[:])
    return 255.0 if arr.size and float(np.max(arr)) > 1.5 else 1.0
