"""OME-Zarr label images: how predictions are written to a ``.zarr`` path.

A prediction saved at ``name.zarr`` is an OME-NGFF 0.5 image (a zarr v3 group):
the labels at full resolution in the array ``0``, optionally coarser levels
``1``, ``2``, ... (nearest-neighbour: label values are never averaged), and
the ``multiscales`` metadata, written with ome-zarr-py: axes z, y, x and one
scale transformation per level from the voxel spacing.  napari (through
napari-ome-zarr) and other OME-Zarr viewers then show the labels at their
physical size, on top of the image they came from.

:func:`level0` lets :func:`napari_sparse3d.io.arrays.load_array` open any
OME-Zarr image (ours or another tool's) as its full-resolution array.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import zarr

__all__ = [
    "add_pyramid", "check_pyramid", "create_label_image", "is_label_image",
    "level0", "multiscales", "pyramid_factors", "read_levels",
]

MARK = "napari_sparse3d"  # group attribute: what wrote it (an earlier prediction may be replaced with overwrite)


def _axes() -> list[dict[str, str]]:
    return [{"name": name, "type": "space"} for name in "zyx"]


def _write_metadata(group: zarr.Group, scales: Sequence[Sequence[float]], name: str) -> None:
    from ome_zarr.format import FormatV05
    from ome_zarr.writer import write_multiscales_metadata

    datasets = [
        {"path": str(level), "coordinateTransformations": [{"type": "scale", "scale": [float(s) for s in scale]}]}
        for level, scale in enumerate(scales)
    ]
    write_multiscales_metadata(group, datasets, fmt=FormatV05(), axes=_axes(), name=name)


def create_label_image(
    path: str | os.PathLike, shape: Sequence[int], dtype: Any, chunks: Sequence[int], spacing: Sequence[float] | None,
    *, name: str = "labels",
) -> zarr.Array:
    """A new OME-Zarr image at ``path`` holding one level; returns its full-resolution array ``0`` to write into."""
    group = zarr.open_group(str(path), mode="w", zarr_format=3)
    group.attrs[MARK] = {"kind": "labels"}
    array = group.create_array("0", shape=tuple(int(s) for s in shape), dtype=dtype, chunks=tuple(int(c) for c in chunks),
                               fill_value=0)
    _write_metadata(group, [list(spacing) if spacing is not None else [1.0, 1.0, 1.0]], name)
    return array


def multiscales(group: Any) -> list[dict] | None:
    """The ``multiscales`` entries of an OME-Zarr group (NGFF 0.5 under ``ome``, 0.4 at the top), else None."""
    attrs = dict(group.attrs)
    found = attrs.get("ome", {}).get("multiscales") if isinstance(attrs.get("ome"), dict) else None
    found = found if found is not None else attrs.get("multiscales")
    return found if isinstance(found, list) and found and isinstance(found[0], dict) else None


def level0(group: Any) -> Any | None:
    """The full-resolution array of an OME-Zarr image group, or None when ``group`` is not one."""
    entries = multiscales(group)
    if entries is None:
        return None
    datasets = entries[0].get("datasets") or []
    path = datasets[0].get("path") if datasets and isinstance(datasets[0], dict) else None
    if not isinstance(path, str) or path not in set(group.array_keys()):
        return None
    return group[path]


def read_levels(path: str | os.PathLike) -> tuple[list[Any], list[list[float]]]:
    """The levels of an OME-Zarr image (lazy zarr arrays, finest first) and each level's scale (z, y, x)."""
    group = zarr.open_group(str(path), mode="r")
    entries = multiscales(group)
    if entries is None:
        raise ValueError(f"{str(path)!r} is not an OME-Zarr image (no multiscales metadata)")
    arrays, scales = [], []
    for dataset in entries[0].get("datasets", []):
        arrays.append(group[dataset["path"]])
        scale = [1.0, 1.0, 1.0]
        for transform in dataset.get("coordinateTransformations", []):
            if transform.get("type") == "scale":
                scale = [float(v) for v in transform["scale"]][-3:]
        scales.append(scale)
    return arrays, scales


def is_label_image(path: str | os.PathLike) -> bool:
    """Whether ``path`` is an OME-Zarr label image written by napari-sparse3d (replaceable with overwrite)."""
    meta = Path(path) / "zarr.json"
    try:
        node = json.loads(meta.read_text())
        return node.get("node_type") == "group" and isinstance(node.get("attributes", {}).get(MARK), dict)
    except (OSError, ValueError, AttributeError):
        return False


def check_pyramid(pyramid: Any) -> int:
    if isinstance(pyramid, bool) or not isinstance(pyramid, (int, np.integer)) or not 0 <= pyramid <= 16:
        raise ValueError(f"pyramid must be an integer from 0 to 16 (coarser levels of the output), got {pyramid!r}")
    return int(pyramid)


def pyramid_factors(spacing: Sequence[float] | None, levels: int) -> list[tuple[int, int, int]]:
    """Per level, the downsampling of each axis from the previous one: 2 where the voxel is not already coarse.

    An axis whose voxel is more than twice the finest current one is left alone
    (the anisotropic z of a confocal stack) until the others catch up.
    """
    current = [float(s) for s in (spacing if spacing is not None else (1.0, 1.0, 1.0))]
    factors = []
    for _ in range(levels):
        finest = min(current)
        step = tuple(1 if s > 2 * finest else 2 for s in current)
        factors.append(step)
        current = [s * f for s, f in zip(current, step)]
    return factors  # type: ignore[return-value]


def add_pyramid(group: zarr.Group, levels: int, spacing: Sequence[float] | None, *, name: str = "labels") -> None:
    """Add ``levels`` coarser levels beside the array ``0`` (nearest: every ``f``-th voxel), chunk by chunk."""
    scale = [float(s) for s in (spacing if spacing is not None else (1.0, 1.0, 1.0))]
    scales = [list(scale)]
    previous = group["0"]
    for level, factor in enumerate(pyramid_factors(spacing, levels), start=1):
        shape = tuple(-(-n // f) for n, f in zip(previous.shape, factor))
        if min(shape) < 1 or shape == tuple(previous.shape):
            break
        array = group.create_array(str(level), shape=shape, dtype=previous.dtype, chunks=previous.chunks, fill_value=0,
                                   overwrite=True)
        for index in np.ndindex(*(-(-n // c) for n, c in zip(shape, array.chunks))):
            box = tuple(slice(i * c, min((i + 1) * c, n)) for i, c, n in zip(index, array.chunks, shape))
            source = tuple(slice(b.start * f, b.stop * f, f) for b, f in zip(box, factor))
            array[box] = previous[source]
        scale = [s * f for s, f in zip(scale, factor)]
        scales.append(list(scale))
        previous = array
    _write_metadata(group, scales, name)
