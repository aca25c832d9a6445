"""Sliding-window prediction that streams finished blocks.

Windows of the training patch size lie on one grid over the whole volume,
overlapping by ``overlap``; each window's softmax is weighted by a Gaussian
(nnU-Net) so that window borders, where context is missing, count less.
The volume is cut into *cells* — the boxes between consecutive window
starts and ends.  A cell is finished as soon as every window covering it has been
computed; it is then normalised and yielded as a :class:`Block`.  So:

- the result does not depend on the order of the windows (raster order, or
  nearest-first around a point of interest such as the viewer's position);
- only the cells under windows in flight are held in memory, and a caller can
  write each block to a zarr array and drop it;
- streaming gives the same answer as predicting the whole volume at once.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from typing import Any, Callable, Generator, Iterable, Sequence

import numpy as np
import torch

from .checkpoint import ModelInfo, as_model
from .config import PredictConfig
from .data import Volume, check_finite
from .devices import autocast, resolve_device, resolve_precision

__all__ = ["Block", "PredictReport", "window_starts", "gaussian_importance", "predict_blocks", "predict_region", "context_box"]


@dataclass
class Block:
    """A finished region: ``region`` (three slices), ``probabilities`` (K, z, y, x), ``labels`` (z, y, x)."""

    region: tuple[slice, slice, slice]
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


def window_starts(size: int, window: int, overlap: float) -> list[int]:
    """Start positions of windows of ``window`` voxels along an axis of ``size``, evenly spread."""
    if size <= window:
        return [0]
    step = max(1.0, window * (1.0 - overlap))
    count = int(np.ceil((size - window) / step)) + 1
    return sorted({int(round(v)) for v in np.linspace(0, size - window, count)})


def gaussian_importance(window: Sequence[int], sigma_fraction: float = 0.125) -> np.ndarray:
    """A Gaussian over the window, 1 at its centre, never 0 (so every voxel has some weight)."""
    axes = []
    for w in window:
        x = np.arange(w, dtype=np.float64) - (w - 1) / 2
        axes.append(np.exp(-0.5 * (x / max(w * sigma_fraction, 1e-3)) ** 2))
    g = axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]
    g /= g.max()
    return np.maximum(g, 1e-4).astype(np.float32)


class _Grid:
    """Windows and cells along the three axes."""

    def __init__(self, shape: Sequence[int], window: Sequence[int], overlap: float) -> None:
        self.shape = tuple(int(s) for s in shape)
        self.window = tuple(int(w) for w in window)
        self.starts = [window_starts(s, w, overlap) for s, w in zip(self.shape, self.window)]
        # cells are cut at every window start and end, so each cell is inside or outside each window
        self.bounds = [
            sorted({0, s} | set(st) | {min(x + w, s) for x in st})
            for st, w, s in zip(self.starts, self.window, self.shape)
        ]
        # per axis: for each window, the range of cells it covers
        self.cover: list[list[range]] = []
        for st, b, w, s in zip(self.starts, self.bounds, self.window, self.shape):
            ranges = []
            for start in st:
                end = min(start + w, s)
                cells = [i for i in range(len(b) - 1) if b[i] >= start and b[i + 1] <= end]
                ranges.append(range(cells[0], cells[-1] + 1))
            self.cover.append(ranges)
        self.pending: dict[tuple[int, int, int], int] = {}
        for window_index in self.windows():
            for cell in self.cells_of(window_index):
                self.pending[cell] = self.pending.get(cell, 0) + 1

    def windows(self) -> list[tuple[int, int, int]]:
        return list(itertools.product(*(range(len(st)) for st in self.starts)))

    def cells_of(self, window_index: tuple[int, int, int]) -> Iterable[tuple[int, int, int]]:
        return itertools.product(*(self.cover[a][window_index[a]] for a in range(3)))

    def window_region(self, window_index: tuple[int, int, int]) -> tuple[slice, ...]:
        return tuple(
            slice(st[i], min(st[i] + w, s)) for st, i, w, s in zip(self.starts, window_index, self.window, self.shape)
        )

    def cell_region(self, cell: tuple[int, int, int]) -> tuple[slice, slice, slice]:
        return tuple(slice(b[i], b[i + 1]) for b, i in zip(self.bounds, cell))  # type: ignore[return-value]


def _forward(model: torch.nn.Module, batch: torch.Tensor, mirror: bool) -> torch.Tensor:
    """Softmax probabilities, averaged over the 8 mirrorings when ``mirror``."""
    probs = torch.softmax(model(batch).float(), dim=1)
    if not mirror:
        return probs
    flips = [f for r in range(1, 4) for f in itertools.combinations((2, 3, 4), r)]
    for dims in flips:
        probs += torch.softmax(model(torch.flip(batch, dims)).float(), dim=1).flip(dims)
    return probs / (len(flips) + 1)


def predict_blocks(
    volume: Volume,
    model: Any,
    *,
    device: str = "auto",
    config: PredictConfig | None = None,
    priority: Sequence[float] | None = None,
    progress: Callable[[PredictReport], Any] | None = None,
) -> Generator[Block, None, None]:
    """Predict ``volume`` window by window, yielding each finished :class:`Block`.

    Parameters
    ----------
    volume : Volume
    model : trained model or checkpoint
        See :func:`napari_sparse3d.checkpoint.as_model`.
    device : str
    config : PredictConfig, optional
        Overlap, batch size, mirror test-time augmentation; default: the model's.
    priority : (z, y, x), optional
        Compute windows nearest this point first (e.g. where the viewer looks).
    progress : callable, optional
        Called with a :class:`PredictReport` after every batch of windows.
    """
    model = as_model(model)
    info: ModelInfo = model.sparse3d  # type: ignore[assignment]
    config = config or info.config.predict
    if volume.channels != info.in_channels:
        raise ValueError(f"image has {volume.channels} channels, but the model was trained on {info.in_channels}")
    dev = resolve_device(device)
    dtype = resolve_precision(dev, info.config.train.precision)
    model = model.to(dev).eval()
    channels_last = info.config.train.channels_last
    grid = _Grid(volume.spatial_shape, info.patch_size, config.overlap)
    gauss = gaussian_importance(info.patch_size, config.gaussian_sigma)
    class_values = np.asarray(info.class_values)
    labels_dtype = np.min_scalar_type(max(int(class_values.max()), 1))
    windows = grid.windows()
    if priority is not None:
        point = np.asarray(priority, dtype=float)

        def distance(w: tuple[int, int, int]) -> float:
            centre = np.array([(r.start + r.stop) / 2 for r in grid.window_region(w)])
            return float(np.sum((centre - point) ** 2))

        windows.sort(key=distance)
    sums: dict[tuple[int, int, int], np.ndarray] = {}
    weights: dict[tuple[int, int, int], np.ndarray] = {}
    start = time.perf_counter()
    done = 0
    for first in range(0, len(windows), config.batch_size):
        chunk = windows[first : first + config.batch_size]
        regions = [grid.window_region(w) for w in chunk]
        images = []
        for region in regions:
            block = volume.read(region)
            check_finite("image", block)
            block = info.normalization.apply(block)
            pad = [(0, 0)] + [(0, w - (r.stop - r.start)) for r, w in zip(region, grid.window)]
            images.append(np.pad(block, pad) if any(p[1] for p in pad) else block)
        batch = torch.from_numpy(np.stack(images)).to(dev)
        if channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last_3d)
        with torch.inference_mode(), autocast(dev, dtype):
            probs = _forward(model, batch, config.mirror_tta).cpu().numpy()
        for w, region, p in zip(chunk, regions, probs):
            for cell in grid.cells_of(w):
                cell_region = grid.cell_region(cell)
                local = tuple(slice(c.start - r.start, c.stop - r.start) for c, r in zip(cell_region, region))
                g = gauss[local]
                if cell not in sums:
                    sums[cell] = p[(slice(None),) + local] * g
                    weights[cell] = g.copy()
                else:
                    sums[cell] += p[(slice(None),) + local] * g
                    weights[cell] += g
                grid.pending[cell] -= 1
                if grid.pending[cell] == 0:
                    cell_probs = sums.pop(cell) / weights.pop(cell)
                    cell_labels = class_values[np.argmax(cell_probs, axis=0)].astype(labels_dtype)
                    yield Block(cell_region, cell_probs.astype(np.float32, copy=False), cell_labels)
        done += len(chunk)
        if progress is not None:
            progress(PredictReport(done, len(windows), time.perf_counter() - start))


class _Crop:
    """A box of a :class:`Volume` that reads like a Volume (used to predict a region with context)."""

    def __init__(self, volume: Volume, box: tuple[slice, slice, slice]) -> None:
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
    """``region`` grown (about its centre, inside ``shape``) to at least one window per axis."""
    box = []
    for size, r, w in zip(shape, region, window):
        start, stop = max(0, r.start or 0), min(size, size if r.stop is None else r.stop)
        if stop - start < w:
            start = max(0, min(size - w, (start + stop - w) // 2))
            stop = min(size, start + w)
        box.append(slice(start, stop))
    return tuple(box)  # type: ignore[return-value]


def predict_region(
    volume: Volume,
    model: Any,
    region: Sequence[slice],
    *,
    device: str = "auto",
    config: PredictConfig | None = None,
) -> Generator[Block, None, None]:
    """Predict only ``region`` (three slices) of ``volume``, e.g. the slice on screen.

    The region is grown to at least one training patch per axis, so the network
    sees the context it was trained with; the blocks yielded cover that box, in
    the volume's coordinates.
    """
    model = as_model(model)
    box = context_box(volume.spatial_shape, region, model.sparse3d.patch_size)
    for block in predict_blocks(_Crop(volume, box), model, device=device, config=config):  # type: ignore[arg-type]
        shifted = tuple(slice(b.start + r.start, b.start + r.stop) for b, r in zip(box, block.region))
        yield Block(shifted, block.probabilities, block.labels)  # type: ignore[arg-type]
