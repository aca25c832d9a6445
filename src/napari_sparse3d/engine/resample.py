"""Prediction at the model's voxel spacing: resample, predict, resample back.

A network learns the size of objects in voxels.  Shown a volume at another
voxel spacing (half as many z slices, a coarser camera pixel), it sees objects
of the wrong size.  :func:`~napari_sparse3d.engine.prediction.predict_volume`
given the volume's ``spacing`` therefore uses this module to

1. view the image on the model's grid (:class:`ResampledVolume`: linear
   interpolation, computed lazily for each tile the prediction reads, so the
   resampled image never exists whole);
2. predict there, normalised with the statistics of the *original* image
   (computed once, before resampling, as nnU-Net does);
3. interpolate the class probabilities linearly back onto the image's grid,
   slab by slab, and take the argmax there; the labels have exactly the
   image's shape and are written into ``out`` one slab of whole chunks at a time.

Memory: the model-grid probabilities (4 bytes x classes x model-grid voxels)
are held in memory up to :data:`BUFFER_BYTES` (2 GiB) and in a
temporary ``.npy`` file (memory-mapped, removed afterwards) above that, so a
volume larger than memory can be predicted into a zarr ``out`` given that much
free disk.  Everything else is bounded by the tile and slab sizes.

The interpolation is ``torch.nn.functional.interpolate(mode="trilinear",
align_corners=False)`` (voxels are cells; their centres map onto each other),
written separably in numpy so that any box can be computed from the source
voxels under it.  Downsampling (an image finer than the model) uses no
anti-aliasing filter, like nnU-Net's resampling of images.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Generator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np

from napari_sparse3d.engine.annotations import class_value_array
from napari_sparse3d.engine.volume import Box, VolumeLike, check_spacing, int3

__all__ = [
    "BUFFER_BYTES",
    "SPACING_TOLERANCE",
    "ResampledVolume",
    "grid_shape",
    "labels_on_grid",
    "model_grid",
    "probability_buffer",
    "resample_box",
    "spacing_differs",
]

#: Relative difference of the spacing on any axis above which an image is resampled to the model's.
SPACING_TOLERANCE = 0.05
#: Model-grid probabilities above this many bytes are kept in a temporary file instead of memory.
BUFFER_BYTES = 2**31
#: Voxels of the image grid resampled back at a time (a slab of whole z-chunks, at least one).
SLAB_VOXELS = 2**22


def spacing_differs(spacing: Sequence[float], model_spacing: Sequence[float], tolerance: float = SPACING_TOLERANCE) -> bool:
    """Whether ``spacing`` differs from ``model_spacing`` by more than ``tolerance`` (relative) on any axis."""
    return any(abs(float(s) - float(m)) > tolerance * float(m) for s, m in zip(spacing, model_spacing))


def grid_shape(shape: Sequence[int], spacing: Sequence[float], target_spacing: Sequence[float]) -> tuple[int, int, int]:
    """The shape of ``shape`` voxels at ``spacing`` on a grid of ``target_spacing`` (the same physical extent)."""
    return int3(max(1, int(round(n * float(s) / float(t)))) for n, s, t in zip(shape, spacing, target_spacing))


def model_grid(
    shape: Sequence[int], spacing: Sequence[float] | None, model_spacing: Sequence[float] | None
) -> tuple[int, int, int] | None:
    """The shape of the volume on the model's grid, or ``None`` when it is predicted as it is.

    ``None`` when either spacing is unknown (a model trained without a spacing is
    never resampled for) or they differ by at most :data:`SPACING_TOLERANCE` on every
    axis.  ``spacing`` is checked (``TypeError``/``ValueError`` naming it).
    """
    spacing = check_spacing(spacing)
    if spacing is None or model_spacing is None or not spacing_differs(spacing, model_spacing):
        return None
    return grid_shape(shape, spacing, model_spacing)


def _axis_map(n_in: int, n_out: int, index: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For output positions ``index``: the two source voxels and the weight of the second (as torch computes them)."""
    coord = np.clip((index + 0.5) * (n_in / n_out) - 0.5, 0.0, n_in - 1)
    i0 = np.floor(coord).astype(np.int64)
    i1 = np.minimum(i0 + 1, n_in - 1)
    return i0, i1, (coord - i0).astype(np.float32)


def _indices(region: slice, n: int) -> np.ndarray:
    return np.arange(*region.indices(n))


