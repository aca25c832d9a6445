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
from napari_sparse3d.io.ome import add_pyramid, create_label_image, is_label_image

__all__ = ["PredictionOutput", "save_labels"]


def replaceable(path: Path) -> bool:
    """What a prediction may overwrite: an earlier one (an OME-Zarr label image of ours, or a bare zarr array)."""
    return is_label_image(path) or is_zarr_array(path)


class PredictionOutput:
    """The target of :func:`napari_sparse3d.predict`: ``None`` (an array is made), a path, or a caller's array.

    ``finish()`` after the last block, ``abandon()`` after an error.
    """

    def __init__(
        self,
        out: Any,
        shape: tuple[int, ...],
        class_values: Sequence[int],
        *,
        overwrite: bool,
        inputs: Sequence[Any],
        spacing: Sequence[float] | None = None,
        pyramid: int = 0,
    ) -> None:
        self.final: Path | None = None  # a path asked for: the aside copy is renamed here at the end
        self.tmp: Path | None = None
        self.array: Any = None
        self.spacing, self.pyramid = spacing, int(pyramid)
        if out is None:
            return
        if isinstance(out, (str, os.PathLike)):
            self.final = check_output_path(
                out, name="out", overwrite=overwrite, inputs=inputs, is_replaceable=replaceable, what="zarr prediction"
            )
            self.final.parent.mkdir(parents=True, exist_ok=True)
            self.tmp = aside_path(self.final)
            dtype = np.min_scalar_type(max(max(class_values), 1))
            self.array = create_label_image(self.tmp, shape, dtype, chunks_for(shape), spacing)
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
        """Mark the array complete; a path's image gets its pyramid, is renamed into place, and its labels are returned."""
        if self.final is None or self.tmp is None:
            self._mark(True)
            return self.array
        if self.pyramid:
            add_pyramid(zarr.open_group(str(self.tmp), mode="r+"), self.pyramid, self.spacing)
        self._mark(True)
        replace_with(self.tmp, self.final)
        return zarr.open_group(str(self.final), mode="r+")["0"]

    def abandon(self) -> None:
        """After an error (not a kill): remove the aside copy; a caller's array stays marked incomplete."""
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)


def save_labels(
    path: str | os.PathLike, labels: np.ndarray, class_values: Sequence[int], *, spacing: Sequence[float] | None,
    overwrite: bool, inputs: Sequence[Any], pyramid: int = 0,
) -> Any:
    """Write finished labels (e.g. after post-processing) to ``path`` as an OME-Zarr label image, like a prediction."""
    target = PredictionOutput(path, tuple(labels.shape), list(class_values) + [int(np.max(labels, initial=0))],
                              overwrite=overwrite, inputs=inputs, spacing=spacing, pyramid=pyramid)
    try:
        target.array[...] = labels
    except BaseException:
        target.abandon()
        raise
    return target.finish()
