"""The correction step of the loop, without Qt: how sure the network is, and accepting its slices.

* :func:`uncertainty` — a per-voxel uncertainty image from class probabilities;
* :func:`uncertain_slices` — the slices the network is least sure of (where to annotate next);
* :func:`accept_slices` — copy (corrected) prediction planes into the annotations
  and mark them annotated.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

from napari_sparse3d.loop.slices import SliceRegister, plane

__all__ = ["accept_slices", "uncertain_slices", "uncertainty"]


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
    blocked = {int(m) for m in marked}
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
        for index in sorted({int(i) for i in indices}):
            register.check(int(axis), index)
            key = plane(int(axis), index)
            labels[key] = prediction[key]
            accepted.append((int(axis), index))
    register.mark_many(accepted)
    return accepted
