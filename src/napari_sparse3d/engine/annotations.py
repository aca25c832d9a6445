"""Labels and annotated slices, checked once and turned into class-index training targets.

Inside the annotated slices an unpainted voxel is background; elsewhere 0 means
"not annotated".  Bad labels raise a ``TypeError``/``ValueError`` that names the
argument, what was expected and what was given.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from napari_sparse3d.engine.volume import check_numeric, from_torch

__all__ = [
    "Annotations", "check_slices", "class_value_array", "integer_labels", "prepare_annotations", "prepare_many",
    "stored_annotations",
]


def check_slices(annotated_slices: Any, shape: Sequence[int]) -> dict[int, list[int]]:
    """Validate ``{axis: [indices]}`` against the spatial shape; returns sorted unique indices."""
    if annotated_slices is None:
        return {}
    if not isinstance(annotated_slices, Mapping):
        raise TypeError(f"annotated_slices must be a dict {{axis: [indices]}}, got {type(annotated_slices).__name__}")
    out: dict[int, list[int]] = {}
    for axis, indices in annotated_slices.items():
        if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)) or not 0 <= axis < 3:
            raise ValueError(f"annotated_slices: axis must be 0, 1 or 2 (z, y, x), got {axis!r}")
        if isinstance(indices, (int, np.integer)):
            indices = [indices]
        checked = []
        for i in indices:
            if isinstance(i, bool) or not isinstance(i, (int, np.integer)):
                raise TypeError(f"annotated_slices[{axis}]: indices must be integers, got {i!r}")
            if not 0 <= i < shape[axis]:
                raise ValueError(
                    f"annotated_slices[{axis}]: index {int(i)} is out of range for axis {axis} of size {shape[axis]}"
                    f" (valid: 0..{shape[axis] - 1})"
                )
            checked.append(int(i))
        out[int(axis)] = sorted(set(checked))
    return out


@dataclass
class Annotations:
    """Sparse annotations turned into training targets.

    ``target`` holds a class index per voxel (``-1`` where unlabeled);
    ``class_values[k]`` is the user's label value of class ``k`` (0 for
    background).
    """

    target: np.ndarray
    class_values: list[int]
    annotated_slices: dict[int, list[int]]

    @property
    def num_classes(self) -> int:
        return len(self.class_values)

    def remap(self, class_values: Sequence[int]) -> Annotations:
        """The same annotations in another class order (a model's, when training continues)."""
        class_values = [int(v) for v in class_values]
        if class_values == self.class_values:
            return self
        _check_known(self.class_values, class_values)
        lut = np.array([class_values.index(v) for v in self.class_values], dtype=np.int16)
        target = np.where(self.target >= 0, lut[np.clip(self.target, 0, None)], -1).astype(np.int16)
        return Annotations(target=target, class_values=class_values, annotated_slices=self.annotated_slices)

    def slice_counts(self) -> list[int]:
        """Annotated voxels on the annotated slices of each axis."""
        counts = []
        for axis in range(3):
            index: list[Any] = [slice(None)] * 3
            index[axis] = self.annotated_slices.get(axis, [])
            counts.append(int(np.count_nonzero(self.target[tuple(index)] >= 0)))
        return counts

    def counts(self) -> np.ndarray:
        labeled = self.target[self.target >= 0]
        return np.bincount(labeled.ravel(), minlength=self.num_classes)


def class_value_array(class_values: Sequence[int]) -> np.ndarray:
    """The classes' label values as an array of the smallest unsigned type that holds them all.

    ``np.asarray`` would make a list holding values at or above 2**63 and small ones float64,
    which rounds the large values.
    """
    values = [int(v) for v in class_values]
    return np.array(values, dtype=np.min_scalar_type(max(max(values, default=0), 1)))


def _check_known(values: Sequence[int], class_values: Sequence[int]) -> None:
    unknown = [int(v) for v in values if v not in class_values]
    if unknown:
        raise ValueError(
            f"labels hold values {unknown} that the model does not know (its classes are {list(class_values)});"
            " start a new model to add classes"
        )


def integer_labels(labels: Any) -> np.ndarray:
    if isinstance(labels, (list, tuple)):
        labels = np.asarray(labels)
    labels = from_torch(labels)
    dtype = check_numeric("labels", labels)
    arr = np.asarray(labels)
    if dtype.kind == "b":
        return arr.astype(np.uint8)
    if dtype.kind == "f":
        if not np.isfinite(arr).all():
            raise ValueError("labels contain NaN or infinite values; labels must be non-negative integers")
        if not np.array_equal(arr, np.round(arr)):
            raise ValueError("labels contain fractional values; labels must be integers (0 = not annotated, >= 1 = class)")
        if arr.min() < 0:
            raise ValueError(f"labels contain negative values (min {arr.min():g}); use 0 for not annotated, >= 1 for classes")
        if arr.max() >= 2.0**63:
            raise ValueError(
                f"labels contain values beyond the integer range (largest {arr.max():g}); float labels must be below"
                " 2**63 (use an unsigned integer array for larger label values)"
            )
        arr = arr.astype(np.int64)
    if arr.min() < 0:
        raise ValueError(f"labels contain negative values (min {int(arr.min())}); use 0 for not annotated, >= 1 for classes")
    return arr


def stored_annotations(
    labels: Any, annotated_slices: Any, shape: Sequence[int]
) -> tuple[np.ndarray, dict[int, list[int]]]:
    """Labels and fully annotated slices as a project stores them, or the error that says what is wrong.

    Work in progress may hold a single class or none: only what would corrupt a project is refused.
    """
    if labels is None:
        raise ValueError("annotated_slices were given without labels: give the labels painted in them")
    if tuple(np.shape(labels)) != tuple(shape):
        raise ValueError(f"labels must have the project's shape {tuple(shape)}, got {tuple(np.shape(labels))}")
    slices = check_slices(annotated_slices or {}, shape)
    return integer_labels(labels), {a: v for a, v in slices.items() if v}


def prepare_annotations(
    labels: Any,
    shape: Sequence[int],
    annotated_slices: Any = None,
    background_label: int | None = None,
    class_values: Sequence[int] | None = None,
    *,
    require_two: bool = True,
) -> Annotations:
    """Turn napari-style labels into class targets.

    Inside ``annotated_slices`` a 0 voxel is background; elsewhere 0 is "not
    annotated".  Voxels equal to ``background_label`` are background
    anywhere.  ``class_values`` fixes the class order (when continuing to
    train a model); new values that it lacks are an error.
    """
    if isinstance(labels, (str, os.PathLike)):
        raise TypeError(
            f"labels must be an array here, got the path {str(labels)!r}; open files with"
            " napari_sparse3d.io.arrays.load_array (napari_sparse3d.run accepts paths)"
        )
    arr = integer_labels(labels)
    if tuple(arr.shape) != tuple(shape):
        raise ValueError(f"labels must have the image's spatial shape {tuple(shape)}, got {tuple(arr.shape)}")
    slices = check_slices(annotated_slices, shape)
    if background_label is not None and (
        isinstance(background_label, bool) or not isinstance(background_label, (int, np.integer)) or background_label < 1
    ):
        raise ValueError(f"background_label must be a label value >= 1 or None, got {background_label!r}")
    background = np.zeros(arr.shape, dtype=bool)
    for axis, indices in slices.items():
        index: list[Any] = [slice(None)] * 3
        index[axis] = indices
        background[tuple(index)] = arr[tuple(index)] == 0
    if background_label is not None:
        background |= arr == background_label
    foreground_values = sorted(int(v) for v in np.unique(arr) if v != 0 and v != background_label)
    has_background = bool(background.any())
    if not foreground_values and not has_background:
        raise ValueError(
            "labels hold no annotations: paint some voxels (values >= 1) or pass annotated_slices whose unpainted "
            "voxels count as background"
        )
    if class_values is None:
        class_values = ([0] if has_background else []) + foreground_values
        if require_two and len(class_values) < 2:
            only = class_values[0]
            raise ValueError(
                f"labels annotate only one class ({'background' if only == 0 else f'label {only}'}); a model needs at"
                " least two: annotate background (annotated_slices or background_label) and at least one class"
            )
    else:
        class_values = [int(v) for v in class_values]
        _check_known(([0] if has_background else []) + foreground_values, class_values)
    if len(class_values) > 255:
        raise ValueError(
            f"labels hold {len(class_values)} classes; expected a few semantic classes (is this an instance "
            "segmentation? convert it to classes first)"
        )
    # searchsorted instead of a lookup table: label values may be huge (uint32, uint64)
    fg_values = np.array(sorted(v for v in class_values if v != 0), dtype=np.uint64 if arr.dtype == np.uint64 else np.int64)
    fg_index = np.array([class_values.index(v) for v in fg_values], dtype=np.int16)
    target = np.full(arr.shape, -1, dtype=np.int16)
    if fg_values.size:
        pos = np.searchsorted(fg_values, arr).clip(max=fg_values.size - 1)
        hit = fg_values[pos] == arr
        target[hit] = fg_index[pos[hit]]
    if 0 in class_values:
        target[background] = class_values.index(0)
    return Annotations(target=target, class_values=list(class_values), annotated_slices=slices)


def prepare_many(
    labels: Sequence[Any],
    shapes: Sequence[Sequence[int]],
    annotated_slices: Sequence[Any],
    background_label: int | None = None,
    class_values: Sequence[int] | None = None,
) -> list[Annotations]:
    """:func:`prepare_annotations` for several volumes, indexed by one class order.

    Without ``class_values`` the classes are the union over the volumes (a volume may
    annotate only some of them, even only background); together they must hold two.
    """
    if not (len(labels) == len(shapes) == len(annotated_slices)):
        raise ValueError(
            f"labels, images and annotated_slices must come one per volume, got {len(labels)}, {len(shapes)} and"
            f" {len(annotated_slices)}"
        )
    prepared = []
    for i, (lab, shape, slices) in enumerate(zip(labels, shapes, annotated_slices)):
        try:
            prepared.append(prepare_annotations(lab, shape, slices, background_label, class_values, require_two=False))
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"volume {i}: {exc}") from None
    if class_values is None:
        class_values = sorted({v for a in prepared for v in a.class_values})
        if len(class_values) < 2:
            raise ValueError(
                f"labels of all {len(labels)} volumes together annotate only one class ({class_values}); a model needs"
                " at least two: annotate background (annotated_slices or background_label) and at least one class"
            )
    return [a.remap(class_values) for a in prepared]
