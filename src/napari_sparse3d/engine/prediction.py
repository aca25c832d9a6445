"""Sliding-window prediction, tile by tile, in bounded memory.

Windows lie on one grid over the whole volume, overlapping by at least
``overlap``; each window's softmax is weighted by a Gaussian (nnU-Net) so
that window borders, where context is missing, count less.  The prediction
window is not the training patch: a fully convolutional network can take a
larger one, which needs fewer, larger forward passes and less overlap
(:func:`plan_window`; instance normalisation then takes its statistics over
the larger window, which ``benchmarks/bench_prediction.py`` measures), and
fitted to the volume's shape so that its grid wastes few voxels
(:func:`~napari_sparse3d.engine.tiling.fit_window`).

The volume is cut into *tiles*: boxes whose faces lie on the output's chunk
grid (so each output chunk is written once, whole) and whose size is bounded
by ``tile_voxels`` (so memory depends on the tile and window size, never on
the volume's extent).  A tile is computed from every window of the global
grid that touches it: the input box under those windows is read and
normalised once, the windows are cut from it as tensor views, and the
Gaussian-weighted probabilities are summed into the tile in torch (on the
GPU when the model is there).  The Gaussian is separable and the windows
form a product grid, so the sum of weights under every voxel is an outer
product of three 1D sums and needs no accumulator.  A window that straddles
two tiles is computed for each of them; that costs a few per cent on large
volumes and nothing on a volume that fits one tile.  So:

- the result does not depend on the tiling nor on the order of the tiles
  (raster order, or nearest-first around a point of interest such as the
  viewer's position), and equals a plain whole-volume computation;
- a caller can write each finished :class:`Block` to a zarr array and drop it.

The input is normalised with statistics chosen once for the whole volume
(:meth:`Normalization.for_volume`: its own in "image" mode), never per tile.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from napari_sparse3d.config import PredictConfig
from napari_sparse3d.engine.annotations import class_value_array
from napari_sparse3d.engine.devices import autocast, resolve_device, resolve_precision
from napari_sparse3d.engine.model import UNet3D
from napari_sparse3d.engine.pixel_head import checked_prior_map, prior
from napari_sparse3d.engine.preprocess import Normalization, plan_window
from napari_sparse3d.engine.resample import ResampledVolume, labels_on_grid, model_grid, probability_buffer
from napari_sparse3d.engine.tiling import WindowGrid, fit_window, gaussian_importance, plan_tiles, window_starts
from napari_sparse3d.engine.trained import ModelInfo, model_info, require_trained
from napari_sparse3d.engine.volume import Box, VolumeLike, box3, check_finite, int3

__all__ = [
    "Block",
    "PredictReport",
    "TilePredictor",
    "WindowGrid",
    "class_argmax",
    "context_box",
    "gaussian_importance",
    "plan_tiles",
    "plan_window",
    "predict_blocks",
    "predict_region",
    "predict_volume",
    "resolve_window",
    "window_starts",
]


@dataclass
class Block:
    """A finished region: ``region`` (three slices), ``probabilities`` (K, z, y, x), ``labels`` (z, y, x)."""

    region: Box
    probabilities: np.ndarray
    labels: np.ndarray


@dataclass(frozen=True)
class PredictReport:
    windows_done: int
    windows_total: int
    elapsed: float

    @property
    def progress(self) -> float:
        return self.windows_done / max(self.windows_total, 1)


def _forward(model: torch.nn.Module, batch: torch.Tensor, mirror: bool) -> torch.Tensor:
    """Softmax probabilities, averaged over the 8 mirrorings when ``mirror``."""
    probs = torch.softmax(model(batch).float(), dim=1)
    if not mirror:
        return probs
    flips = [f for r in range(1, 4) for f in itertools.combinations((2, 3, 4), r)]
    for dims in flips:
        probs += torch.softmax(model(torch.flip(batch, dims)).float(), dim=1).flip(dims)
    return probs / (len(flips) + 1)


def class_argmax(scores: torch.Tensor) -> torch.Tensor:
    """``argmax`` over the first axis of ``(K, ...)`` scores (the first class wins ties), as int64.

    ``torch.argmax(dim=0)`` reduces across a strided axis and took 1.0 s on a (3, 60, 256, 256)
    volume on two CPU cores; comparing class by class takes 0.07 s.
    """
    best, labels = scores[0].clone(), torch.zeros(scores.shape[1:], dtype=torch.int64, device=scores.device)
    for k in range(1, scores.shape[0]):
        higher = scores[k] > best
        best = torch.where(higher, scores[k], best)
        labels.masked_fill_(higher, k)
    return labels


def resolve_window(info: ModelInfo, model: torch.nn.Module, shape: Sequence[int], config: PredictConfig) -> tuple[int, int, int]:
    """The window a prediction of a volume of ``shape`` uses under ``config``."""
    divisor = tuple(model.divisor)
    if config.window == "patch":
        return int3(info.patch_size)
    if config.window == "auto":  # the patch grown to about window_voxels, then fitted to the volume's shape
        planned = plan_window(info.patch_size, divisor, shape, config.window_voxels)
        return fit_window(planned, info.patch_size, divisor, shape, config.overlap)
    window = int3(config.window)
    if any(w % d for w, d in zip(window, divisor)):
        raise ValueError(f"config.predict.window {window} must be a multiple of the network's stride {divisor} per axis")
    if all(w == d for w, d in zip(window, divisor)) and max(divisor) > 1:  # a 1x1x1 level cannot be normalised
        raise ValueError(f"config.predict.window {window} leaves one voxel at the network's deepest level (stride {divisor})")
    return window


def _check_channels(volume: VolumeLike, info: ModelInfo) -> None:
    if volume.channels != info.in_channels:
        raise ValueError(f"image has {volume.channels} channels, but the model was trained on {info.in_channels}")


class TilePredictor:
    """What every tile of one volume's prediction shares, set up once: the model on its device, windows, weights.

    :func:`predict_blocks` runs it over the tiles in one process; a worker of a
    cluster (:mod:`napari_sparse3d.distributed`) builds one per volume and runs
    the tiles it is given.  Arguments as for :func:`predict_blocks`; the
    normalisation is required here, computed once for the whole volume.
    """

    def __init__(
        self, volume: VolumeLike, model: UNet3D, *, device: str, config: PredictConfig | None, normalization: Normalization,
        prior_map: Any = None,
    ) -> None:
        model = require_trained(model)
        info = model_info(model)
        self.config = config = config or info.config.predict
        _check_channels(volume, info)
        self.volume, self.norm = volume, normalization
        self.prior_map = checked_prior_map(prior_map, model.prior_channels, volume.spatial_shape)
        self.device = dev = resolve_device(device)
        self.dtype = resolve_precision(dev, info.config.train.precision)
        self.channels_last = info.config.train.channels_last
        # the weights in the batch's memory format: a loaded checkpoint is contiguous, and oneDNN would
        # otherwise reorder them at every call (measured: slower than plain contiguous tensors)
        memory_format = torch.channels_last_3d if self.channels_last else torch.contiguous_format
        self.model = model.to(dev, memory_format=memory_format).eval()
        self.shape = volume.spatial_shape
        self.window = resolve_window(info, model, self.shape, config)
        self.grid = WindowGrid(self.shape, self.window, config.overlap, config.gaussian_sigma)
        self.gauss = torch.from_numpy(gaussian_importance(self.window, config.gaussian_sigma)).to(dev)
        self.class_values = class_value_array(info.class_values)

    def tiles(self, chunks: Sequence[int] | None = None) -> list[Box]:
        return plan_tiles(self.shape, self.window, self.config.tile_voxels, chunks)

    def _input(self, starts: Sequence[tuple[int, int, int]]) -> tuple[torch.Tensor, list[int]]:
        """The input under ``starts``' windows, read and normalised once; zeros (the mean) outside the volume."""
        volume, window, shape = self.volume, self.window, self.shape
        lo = [min(s[a] for s in starts) for a in range(3)]
        hi = [max(s[a] for s in starts) + window[a] for a in range(3)]
        inside = tuple(slice(low, min(high, n)) for low, high, n in zip(lo, hi, shape))
        block = volume.read(inside)
        check_finite("image", block)
        block = self.norm.apply(block)
        prior_channels = self.model.prior_channels
        image = torch.zeros((volume.channels + prior_channels, *(high - low for low, high in zip(lo, hi))), dtype=torch.float32)
        within = tuple(slice(0, s.stop - s.start) for s in inside)
        image[(slice(None, volume.channels), *within)] = torch.from_numpy(block)
        del block
        if prior_channels:  # the pixel classifier's probabilities (given, or computed with their own margin); 0 outside
            if self.prior_map is not None:
                probs = torch.from_numpy(np.asarray(self.prior_map[(slice(None), *inside)], dtype=np.float32))
            else:
                probs = prior(self.model.pixel_head, volume, self.norm, inside, dtype=self.dtype).float().cpu()
            image[(slice(volume.channels, None), *within)] = probs
        return image.to(self.device), lo

    def predict(self, tile: Box, on_batch: Callable[[int], Any] | None = None) -> Block:
        """The finished :class:`Block` of ``tile``; ``on_batch(windows)`` after every batch of windows."""
        config, window, dev = self.config, self.window, self.device
        starts = self.grid.windows_touching(tile)
        image, lo = self._input(starts)
        tile_shape = tuple(t.stop - t.start for t in tile)
        acc = torch.zeros((len(self.class_values),) + tile_shape, dtype=torch.float32, device=dev)
        for first in range(0, len(starts), config.batch_size):
            chunk = starts[first : first + config.batch_size]
            crops = [image[(slice(None), *(slice(a - low, a - low + w) for a, low, w in zip(s, lo, window)))] for s in chunk]
            batch = torch.stack(crops)
            if self.channels_last:
                batch = batch.contiguous(memory_format=torch.channels_last_3d)
            with torch.inference_mode(), autocast(dev, self.dtype):
                probs = _forward(self.model, batch, config.mirror_tta)
            with torch.inference_mode():
                for s, p in zip(chunk, probs):
                    # the part of the window inside the tile, in window and in tile coordinates
                    a0 = [max(a, t.start) for a, t in zip(s, tile)]
                    a1 = [min(a + w, t.stop) for a, w, t in zip(s, window, tile)]
                    win = tuple(slice(x0 - a, x1 - a) for x0, x1, a in zip(a0, a1, s))
                    loc = tuple(slice(x0 - t.start, x1 - t.start) for x0, x1, t in zip(a0, a1, tile))
                    acc[(slice(None),) + loc] += p[(slice(None),) + win] * self.gauss[win]
            if on_batch is not None:
                on_batch(len(chunk))
        del image
        wz, wy, wx = (torch.from_numpy(ws[t].astype(np.float32)).to(dev) for ws, t in zip(self.grid.weight_sum, tile))
        acc /= wz[:, None, None] * wy[None, :, None] * wx[None, None, :]
        labels = class_argmax(acc).cpu().numpy()
        probabilities = acc.cpu().numpy()
        del acc
        return Block(tile, probabilities, self.class_values[labels])


