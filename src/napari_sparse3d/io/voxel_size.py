"""The voxel size (z, y, x) that an image file records, when it records all three.

- OME-TIFF: ``PhysicalSizeZ/Y/X`` of the first image (with their units);
- ImageJ TIFF: the ``XResolution``/``YResolution`` tags (pixels per unit) and the
  ``spacing`` of the ImageJ description (its ``unit``);
- OME-Zarr: the scale of the full-resolution level.

Sizes come back in micrometres where the file names a length unit, else in the
file's own unit.  A file that gives no size along one of the axes gives None: the
plugin then asks the user instead of guessing cubes.  No torch, no napari.
"""

from __future__ import annotations

import math
import os
import xml.etree.ElementTree as ET
from pathlib import Path

__all__ = ["file_voxel_size"]

#: Micrometres per unit, by the names OME and ImageJ use.
_MICRONS = {
    "m": 1e6, "cm": 1e4, "mm": 1e3, "µm": 1.0, "um": 1.0, "micron": 1.0, "microns": 1.0, "\\u00B5m": 1.0,
    "nm": 1e-3, "å": 1e-4, "Å": 1e-4, "angstrom": 1e-4, "pm": 1e-6, "inch": 25400.0,
}

VoxelSize = tuple[float, float, float]


def file_voxel_size(path: str | os.PathLike) -> VoxelSize | None:
    """The voxel size that the TIFF or OME-Zarr at ``path`` records, or None when it does not record all three."""
    path = Path(path)
    name = path.name.lower()
    try:
        if name.endswith((".tif", ".tiff")):
            return _tiff(path)
        if path.is_dir():
            return _ome_zarr(path)
    except Exception:  # a damaged or foreign file (tifffile raises many kinds): unknown, the user is asked
        return None
    return None


def _valid(size: tuple[float | None, ...]) -> VoxelSize | None:
    if len(size) != 3 or any(s is None or not math.isfinite(s) or s <= 0 for s in size):
        return None
    return float(size[0]), float(size[1]), float(size[2])  # type: ignore[arg-type]


def _in_microns(value: float | None, unit: str | None) -> float | None:
    if value is None:
        return None
    return value * _MICRONS.get((unit or "µm").strip(), 1.0)


def _tiff(path: Path) -> VoxelSize | None:
    import tifffile

    with tifffile.TiffFile(path) as tif:
        if tif.is_ome and tif.ome_metadata:
            found = _ome_xml(tif.ome_metadata)
            if found is not None:
                return found
        page = tif.pages.first
        tags = page.tags
        if "XResolution" not in tags or "YResolution" not in tags:
            return None
        imagej = tif.imagej_metadata or {}
        unit = imagej.get("unit")
        if unit is None:  # a plain TIFF: the ResolutionUnit tag (2 inch, 3 cm)
            unit = {2: "inch", 3: "cm"}.get(int(getattr(tags.get("ResolutionUnit"), "value", 1)))
        x, y = (_per_pixel(tags[name].value) for name in ("XResolution", "YResolution"))
        z = imagej.get("spacing")
        return _valid(tuple(_in_microns(v, unit) for v in (None if z is None else float(z), y, x)))


def _per_pixel(rational: tuple[int, int] | float) -> float | None:
    """A resolution tag (pixels per unit, as a rational) as a pixel size (units per pixel)."""
    if isinstance(rational, tuple):
        numerator, denominator = rational
        return None if numerator == 0 else denominator / numerator
    return None if not rational else 1.0 / float(rational)


def _ome_xml(xml: str) -> VoxelSize | None:
    root = ET.fromstring(xml)
    pixels = next((element for element in root.iter() if element.tag.endswith("}Pixels") or element.tag == "Pixels"), None)
    if pixels is None:
        return None
    size = []
    for axis in "ZYX":
        value = pixels.get(f"PhysicalSize{axis}")
        size.append(_in_microns(None if value is None else float(value), pixels.get(f"PhysicalSize{axis}Unit")))
    return _valid(tuple(size))


def _ome_zarr(path: Path) -> VoxelSize | None:
    import zarr

    from napari_sparse3d.io.ome import multiscales, read_levels

    if multiscales(zarr.open_group(str(path), mode="r")) is None:
        return None
    _, scales = read_levels(path)
    return _valid(tuple(scales[0])) if scales else None
