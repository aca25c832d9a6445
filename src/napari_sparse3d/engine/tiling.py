"""The geometry of sliding-window prediction: window starts, Gaussian weights, the global window grid, output tiles.

See :mod:`napari_sparse3d.engine.prediction` for how they are used; kept apart so
that a worker of a cluster (:mod:`napari_sparse3d.distributed`) and the
single-process path plan the same windows and tiles from the same code.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np

from napari_sparse3d.engine.preprocess import round_up, side_limits
from napari_sparse3d.engine.volume import Box, box3

__all__ = ["WindowGrid", "fit_window", "gaussian_importance", "plan_tiles", "window_starts"]


def window_starts(size: int, window: int, overlap: float) -> list[int]:
    """Start positions of windows of ``window`` voxels along an axis of ``size``, evenly spread."""
    if size <= window:
        return [0]
    step = max(1.0, window * (1.0 - overlap))
    count = int(np.ceil((size - window) / step)) + 1
    return sorted({int(round(v)) for v in np.linspace(0, size - window, count)})


_FIT_CANDIDATES = 32  # window sides tried per axis, at most


def fit_window(
    window: Sequence[int],
    patch: Sequence[int],
    divisor: Sequence[int],
    shape: Sequence[int],
    overlap: float,
    *,
    grow: float = 1.5,
    shrink: float = 0.75,
    aspect: float = 1.35,
    slack: float = 1.02,
) -> tuple[int, int, int]:
    """The window near ``window`` whose grid covers ``shape`` with the fewest computed voxels.

    Along an axis of ``L`` voxels, ``n`` windows of ``w`` voxels (evenly spread, overlapping by at
    least ``overlap``: :func:`window_starts`) compute ``n * w`` voxels, and the grid multiplies that
    over the axes.  A window planned from the training patch alone can waste much of it on a small
    volume: 32x96x96 windows on a 60x256x256 volume need 3x4x4 windows, 3.6 computed voxels per
    voxel; 36x104x104 windows need 2x3x3, 1.8.  On a large volume the choice hardly matters and the
    window stays as it was.

    Sides stay multiples of ``divisor``, at least the patch (or the volume) and at most the volume
    rounded up (:func:`~napari_sparse3d.engine.preprocess.side_limits`).  The window keeps
    between ``shrink`` and ``grow`` times the voxels of ``window`` (instance normalisation takes its
    statistics over it), and its sides' ratios to ``window``'s differ by at most ``aspect``.  Among
    the windows within ``slack`` of the least work, the one nearest ``window`` is chosen.
    """
    window, shape = [int(w) for w in window], [int(s) for s in shape]
    per_axis: list[dict[int, int]] = []  # per axis: candidate side -> voxels its windows compute along the axis
    for w0, p, d, size, top in zip(window, patch, divisor, shape, side_limits(shape, divisor, patch)):
        d = max(int(d), 1)
        low = max(d, min(int(p), top), math.ceil(w0 * shrink / d) * d)
        high = min(top, 2 * w0)
        step = d * max(1, -(-(high - low) // (_FIT_CANDIDATES * d)))  # a bounded search on any axis
        best_of_count: dict[int, int] = {}
        for w in range(low, high + 1, step):  # per count of windows, its smallest window: the least work
            best_of_count.setdefault(len(window_starts(size, w, overlap)), w)
        per_axis.append({w: len(window_starts(size, w, overlap)) * w for w in {w0, *best_of_count.values()}})
    volume0 = math.prod(window)
    chosen: list[tuple[int, float, tuple[int, int, int]]] = []
    for sides in itertools.product(*per_axis):
        ratios = [w / w0 for w, w0 in zip(sides, window)]
        if not shrink * volume0 <= math.prod(sides) <= grow * volume0 or max(ratios) > aspect * min(ratios):
            continue
        work = math.prod(along[w] for along, w in zip(per_axis, sides))
        chosen.append((work, sum(abs(math.log(r)) for r in ratios), (sides[0], sides[1], sides[2])))
    least = min(work for work, _, _ in chosen)  # the window itself always qualifies
    return min((c for c in chosen if c[0] <= slack * least), key=lambda c: c[1])[2]


def _gaussian_1d(width: int, sigma_fraction: float) -> np.ndarray:
    x = np.arange(width, dtype=np.float64) - (width - 1) / 2
    g = np.exp(-0.5 * (x / max(width * sigma_fraction, 1e-3)) ** 2)
    return np.maximum(g / g.max(), 1e-4)


def gaussian_importance(window: Sequence[int], sigma_fraction: float = 0.125) -> np.ndarray:
    """A separable Gaussian over the window, 1 at its centre, never 0 (so every voxel has some weight)."""
    gz, gy, gx = (_gaussian_1d(int(w), sigma_fraction) for w in window)
    return (gz[:, None, None] * gy[None, :, None] * gx[None, None, :]).astype(np.float32)


def plan_tiles(
    shape: Sequence[int],
    window: Sequence[int],
    tile_voxels: int,
    chunks: Sequence[int] | None = None,
) -> list[Box]:
    """Output tiles: whole chunks of ``chunks`` (when given), about ``tile_voxels`` at most, covering ``shape``.

    A volume within the budget is one tile.  Otherwise a tile grows from one
    chunk, doubling the axis that is shortest relative to the window (long
    tiles would recompute more straddling windows), while it stays within the
    budget; it is never smaller than one chunk.
    """
    shape = tuple(int(s) for s in shape)
    if int(np.prod(shape)) <= tile_voxels:
        return [box3(slice(0, s) for s in shape)]
    unit = [min(int(c), s) for c, s in zip(chunks or (1, 1, 1), shape)]
    full = [round_up(s, u) for s, u in zip(shape, unit)]
    tile = list(unit)
    while True:
        growable = [a for a in range(3) if tile[a] < full[a]]
        growable = [a for a in growable if np.prod(tile) // tile[a] * min(2 * tile[a], full[a]) <= tile_voxels]
        if not growable:
            break
        a = min(growable, key=lambda i: tile[i] / max(int(window[i]), 1))
        tile[a] = min(2 * tile[a], full[a])
    starts = [range(0, s, t) for s, t in zip(shape, tile)]
    return [
        box3(slice(o, min(o + t, s)) for o, t, s in zip(origin, tile, shape))
        for origin in itertools.product(*starts)
    ]


class WindowGrid:
    """The global window grid, and the Gaussian weights it lays on each axis."""

    def __init__(self, shape: Sequence[int], window: Sequence[int], overlap: float, sigma: float) -> None:
        self.shape = tuple(int(s) for s in shape)
        self.window = tuple(int(w) for w in window)
        self.starts = [np.asarray(window_starts(s, w, overlap)) for s, w in zip(self.shape, self.window)]
        self.gauss = [_gaussian_1d(w, sigma) for w in self.window]
        # per axis, the sum of the 1D Gaussians of all windows at each voxel: their product is the
        # weight sum under every voxel, since the windows form a product grid
        self.weight_sum = []
        for starts, g, s in zip(self.starts, self.gauss, self.shape):
            total = np.zeros(max(s, int(starts[-1]) + len(g)))
            for a in starts:
                total[a : a + len(g)] += g
            self.weight_sum.append(total[:s])

    def windows_touching(self, box: Box) -> list[tuple[int, int, int]]:
        """Start positions (z, y, x) of the windows that overlap ``box``."""
        per_axis = [
            [int(a) for a in starts if a < b.stop and a + w > b.start]
            for starts, b, w in zip(self.starts, box, self.window)
        ]
        return list(itertools.product(*per_axis))

    def count(self) -> int:
        return int(np.prod([len(s) for s in self.starts]))
