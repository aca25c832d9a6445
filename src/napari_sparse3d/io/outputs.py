"""Where a prediction is written: an array marked incomplete until the last block is in.

An interrupted prediction must never leave a half-written array under the name
asked for (its unwritten chunks would read as background), nor destroy what was
there: a path gets a zarr array written aside and renamed into place at the end,
and any zarr array carries ``{"napari_sparse3d": {"complete": false}}`` until it
is finished, which :func:`napari_sparse3d.io.arrays.load_array` refuses to read.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from napari_sparse3d.io.arrays import OUTPUT_ATTRIBUTE, chunks_for
from napari_sparse3d.io.files import aside_path, check_output_path, is_zarr_array, replace_with

__all__ = ["PredictionOutput"]


class PredictionOutput:
    """The target of :func:`napari_sparse3d.predict`: ``None`` (an array is made), a path, or a caller's array.

    ``finish()`` after the last block, ``abandon()`` after an error.
    """

    def __init__(
        self, out: Any, shape: tuple[int, ...], class_values: Sequence[int], *, overwrite: bool, inputs: Sequence[Any]
    ) -> None:
        self.final: Path | None = None  # a path asked for: the aside copy is renamed here at the end
        self.tmp: Path | None = None
        self.array: Any = None
        if out is None:
            return
        if isinstance(out, (str, os.PathLike)):
            self.final = check_output_path(
                out, name="out", overwrite=overwrite, inputs=inputs, is_replaceable=is_zarr_array, what="zarr prediction"
            )
            self.final.parent.mkdir(parents=True, exist_ok=True)
            self.tmp = aside_path(self.final)
            dtype = np.min_scalar_type(max(max(class_values), 1))
            self.array = zarr.create_array(str(self.tmp), shape=shape, dtype=dtype, chunks=chunks_for(shape))
            self.array.attrs[OUTPUT_ATTRIBUTE] = {"complete": False}
            return
        if not hasattr(out, "shape") or not hasattr(out, "__setitem__"):
            raise TypeError(f"out must be a writable array (zarr or numpy) or a path, got {type(out).__name__}")
        if tuple(out.shape) != tuple(shape):
            raise ValueError(f"out must have the image's spatial shape {shape}, got {tuple(out.shape)}")
        kind = np.dtype(out.dtype).kind
        if kind not in "iu" or np.iinfo(out.dtype).max < max(class_values):
            raise ValueError(f"out must have an integer dtype that holds label values up to {max(class_values)}, got {out.dtype}")
        self.array = out
        self._mark(False)

    def _mark(self, complete: bool) -> None:
        attrs = getattr(self.array, "attrs", None)
        if attrs is not None and hasattr(attrs, "__setitem__"):
            try:
                attrs[OUTPUT_ATTRIBUTE] = {"complete": complete}
            except Exception:  # a read-only or foreign attribute store: nothing to mark
                pass

    def finish(self) -> Any:
        """Mark the array complete; a path's array is renamed into place and returned reopened."""
        self._mark(True)
        if self.final is None or self.tmp is None:
            return self.array
        replace_with(self.tmp, self.final)
        return zarr.open_array(str(self.final), mode="r+")

    def abandon(self) -> None:
        """After an error (not a kill): remove the aside copy; a caller's array stays marked incomplete."""
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
