"""A validation Dice from annotations held out of training: what the user sees beside the loss.

:func:`split_validation` takes a share of the annotated voxels away from training; :class:`Validator` measures,
every few steps, how well the network segments them (mean Dice over the foreground classes).

Which voxels are held out, and why:

- **A whole slice** when an axis has at least three fully annotated slices: the one nearest the middle of them,
  never the first or the last (the plane lies between training slices, as the unpainted planes the user cares
  about do).  The network never sees any voxel of that plane: an honest estimate of how it segments planes nobody
  painted.  The slice is taken only if it holds at most :data:`SLICE_SHARE_LIMIT` times ``share`` of the annotated
  voxels (with three slices on one axis a slice is a third of all annotations: too much to take from a network
  trained on a handful of slices).  Among the axes that qualify, the slice whose size is nearest ``share`` wins.
- **Square tiles** otherwise: :data:`TILE` x :data:`TILE` in-plane tiles of the annotated slices and of the
  scribbles (in z-planes), drawn at random with the seed until about ``share`` of the annotated voxels are held
  out (at least one tile).  Neighbouring voxels still train, so this Dice is optimistic, but it still tells
  whether the network under- or overfits, and when it stops improving.

Every class keeps training voxels: no class gives more than :data:`CLASS_SHARE_LIMIT` of its voxels to validation.
With too few annotations (fewer than :data:`MIN_VOXELS` annotated voxels, or a class with fewer than
:data:`MIN_CLASS_VOXELS`) nothing is held out: every voxel is needed for training, and a Dice on a few voxels
would be noise.  Validation is then disabled and reported as ``None``.

Memory: the split copies the target once and adds one int16 volume (held out); the :class:`Validator` keeps its patches.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from napari_sparse3d.engine.annotations import Annotations
from napari_sparse3d.engine.devices import autocast, release_cached_memory
from napari_sparse3d.engine.preprocess import Normalization
from napari_sparse3d.engine.volume import Box, VolumeLike, int3

__all__ = ["CLASS_SHARE_LIMIT", "MIN_CLASS_VOXELS", "MIN_VOXELS", "SLICE_SHARE_LIMIT", "TILE", "Validator", "split_validation"]

#: Fewer annotated voxels than this: nothing is held out (validation disabled).
MIN_VOXELS = 2000
#: A class with fewer annotated voxels than this: nothing is held out (validation disabled).
MIN_CLASS_VOXELS = 50
#: Side of the square in-plane tiles held out when no whole slice is.
TILE = 16
#: A whole slice is held out only if it holds at most this many times ``share`` of the annotated voxels.
SLICE_SHARE_LIMIT = 2.0
#: No class gives more than this share of its annotated voxels to validation.
CLASS_SHARE_LIMIT = 0.5


def _planes(shape: Sequence[int], voxels: int = 1 << 24) -> Iterator[slice]:
    """Blocks of whole z-planes of about ``voxels`` voxels: big volumes are scanned without big temporaries."""
    step = max(1, voxels // max(1, int(shape[1]) * int(shape[2])))
    for z in range(0, int(shape[0]), step):
        yield slice(z, min(z + step, int(shape[0])))


def _class_counts(target: np.ndarray, num_classes: int) -> np.ndarray:
    counts = np.zeros(num_classes + 1, np.int64)
    for block in _planes(target.shape):
        counts += np.bincount(np.asarray(target[block], np.int64).ravel() + 1, minlength=num_classes + 1)[: num_classes + 1]
    return counts[1:]


def _plane(axis: int, index: int) -> Box:
    box = [slice(None)] * 3
    box[axis] = slice(index, index + 1)
    return (box[0], box[1], box[2])


def _new_counts(target: np.ndarray, held: np.ndarray | None, box: Box, num_classes: int) -> np.ndarray:
    """Per class: annotated voxels of ``box`` not held out yet."""
    region = target[box]
    take = region >= 0 if held is None else (region >= 0) & (held[box] < 0)
    return np.bincount(region[take].astype(np.int64), minlength=num_classes)[:num_classes]


def _whole_slice(annotations: Annotations, counts: np.ndarray, share: float) -> Box | None:
    """The slice to hold out (see the module docstring), or None."""
    total, limit = counts.sum(), np.floor(counts * CLASS_SHARE_LIMIT)
    best: tuple[float, Box] | None = None
    for axis in range(3):
        indices = sorted(annotations.annotated_slices.get(axis, []))
        if len(indices) < 3:
            continue
        middle = (indices[0] + indices[-1]) / 2
        for index in sorted(indices[1:-1], key=lambda i: (abs(i - middle), i)):
            box = _plane(axis, index)
            held = _new_counts(annotations.target, None, box, annotations.num_classes)
            if 0 < held.sum() <= SLICE_SHARE_LIMIT * share * total and (held <= limit).all():
                distance = abs(held.sum() / total - share)
                if best is None or distance < best[0]:
                    best = (distance, box)
                break  # this axis's slice: the one nearest the middle that may be held out
    return None if best is None else best[1]


def _tile_counts(mask: np.ndarray) -> np.ndarray:
    """Annotated voxels per ``TILE`` x ``TILE`` tile of a 2D mask."""
    rows, cols = -(-mask.shape[0] // TILE), -(-mask.shape[1] // TILE)
    padded = np.zeros((rows * TILE, cols * TILE), bool)
    padded[: mask.shape[0], : mask.shape[1]] = mask
    return padded.reshape(rows, TILE, cols, TILE).sum(axis=(1, 3))


def _tile_candidates(annotations: Annotations) -> np.ndarray:
    """``(N, 4)`` rows ``(axis, index, tile row, tile column)``: every tile holding annotated voxels."""
    target, slices = annotations.target, annotations.annotated_slices
    rows: list[np.ndarray] = []

    def add(axis: int, index: int, mask: np.ndarray) -> None:
        r, c = np.nonzero(_tile_counts(mask))
        if r.size:
            rows.append(np.stack([np.full(r.size, axis), np.full(r.size, index), r, c], axis=1))

    for axis in range(3):  # the fully annotated slices, tiled in their own plane
        for index in slices.get(axis, []):
            add(axis, index, np.asarray(target[_plane(axis, index)]).squeeze(axis) >= 0)
    on_z, on_y, on_x = (set(slices.get(a, [])) for a in range(3))
    for z in range(target.shape[0]):  # scribbles (off every annotated slice), tiled in z-planes
        if z in on_z:
            continue
        mask = np.asarray(target[z]) >= 0
        mask[sorted(on_y), :] = False
        mask[:, sorted(on_x)] = False
        if mask.any():
            add(0, z, mask)
    return np.concatenate(rows) if rows else np.zeros((0, 4), np.int64)


def _tile_box(row: np.ndarray) -> Box:
    axis, index, r, c = (int(v) for v in row)
    box = [slice(r * TILE, (r + 1) * TILE), slice(c * TILE, (c + 1) * TILE)]
    box.insert(axis, slice(index, index + 1))
    return (box[0], box[1], box[2])


def _hold_tiles(annotations: Annotations, counts: np.ndarray, share: float, rng: np.random.Generator, held: np.ndarray) -> list:
    """Fill ``held`` with random tiles until about ``share`` of the annotated voxels; the boxes taken."""
    target, k = annotations.target, annotations.num_classes
    goal, limit = share * counts.sum(), np.floor(counts * CLASS_SHARE_LIMIT)
    taken = np.zeros(k, np.int64)
    boxes: list[Box] = []
    candidates = _tile_candidates(annotations)
    for row in candidates[rng.permutation(len(candidates))]:
        done = taken.sum()
        if boxes and done >= goal - TILE * TILE / 2:  # one more tile would overshoot more than it fills
            break
        box = _tile_box(row)
        new = _new_counts(target, held, box, k)
        n = new.sum()
        if n == 0 or (boxes and done + n - goal > goal - done) or (taken + new > limit).any():
            continue  # nothing new, farther from the goal than before (one tile is always taken), too much of a class
        region, mark = target[box], held[box]
        take = (region >= 0) & (mark < 0)
        mark[take] = region[take]
        taken += new
        boxes.append(box)
    return boxes


def split_validation(annotations: Annotations, share: float, seed: int) -> tuple[Annotations, np.ndarray]:
    """Hold out about ``share`` of the annotated voxels for a validation Dice (policy: module docstring).

    Parameters
    ----------
    annotations : Annotations
        The training targets (class index per voxel, -1 where unlabeled).
    share : float
        Share of the annotated voxels to hold out, in [0, 1]; 0 holds out nothing.
    seed : int
        Which tiles are drawn (the whole-slice choice does not depend on it).

    Returns
    -------
    training : Annotations
        ``annotations`` with the held-out voxels set to -1 (a copy); ``annotations`` itself when nothing is held out.
    held_out : (Z, Y, X) int16 array
        Class index of every held-out voxel, -1 elsewhere.  When nothing is held out (``share`` 0, too few
        annotations) it is a read-only all -1 view that takes no memory; :class:`Validator` then reports ``None``.
    """
    if not isinstance(annotations, Annotations):
        raise TypeError(f"annotations must be an Annotations (see prepare_annotations), got {type(annotations).__name__}")
    if isinstance(share, bool) or not isinstance(share, (int, float, np.number)) or not 0 <= share <= 1:
        raise ValueError(f"share must be a number in [0, 1] (the held-out share of the annotated voxels), got {share!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an integer, got {seed!r}")
    target = annotations.target
    nothing = np.broadcast_to(np.int16(-1), target.shape)
    if share == 0:
        return annotations, nothing
    counts = _class_counts(target, annotations.num_classes)
    present = counts[counts > 0]
    if counts.sum() < MIN_VOXELS or present.size < 1 or present.min() < MIN_CLASS_VOXELS:
        return annotations, nothing
    held = np.full(target.shape, -1, np.int16)
    box = _whole_slice(annotations, counts, float(share))
    if box is not None:
        held[box] = target[box]  # unlabeled voxels are -1 already
        boxes = [box]
    else:
        boxes = _hold_tiles(annotations, counts, float(share), np.random.default_rng(int(seed)), held)
    if not boxes:
        return annotations, nothing
    training = target.copy()
    for box in boxes:
        part = training[box]
        part[held[box] >= 0] = -1
    return Annotations(training, list(annotations.class_values), dict(annotations.annotated_slices)), held


class Validator:
    """The validation Dice of a network on fixed patches around the held-out voxels.

    Built once: up to ``max_patches`` patches (of the training patch size) are placed greedily where they cover
    the most held-out voxels not covered yet (each class weighs the same, so a rare class is covered too; patches
    are centred on held-out voxels, where the network sees context on every side), then read, normalised and kept
    as tensors.  A held-out voxel counts in one patch only.

    Cost of :meth:`dice`: the forward pass (no gradients) of ``max_patches`` patches in batches of ``batch_size``;
    with the defaults (8 patches, one measurement every 25 steps of batch 4) about 1/3 x 8/4 ≈ 2/3 of a training
    step every 25 steps, a few per cent.  Memory: the patches (``max_patches`` x channels x patch voxels float32,
    plus int16 targets), on the CPU.

    Parameters
    ----------
    items : sequence of (volume, normalization, held_out)
        One per training volume: the image (``read(region)`` gives float32 ``(C, z, y, x)``), its normalisation
        and the held-out target from :func:`split_validation` (-1 where not held out).
    patch_size : (z, y, x)
        The training patch size (a valid network input).
    num_classes : int
    foreground_classes : sequence of int
        The class indices whose Dice is averaged.
    max_patches : int
    batch_size : int
        Patches per forward pass (the training batch size fits).
    seed : int
        Which held-out voxels are tried as patch centres.
    """

    def __init__(
        self, items: Sequence[tuple[VolumeLike, Normalization, np.ndarray]], patch_size: Sequence[int], num_classes: int,
        foreground_classes: Sequence[int], *, max_patches: int = 8, batch_size: int = 2, seed: int = 0,
    ) -> None:
        self.patch_size = int3(patch_size)
        if min(self.patch_size) < 1:
            raise ValueError(f"patch_size must be three positive integers, got {tuple(patch_size)!r}")
        for name, value in (("num_classes", num_classes), ("max_patches", max_patches), ("batch_size", batch_size)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self.num_classes, self.batch_size = int(num_classes), int(batch_size)
        self.foreground_classes = [int(k) for k in foreground_classes]
        if not all(0 <= k < self.num_classes for k in self.foreground_classes):
            raise ValueError(f"foreground_classes must be class indices in [0, {self.num_classes}), got {foreground_classes!r}")
        items = list(items)
        for n, item in enumerate(items):
            if not isinstance(item, (tuple, list)) or len(item) != 3:
                raise TypeError(f"items[{n}] must be a tuple (volume, normalization, held_out), got {type(item).__name__}")
            if tuple(np.shape(item[2])) != tuple(item[0].spatial_shape):
                shapes = f"{tuple(np.shape(item[2]))}, the volume {tuple(item[0].spatial_shape)}"
                raise ValueError(f"items[{n}]: the held-out target has shape {shapes}")
        if len({int(item[0].channels) for item in items}) > 1:
            raise ValueError("items: the volumes must have the same number of channels (one network reads them all)")
        which, coords, classes = self._held_out(items)
        self.held_out_voxels = len(classes)
        self.patches = self._place(items, which, coords, classes, int(max_patches), np.random.default_rng(seed))
        self.covered_voxels = 0
        images, targets = [], []
        for n, origin, inside in self.patches:
            volume, normalization, _ = items[n]
            region = tuple(slice(o, o + p) for o, p in zip(origin, self.patch_size))
            image = normalization.apply(volume.read(region))
            pad = [(0, p - s) for p, s in zip(self.patch_size, image.shape[1:])]
            images.append(np.pad(image, [(0, 0)] + pad) if any(a for _, a in pad) else image)
            target = np.full(self.patch_size, -1, np.int16)
            local = coords[inside] - np.asarray(origin)
            target[local[:, 0], local[:, 1], local[:, 2]] = classes[inside]
            targets.append(target)
            self.covered_voxels += int(inside.size)
        self._images = torch.from_numpy(np.stack(images)) if images else None
        self._targets = torch.from_numpy(np.stack(targets)) if targets else None

    @property
    def enabled(self) -> bool:
        """Whether there is anything to measure (else :meth:`dice` returns None)."""
        return self._images is not None

    @staticmethod
    def _held_out(items: list) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every held-out voxel: its item, ``(z, y, x)`` and class (scanned in blocks of planes)."""
        which, coords, classes = [], [], []
        for n, (_, _, held) in enumerate(items):
            for block in _planes(np.shape(held)):
                part = np.asarray(held[block])
                z, y, x = np.nonzero(part >= 0)
                if z.size:
                    which.append(np.full(z.size, n, np.int32))
                    coords.append(np.stack([z + block.start, y, x], axis=1).astype(np.int64))
                    classes.append(part[z, y, x].astype(np.int16))
        if not classes:
            return np.zeros(0, np.int32), np.zeros((0, 3), np.int64), np.zeros(0, np.int16)
        return np.concatenate(which), np.concatenate(coords), np.concatenate(classes)

    def _place(self, items: list, which: np.ndarray, coords: np.ndarray, classes: np.ndarray, max_patches: int, rng: Any) -> list:
        """Greedy: each patch covers the most (class-balanced) held-out voxels not yet covered."""
        if not classes.size:
            return []
        patch = np.asarray(self.patch_size)
        counts = np.bincount(classes.astype(np.int64), minlength=self.num_classes)
        weight = 1.0 / counts[classes.astype(np.int64)]
        shapes = np.asarray([item[0].spatial_shape for item in items])
        remaining = np.ones(classes.size, bool)
        chosen = []
        for _ in range(max_patches):
            left = np.flatnonzero(remaining)
            if not left.size:
                break
            centres = rng.choice(left, min(64, left.size), replace=False, p=weight[left] / weight[left].sum())
            scored = left if left.size <= 20_000 else rng.choice(left, 20_000, replace=False)
            origins = np.clip(coords[centres] - patch // 2, 0, np.maximum(shapes[which[centres]] - patch, 0))
            inside = (which[scored][None] == which[centres][:, None]) & (
                (coords[scored][None] >= origins[:, None]) & (coords[scored][None] < origins[:, None] + patch)
            ).all(-1)
            best = int(np.argmax(inside @ weight[scored]))
            n, origin = int(which[centres[best]]), origins[best]
            mask = (which[left] == n) & ((coords[left] >= origin) & (coords[left] < origin + patch)).all(-1)
            covered = left[mask]
            remaining[covered] = False
            chosen.append((n, int3(origin), covered))
        return chosen

    def dice(self, model: nn.Module, device: Any = None, precision: torch.dtype | None = None) -> float | None:
        """Mean Dice over the foreground classes on the held-out voxels of the patches; None if nothing is held out.

        Intersections and sizes are summed over all patches first; a class absent
        from both the prediction and the truth (on held-out voxels) is skipped.  The
        model runs in eval mode without gradients; its mode is restored.

        Parameters
        ----------
        model : nn.Module
            Returns logits ``(N, K, z, y, x)`` (or a list of them, finest first).
        device : torch.device or str, optional
            Where the model is; by default the device of its parameters.
        precision : torch.dtype, optional
            The autocast dtype (as training uses); float32 by default.
        """
        if self._images is None or self._targets is None:
            return None
        if device is None:
            device = next(model.parameters()).device
        device = torch.device(device)
        precision = torch.float32 if precision is None else precision
        while True:
            try:
                confusion = self._confusion(model, device, precision)
                break
            except torch.OutOfMemoryError:
                release_cached_memory(device)
                if self.batch_size <= 1:
                    raise
                self.batch_size //= 2
        dices = []
        for k in self.foreground_classes:
            intersection, size = confusion[k, k], confusion[k, :].sum() + confusion[:, k].sum()
            if size > 0:
                dices.append(2.0 * intersection / size)
        return float(np.mean(dices)) if dices else None

    def _confusion(self, model: nn.Module, device: torch.device, precision: torch.dtype) -> np.ndarray:
        """``(K, K)`` voxel counts, truth by prediction, over the held-out voxels."""
        assert self._images is not None and self._targets is not None
        k = self.num_classes
        weights = [p for p in model.parameters() if p.dim() == 5]
        channels_last = bool(weights) and weights[0].is_contiguous(memory_format=torch.channels_last_3d)
        confusion = torch.zeros(k * k, dtype=torch.int64, device=device)
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                for start in range(0, len(self._images), self.batch_size):
                    x = self._images[start : start + self.batch_size].to(device)
                    if channels_last:
                        x = x.contiguous(memory_format=torch.channels_last_3d)
                    with autocast(device, precision):
                        out = model(x)
                    if isinstance(out, (list, tuple)):
                        out = out[0]
                    predicted = out.argmax(1)
                    truth = self._targets[start : start + self.batch_size].to(device).long()
                    valid = truth >= 0
                    confusion += torch.bincount(truth[valid] * k + predicted[valid], minlength=k * k)[: k * k]
        finally:
            model.train(was_training)
        return confusion.cpu().numpy().reshape(k, k)