def predict_blocks(
    volume: VolumeLike,
    model: UNet3D,
    *,
    device: str = "auto",
    config: PredictConfig | None = None,
    priority: Sequence[float] | None = None,
    progress: Callable[[PredictReport], Any] | None = None,
    chunks: Sequence[int] | None = None,
    normalization: Normalization | None = None,
    prior_map: Any = None,
) -> Generator[Block, None, None]:
    """Predict ``volume`` tile by tile, yielding each finished :class:`Block`.

    Parameters
    ----------
    volume : Volume
    model : UNet3D
        A trained network (it carries ``model.sparse3d``; checkpoint files are opened
        by :func:`napari_sparse3d.io.checkpoint.as_model`).
    device : str
    config : PredictConfig, optional
        Window, overlap, batch size, mirroring, tile size; default: the model's.
    priority : (z, y, x), optional
        Compute the tiles nearest this point first (e.g. where the viewer looks).
    progress : callable, optional
        Called with a :class:`PredictReport` after every batch of windows.
    chunks : (z, y, x), optional
        The output's chunk shape: every block then covers whole chunks.
    normalization : Normalization, optional
        Applied as is; default ``model_info(model).normalization.for_volume(volume)``
        (in "image" mode the volume's own statistics, computed here, once).
    prior_map : array ``(K, Z, Y, X)``, optional
        The pixel classifier's probabilities over the whole volume, as the trainer
        keeps them (``TrainingData.prior_map``): read instead of computed again,
        which is most of a default prediction's time on the CPU.  Default: computed
        per tile.  Only for the volume and classifier they were computed for.
    """
    model = require_trained(model)
    _check_channels(volume, model_info(model))
    norm = normalization if normalization is not None else model_info(model).normalization.for_volume(volume)
    predictor = TilePredictor(volume, model, device=device, config=config, normalization=norm, prior_map=prior_map)
    tiles = predictor.tiles(chunks)
    if priority is not None:
        point = np.asarray(priority, dtype=float)
        tiles.sort(key=lambda t: float(np.sum((np.array([(r.start + r.stop) / 2 for r in t]) - point) ** 2)))
    total = sum(len(predictor.grid.windows_touching(t)) for t in tiles)
    start = time.perf_counter()
    done = 0

    def batch_done(count: int) -> None:
        nonlocal done
        done += count
        if progress is not None:
            progress(PredictReport(done, total, time.perf_counter() - start))

    for tile in tiles:
        yield predictor.predict(tile, batch_done)


