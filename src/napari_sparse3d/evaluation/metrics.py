"""Overlap metrics per class, optionally restricted to a mask; instance matching.

Arrays in, numbers out; no torch.  A typical use is to score a dense
prediction on the voxels *outside* the annotated slices::

    mask = ~annotated_slice_mask(shape, annotated_slices)
    scores = dice_per_class(prediction, truth, mask=mask)

and to score instances (objects, each with its own id) by one-to-one matching::

    instance_f1(predicted_instances, true_instances, iou=0.5)["f1"]
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np

__all__ = ["annotated_slice_mask", "dice_per_class", "instance_f1", "iou_per_class", "mean_foreground_dice"]


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


def _instance_ids(array: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(ids, sizes, where)``: the non-zero ids of ``array``, their voxel counts, and the mask of non-zero voxels."""
    if array.dtype == bool or not np.issubdtype(array.dtype, np.integer):
        raise TypeError(f"{name} must be an integer instance label array (0 = background), got dtype {array.dtype}")
    where = array != 0
    ids, sizes = np.unique(array[where], return_counts=True)
    return ids, sizes, where


def instance_f1(pred: np.ndarray, truth: np.ndarray, *, iou: float = 0.5) -> dict[str, float]:
    """Detection scores of instance labels: objects matched one to one by intersection over union.

    Parameters
    ----------
    pred, truth : array of int
        Instance label images of the same shape: each object has its own id, 0 is background.
        Ids need not be consecutive.
    iou : float
        A predicted and a true object match when their IoU *exceeds* this, in [0.5, 1).

    Returns
    -------
    dict
        ``tp`` (matched pairs), ``fp`` (unmatched predicted objects), ``fn`` (unmatched true
        objects), ``precision`` tp/(tp+fp), ``recall`` tp/(tp+fn), ``f1`` 2tp/(2tp+fp+fn),
        ``mean_iou`` (mean IoU of the matched pairs, 0.0 when there are none), ``n_pred``
        and ``n_true``.  With no predicted objects precision is 1.0 only if there are no
        true ones either (and likewise recall); two empty images score 1.0 throughout.

    Notes
    -----
    Above an IoU of 0.5 a match is unique: an object P with IoU(P, T) > 0.5 covers more
    than half of P ∪ T, so two such T would overlap.  The pairs over the threshold are
    therefore already a one-to-one matching (what a greedy or optimal assignment would
    find), and no assignment is needed; below 0.5 it would be, so ``iou < 0.5`` is refused.

    The IoU of every overlapping pair comes from a sparse contingency table: the
    (pred id, true id) pairs of the voxels in both objects, counted by ``np.unique``
    (time O(V log V) for V such voxels), never from a loop over pairs of masks.
    """
    iou = float(iou)
    if not 0.5 <= iou < 1.0:
        raise ValueError(f"iou must be in [0.5, 1) (above 0.5 matches are unique), got {iou}")
    pred = np.asarray(pred)
    truth = np.asarray(truth)
    if pred.shape != truth.shape:
        raise ValueError(f"pred and truth must have the same shape, got {pred.shape} and {truth.shape}")
    pred_ids, pred_sizes, pred_in = _instance_ids(pred, "pred")
    true_ids, true_sizes, true_in = _instance_ids(truth, "truth")
    both = pred_in & true_in
    p = np.searchsorted(pred_ids, pred[both])
    t = np.searchsorted(true_ids, truth[both])
    pairs, overlap = np.unique(p.astype(np.int64) * max(len(true_ids), 1) + t, return_counts=True)
    p, t = np.divmod(pairs, max(len(true_ids), 1))
    union = pred_sizes[p] + true_sizes[t] - overlap
    scores = overlap / union
    matched = scores > iou
    tp = int(matched.sum())
    fp = len(pred_ids) - tp
    fn = len(true_ids) - tp
    return {
        "precision": tp / (tp + fp) if tp + fp else float(fn == 0),
        "recall": tp / (tp + fn) if tp + fn else float(fp == 0),
        "f1": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 1.0,
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "mean_iou": float(scores[matched].mean()) if tp else 0.0,
        "n_pred": len(pred_ids),
        "n_true": len(true_ids),
    }
