"""Which slices are annotated, and where to annotate next — without Qt or napari.

* :class:`SliceRegister` — which slices of each axis are *fully annotated*
  (unpainted voxels there count as background), with change callbacks;
* :func:`next_even_slice` — evenly spread slices first (the network's doubts,
  later, come from :func:`napari_sparse3d.loop.corrections.uncertain_slices`);
* :func:`label_counts` — what the annotations hold, per class.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np

__all__ = ["AXIS_NAMES", "SliceRegister", "label_counts", "next_even_slice", "plane"]

AXIS_NAMES = ("z", "y", "x")


def plane(axis: int, index: int) -> tuple:
    """The index expression of slice ``index`` along ``axis`` of a 3D array."""
    key: list = [slice(None)] * 3
    key[axis] = int(index)
    return tuple(key)


class SliceRegister:
    """The fully annotated slices of a ``(Z, Y, X)`` volume, per axis."""

    def __init__(self, shape: Sequence[int], slices: Mapping[int, Iterable[int]] | None = None) -> None:
        if len(shape) != 3:
            raise ValueError(f"shape must have 3 dimensions (Z, Y, X), got {tuple(shape)}")
        self.shape = tuple(int(s) for s in shape)
        self._slices: dict[int, set[int]] = {0: set(), 1: set(), 2: set()}
        self._callbacks: list[Callable[[], None]] = []
        for axis, indices in (slices or {}).items():
            for index in indices:
                self.check(int(axis), int(index))
                self._slices[int(axis)].add(int(index))

    def check(self, axis: int, index: int) -> None:
        if axis not in (0, 1, 2):
            raise ValueError(f"axis must be 0, 1 or 2, got {axis}")
        if not 0 <= index < self.shape[axis]:
            raise ValueError(f"slice index must be in [0, {self.shape[axis] - 1}] along axis {axis}, got {index}")

    def on_change(self, callback: Callable[[], None]) -> None:
        self._callbacks.append(callback)

    def _changed(self) -> None:
        for callback in list(self._callbacks):
            callback()

    def mark(self, axis: int, index: int) -> None:
        self.mark_many([(axis, index)])

    def mark_many(self, pairs: Iterable[tuple[int, int]]) -> None:
        """Mark several ``(axis, index)`` slices with one change notification."""
        pairs = [(int(a), int(i)) for a, i in pairs]
        for axis, index in pairs:
            self.check(axis, index)
        new = [(a, i) for a, i in pairs if i not in self._slices[a]]
        for axis, index in new:
            self._slices[axis].add(index)
        if new:
            self._changed()

    def unmark(self, axis: int, index: int) -> None:
        self.check(axis, index)
        if index in self._slices[axis]:
            self._slices[axis].discard(int(index))
            self._changed()

    def toggle(self, axis: int, index: int) -> bool:
        """Mark or unmark; returns whether the slice is marked afterwards."""
        if self.is_marked(axis, index):
            self.unmark(axis, index)
            return False
        self.mark(axis, index)
        return True

    def is_marked(self, axis: int, index: int) -> bool:
        return int(index) in self._slices[int(axis)]

    def indices(self, axis: int) -> list[int]:
        return sorted(self._slices[int(axis)])

    def as_dict(self) -> dict[int, list[int]]:
        """``{axis: [indices]}`` for the axes that have marked slices (the engine's ``annotated_slices``)."""
        return {axis: sorted(s) for axis, s in self._slices.items() if s}

    def __len__(self) -> int:
        return sum(len(s) for s in self._slices.values())

    def mask(self) -> np.ndarray:
        """Boolean ``(Z, Y, X)`` mask of the voxels inside marked slices."""
        mask = np.zeros(self.shape, bool)
        for axis, indices in self._slices.items():
            for index in indices:
                mask[plane(axis, index)] = True
        return mask

    def describe(self) -> str:
        parts = []
        for axis in range(3):
            indices = self.indices(axis)
            parts.append(f"{AXIS_NAMES[axis]}: " + (", ".join(map(str, indices)) if indices else "-"))
        return "   ".join(parts)


def next_even_slice(size: int, marked: Iterable[int], current: int | None = None) -> int:
    """The slice farthest from every marked slice and from both ends of the axis.

    With nothing marked this is the middle slice; then the quarter points, and
    so on — slices spread evenly over the axis.  Ties go to the slice nearest
    ``current`` (the one on screen), then to the lower index.
    """
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    taken = sorted({int(m) for m in marked})
    if len(taken) >= size:
        return int(current) if current is not None else size // 2
    positions = np.arange(size)
    # the axis ends act as marked slices just outside the volume
    anchors = np.asarray([-1] + taken + [size], dtype=float)
    distance = np.min(np.abs(positions[:, None] - anchors[None, :]), axis=1)
    distance[taken] = -1
    best = np.flatnonzero(distance == distance.max())
    if current is not None:
        return int(best[np.argmin(np.abs(best - int(current)))])
    return int(best[len(best) // 2] if len(best) > 1 and len(taken) == 0 else best[0])


def label_counts(labels: np.ndarray, register: SliceRegister | None = None) -> dict[int, int]:
    """Annotated voxels per class value; ``0`` counts the unpainted voxels of marked slices (background)."""
    labels = np.asarray(labels)
    values, counts = np.unique(labels[labels > 0], return_counts=True)
    result = {int(v): int(c) for v, c in zip(values, counts)}
    if register is not None and len(register):
        background = int(np.count_nonzero(register.mask() & (labels == 0)))
        if background:
            result = {0: background, **result}
    return dict(sorted(result.items()))
