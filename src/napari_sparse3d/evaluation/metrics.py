"""Overlap metrics per class, optionally restricted to a mask.

Arrays in, numbers out; no torch.  A typical use is to score a dense
prediction on the voxels *outside* the annotated slices::

    mask = ~annotated_slice_mask(shape, annotated_slices)
    scores = dice_per_class(prediction, truth, mask=mask)
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np

__all__ = ["annotated_slice_mask", "dice_per_class", "iou_per_class", "mean_foreground_dice"]


def _counts(
    prediction: np.ndarray, truth: np.ndarray, classes: Iterable[int] | None, mask: np.ndarray | None
) -> dict[int, tuple[int, int, int]]:
    prediction = np.asarray(prediction)
    truth = np.asarray(truth)
    if prediction.shape != truth.shape:
        raise ValueError(f"prediction and truth must have the same shape, got {prediction.shape} and {truth.shape}")
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != truth.shape:
            raise ValueError(f"mask must have the shape of truth {truth.shape}, got {mask.shape}")
        prediction = prediction[mask]
        truth = truth[mask]
    if classes is None:
        classes = sorted(set(np.unique(truth).tolist()) | set(np.unique(prediction).tolist()))
    out = {}
    for c in classes:
        p = prediction == c
        t = truth == c
        inter = int(np.count_nonzero(p & t))
        out[int(c)] = (inter, int(np.count_nonzero(p)), int(np.count_nonzero(t)))
    return out


def dice_per_class(
    prediction: np.ndarray,
    truth: np.ndarray,
    *,
    classes: Iterable[int] | None = None,
    mask: np.ndarray | None = None,
) -> dict[int, float]:
    """Dice coefficient 2|P∩T| / (|P|+|T|) for each class value.

    Parameters
    ----------
    prediction, truth : array of int
        Label images of the same shape.
    classes : iterable of int, optional
        Class values to score; default: every value that occurs in either array.
    mask : array of bool, optional
        Only voxels where ``mask`` is true are scored.

    Returns
    -------
    dict
        ``{class value: dice}``; a class absent from both arrays scores 1.0.
    """
    return {c: (2 * i / (p + t) if p + t else 1.0) for c, (i, p, t) in _counts(prediction, truth, classes, mask).items()}


def iou_per_class(
    prediction: np.ndarray,
    truth: np.ndarray,
    *,
    classes: Iterable[int] | None = None,
    mask: np.ndarray | None = None,
) -> dict[int, float]:
    """Intersection over union |P∩T| / |P∪T| for each class value (see :func:`dice_per_class`)."""
    return {
        c: (i / (p + t - i) if p + t - i else 1.0) for c, (i, p, t) in _counts(prediction, truth, classes, mask).items()
    }


def mean_foreground_dice(
    prediction: np.ndarray, truth: np.ndarray, *, mask: np.ndarray | None = None, background: int = 0
) -> float:
    """Mean Dice over the classes of ``truth`` other than ``background``."""
    classes = [int(c) for c in np.unique(np.asarray(truth)[mask] if mask is not None else truth) if c != background]
    if not classes:
        raise ValueError("truth holds no foreground class to score")
    scores = dice_per_class(prediction, truth, classes=classes, mask=mask)
    return float(np.mean(list(scores.values())))


def annotated_slice_mask(shape: Sequence[int], annotated_slices: Mapping[int, Sequence[int]] | None) -> np.ndarray:
    """Boolean volume that is true on every voxel of the given slices ``{axis: [indices]}``."""
    mask = np.zeros(tuple(shape), dtype=bool)
    for axis, indices in (annotated_slices or {}).items():
        index = [slice(None)] * len(shape)
        index[int(axis)] = list(indices)
        mask[tuple(index)] = True
    return mask
