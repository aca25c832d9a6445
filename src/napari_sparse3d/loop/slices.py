"""The annotation state of the interactive loop, without Qt or napari.

The widgets keep their state here, so that all of it can be tested on plain
arrays:

* :class:`SliceRegister` — which slices of each axis are *fully annotated*
  (unpainted voxels there count as background), with change callbacks;
* :func:`next_even_slice` / :func:`uncertain_slices` — where to annotate next:
  evenly spread slices first, later the slices the network is least sure of;
* :func:`uncertainty` — a per-voxel uncertainty image from class probabilities;
* :func:`label_counts` — what the annotations hold, per class;
* :func:`accept_slices` — the correction step: copy (corrected) prediction
  planes into the annotations and mark them annotated.
"""

from __future__ import annotations

from typing import Callable, Iterable, Mapping, Sequence

import numpy as np

__all__ = [
    "SliceRegister",
    "next_even_slice",
    "uncertain_slices",
    "uncertainty",
    "label_counts",
    "accept_slices",
    "plane",
]

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
                self._check(int(axis), int(index))
                self._slices[int(axis)].add(int(index))

    def _check(self, axis: int, index: int) -> None:
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
            self._check(axis, index)
        new = [(a, i) for a, i in pairs if i not in self._slices[a]]
        for axis, index in new:
            self._slices[axis].add(index)
        if new:
            self._changed()

    def unmark(self, axis: int, index: int) -> None:
        self._check(axis, index)
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
    taken = sorted(set(int(m) for m in marked))
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


def uncertainty(probabilities: np.ndarray) -> np.ndarray:
    """Normalised entropy of ``(K, ...)`` class probabilities: 0 = certain, 1 = uniform."""
    p = np.asarray(probabilities, dtype=np.float32)
    if p.ndim < 2 or p.shape[0] < 2:
        raise ValueError(f"probabilities must be (K, ...) with K >= 2 classes, got shape {p.shape}")
    entropy = -np.sum(p * np.log(np.clip(p, 1e-7, 1.0)), axis=0)
    return (entropy / np.log(p.shape[0])).astype(np.float32)


def uncertain_slices(
    uncertainty_map: np.ndarray, axis: int, marked: Iterable[int] = (), count: int = 3, min_gap: int = 2
) -> list[int]:
    """The ``count`` slices along ``axis`` with the highest mean uncertainty.

    Marked slices and slices within ``min_gap`` of a marked or already chosen
    slice are skipped (neighbouring slices are nearly the same, so annotating
    two of them teaches little more than one).
    """
    u = np.asarray(uncertainty_map, dtype=np.float32)
    if u.ndim != 3:
        raise ValueError(f"uncertainty_map must be 3D (Z, Y, X), got shape {u.shape}")
    other = tuple(a for a in range(3) if a != axis)
    score = u.mean(axis=other)
    blocked = set(int(m) for m in marked)
    chosen: list[int] = []
    gap = max(int(min_gap), 1)
    for index in np.argsort(-score, kind="stable"):
        index = int(index)
        if any(abs(index - b) < gap for b in blocked) or any(abs(index - c) < gap for c in chosen):
            continue
        chosen.append(index)
        if len(chosen) == count:
            break
    return chosen


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


def accept_slices(
    labels: np.ndarray,
    prediction: np.ndarray,
    register: SliceRegister,
    slices: Mapping[int, Iterable[int]],
) -> list[tuple[int, int]]:
    """Copy the (corrected) prediction on ``slices`` into ``labels`` and mark those slices.

    Prediction value 0 is background; it becomes an unpainted voxel inside a
    marked slice, which means the same.  Returns the ``(axis, index)`` pairs
    accepted.  ``labels`` is changed in place.
    """
    if labels.shape != prediction.shape:
        raise ValueError(f"prediction must have the labels' shape {labels.shape}, got {prediction.shape}")
    accepted = []
    for axis, indices in slices.items():
        for index in sorted(set(int(i) for i in indices)):
            register._check(int(axis), index)
            key = plane(int(axis), index)
            labels[key] = prediction[key]
            accepted.append((int(axis), index))
    register.mark_many(accepted)
    return accepted