def resample_box(
    read: Callable[[Box], np.ndarray], in_shape: Sequence[int], out_shape: Sequence[int], region: Sequence[slice]
) -> np.ndarray:
    """A box of a ``(C, *in_shape)`` array linearly resampled to ``out_shape``.

    Parameters
    ----------
    read : callable
        Returns the ``(C, z, y, x)`` float block of the source under a box (three slices).
    in_shape, out_shape : (z, y, x)
    region : three slices
        The box of the *output* grid to compute (steps allowed).

    Returns
    -------
    numpy.ndarray
        float32 ``(C, *region shape)``; equal to that box of
        ``F.interpolate(source, out_shape, mode="trilinear", align_corners=False)``.
    """
    maps = [_axis_map(int(i), int(o), _indices(r, int(o))) for i, o, r in zip(in_shape, out_shape, region)]
    if any(len(i0) == 0 for i0, _, _ in maps):
        raise ValueError(f"region {tuple(region)} is empty in a grid of shape {tuple(out_shape)}")
    box = tuple(slice(int(i0.min()), int(i1.max()) + 1) for i0, i1, _ in maps)
    block = np.asarray(read((box[0], box[1], box[2])), dtype=np.float32)
    for axis, ((i0, i1, w), b) in enumerate(zip(maps, box), start=1):
        shape = [1] * block.ndim
        shape[axis] = -1
        first = np.take(block, i0 - b.start, axis=axis)
        second = np.take(block, i1 - b.start, axis=axis)
        second -= first
        second *= w.reshape(shape)
        first += second
        block = first
    return block


class ResampledVolume:
    """A :class:`~napari_sparse3d.engine.volume.VolumeLike` view of ``volume`` on a grid of ``shape`` voxels.

    Each :meth:`read` interpolates (linearly) the voxels it returns from the
    source voxels under them; nothing is computed or stored in advance.
    """

    def __init__(self, volume: VolumeLike, shape: Sequence[int]) -> None:
        self.volume = volume
        self.spatial_shape = int3(shape)
        self.channels = volume.channels
        self.shape = (self.channels, *self.spatial_shape)

    def read(self, region: Sequence[slice] | None = None) -> np.ndarray:
        """The region (three slices over the new grid) as a new float32 ``(C, z, y, x)`` array."""
        region = tuple(region) if region is not None else (slice(None),) * 3
        return resample_box(self.volume.read, self.volume.spatial_shape, self.spatial_shape, region)


def _z_chunk(out: Any) -> int:
    chunks = getattr(out, "chunks", None)
    if isinstance(chunks, tuple) and len(chunks) == 3 and all(isinstance(c, (int, np.integer)) for c in chunks):
        return max(1, int(chunks[0]))
    return 1


@contextmanager
def probability_buffer(classes: int, shape: Sequence[int], limit: int | None = None) -> Generator[np.ndarray, None, None]:
    """A float32 ``(classes, *shape)`` array: in memory up to ``limit`` bytes, else a temporary memory-mapped file.

    ``limit`` defaults to :data:`BUFFER_BYTES`; the file is removed on exit.
    """
    limit = BUFFER_BYTES if limit is None else limit
    full = (int(classes), *int3(shape))
    if 4 * int(np.prod(full)) <= limit:
        yield np.empty(full, np.float32)
        return
    with tempfile.TemporaryDirectory(prefix="sparse3d-resample-") as folder:
        buffer = np.lib.format.open_memmap(os.path.join(folder, "probabilities.npy"), mode="w+", dtype=np.float32, shape=full)
        try:
            yield buffer
        finally:
            del buffer  # closes the map before its folder goes


def labels_on_grid(
    buffer: np.ndarray, shape: Sequence[int], class_values: Sequence[int], out: Any = None, keep_probabilities: bool = False
) -> tuple[Any, np.ndarray | None]:
    """Probabilities on the model's grid -> labels (and probabilities) on the image's grid of ``shape``.

    The probabilities ``buffer`` ``(K, *model grid)`` are interpolated linearly
    onto the image's grid a slab at a time (whole z-chunks of ``out``, about
    :data:`SLAB_VOXELS` voxels), the argmax is taken there and written into
    ``out`` (default: a new numpy array).  Returns ``(out, probabilities)``,
    the probabilities ``(K, Z, Y, X)`` only with ``keep_probabilities``.
    """
    values = class_value_array(class_values)
    dtype = np.min_scalar_type(max(int(values.max()), 1))
    z, y, x = int3(shape)
    if out is None:
        out = np.zeros((z, y, x), dtype)
    probabilities = np.zeros((len(values), z, y, x), np.float32) if keep_probabilities else None
    chunk = _z_chunk(out)
    slab = max(chunk, SLAB_VOXELS // max(y * x, 1) // chunk * chunk)
    grid = buffer.shape[1:]
    for z0 in range(0, z, slab):
        region = (slice(z0, min(z, z0 + slab)), slice(0, y), slice(0, x))
        probs = resample_box(lambda box: buffer[(slice(None), *box)], grid, (z, y, x), region)
        out[region] = values[np.argmax(probs, axis=0)].astype(dtype)
        if probabilities is not None:
            probabilities[(slice(None), *region)] = probs
    return out, probabilities
