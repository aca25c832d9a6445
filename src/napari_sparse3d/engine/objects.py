"""The scale of the annotated objects, read from sparse annotations (what the planner sizes patches by).

A patch must see an object with some context around it: nuclei a few dozen
voxels wide train best on small, fast patches, while one large organ needs a
patch that covers most of it.  :func:`object_extent` measures the annotated
objects where their outline is known: on fully annotated slices, each
foreground class's 2D connected components give extents along the two
in-plane axes (weighted by area, so debris does not count); without slices
(scribbles) the 3D components of the painted voxels give a lower bound.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import ndimage

from napari_sparse3d.engine.annotations import Annotations

__all__ = ["context_plan", "object_extent"]


def _weighted_median(values: list[float], weights: list[float]) -> float:
    order = np.argsort(values)
    v = np.asarray(values, float)[order]
    w = np.cumsum(np.asarray(weights, float)[order])
    return float(v[np.searchsorted(w, w[-1] / 2)])


def _components(mask: np.ndarray) -> list[tuple[tuple[int, ...], int]]:
    """``(extent per axis, size)`` of each connected component of ``mask``."""
    labelled, count = ndimage.label(mask)
    if not count:
        return []
    sizes = np.bincount(labelled.ravel())[1:]
    boxes = ndimage.find_objects(labelled)
    return [(tuple(s.stop - s.start for s in box), int(size)) for box, size in zip(boxes, sizes) if box is not None]


def object_extent(annotations: Annotations, *, min_size: int = 4) -> np.ndarray | None:
    """Typical extent (z, y, x) in voxels of the annotated foreground objects, or None when none is outlined.

    Per foreground class, the area-weighted median extent of its components
    along each axis; the object scale is the largest over the classes (an
    interior class and its boundary ring measure the same objects).  An axis
    no annotated plane shows takes the mean of the others.
    """
    target = annotations.target
    background = annotations.class_values.index(0) if 0 in annotations.class_values else None
    classes = [k for k in range(annotations.num_classes) if k != background]
    best = np.zeros(3)
    found = False
    for k in classes:
        values: list[list[float]] = [[], [], []]
        weights: list[list[float]] = [[], [], []]
        planes = [(axis, i) for axis, indices in annotations.annotated_slices.items() for i in indices]
        if planes:
            for axis, i in planes:
                index: list[Any] = [slice(None)] * 3
                index[axis] = i
                others = [a for a in range(3) if a != axis]
                for extent, size in _components(target[tuple(index)] == k):
                    if size >= min_size:
                        for a, e in zip(others, extent):
                            values[a].append(e)
                            weights[a].append(size)
        else:  # scribbles: the painted voxels' own components (a lower bound of the objects)
            for extent, size in _components(target == k):
                if size >= min_size:
                    for a in range(3):
                        values[a].append(extent[a])
                        weights[a].append(size)
        for a in range(3):
            if values[a]:
                best[a] = max(best[a], _weighted_median(values[a], weights[a]))
                found = True
    if not found:
        return None
    known = best > 0
    best[~known] = best[known].mean()
    return best


def context_plan(
    extent: np.ndarray | None, patch_voxels: int, batch_size: int, *, grow_above: float = 2.0, max_growth: float = 4.0
) -> tuple[int, int] | None:
    """A larger patch (voxels) and smaller batch for objects that a patch of ``patch_voxels`` cannot hold.

    Objects whose bounding box holds at most ``grow_above`` patches keep the
    configured patch (small, fast steps label-efficiently train dense small
    objects); larger ones get a patch grown towards their size, up to
    ``max_growth`` times the configured one, and a batch cut so that a step
    costs at most twice the configured one.  None: keep the configuration.
    """
    if extent is None:
        return None
    need = float(np.prod(extent))
    if need <= grow_above * patch_voxels:
        return None
    grown = int(min(need, max_growth * patch_voxels))
    batch = int(max(1, min(batch_size, round(2 * batch_size * patch_voxels / grown))))
    return grown, batch
