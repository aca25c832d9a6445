"""A PNG of three orthogonal views with the segmentation overlaid (for reports and the console command)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np

__all__ = ["orthogonal_views", "save_orthogonal_views"]

# distinct colours for label values 1, 2, ... (background stays uncoloured)
_PALETTE = np.array(
    [[230, 25, 75], [60, 180, 75], [0, 130, 200], [255, 225, 25], [245, 130, 48], [145, 30, 180], [70, 240, 240]],
    dtype=np.float32,
)


def _grey(plane: np.ndarray, lo: float, hi: float) -> np.ndarray:
    g = np.clip((plane.astype(np.float32) - lo) / max(hi - lo, 1e-8), 0, 1) * 255
    return np.repeat(g[..., None], 3, axis=-1)


def _overlay(rgb: np.ndarray, labels: np.ndarray, alpha: float) -> np.ndarray:
    from skimage.segmentation import find_boundaries

    out = rgb.copy()
    for i, value in enumerate(v for v in np.unique(labels) if v != 0):
        colour = _PALETTE[i % len(_PALETTE)]
        region = labels == value
        out[region] = (1 - alpha) * out[region] + alpha * colour
        out[find_boundaries(region, mode="inner")] = colour
    return out


def orthogonal_views(
    image: np.ndarray,
    labels: np.ndarray,
    *,
    index: Sequence[int] | None = None,
    spacing: Sequence[float] | None = None,
    annotated_slices: Mapping[int, Sequence[int]] | None = None,
    alpha: float = 0.35,
    zoom: int = 2,
) -> np.ndarray:
    """An RGB uint8 mosaic: for each axis the image slice (left) and the slice with labels overlaid (right).

    Slices are taken at ``index`` (default: the first annotated slice of each
    axis, else the centre); anisotropic ``spacing`` stretches the views to
    physical proportions.
    """
    image = np.asarray(image)
    labels = np.asarray(labels)
    if index is None:
        index = [
            (annotated_slices or {}).get(a, [s // 2])[0] if (annotated_slices or {}).get(a) else s // 2
            for a, s in enumerate(image.shape)
        ]
    lo, hi = np.percentile(image, [0.5, 99.5])
    spacing = np.asarray(spacing if spacing is not None else (1.0, 1.0, 1.0), dtype=float)
    rows = []
    for axis in range(3):
        plane = np.take(image, index[axis], axis=axis)
        lab = np.take(labels, index[axis], axis=axis)
        other = [a for a in range(3) if a != axis]
        # physical aspect ratio: repeat rows/columns of the coarser axis
        rep = spacing[other] / spacing[other].min()
        reps = [max(1, int(round(r))) * zoom for r in rep]
        grey = _grey(plane, lo, hi)
        pair = np.concatenate([grey, np.full((grey.shape[0], 4, 3), 255.0), _overlay(grey, lab, alpha)], axis=1)
        pair = np.repeat(np.repeat(pair, reps[0], axis=0), reps[1], axis=1)
        rows.append(pair)
    width = max(r.shape[1] for r in rows)
    padded = [np.pad(r, ((0, 6), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows]
    return np.concatenate(padded, axis=0).astype(np.uint8)


def save_orthogonal_views(path: str | os.PathLike, image: np.ndarray, labels: np.ndarray, **kwargs) -> str:
    from skimage.io import imsave

    imsave(str(path), orthogonal_views(image, labels, **kwargs), check_contrast=False)
    return str(path)
