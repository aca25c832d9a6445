"""napari reader: a project directory opens as its image, annotations and prediction.

A prediction written to zarr (an OME-Zarr label image, :mod:`napari_sparse3d.io.ome`)
opens as a Labels layer at its voxel size, with its pyramid when it has one.

The annotation layer carries the project's path and its fully annotated slices
in ``metadata["napari_sparse3d"]``; the plugin's docks pick both up, save
edits back into the project and continue from its latest checkpoint.  No torch
is imported here.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from napari_sparse3d._napari.state import METADATA_KEY
from napari_sparse3d.io.ome import is_label_image, read_levels
from napari_sparse3d.io.project import Project, is_project

__all__ = ["napari_get_reader", "read_labels_image", "read_project"]


def napari_get_reader(path: Any) -> Callable[[Any], list] | None:
    if isinstance(path, list):
        path = path[0] if len(path) == 1 else None
    if path is None:
        return None
    if is_project(path):
        return read_project
    if is_label_image(path):
        return read_labels_image
    return None


def read_labels_image(path: Any) -> list[tuple[Any, dict, str]]:
    """A prediction written to zarr: one Labels layer, multiscale when it has coarser levels."""
    if isinstance(path, list):
        path = path[0]
    arrays, scales = read_levels(path)
    name = Path(path).name.removesuffix(".zarr")
    data = arrays if len(arrays) > 1 else arrays[0]
    return [(data, {"name": name, "scale": tuple(scales[0]), "multiscale": len(arrays) > 1}, "labels")]


def read_project(path: Any) -> list[tuple[Any, dict, str]]:
    if isinstance(path, list):
        path = path[0]
    project = Project.open(path)
    name = Path(path).name.removesuffix(".zarr")
    scale = project.spacing or (1.0, 1.0, 1.0)
    labels, slices = project.annotations()
    meta = {"project": str(Path(path).resolve()), "annotated_slices": {str(a): v for a, v in slices.items()}}
    layers: list[tuple[Any, dict, str]] = [
        (project.image(), {"name": name, "scale": scale}, "image"),
        (labels, {"name": f"{name} annotations", "scale": scale, "metadata": {METADATA_KEY: meta}}, "labels"),
    ]
    prediction = project.prediction()
    if prediction is not None:
        layers.append(
            (
                prediction,
                {
                    "name": "prediction",
                    "scale": scale,
                    "opacity": 0.5,
                    "metadata": {METADATA_KEY: {"role": "prediction", "project": meta["project"]}},
                },
                "labels",
            )
        )
    return layers
