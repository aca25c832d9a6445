"""Intensity normalisation and patch-size planning.

Normalisation follows nnU-Net / the KiTS19 entry of the seeds: clip to the
0.5 and 99.5 percentiles, then z-score.  The statistics are computed once on
the training volume and stored with the model, so that a new volume is
normalised the same way at prediction time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from napari_sparse3d.engine.volume import Volume, check_finite, int3

__all__ = ["Normalization", "compute_normalization", "dominant_slice_axis", "plan_patch_size", "round_up"]


@dataclass(frozen=True)
class Normalization:
    """Per-channel clip bounds and z-score statistics."""

    lower: tuple[float, ...]
    upper: tuple[float, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def apply(self, block: np.ndarray) -> np.ndarray:
        """Normalise a ``(C, ...)`` float32 block (in place where possible)."""
        shape = (-1,) + (1,) * (block.ndim - 1)
        lo = np.asarray(self.lower, np.float32).reshape(shape)
        hi = np.asarray(self.upper, np.float32).reshape(shape)
        mean = np.asarray(self.mean, np.float32).reshape(shape)
        std = np.asarray(self.std, np.float32).reshape(shape)
        if block.shape[0] != lo.shape[0]:
            raise ValueError(f"image has {block.shape[0]} channels, but the model was trained on {lo.shape[0]}")
        block = np.clip(block, lo, hi, out=block if block.dtype == np.float32 else None)
        block -= mean
        block /= std
        return block

    def to_dict(self) -> dict[str, list[float]]:
        return {k: list(v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict) -> Normalization:
        return cls(**{k: tuple(float(x) for x in data[k]) for k in ("lower", "upper", "mean", "std")})


def compute_normalization(volume: Volume, *, max_samples: int = 4_000_000, name: str = "image") -> Normalization:
    """Percentile clip bounds and z-score statistics of a volume (a strided subsample of large ones).

    Raises ``ValueError`` when the sample holds NaN or infinite values.
    """
    shape = volume.spatial_shape
    total = int(np.prod(shape))
    step = max(1, int(np.ceil((total / max_samples) ** (1 / 3))))
    sample = volume.read((slice(None, None, step),) * 3)
    check_finite(name, sample)
    lower, upper, mean, std = [], [], [], []
    for channel in sample.reshape(sample.shape[0], -1):
        lo, hi = np.percentile(channel, [0.5, 99.5])
        clipped = np.clip(channel, lo, hi)
        m, s = float(clipped.mean()), float(clipped.std())
        lower.append(float(lo))
        upper.append(float(hi))
        mean.append(m)
        std.append(s if s > 1e-8 else 1.0)  # a constant image stays constant instead of dividing by zero
    return Normalization(tuple(lower), tuple(upper), tuple(mean), tuple(std))


def round_up(value: int, multiple: int) -> int:
    """The smallest multiple of ``multiple`` that is at least ``value``."""
    return int(-(-int(value) // int(multiple)) * int(multiple))


def dominant_slice_axis(slice_counts: Sequence[int], share: float = 0.5) -> int | None:
    """The axis whose annotated slices hold more than ``share`` of the annotated voxels, if any."""
    counts = np.asarray(slice_counts, dtype=float)
    if counts.sum() <= 0:
        return None
    axis = int(np.argmax(counts))
    return axis if counts[axis] / counts.sum() > share else None


def plan_patch_size(
    shape: Sequence[int],
    spacing: Sequence[float] | None,
    divisor: Sequence[int],
    target_voxels: int,
    *,
    flatten_axis: int | None = None,
    min_side: int = 8,
) -> tuple[int, int, int]:
    """A patch of about ``target_voxels`` that is roughly cubic in physical units.

    Each side is a multiple of ``divisor`` (the network's total stride) and no
    larger than the volume rounded up to that multiple; budget that a short
    axis cannot use goes to the others.

    ``flatten_axis`` halves the patch along that axis (not below ``min_side``
    voxels) and widens it along the others.  With annotations on whole slices,
    a patch holds annotated voxels in proportion to its extent *within* the
    slices, so a patch flattened along the normal of the most-annotated slices
    sees about twice the labels for the same compute (measured in
    benchmarks/label_efficiency.py: more accurate and less seed-dependent).
    """
    spacing = np.asarray(spacing if spacing is not None else (1.0, 1.0, 1.0), dtype=float)
    limit = np.array([round_up(int(s), int(d)) for s, d in zip(shape, divisor)], dtype=float)
    size = 1.0 / spacing  # physical cube
    if flatten_axis is not None:
        cube_side = (target_voxels / np.prod(size)) ** (1 / 3) * size[flatten_axis]
        if cube_side / 2 >= max(min_side, divisor[flatten_axis]):
            size = size * np.sqrt(2.0)
            size[flatten_axis] /= 2 * np.sqrt(2.0)
    free = np.ones(3, dtype=bool)
    for _ in range(3):
        fixed = np.prod(np.where(free, 1.0, size))
        scale = (target_voxels / fixed / np.prod(size[free])) ** (1 / free.sum())
        size = np.where(free, size * scale, size)
        over = free & (size > limit)
        if not over.any():
            break
        size = np.where(over, limit, size)
        free &= ~over
        if not free.any():
            break
    patch = []
    for s, d, lim in zip(size, divisor, limit):
        p = max(int(d), int(round(s / d)) * int(d))
        patch.append(int(min(p, lim)))
    return int3(patch)
