"""Intensity normalisation, and the planning of patch and prediction window sizes.

Normalisation follows nnU-Net / the KiTS19 entry of the seeds: clip to the
0.5 and 99.5 percentiles, then z-score.  Its ``mode`` (``config.train.normalization``)
says which statistics an image gets, and travels with the model:

- ``"image"``: every image is normalised with its own statistics (nnU-Net's
  scheme for non-CT data).  A model then transfers to a new volume whose
  brightness differs (another microscope, laser power, gain): a global
  ``a * image + b`` with ``a > 0`` is normalised away exactly.  The stored
  statistics are the training image's, and :meth:`Normalization.for_volume`
  computes a new volume's own, once per volume (never per window or tile,
  which would make results depend on the tiling).
- ``"dataset"``: the stored statistics (of the training image, or pooled over
  the training images by :func:`pooled_normalization`) are applied to every
  image: for intensities that are calibrated across volumes (CT).  Checkpoints
  written before the mode existed behave this way.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from napari_sparse3d.engine.volume import VolumeLike, check_finite, int3

__all__ = [
    "NORMALIZATION_MODES",
    "Normalization",
    "compute_normalization",
    "dominant_slice_axis",
    "plan_patch_size",
    "plan_window",
    "pooled_normalization",
    "round_up",
]

#: ``"image"``: each image's own statistics; ``"dataset"``: the stored statistics for every image.
NORMALIZATION_MODES = ("image", "dataset")
_STATISTICS = ("lower", "upper", "mean", "std")


def _check_mode(mode: Any, name: str = "mode") -> str:
    if not isinstance(mode, str) or mode not in NORMALIZATION_MODES:
        raise ValueError(f"{name} must be one of {NORMALIZATION_MODES}, got {mode!r}")
    return mode


@dataclass(frozen=True)
class Normalization:
    """Per-channel clip bounds and z-score statistics, and which images they are for.

    Attributes
    ----------
    lower, upper : tuple of float
        Per channel, the 0.5 and 99.5 percentiles the image is clipped to.
    mean, std : tuple of float
        Per channel, the z-score statistics of the clipped image.
    mode : {"dataset", "image"}
        "dataset": these statistics are applied to every image; "image": they
        are the training image's, and every other image is normalised with its
        own (:meth:`for_volume`).  The default is "dataset", what a
        ``Normalization`` built from statistics alone always meant.
    """

    lower: tuple[float, ...]
    upper: tuple[float, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    mode: str = "dataset"

    def __post_init__(self) -> None:
        _check_mode(self.mode, "normalization mode")

    def for_volume(self, volume: VolumeLike, *, max_samples: int = 4_000_000, name: str = "image") -> Normalization:
        """The statistics to normalise ``volume`` with.

        Parameters
        ----------
        volume : VolumeLike
            The whole volume about to be predicted (not a window or tile of it).
        max_samples : int
            As for :func:`compute_normalization`.
        name : str
            The argument named in errors.

        Returns
        -------
        Normalization
            ``self`` in "dataset" mode; in "image" mode the volume's own
            statistics (:func:`compute_normalization`, the same strided
            subsample, so the training volume gets exactly the stored ones).

        Raises
        ------
        ValueError
            When ``volume`` has another number of channels, or its sample holds NaN or infinity.
        """
        if self.mode == "dataset":
            return self
        if volume.channels != len(self.lower):
            raise ValueError(f"{name} has {volume.channels} channels, but the model was trained on {len(self.lower)}")
        return compute_normalization(volume, max_samples=max_samples, name=name, mode=self.mode)

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

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {k: [float(x) for x in getattr(self, k)] for k in _STATISTICS}
        out["mode"] = self.mode
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Normalization:
        """Rebuild from :meth:`to_dict`, checking untrusted input (a checkpoint from elsewhere).

        A dict without ``"mode"`` (written before the mode existed) is "dataset" mode:
        those models applied their stored statistics to every image.

        Raises
        ------
        ValueError
            Naming the field: a mode other than "image"/"dataset", a missing or
            non-numeric statistic, channels that disagree, a non-finite value,
            a standard deviation <= 0 or clip bounds in the wrong order.
        """
        if not isinstance(data, Mapping):
            raise ValueError(f"normalization must be a dict of statistics, got {type(data).__name__}")
        mode = _check_mode(data.get("mode", "dataset"), "normalization.mode")
        stats: dict[str, tuple[float, ...]] = {}
        for key in _STATISTICS:
            if key not in data:
                raise ValueError(f"normalization.{key} is missing")
            try:
                values = tuple(float(x) for x in data[key])
            except (TypeError, ValueError):
                raise ValueError(f"normalization.{key} must be a list of numbers, got {data[key]!r}") from None
            if not values or not all(np.isfinite(values)):
                raise ValueError(f"normalization.{key} must be a non-empty list of finite numbers, got {data[key]!r}")
            stats[key] = values
        if len({len(v) for v in stats.values()}) != 1:
            raise ValueError(f"normalization: lower, upper, mean and std must have one value per channel, got {stats}")
        if any(s <= 0 for s in stats["std"]) or any(lo > hi for lo, hi in zip(stats["lower"], stats["upper"])):
            raise ValueError(f"normalization: needs std > 0 and lower <= upper per channel, got {stats}")
        return cls(**stats, mode=mode)


def _sample(volume: VolumeLike, step: int, name: str) -> np.ndarray:
    sample = volume.read((slice(None, None, step),) * 3)
    check_finite(name, sample)
    return sample.reshape(sample.shape[0], -1)


def _stride(total: int, max_samples: int) -> int:
    """The stride per axis that keeps a 3D subsample of ``total`` voxels under about ``max_samples``."""
    return max(1, int(np.ceil((total / max_samples) ** (1 / 3))))


def _statistics(sample: np.ndarray, mode: str) -> Normalization:
    """Per-channel percentiles and clipped z-score statistics of a ``(C, N)`` sample."""
    lower, upper, mean, std = [], [], [], []
    for channel in sample:
        lo, hi = np.percentile(channel, [0.5, 99.5])
        clipped = np.clip(channel, lo, hi)
        m, s = float(clipped.mean()), float(clipped.std())
        lower.append(float(lo))
        upper.append(float(hi))
        mean.append(m)
        std.append(s if s > 1e-8 else 1.0)  # a constant image stays constant instead of dividing by zero
    return Normalization(tuple(lower), tuple(upper), tuple(mean), tuple(std), mode)


def compute_normalization(
    volume: VolumeLike, *, max_samples: int = 4_000_000, name: str = "image", mode: str = "image"
) -> Normalization:
    """Percentile clip bounds and z-score statistics of a volume (a strided subsample of large ones).

    Parameters
    ----------
    volume : VolumeLike
    max_samples : int
        About this many voxels are read, on a regular grid over the whole volume.
    name : str
        The argument named in errors.
    mode : {"image", "dataset"}
        Stored with the statistics: how a model applies them to other images
        (see the module docstring; ``config.train.normalization``).

    Raises
    ------
    ValueError
        When the sample holds NaN or infinite values, or for an unknown ``mode``.
    """
    _check_mode(mode)
    step = _stride(int(np.prod(volume.spatial_shape)), max_samples)
    return _statistics(_sample(volume, step, name), mode)


def pooled_normalization(
    volumes: Sequence[VolumeLike], *, mode: str = "dataset", max_samples: int = 4_000_000, name: str = "images"
) -> Normalization:
    """Statistics pooled over several volumes, for "dataset" normalisation of multi-volume training.

    Every volume is subsampled with the same stride, so each contributes in
    proportion to its size; about ``max_samples`` voxels are read in all.  With
    one volume this equals :func:`compute_normalization`.

    Parameters
    ----------
    volumes : sequence of VolumeLike
        With the same number of channels.
    mode : {"dataset", "image"}
        Stored with the statistics ("image" mode would normalise each image
        with its own statistics instead, so pooling serves "dataset" mode).
    max_samples : int
    name : str
        The argument named in errors (``name[i]`` for the i-th volume).

    Raises
    ------
    ValueError
        For no volumes, volumes with different channel counts, non-finite
        values in a sample, or an unknown ``mode``.
    """
    _check_mode(mode)
    volumes = list(volumes)
    if not volumes:
        raise ValueError(f"{name} must hold at least one volume")
    channels = {v.channels for v in volumes}
    if len(channels) != 1:
        raise ValueError(f"{name} must all have the same number of channels, got {[v.channels for v in volumes]}")
    step = _stride(sum(int(np.prod(v.spatial_shape)) for v in volumes), max_samples)
    sample = np.concatenate([_sample(v, step, f"{name}[{i}]") for i, v in enumerate(volumes)], axis=1)
    return _statistics(sample, mode)


def plan_window(
    patch_size: Sequence[int], divisor: Sequence[int], shape: Sequence[int], target_voxels: int
) -> tuple[int, int, int]:
    """The prediction window: the training patch grown (same proportions) to about ``target_voxels``.

    Each side stays a multiple of the network's stride ``divisor`` and is no
    larger than the volume rounded up to it; a side the volume caps gives its
    share to the others.  Never smaller than the training patch (where the
    volume allows).  (Used by :mod:`napari_sparse3d.engine.prediction`.)
    """
    patch = np.asarray(patch_size, dtype=float)
    limit = np.array(side_limits(shape, divisor, patch_size), dtype=float)
    size = np.minimum(patch, limit)
    free = size < limit
    for _ in range(3):
        if not free.any():
            break
        scale = (target_voxels / np.prod(size)) ** (1 / free.sum())
        if scale <= 1:
            break
        size = np.where(free, np.minimum(size * scale, limit), size)
        free &= size < limit
    out = []
    for s, p, d, lim in zip(size, patch, divisor, limit):
        w = max(int(d), int(round(s / d)) * int(d))
        out.append(int(min(max(w, min(p, lim)), lim)))
    return int3(out)


def side_limits(shape: Sequence[int], divisor: Sequence[int], patch: Sequence[int] | None = None) -> list[int]:
    """The largest patch or window side per axis for a volume of ``shape``: each axis rounded up to the stride.

    When that would leave the network's deepest level a single voxel (a volume no
    larger than one stride ``divisor`` along every axis), the sides along the
    downsampled axes are two strides instead (or ``patch``'s, if smaller): the window
    is padded, since a 1x1x1 level cannot be instance-normalised.
    """
    limit = [round_up(int(s), int(d)) for s, d in zip(shape, divisor)]
    if all(lim == int(d) for lim, d in zip(limit, divisor)) and max(int(d) for d in divisor) > 1:
        patch = patch if patch is not None else [2 * int(d) for d in divisor]
        limit = [max(lim, min(int(p), 2 * int(d))) if int(d) > 1 else lim for lim, p, d in zip(limit, patch, divisor)]
    return limit


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
    limit = np.array(side_limits(shape, divisor), dtype=float)
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
