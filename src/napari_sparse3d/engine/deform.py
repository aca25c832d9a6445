"""The 3D U-Net paper's spatial augmentation: elastic deformation, rotation and scaling in one resampling.

Çiçek et al. (2016) trained their 3D U-Net from a few annotated slices with smooth dense
deformations (normal displacements on a coarse grid of control points, B-spline interpolated),
rotations and scalings.  This module does the same, in torch, on a batch already on its device:

* per sample, with probability ``probability``, a rotation about the patch centre and a zoom are
  drawn in *physical* units (anisotropic voxels rotate correctly), plus elastic displacements;
* the grid is exact cubic B-spline *interpolation* of control-point values (the field equals the
  drawn displacement at each control point), done separably: one ``(voxels x control points)``
  matrix per axis, three small matrix products.  The spline reproduces affine maps exactly, so the
  affine part is evaluated at the control points only and comes out of the same products;
* :func:`torch.nn.functional.grid_sample` (``align_corners=True``) is called once for the image
  (trilinear) and once for target and weight stacked as two channels (nearest: labels stay exact).
  Samples left untransformed are not resampled at all (bit-identical, and half the work at the
  default probability of 1/2).

Outside the patch the image reads zeros (the z-scored mean), the target becomes -1 and the weight
0: target+1 is sampled with zero padding and 1 subtracted, so padding is never a real class.

For strongly anisotropic voxels (largest over smallest spacing above 2.5) the transform is in-plane,
as nnU-Net's "dummy 2D" augmentation: rotation about the odd (usually z) axis only, zoom and elastic
displacement of the two other axes only.  Elastic ``sigma`` and ``grid`` are in voxels of the finest
axis (along a coarser axis both shrink by the spacing ratio: isotropic in physical space).

All randomness comes from the caller's :class:`torch.Generator`: a seeded run is reproducible.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["STRONG_ANISOTROPY", "SpatialAugment", "SpatialSample", "bspline_interpolation_matrix", "cubic_bspline"]

#: Largest over smallest voxel spacing above which the transform is in-plane only (as nnU-Net's dummy 2D).
STRONG_ANISOTROPY = 2.5
#: The planes (axis pairs, z=0 y=1 x=2) of the three rotations, about z, y and x.
_PLANES = ((1, 2), (0, 2), (0, 1))
_CACHE_SIZE = 8


def _intervals(n_voxels: int, grid: float) -> int:
    """Control intervals that cover ``n_voxels`` at a spacing of ``grid`` voxels (at least 1)."""
    return max(1, math.ceil((n_voxels - 1) / grid - 1e-9))


def cubic_bspline(x: torch.Tensor) -> torch.Tensor:
    """The uniform cubic B-spline basis function, evaluated elementwise.

    Parameters
    ----------
    x : Tensor
        Positions in units of the knot spacing.

    Returns
    -------
    Tensor
        ``(4 - 6|x|^2 + 3|x|^3) / 6`` for ``|x| < 1``, ``(2 - |x|)^3 / 6`` below 2, else 0.
    """
    a = x.abs()
    inner = (4 - 6 * a**2 + 3 * a**3) / 6
    outer = (2 - a).clamp(min=0) ** 3 / 6
    return torch.where(a < 1, inner, outer)


def bspline_interpolation_matrix(n_voxels: int, grid: float) -> torch.Tensor:
    """Weights that interpolate control-point values to every voxel of one axis with a cubic B-spline.

    ``L = max(1, ceil((n_voxels - 1) / grid))`` intervals of ``grid`` voxels are centred on the axis and
    extended by one control point on each side, ``L + 3 >= 4`` control points in all, so every voxel has
    the full support of four.  The spline passes through the control values (interpolation: the
    coefficients are the values times the inverse of the collocation matrix), with linear extrapolation
    at the ends, so constants and linear ramps are reproduced exactly and every row sums to 1.

    Parameters
    ----------
    n_voxels : int
        Voxels along the axis.
    grid : float
        Control-point spacing in voxels.

    Returns
    -------
    Tensor
        ``(n_voxels, L + 3)`` float64 on the CPU; ``field = W @ values``.
    """
    intervals = _intervals(n_voxels, grid)
    t = (torch.arange(n_voxels, dtype=torch.float64) - (n_voxels - 1) / 2) / grid + intervals / 2
    knots = torch.arange(-1, intervals + 2, dtype=torch.float64)
    basis = cubic_bspline(t[:, None] - knots[None, :])
    # collocation: value at knot i = (c[i-1] + 4 c[i] + c[i+1]) / 6; at the two end knots the outer
    # coefficient is linearly extrapolated (c[-2] = 2 c[-1] - c[0]), which makes the row c[-1] = value
    system = cubic_bspline(knots[:, None] - knots[None, :])
    system[0], system[-1] = torch.eye(len(knots), dtype=torch.float64)[[0, -1]]
    return basis @ torch.linalg.inv(system)


@dataclass(frozen=True)
class SpatialSample:
    """The random parameters of one batch (CPU tensors).

    Attributes
    ----------
    selected : Tensor
        ``(B,)`` bool: which samples are transformed.
    matrices : Tensor
        ``(B, 3, 3)`` float64 in voxel units, (z, y, x) order: a voxel at offset ``o`` from the patch
        centre reads the input at ``M @ o`` from the centre (plus the elastic displacement).
    control : Tensor or None
        ``(B, 3, mz, my, mx)`` float64 elastic displacements (z, y, x components, voxels of each axis)
        at the control points; None without elastic deformation.
    """

    selected: torch.Tensor
    matrices: torch.Tensor
    control: torch.Tensor | None


@dataclass(frozen=True)
class _Geometry:
    """What depends on the patch shape and the device only."""

    half: torch.Tensor  # (3,) float64, (z, y, x): voxels per normalised unit of grid_sample
    knots: tuple[torch.Tensor, ...]  # per axis, float64: offsets of the control points from the centre, voxels
    weights: tuple[torch.Tensor, ...]  # per axis, (n, m) float32 on the device


class SpatialAugment:
    """Random elastic deformation, rotation and scaling of a batch, on its device.

    Parameters
    ----------
    elastic : bool
        Smooth elastic deformation: displacements ``N(0, elastic_sigma)`` on control points
        ``elastic_grid`` voxels apart, B-spline interpolated.
    elastic_sigma : float
        Standard deviation of the displacement at the control points, in voxels of the finest axis.
    elastic_grid : int
        Control-point spacing in voxels of the finest axis.
    rotate : bool
        Rotation about the patch centre, each angle uniform in ``[-rotate_degrees, rotate_degrees]``:
        about z, y and x in turn, or about the odd axis only for strongly anisotropic voxels.
    rotate_degrees : float
        Largest angle.
    scale : bool
        Zoom about the patch centre by a factor uniform in ``[1 - scale_range, 1 + scale_range]``
        (above 1 magnifies).
    scale_range : float
        Half-width of the zoom interval.
    probability : float
        Chance that a sample is transformed at all.
    spacing : (z, y, x) or None
        Voxel spacing; None means isotropic.
    """

    def __init__(
        self, *, elastic: bool, elastic_sigma: float, elastic_grid: int, rotate: bool, rotate_degrees: float,
        scale: bool, scale_range: float, probability: float, spacing: Sequence[float] | None = None,
    ) -> None:  # fmt: skip
        self.elastic, self.rotate, self.scale = bool(elastic), bool(rotate), bool(scale)
        self.elastic_sigma, self.elastic_grid = float(elastic_sigma), float(elastic_grid)
        self.rotate_degrees, self.scale_range = float(rotate_degrees), float(scale_range)
        self.probability = float(probability)
        spacing = (1.0, 1.0, 1.0) if spacing is None else tuple(float(s) for s in spacing)
        if len(spacing) != 3 or min(spacing) <= 0:
            raise ValueError(f"spacing must be three positive numbers (z, y, x), got {spacing!r}")
        self.spacing: tuple[float, float, float] = spacing  # type: ignore[assignment]
        #: the axis kept fixed (in-plane transforms only), or None for full 3D transforms
        self.fixed_axis: int | None = None
        if max(spacing) / min(spacing) > STRONG_ANISOTROPY:
            logs = [math.log(s) for s in spacing]
            # the odd axis out: the other two spacings are the closest pair
            self.fixed_axis = min(range(3), key=lambda a: abs(logs[(a + 1) % 3] - logs[(a + 2) % 3]))
        ratio = torch.tensor([min(spacing) / s for s in spacing], dtype=torch.float64)
        moving = torch.ones(3, dtype=torch.float64)
        if self.fixed_axis is not None:
            moving[self.fixed_axis] = 0
        self._moving = moving  # 1 for the axes that the transform moves
        self._sigma = self.elastic_sigma * ratio * moving  # per axis, voxels of that axis
        self._grid = tuple(max(1.0, self.elastic_grid * float(r)) for r in ratio)
        self._cache: dict[tuple[Any, ...], _Geometry] = {}

    @classmethod
    def from_config(cls, train_config: Any, spacing: Sequence[float] | None) -> SpatialAugment:
        """The augmentation that a :class:`~napari_sparse3d.config.TrainConfig` asks for.

        Parameters
        ----------
        train_config : TrainConfig
            Reads ``elastic``, ``elastic_sigma``, ``elastic_grid``, ``rotate``, ``rotate_degrees``,
            ``scale``, ``scale_range`` and ``spatial_probability``.
        spacing : (z, y, x) or None
            Voxel spacing of the training volume.

        Returns
        -------
        SpatialAugment
        """
        tc = train_config
        return cls(
            elastic=tc.elastic, elastic_sigma=tc.elastic_sigma, elastic_grid=tc.elastic_grid,
            rotate=tc.rotate, rotate_degrees=tc.rotate_degrees, scale=tc.scale, scale_range=tc.scale_range,
            probability=tc.spatial_probability, spacing=spacing,
        )

    @property
    def enabled(self) -> bool:
        """False when no part is switched on or the probability is 0: the caller may skip the call."""
        return self.probability > 0 and (self.elastic or self.rotate or self.scale)

    def control_shape(self, shape: Sequence[int]) -> tuple[int, int, int]:
        """Control points per axis (z, y, x) for a patch of ``shape``."""
        return tuple(_intervals(n, g) + 3 for n, g in zip(shape, self._grid))  # type: ignore[return-value]

    def sample(self, batch: int, shape: Sequence[int], generator: torch.Generator) -> SpatialSample:
        """Draw the parameters of one batch.

        Parameters
        ----------
        batch : int
            Samples in the batch.
        shape : (z, y, x)
            Patch shape (sets the number of control points).
        generator : torch.Generator
            The source of randomness (on any device; the results are on the CPU).

        Returns
        -------
        SpatialSample
        """
        kw: dict[str, Any] = {"generator": generator, "device": generator.device, "dtype": torch.float64}
        # one draw for selection, angles and zoom whatever is switched on: a fixed layout of the stream
        uniform = torch.rand(batch, 5, **kw).cpu()
        selected = uniform[:, 0] < self.probability
        matrices = torch.eye(3, dtype=torch.float64).repeat(batch, 1, 1)
        if self.rotate:
            planes = _PLANES if self.fixed_axis is None else (tuple(a for a in range(3) if a != self.fixed_axis),)
            angles = (uniform[:, 1:4] * 2 - 1) * math.radians(self.rotate_degrees)
            cos, sin = torch.cos(angles), torch.sin(angles)
            for p, (i, j) in enumerate(planes):
                rotation = torch.eye(3, dtype=torch.float64).repeat(batch, 1, 1)
                rotation[:, i, i] = rotation[:, j, j] = cos[:, p]
                rotation[:, i, j], rotation[:, j, i] = -sin[:, p], sin[:, p]
                matrices = matrices @ rotation
            # voxel offsets -> physical, rotate, -> voxel offsets of the input: S^-1 R S
            physical = torch.tensor(self.spacing, dtype=torch.float64)
            matrices = matrices * physical[None, None, :] / physical[None, :, None]
        if self.scale:
            zoom = 1 + (uniform[:, 4] * 2 - 1) * self.scale_range
            # a zoom s > 1 magnifies: an output offset o reads the input at o / s (in the moving axes)
            matrices = matrices * (1 + (1 / zoom[:, None] - 1) * self._moving[None, :])[:, None, :]
        control = None
        if self.elastic:
            control = torch.randn(batch, 3, *self.control_shape(shape), **kw).cpu()
            control = control * self._sigma[None, :, None, None, None]
        return SpatialSample(selected, matrices, control)

    def elastic_field(
        self, shape: Sequence[int], generator: torch.Generator, device: torch.device | str = "cpu"
    ) -> torch.Tensor:
        """One random elastic displacement field, for inspection and tests.

        Parameters
        ----------
        shape : (z, y, x)
            Patch shape.
        generator : torch.Generator
            The source of randomness.
        device : torch.device or str
            Where the field is computed.

        Returns
        -------
        Tensor
            ``(3, z, y, x)`` float32: the displacement (z, y, x components) in voxels of each axis.
        """
        shape = tuple(int(n) for n in shape)
        control = torch.randn(1, 3, *self.control_shape(shape), generator=generator, device=generator.device,
                              dtype=torch.float64).cpu() * self._sigma[None, :, None, None, None]
        geometry = self._geometry(shape, torch.device(device))
        values = control.permute(0, 2, 3, 4, 1).to(geometry.weights[0].device, torch.float32)
        return self._interpolate(values, geometry)[0].permute(3, 0, 1, 2)

    def _geometry(self, shape: tuple[int, ...], device: torch.device) -> _Geometry:
        key = (shape, str(device))
        found = self._cache.get(key)
        if found is None:
            half = torch.tensor([max((n - 1) / 2, 0.5) for n in shape], dtype=torch.float64)
            sizes = [(n, g, _intervals(n, g)) for n, g in zip(shape, self._grid)]
            knots = tuple((torch.arange(-1, m + 2, dtype=torch.float64) - m / 2) * g for _, g, m in sizes)
            weights = tuple(bspline_interpolation_matrix(n, g).to(device, torch.float32) for n, g, _ in sizes)
            found = _Geometry(half, knots, weights)
            if len(self._cache) >= _CACHE_SIZE:
                self._cache.pop(next(iter(self._cache)))
            self._cache[key] = found
        return found

    @staticmethod
    def _interpolate(values: torch.Tensor, geometry: _Geometry) -> torch.Tensor:
        """``(k, mz, my, mx, c)`` control values -> ``(k, z, y, x, c)``: three matrix products, one per axis."""
        wz, wy, wx = geometry.weights
        k, mz, my, _, c = values.shape
        field = torch.matmul(wx, values)  # (k, mz, my, x, c)
        field = torch.matmul(wy, field.reshape(k, mz, my, -1))  # (k, mz, y, x*c)
        field = torch.matmul(wz, field.reshape(k, mz, -1))  # (k, z, y*x*c)
        return field.view(k, wz.shape[0], wy.shape[0], wx.shape[0], c)

    def grid(self, sample: SpatialSample, shape: Sequence[int], device: torch.device | str) -> torch.Tensor:
        """The sampling grid of the selected samples.

        The affine part is evaluated at the control points and added to the elastic displacements
        there; one B-spline interpolation then gives the whole grid (it reproduces affine maps exactly).

        Parameters
        ----------
        sample : SpatialSample
            From :meth:`sample`.
        shape : (z, y, x)
            Patch shape.
        device : torch.device or str
            Where the grid is built.

        Returns
        -------
        Tensor
            ``(k, z, y, x, 3)`` float32 for the ``k`` selected samples, in the normalised (x, y, z)
            coordinates of :func:`~torch.nn.functional.grid_sample` with ``align_corners=True``
            (-1 and 1 are the centres of the first and last voxels).
        """
        shape = tuple(int(n) for n in shape)
        geometry = self._geometry(shape, torch.device(device))
        index = sample.selected.nonzero().flatten()
        matrices = sample.matrices[index]
        oz, oy, ox = geometry.knots
        # input offsets (voxels, z y x components) read by the control points: M @ (oz, oy, ox)
        at = (matrices[:, :, 0, None, None, None] * oz[:, None, None]
              + matrices[:, :, 1, None, None, None] * oy[None, :, None]
              + matrices[:, :, 2, None, None, None] * ox[None, None, :])  # fmt: skip
        if sample.control is not None:
            at = at + sample.control[index]
        at = at / geometry.half[None, :, None, None, None]  # normalised units of grid_sample
        values = at.flip(1).permute(0, 2, 3, 4, 1).to(geometry.weights[0].device, torch.float32)
        return self._interpolate(values, geometry)

    def __call__(
        self, image: torch.Tensor, target: torch.Tensor, weight: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Transform a batch: the same random map for the image, the target and the weight of each sample.

        Parameters
        ----------
        image : Tensor
            ``(B, C, z, y, x)`` floating point, any memory format.
        target : Tensor
            ``(B, z, y, x)`` integer class indices, -1 unlabeled.
        weight : Tensor
            ``(B, z, y, x)`` floating point, 0 where unlabeled.
        generator : torch.Generator
            The source of randomness.

        Returns
        -------
        image, target, weight : Tensor
            Of the input dtypes and device.  The image is resampled trilinearly (zeros outside the
            patch), target and weight by the nearest voxel; outside the patch the target is -1 and
            the weight 0.  Samples left untransformed are returned unchanged.
        """
        if not self.enabled:
            return image, target, weight
        batch, shape = image.shape[0], tuple(image.shape[2:])
        sample = self.sample(batch, shape, generator)
        count = int(sample.selected.sum())
        if count == 0:
            return image, target, weight
        grid = self.grid(sample, shape, image.device)
        every = count == batch
        index = sample.selected.nonzero().flatten().to(image.device)
        pick = (lambda t: t) if every else (lambda t: t.index_select(0, index))
        compute = image.dtype if image.dtype == torch.float64 else torch.float32
        moved = F.grid_sample(pick(image).to(compute), grid.to(compute), mode="bilinear", padding_mode="zeros",
                              align_corners=True).to(image.dtype)
        labels = torch.stack(((pick(target) + 1).to(torch.float32), pick(weight).to(torch.float32)), 1)
        labels = F.grid_sample(labels, grid, mode="nearest", padding_mode="zeros", align_corners=True)
        # nearest copies both channels of one voxel, exactly (small integers are exact in float32); outside
        # the patch both are 0: target -1, weight 0
        moved_target = labels[:, 0].to(target.dtype) - 1
        moved_weight = labels[:, 1].to(weight.dtype).contiguous()
        if every:
            return moved, moved_target, moved_weight
        image, target, weight = image.clone(), target.clone(), weight.clone()
        image[index], target[index], weight[index] = moved, moved_target, moved_weight
        return image, target, weight
