"""Arrays on disk: open tif, npy and zarr lazily; write them durably; chunk shapes.

A file is opened where it is (memory-mapped, page by page, or as a lazy zarr
array), so a volume larger than memory can be predicted block by block.  An
array written by an interrupted prediction is marked incomplete and refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from napari_sparse3d.io.files import check_output_path, write_aside

__all__ = [
    "ARRAY_SUFFIXES",
    "OUTPUT_ATTRIBUTE",
    "TiffPages",
    "chunks_for",
    "image_hash",
    "load_array",
    "open_input",
    "save_array",
]

ARRAY_SUFFIXES = (".tif", ".tiff", ".npy", ".zarr")


def load_array(path: str | os.PathLike, *, name: str = "image") -> Any:
    """Open a tif, npy or zarr file; zarr and npy stay on disk (lazy or memory-mapped).

    A zarr path may be an array, a group holding one array, or an OME-Zarr image
    (its full-resolution level is opened).
    """
    p = Path(path)
    if not p.exists():
        raise ValueError(f"{name}: file {str(p)!r} does not exist")
    suffix = p.suffix.lower()
    if suffix in (".tif", ".tiff"):
        return _open_tiff(p, name)
    if suffix == ".npy":
        try:
            return np.load(p, mmap_mode="r", allow_pickle=False)
        except (EOFError, ValueError, OSError) as exc:  # empty, truncated, pickled or object arrays, a folder
            raise ValueError(f"{name}: {str(p)!r} is not a readable .npy array of numbers ({exc})") from None
    if suffix == ".zarr" or ((p.is_dir() and (p / "zarr.json").exists()) or (p / ".zarray").exists()):
        import zarr

        try:
            node = zarr.open(str(p), mode="r")
        except Exception as exc:  # zarr raises its own kinds (no group found, bad metadata JSON, ...)
            raise ValueError(f"{name}: {str(p)!r} is not a readable zarr array or group ({exc})") from None
        if isinstance(node, zarr.Array):
            return _complete(node, p, name)
        from napari_sparse3d.io.ome import level0

        full = level0(node)  # an OME-Zarr image (a prediction of ours among them): its full resolution
        if full is not None:
            return _complete(full, p, name)
        arrays = list(node.array_keys())
        if len(arrays) == 1:
            return _complete(node[arrays[0]], p, name)
        raise ValueError(
            f"{name}: {str(p)!r} is a zarr group with arrays {arrays}; give the path of one array (group/array)"
        )
    raise ValueError(f"{name}: unsupported file type {suffix!r} of {str(p)!r}; expected one of {ARRAY_SUFFIXES}")


OUTPUT_ATTRIBUTE = "napari_sparse3d"  # {"complete": false} while a prediction writes the array


def _complete(array: Any, path: Path, name: str) -> Any:
    """``array``, unless it is the unfinished output of a prediction (unwritten chunks read as 0)."""
    meta = dict(array.attrs).get(OUTPUT_ATTRIBUTE)
    if isinstance(meta, dict) and meta.get("complete") is False:
        raise ValueError(
            f"{name}: {str(path)!r} is the incomplete output of an interrupted prediction: its unwritten chunks would"
            " read as background (0). Predict again"
        )
    return array


def _open_tiff(path: Path, name: str) -> Any:
    """A TIFF that is read where it is needed: memory-mapped, or page by page, or (else) whole.

    Uncompressed contiguous data is memory-mapped; a compressed or tiled stack
    of one 2D page per z-slice reads only the pages a region touches; any
    other layout (a single 3D page, interleaved channels) is read whole.
    """
    import tifffile

    try:
        return tifffile.memmap(str(path), mode="r")
    except Exception:  # compressed, tiled, not contiguous, or an unusual layout: tifffile says ValueError
        pass
    try:
        with tifffile.TiffFile(str(path)) as tif:
            series = tif.series[0]
            shape, dtype = tuple(int(s) for s in series.shape), np.dtype(series.dtype)
            pages = len(series.pages)
            page_shape = tuple(series.pages[0].shape) if pages else ()
    except Exception as exc:
        raise ValueError(f"{name}: {str(path)!r} is not a readable TIFF file ({exc})") from exc
    if len(shape) == 3 and pages == shape[0] and page_shape == shape[1:]:
        return TiffPages(path, shape, dtype)
    return tifffile.imread(str(path))


class TiffPages:
    """A read-only (Z, Y, X) array over a TIFF's pages, one page per z-slice, read on demand.

    Indexing reads only the pages of the requested z-range (``volume[a:b]``,
    ``volume[a:b, y0:y1, x0:x1]``, steps and integers too), so memory follows
    the region asked for, not the file.
    """

    def __init__(self, path: str | os.PathLike, shape: tuple[int, ...], dtype: np.dtype) -> None:
        self.path, self.shape, self.dtype, self.ndim = str(path), tuple(shape), np.dtype(dtype), len(shape)
        self._file: Any = None
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:  # picklable (for worker processes): the open file stays behind
        return {"path": self.path, "shape": self.shape, "dtype": self.dtype}

    def __setstate__(self, state: dict) -> None:
        self.path, self.shape, self.dtype, self.ndim = state["path"], state["shape"], state["dtype"], len(state["shape"])
        self._file = None
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self.shape[0]

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self[...]
        return out if dtype is None else out.astype(dtype)

    def __getitem__(self, index: Any) -> np.ndarray:
        import tifffile

        if not isinstance(index, tuple):
            index = (index,)
        if any(i is Ellipsis for i in index):
            at = index.index(Ellipsis)
            index = index[:at] + (slice(None),) * (3 - len(index) + 1) + index[at + 1 :]
        if len(index) > 3 or not all(isinstance(i, (slice, int, np.integer)) for i in index):
            raise IndexError(f"TiffPages takes up to three slices or integers, got {index!r}")
        index = tuple(index) + (slice(None),) * (3 - len(index))
        z, rest = index[0], index[1:]
        squeeze = isinstance(z, (int, np.integer))
        if squeeze:
            z = int(z) + self.shape[0] if int(z) < 0 else int(z)
            if not 0 <= z < self.shape[0]:
                raise IndexError(f"index {index[0]} is out of range for axis 0 of size {self.shape[0]}")
            planes = [z]
        else:
            planes = list(range(*z.indices(self.shape[0])))
        with self._lock:
            if self._file is None:
                self._file = tifffile.TiffFile(self.path)
            pages = self._file.series[0].pages
            data = [np.asarray(pages[i].asarray())[rest] for i in planes]
        if squeeze:
            return data[0]
        if not data:
            probe = np.zeros(self.shape[1:], self.dtype)[rest]
            return np.zeros((0,) + probe.shape, self.dtype)
        return np.stack(data)


def save_array(path: str | os.PathLike, array: np.ndarray, *, overwrite: bool = False, inputs: Sequence[Any] = ()) -> Path:
    """Write an array as tif, npy or zarr, chosen by the suffix; it appears only once complete.

    An existing file is replaced only with ``overwrite`` and only by one of the same
    kind; never one of ``inputs``.
    """
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix not in ARRAY_SUFFIXES:
        raise ValueError(f"output path {str(p)!r}: unsupported suffix {suffix!r}; expected one of {ARRAY_SUFFIXES}")
    check_output_path(p, name="output path", overwrite=overwrite, inputs=inputs, what=f"{suffix} array")
    p.parent.mkdir(parents=True, exist_ok=True)
    with write_aside(p) as tmp:
        if suffix in (".tif", ".tiff"):
            import tifffile

            tifffile.imwrite(tmp, np.asarray(array), compression="zlib")
        elif suffix == ".npy":
            with open(tmp, "wb") as f:
                np.save(f, np.asarray(array))
        else:
            import zarr

            z = zarr.create_array(str(tmp), shape=array.shape, dtype=array.dtype, chunks=chunks_for(array.shape))
            z[...] = array
    return p


def chunks_for(shape: Sequence[int]) -> tuple[int, ...]:
    """The chunk shape of the arrays napari-sparse3d writes: at most 64 along each axis."""
    return tuple(min(int(s), 64) for s in shape)




def open_input(value: Any, *, name: str) -> Any:
    """``value`` itself, or the array stored at ``value`` when it is a path."""
    if isinstance(value, (str, os.PathLike)):
        return load_array(value, name=name)
    return value


def image_hash(array: Any, *, block_voxels: int = 1 << 24, dtype: Any = None) -> str:
    """SHA-256 of an array's shape, dtype and values, read slab by slab (bounded memory).

    ``dtype``: hash the values as that dtype (a copy stored in native byte order, hashed as
    the big-endian array it was made from, gives that array's hash)."""
    dtype = np.dtype(array.dtype if dtype is None else dtype)
    h = hashlib.sha256()
    h.update(json.dumps([list(map(int, array.shape)), str(dtype)]).encode())
    if len(array.shape) == 0:
        h.update(np.ascontiguousarray(np.asarray(array), dtype=dtype).tobytes())
        return h.hexdigest()
    per_slab = max(1, int(np.prod(array.shape[1:], dtype=np.int64)))
    step = max(1, block_voxels // per_slab)
    for start in range(0, int(array.shape[0]), step):
        h.update(np.ascontiguousarray(np.asarray(array[start : start + step]), dtype=dtype).tobytes())
    return h.hexdigest()
