"""The engine's inputs: images, spacing and budgets, checked once (labels: :mod:`~napari_sparse3d.engine.annotations`).

Every array a user can hand to :func:`napari_sparse3d.run` or
:func:`napari_sparse3d.predict` passes through here and either comes out in
a known form (a channel-first :class:`Volume`) or raises a ``TypeError``/``ValueError`` that names the argument, what was
expected and what was given.  Files are opened before, by :mod:`napari_sparse3d.io.arrays`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

__all__ = [
    "Box",
    "TrainingInputs",
    "Triple",
    "Volume",
    "VolumeLike",
    "as_volume",
    "box3",
    "check_budget",
    "check_finite",
    "check_numeric",
    "check_spacing",
    "from_torch",
    "int3",
]


def from_torch(array: Any) -> Any:
    """A torch tensor as a numpy array (on the CPU, detached; bfloat16 as float32); anything else as it is."""
    if type(array).__module__.split(".")[0] == "torch" and hasattr(array, "detach"):
        array = array.detach().cpu()
        if str(array.dtype) == "torch.bfloat16":  # numpy has no bfloat16
            array = array.float()
        return array.numpy()
    return array


def check_numeric(name: str, array: Any) -> np.dtype:
    if not hasattr(array, "shape") or not hasattr(array, "dtype"):
        raise TypeError(f"{name} must be an array (numpy, zarr, dask) or a file path, got {type(array).__name__}")
    dtype = np.dtype(array.dtype)
    if dtype.kind not in "biuf":
        raise TypeError(f"{name} must have a numeric or boolean dtype, got dtype {dtype}")
    if any(int(s) == 0 for s in array.shape):
        raise ValueError(f"{name} must not be empty, got shape {tuple(array.shape)}")
    return dtype


Triple = tuple[int, int, int]
Box = tuple[slice, slice, slice]


def int3(values: Iterable[Any]) -> Triple:
    """Three integers (a shape, a patch, a window) from any sequence of three numbers."""
    z, y, x = (int(v) for v in values)
    return (z, y, x)


def box3(slices: Iterable[slice]) -> Box:
    """Three slices (a region over z, y, x)."""
    z, y, x = slices
    return (z, y, x)


class VolumeLike(Protocol):
    """What the engine reads images through: a channel-first ``(C, Z, Y, X)`` source of float32 blocks."""

    @property
    def spatial_shape(self) -> tuple[int, int, int]: ...

    @property
    def channels(self) -> int: ...

    def read(self, region: tuple[slice, slice, slice] | None = None) -> np.ndarray: ...


class Volume:
    """A channel-first view ``(C, Z, Y, X)`` of a numpy, zarr or dask array; reads as float32 on demand."""

    def __init__(self, array: Any, channel_axis: int | None) -> None:
        self.array = array
        self.channel_axis = channel_axis
        shape = tuple(int(s) for s in array.shape)
        if channel_axis is None:
            self.shape = (1,) + shape
        else:
            spatial = shape[:channel_axis] + shape[channel_axis + 1 :]
            self.shape = (shape[channel_axis],) + spatial

    @property
    def spatial_shape(self) -> tuple[int, int, int]:
        _, z, y, x = self.shape
        return (z, y, x)

    @property
    def channels(self) -> int:
        return self.shape[0]

    def read(self, region: tuple[slice, slice, slice] | None = None) -> np.ndarray:
        """The region (three slices over z, y, x) as a float32 ``(C, z, y, x)`` array."""
        region = tuple(region) if region is not None else (slice(None),) * 3
        if self.channel_axis is None:
            block = np.asarray(self.array[region])[None]
        else:
            index = list(region)
            index.insert(self.channel_axis, slice(None))
            block = np.moveaxis(np.asarray(self.array[tuple(index)]), self.channel_axis, 0)
        # always a copy: callers normalise in place and must never touch the user's array
        with np.errstate(over="ignore"):  # beyond float32's range: the clear error below
            out = np.array(block, dtype=np.float32, copy=True)
        if block.dtype.kind == "f" and block.dtype.itemsize > 4 and not np.isfinite(out).all() and np.isfinite(block).all():
            largest = float(np.abs(block).max())
            raise ValueError(
                f"image has values beyond float32's range (largest magnitude {largest:.3g}, float32 holds up to"
                " 3.4e+38); napari-sparse3d computes in float32: scale the image down first"
            )
        return out


def as_volume(image: Any, channel_axis: int | None = None, *, name: str = "image") -> Volume:
    """Check an image (array or path) and return its channel-first :class:`Volume`."""
    if isinstance(image, (str, os.PathLike)):
        raise TypeError(
            f"{name} must be an array here, got the path {str(image)!r}; open files with"
            " napari_sparse3d.io.arrays.load_array (napari_sparse3d.run and predict accept paths)"
        )
    if isinstance(image, (list, tuple)):
        image = np.asarray(image)
    image = from_torch(image)
    dtype = check_numeric(name, image)
    if dtype.kind == "b":
        image = np.asarray(image, dtype=np.uint8)
    ndim = len(image.shape)
    if channel_axis is not None:
        if isinstance(channel_axis, bool) or not isinstance(channel_axis, (int, np.integer)):
            raise TypeError(f"channel_axis must be an integer or None, got {channel_axis!r}")
        if ndim != 4:
            raise ValueError(f"{name} with a channel_axis must be 4D (3 spatial axes + channels), got shape {image.shape}")
        if not -4 <= channel_axis < 4:
            raise ValueError(f"channel_axis must be in [-4, 3] for a 4D {name}, got {channel_axis}")
        channel_axis = int(channel_axis) % 4
    elif ndim == 4:
        raise ValueError(
            f"{name} is 4D {tuple(image.shape)}; a 3D volume with channels needs channel_axis= naming the channel axis"
        )
    elif ndim != 3:
        raise ValueError(f"{name} must be a 3D volume (Z, Y, X), got {ndim}D with shape {tuple(image.shape)}")
    return Volume(image, channel_axis)


def check_finite(name: str, block: np.ndarray) -> None:
    if not np.isfinite(block).all():
        bad = int(np.size(block) - np.count_nonzero(np.isfinite(block)))
        raise ValueError(f"{name} contains {bad} NaN or infinite values; replace them (e.g. np.nan_to_num) first")


def check_spacing(spacing: Any) -> tuple[float, float, float] | None:
    if spacing is None:
        return None
    try:
        values = tuple(float(s) for s in spacing)
    except (TypeError, ValueError):
        raise TypeError(f"spacing must be three numbers (z, y, x) or None, got {spacing!r}") from None
    if len(values) != 3 or not all(np.isfinite(v) and v > 0 for v in values):
        raise ValueError(f"spacing must be three positive finite numbers (z, y, x), got {spacing!r}")
    return (values[0], values[1], values[2])


def check_budget(max_seconds: Any, max_iterations: Any) -> None:
    if max_seconds is not None:
        if isinstance(max_seconds, bool) or not isinstance(max_seconds, (int, float, np.number)):
            raise TypeError(f"max_seconds must be a number or None, got {max_seconds!r}")
        if not np.isfinite(max_seconds) or max_seconds <= 0:
            raise ValueError(f"max_seconds must be a positive finite number of seconds, got {max_seconds!r}")
    if max_iterations is not None:
        if isinstance(max_iterations, bool) or not isinstance(max_iterations, (int, np.integer)):
            raise TypeError(f"max_iterations must be an integer or None, got {max_iterations!r}")
        if max_iterations <= 0:
            raise ValueError(f"max_iterations must be a positive integer, got {max_iterations!r}")


@dataclass(frozen=True)
class TrainingInputs:
    """Everything a training run starts from (what :meth:`Trainer.from_inputs` takes).

    ``init`` is a trained model or, from a store, a checkpoint path that the
    caller opens (:func:`napari_sparse3d.io.checkpoint.as_model`).
    """

    image: Any
    labels: Any
    annotated_slices: Mapping[int, Sequence[int]] | None = None
    spacing: Sequence[float] | None = None
    config: Any = None
    init: Any = None
