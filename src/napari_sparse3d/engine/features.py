"""A fixed bank of multiscale filters, in torch: what a pixel classifier sees of each voxel.

For every image channel and every scale sigma the bank gives five responses:
the Gaussian-smoothed intensity, its gradient magnitude and the three
eigenvalues of its Hessian (ascending), with derivatives scale-normalised
(times sigma per order).  This is the feature set ilastik's and scikit-image's
pixel classifiers use by default ("intensity", "edges", "texture").  Scales are
given in voxels of the finest axis and follow the voxel spacing, so an
anisotropic volume is smoothed less along its coarse axis.

Filters are separable 1D Gaussians with replicated borders; a volume is
processed in blocks, each read with a margin (:func:`halo`) so that a block's
responses equal those of the whole volume.  Everything runs on the device the
input tensor is on.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["PER_SCALE", "SIGMAS", "block_boxes", "feature_count", "filter_bank", "grow", "halo", "scaled_sigmas"]

#: Scales, in voxels of the finest axis.  Adding 16 helps the nuclei volume and hurts noisy touching
#: cells (the classifier alone: benchmarks/results/classifier_fit.md, variant scales-1-16), so it is not here.
SIGMAS = (1.0, 2.0, 4.0, 8.0)
#: Responses per channel and scale: smoothed intensity, gradient magnitude, three Hessian eigenvalues.
PER_SCALE = 5
_TRUNCATE = 3.0  # kernel radius in sigmas
_MATRIX_MAX = 512  # longest axis smoothed by a matrix product (see _smooth)

Box = tuple[slice, slice, slice]


def feature_count(channels: int, n_scales: int = len(SIGMAS)) -> int:
    return channels * n_scales * PER_SCALE


def scaled_sigmas(spacing: Sequence[float] | None, sigmas: Sequence[float] = SIGMAS) -> np.ndarray:
    """``(S, 3)`` per-axis sigmas in voxels: scale ``s`` on the finest axis, ``s * finest / spacing`` on the others."""
    spacing = np.ones(3) if spacing is None else np.asarray(spacing, dtype=float)
    ratio = spacing.min() / spacing
    return np.asarray([[s * r for r in ratio] for s in sigmas], dtype=np.float32)


def halo(sigmas: np.ndarray) -> tuple[int, int, int]:
    """Margin per axis a block needs so that its responses do not depend on where the block ends."""
    radius = np.ceil(_TRUNCATE * np.asarray(sigmas).max(axis=0)).astype(int) + 2  # + 2: the finite differences
    return tuple(int(r) for r in radius)  # type: ignore[return-value]


def _kernel(sigma: float, device: torch.device) -> torch.Tensor:
    radius = max(1, int(math.ceil(_TRUNCATE * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32, device=device)
    k = torch.exp(-0.5 * (x / max(sigma, 1e-3)) ** 2)
    return k / k.sum()


def _smoothing_matrix(kernel: torch.Tensor, length: int, start: int, stop: int) -> tuple[torch.Tensor, int, int]:
    """``(matrix, lo, hi)``: ``matrix @ line[lo:hi]`` is ``line[start:stop]`` smoothed by ``kernel``.

    ``line`` has ``length`` voxels and its borders are replicated (folded into the matrix).
    """
    r = (kernel.numel() - 1) // 2
    lo, hi = max(0, start - r), min(length, stop + r)
    offsets = torch.arange(-r, r + 1, device=kernel.device)
    source = (torch.arange(start, stop, device=kernel.device)[:, None] + offsets[None, :]).clamp(0, length - 1) - lo
    matrix = torch.zeros((stop - start, hi - lo), dtype=kernel.dtype, device=kernel.device)
    return matrix.scatter_add_(1, source, kernel.expand(stop - start, -1).contiguous()), lo, hi


def _smooth_axis(x: torch.Tensor, kernel: torch.Tensor, axis: int) -> torch.Tensor:
    """Smooth ``(N, z, y, x)`` along spatial ``axis`` by matrix products, :data:`_MATRIX_MAX` voxels at a time."""
    length = x.shape[1 + axis]
    if length == 0:
        return x
    pieces = []
    for start in range(0, length, _MATRIX_MAX):
        matrix, lo, hi = _smoothing_matrix(kernel, length, start, min(length, start + _MATRIX_MAX))
        part = x.narrow(1 + axis, lo, hi - lo)
        if axis == 2:
            pieces.append(part @ matrix.T)
        else:
            before, after = math.prod(part.shape[: 1 + axis]), math.prod(part.shape[2 + axis :])
            out = torch.matmul(matrix, part.reshape(before, hi - lo, after))
            pieces.append(out.reshape(*part.shape[: 1 + axis], matrix.shape[0], *part.shape[2 + axis :]))
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1 + axis)


def _smooth_axis_traceable(x: torch.Tensor, kernel: torch.Tensor, axis: int) -> torch.Tensor:
    """The same by a 1D convolution over the axis moved last: a traced module runs it at any input size."""
    r = (kernel.numel() - 1) // 2
    lines = x.movedim(1 + axis, -1)
    shape = lines.shape
    flat = F.pad(lines.reshape(-1, 1, shape[-1]), (r, r), mode="replicate")
    return F.conv1d(flat, kernel.view(1, 1, -1)).reshape(shape).movedim(-1, 1 + axis)


def _smooth(volume: torch.Tensor, sigma: Sequence[float]) -> torch.Tensor:
    """Gaussian smoothing of ``(N, z, y, x)`` along each axis (replicated borders).

    Each axis is smoothed by products with a matrix that holds the kernel
    and the replicated borders, up to :data:`_MATRIX_MAX` voxels of the axis
    at a time: matrix products run near the CPU's peak, while a 1D
    convolution with one input channel is unfolded by oneDNN into a buffer of
    kernel-length times the volume.  Measured on two CPU cores, 60x256x256,
    sigma 8: 0.035 s instead of 0.64 s (and 800 MB of page faults), equal to
    1e-7.  A traced module (whose matrices would be frozen to the example's
    size) uses the convolution.
    """
    x = volume
    smooth_axis = _smooth_axis_traceable if torch.jit.is_tracing() else _smooth_axis
    for axis, s in enumerate(sigma):
        if s < 0.3:  # narrower than a voxel: leave the axis as it is
            continue
        x = smooth_axis(x, _kernel(float(s), volume.device), axis)
    return x.contiguous()


def _diff(volume: torch.Tensor, axis: int) -> torch.Tensor:
    """Central differences along spatial ``axis`` of ``(N, z, y, x)`` (one-sided at the ends)."""
    if volume.shape[1 + axis] < 2:
        return torch.zeros_like(volume)
    return torch.gradient(volume, dim=1 + axis)[0]


def _eigenvalues(h: dict[tuple[int, int], torch.Tensor]) -> list[torch.Tensor]:
    """Ascending eigenvalues of symmetric 3x3 matrices given by their upper triangle ``h[a, b]``.

    The closed trigonometric form (about 15x faster on the CPU than ``torch.linalg.eigvalsh``
    on stacked 3x3 matrices, and without their memory).
    """
    a11, a22, a33, a12, a13, a23 = h[0, 0], h[1, 1], h[2, 2], h[0, 1], h[0, 2], h[1, 2]
    q = (a11 + a22 + a33) / 3
    b11, b22, b33 = a11 - q, a22 - q, a33 - q
    p1 = a12 * a12 + a13 * a13 + a23 * a23
    p = torch.sqrt((b11 * b11 + b22 * b22 + b33 * b33 + 2 * p1) / 6)
    safe = torch.where(p > 1e-12, p, torch.ones_like(p))
    det = b11 * (b22 * b33 - a23 * a23) - a12 * (a12 * b33 - a23 * a13) + a13 * (a12 * a23 - b22 * a13)
    r = torch.clamp(det / (2 * safe**3), -1.0, 1.0)
    phi = torch.acos(r) / 3
    largest = q + 2 * p * torch.cos(phi)
    smallest = q + 2 * p * torch.cos(phi + 2 * math.pi / 3)
    return [smallest, 3 * q - largest - smallest, largest]


def filter_bank(image: torch.Tensor, sigmas: np.ndarray) -> torch.Tensor:
    """The responses of ``image`` ``(C, z, y, x)``: ``(C * S * 5, z, y, x)`` float32 (see the module docstring)."""
    if image.ndim != 4:
        raise ValueError(f"image must be (channels, z, y, x), got shape {tuple(image.shape)}")
    image = image.float()
    sigmas = np.asarray(sigmas, dtype=float)
    # (C, S * 5, z, y, x), written response by response (stacking a list of them at the end took
    # twice as long on two CPU cores), then viewed as (C * S * 5, z, y, x), channel-major
    out = torch.empty((image.shape[0], len(sigmas) * PER_SCALE, *image.shape[1:]), device=image.device)
    for s, sigma in enumerate(sigmas):
        g = _smooth(image, sigma)
        grads = [_diff(g, a) * float(max(sigma[a], 1.0)) for a in range(3)]
        out[:, s * PER_SCALE] = g
        torch.sqrt(sum(d * d for d in grads), out=out[:, s * PER_SCALE + 1])
        h = {}
        for a in range(3):
            for b in range(a, 3):
                h[a, b] = _diff(grads[b], a) * float(max(sigma[a], 1.0))
        for e, value in enumerate(_eigenvalues(h)):
            out[:, s * PER_SCALE + 2 + e] = value
        del h
    return out.reshape(-1, *image.shape[1:])


def grow(box: Box, margin: Sequence[int], shape: Sequence[int]) -> tuple[Box, Box]:
    """``box`` grown by ``margin`` inside ``shape``, and where ``box`` lies inside the grown one."""
    grown = tuple(slice(max(0, b.start - m), min(n, b.stop + m)) for b, m, n in zip(box, margin, shape))
    inner = tuple(slice(b.start - g.start, b.stop - g.start) for b, g in zip(box, grown))
    return grown, inner  # type: ignore[return-value]


def block_boxes(shape: Sequence[int], max_voxels: int) -> list[Box]:
    """Boxes of at most ``max_voxels`` that tile ``shape`` (the longest axis is cut first)."""
    counts = [1, 1, 1]
    while math.prod(-(-n // c) for n, c in zip(shape, counts)) > max_voxels:
        sizes = [-(-n // c) for n, c in zip(shape, counts)]
        axis = int(np.argmax(sizes))
        if sizes[axis] <= 1:
            break
        counts[axis] += 1
    edges = [np.linspace(0, n, c + 1).round().astype(int) for n, c in zip(shape, counts)]
    return [
        (slice(int(z0), int(z1)), slice(int(y0), int(y1)), slice(int(x0), int(x1)))
        for z0, z1 in zip(edges[0][:-1], edges[0][1:])
        for y0, y1 in zip(edges[1][:-1], edges[1][1:])
        for x0, x1 in zip(edges[2][:-1], edges[2][1:])
    ]