class _Crop:
    """A box of a :class:`Volume` that reads like a Volume (used to predict a region with context)."""

    def __init__(self, volume: VolumeLike, box: tuple[slice, slice, slice]) -> None:
        self.volume, self.box = volume, box
        self.channels = volume.channels
        self.spatial_shape = tuple(b.stop - b.start for b in box)
        self.shape = (self.channels,) + self.spatial_shape

    def read(self, region: tuple[slice, slice, slice] | None = None) -> np.ndarray:
        region = region or (slice(None),) * 3
        shifted = tuple(
            slice(b.start + (r.start or 0), b.start + (b.stop - b.start if r.stop is None else r.stop))
            for b, r in zip(self.box, region)
        )
        return self.volume.read(shifted)


def context_box(
    shape: Sequence[int], region: Sequence[slice], window: Sequence[int]
) -> tuple[slice, slice, slice]:
    """``region`` grown (about its centre, inside ``shape``) to at least one ``window`` per axis."""
    box = []
    for size, r, w in zip(shape, region, window):
        start, stop = max(0, r.start or 0), min(size, size if r.stop is None else r.stop)
        if stop - start < w:
            start = max(0, min(size - w, (start + stop - w) // 2))
            stop = min(size, start + w)
        box.append(slice(start, stop))
    return box3(box)


def predict_region(
    volume: VolumeLike,
    model: UNet3D,
    region: Sequence[slice],
    *,
    device: str = "auto",
    config: PredictConfig | None = None,
    normalization: Normalization | None = None,
    prior_map: Any = None,
) -> Generator[Block, None, None]:
    """Predict only ``region`` (three slices) of ``volume``, e.g. the slice on screen.

    The region is grown to at least one prediction window per axis, so the
    network sees the context it was trained with; the blocks yielded cover
    that box, in the volume's coordinates.  The region is normalised like the
    whole volume (``normalization``, default ``for_volume(volume)``: pass it,
    computed once, when predicting many regions of one volume); ``prior_map`` as
    for :func:`predict_blocks`, over the whole volume.
    """
    info = model_info(model)
    config = config or info.config.predict
    norm = normalization if normalization is not None else info.normalization.for_volume(volume)
    box = context_box(volume.spatial_shape, region, resolve_window(info, model, volume.spatial_shape, config))
    prior_map = checked_prior_map(prior_map, model.prior_channels, volume.spatial_shape)
    crop = None if prior_map is None else prior_map[(slice(None), *box)]
    for block in predict_blocks(_Crop(volume, box), model, device=device, config=config, normalization=norm, prior_map=crop):
        shifted = box3(slice(b.start + r.start, b.start + r.stop) for b, r in zip(box, block.region))
        yield Block(shifted, block.probabilities, block.labels)


def predict_volume(
    volume: VolumeLike,
    model: UNet3D,
    *,
    device: str = "auto",
    progress: Callable[[PredictReport], Any] | None = None,
    out: Any = None,
    keep_probabilities: bool = False,
    normalization: Normalization | None = None,
    spacing: Sequence[float] | None = None,
    prior_map: Any = None,
) -> tuple[Any, np.ndarray | None]:
    """Segment a whole volume into ``out`` (a new array by default), block by block.

    Returns ``(labels, probabilities)``; the probabilities ``(K, Z, Y, X)`` only with
    ``keep_probabilities``.  A zarr ``out`` gets each of its chunks written once, whole.
    ``normalization`` and ``prior_map`` as for :func:`predict_blocks` (``prior_map`` on
    the grid that is predicted: the model's when resampled, as the trainer keeps it).
    A ``spacing`` (the volume's voxel size) more than 5% off the model's on some axis:
    predicted on the model's grid and brought back to the volume's
    (:mod:`napari_sparse3d.engine.resample`).
    """
    info = model_info(model)
    shape = volume.spatial_shape
    grid = model_grid(shape, spacing, info.spacing)
    if grid is not None:
        norm = normalization if normalization is not None else info.normalization.for_volume(volume)
        with probability_buffer(len(info.class_values), grid) as buffer:
            view = ResampledVolume(volume, grid)
            for block in predict_blocks(view, model, device=device, progress=progress, normalization=norm, prior_map=prior_map):
                buffer[(slice(None), *block.region)] = block.probabilities
            return labels_on_grid(buffer, shape, info.class_values, out, keep_probabilities)
    if out is None:
        out = np.zeros(shape, dtype=np.min_scalar_type(max(max(info.class_values), 1)))
    probabilities = np.zeros((len(info.class_values), *shape), np.float32) if keep_probabilities else None
    chunks = getattr(out, "chunks", None)
    if not (isinstance(chunks, tuple) and len(chunks) == 3 and all(isinstance(c, (int, np.integer)) for c in chunks)):
        chunks = None
    blocks = predict_blocks(
        volume, model, device=device, progress=progress, chunks=chunks, normalization=normalization, prior_map=prior_map
    )
    for block in blocks:
        out[block.region] = block.labels
        if probabilities is not None:
            probabilities[(slice(None), *block.region)] = block.probabilities
    return out, probabilities
