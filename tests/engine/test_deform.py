"""The 3D U-Net paper's spatial augmentation (engine/deform.py): alignment, padding, identity, statistics."""

import math

import pytest
import torch
import torch.nn.functional as F

from napari_sparse3d.config import Config
from napari_sparse3d.engine.deform import SpatialAugment, bspline_interpolation_matrix


def _augment(**kwargs) -> SpatialAugment:
    options = dict(elastic=False, elastic_sigma=4.0, elastic_grid=8, rotate=False, rotate_degrees=30.0,
                   scale=False, scale_range=0.15, probability=1.0, spacing=None)
    options.update(kwargs)
    return SpatialAugment(**options)


def _close(actual: torch.Tensor, expected: torch.Tensor, atol: float = 1e-6) -> bool:
    """Equal shapes, every element within ``atol`` (torch.testing.assert_close costs a second to import)."""
    return actual.shape == expected.shape and float((actual - expected).abs().max()) <= atol


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _coordinates(shape) -> torch.Tensor:
    """(3, z, y, x) float: each voxel's own (z, y, x) index."""
    return torch.stack(torch.meshgrid(*(torch.arange(n, dtype=torch.float32) for n in shape), indexing="ij"))


def _strong(**kwargs) -> SpatialAugment:
    return _augment(**{"elastic": True, "rotate": True, "scale": True, **kwargs})


def _uniform_around(values: torch.Tensor, outside: float) -> torch.Tensor:
    """(B, z, y, x) bool: the voxel and its 26 neighbours hold one value (beyond the patch counts as ``outside``)."""
    padded = F.pad(values.float()[:, None], (1,) * 6, value=outside)
    return (F.max_pool3d(padded, 3, 1) == -F.max_pool3d(-padded, 3, 1))[:, 0]


def test_image_and_labels_are_resampled_at_the_same_points():
    # the image holds each voxel's coordinates (trilinear interpolation of a linear function is exact), the
    # target each voxel's index: the nearest voxel picked for the label lies within half a voxel of the image's
    # sample point on every axis.  Non-cubic so that an axis mix-up shows.
    shape = (12, 20, 26)
    batch = 3
    image = _coordinates(shape).expand(batch, 3, *shape).contiguous()
    target = torch.arange(math.prod(shape)).reshape(shape).expand(batch, *shape).contiguous()
    weight = torch.ones(batch, *shape)
    out_image, out_target, out_weight = _strong()(image, target, weight, _gen(0))
    inside = out_target >= 0
    assert (out_weight[inside] == 1).all() and (out_weight[~inside] == 0).all()
    z, rest = out_target.div(shape[1] * shape[2], rounding_mode="floor"), out_target % (shape[1] * shape[2])
    picked = torch.stack((z, rest.div(shape[2], rounding_mode="floor"), rest % shape[2]), 1).float()
    # where the picked voxel is off the border, all 8 neighbours of the sample point are inside the patch
    interior = inside.clone()
    for axis, n in enumerate(shape):
        interior &= (picked[:, axis] >= 1) & (picked[:, axis] <= n - 2)
    assert interior.float().mean() > 0.3
    error = (out_image - picked).abs().amax(1)[interior]
    assert error.max() <= 0.5 + 1e-3
    moved = (out_image - _coordinates(shape)).norm(dim=1)[interior]
    assert moved.mean() > 1.0  # the transform really moved things


def test_a_deformed_labelled_checkerboard_keeps_image_and_target_aligned():
    shape = (16, 32, 32)
    classes = (_coordinates(shape) // 8).sum(0).long() % 3  # blocks of 8 voxels, classes 0..2
    image = classes.float().expand(2, 1, *shape).contiguous()
    target = classes.expand(2, *shape).contiguous()
    weight = torch.ones(2, *shape)
    augment = _augment(elastic=True, elastic_sigma=4.0, elastic_grid=16, rotate=True, rotate_degrees=30.0,
                       scale=True, scale_range=0.15)
    out_image, out_target, out_weight = augment(image, target, weight, _gen(1))
    uniform = _uniform_around(out_target, -1) & (out_target >= 0)
    assert uniform.float().mean() > 0.15
    agreement = (out_image[:, 0].round().long() == out_target)[uniform].float().mean()
    assert agreement > 0.97
    unchanged = (out_target == target)[out_target >= 0].float().mean()
    assert unchanged < 0.85
    assert (out_weight[out_target >= 0] == 1).all()


def test_outside_the_patch_the_target_is_unlabeled_and_the_weight_zero():
    shape = (10, 24, 24)
    batch = 4
    target = (_coordinates(shape)[2] // 6).long().expand(batch, *shape).contiguous()  # classes 0..3 everywhere
    target[:, :, :3] = -1  # and an unlabeled band
    weight = (target >= 0).float() * 0.5
    image = torch.randn(batch, 1, *shape, generator=_gen(5))
    augment = _augment(rotate=True, rotate_degrees=45.0, scale=True, scale_range=0.6)
    out_image, out_target, out_weight = augment(image, target, weight, _gen(2))
    assert out_target.dtype == target.dtype and out_weight.dtype == weight.dtype and out_image.dtype == image.dtype
    assert set(out_target.unique().tolist()) <= {-1, 0, 1, 2, 3}
    assert (out_weight[out_target == -1] == 0).all()
    assert (out_weight[out_target >= 0] == 0.5).all()
    # the voxels whose nearest sample point falls outside the patch are exactly the new unlabeled ones
    sample = augment.sample(batch, shape, _gen(2))
    grid = augment.grid(sample, shape, "cpu")
    sizes = torch.tensor(shape[::-1], dtype=torch.float32)  # grid is (x, y, z)
    index = ((grid + 1) / 2 * (sizes - 1)).round()
    outside = ((index < 0) | (index > sizes - 1)).any(-1)
    assert outside.float().mean() > 0.05
    assert (out_target[outside] == -1).all()
    # inside, the target is the input's at the nearest voxel (unlabeled ones included)
    ix, iy, iz = index.clamp(min=0).minimum(sizes - 1).long().unbind(-1)
    nearest = target[torch.arange(batch)[:, None, None, None], iz, iy, ix]
    assert (out_target[~outside] == nearest[~outside]).float().mean() > 0.999
    # and the image reads zeros far outside (no trilinear neighbour inside)
    far = ((grid + 1) / 2 * (sizes - 1) < -1).any(-1) | ((grid + 1) / 2 * (sizes - 1) > sizes).any(-1)
    assert far.any() and (out_image[:, 0][far] == 0).all()


def test_zoom_factors_lie_in_the_range_and_above_one_magnify():
    augment = _augment(scale=True, scale_range=0.5)
    matrices = augment.sample(64, (8, 8, 8), _gen(0)).matrices
    diagonal = matrices.diagonal(dim1=1, dim2=2)
    assert torch.equal(matrices, torch.diag_embed(diagonal)) and (diagonal == diagonal[:, :1]).all()  # isotropic
    zoom = 1 / diagonal[:, 0]  # a zoom s reads the input at offset / s
    assert zoom.min() >= 0.5 and zoom.max() <= 1.5 and zoom.min() < 0.6 and zoom.max() > 1.4
    # a 3x3x3 cube grows where the zoom is above 1 and shrinks where it is below
    shape = (11, 11, 11)
    target = torch.zeros(8, *shape, dtype=torch.long)
    target[:, 4:7, 4:7, 4:7] = 1
    sizes = (augment(target[:, None].float(), target, torch.ones(8, *shape), _gen(1))[1] == 1).sum((1, 2, 3))
    zoom = 1 / augment.sample(8, shape, _gen(1)).matrices[:, 0, 0]
    assert ((sizes > 27) == (zoom > 1.34)).all() and (sizes[zoom < 0.66] < 27).all()
    assert (zoom > 1.34).any() and (zoom < 0.66).any()


def test_nothing_switched_on_or_probability_zero_returns_the_inputs():
    image, target, weight = torch.randn(2, 1, 6, 8, 10), torch.randint(-1, 3, (2, 6, 8, 10)), torch.rand(2, 6, 8, 10)
    for augment in (_augment(), _strong(probability=0.0)):
        assert not augment.enabled
        out = augment(image, target, weight, _gen(0))
        assert all(a is b for a, b in zip(out, (image, target, weight)))
    assert _strong().enabled and _augment(scale=True).enabled


def test_a_transform_of_zero_strength_is_the_identity():
    # exercises the whole grid (affine at the control points, spline, normalisation, align_corners)
    shape = (7, 12, 17)
    image, target = torch.randn(2, 2, *shape, generator=_gen(3)), torch.randint(-1, 4, (2, *shape), generator=_gen(4))
    weight = (target >= 0).float()
    augment = _strong(elastic_sigma=0.0, rotate_degrees=0.0, scale_range=0.0, spacing=(2.0, 1.0, 1.0))
    out_image, out_target, out_weight = augment(image, target, weight, _gen(0))
    assert torch.equal(out_target, target) and torch.equal(out_weight, weight)
    assert _close(out_image, image, 1e-4)


def test_a_seed_gives_the_same_batch_and_another_seed_another():
    shape = (8, 16, 16)
    image, target = torch.randn(3, 1, *shape, generator=_gen(3)), torch.randint(0, 3, (3, *shape), generator=_gen(4))
    weight = torch.ones(3, *shape)
    augment = _strong()
    first, again, other = (augment(image, target, weight, _gen(seed)) for seed in (7, 7, 8))
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[0], other[0])


def test_only_the_selected_samples_change_and_the_others_stay_bit_identical():
    shape = (6, 12, 12)
    batch = 16
    image, target = torch.randn(batch, 1, *shape, generator=_gen(3)), torch.randint(0, 3, (batch, *shape), generator=_gen(4))
    weight = torch.ones(batch, *shape)
    augment = _strong(probability=0.5)
    selected = augment.sample(batch, shape, _gen(9)).selected
    assert 0 < int(selected.sum()) < batch
    out_image, out_target, _ = augment(image, target, weight, _gen(9))
    for b in range(batch):
        assert torch.equal(out_image[b], image[b]) != bool(selected[b])
    assert torch.equal(out_target[~selected], target[~selected])


def test_the_spline_interpolates_the_control_values_and_reproduces_ramps():
    matrix = bspline_interpolation_matrix(33, 8)  # knots at voxels 0, 8, ..., 32 and one outside each end
    assert matrix.shape == (33, 7)
    assert _close(matrix[::8], torch.eye(7, dtype=torch.float64)[1:-1], 1e-12)
    assert _close(matrix.sum(1), torch.ones(33, dtype=torch.float64), 1e-12)
    ramp = torch.arange(-1, 6, dtype=torch.float64) * 8  # a linear function at the knots
    assert _close(matrix @ ramp, torch.arange(33, dtype=torch.float64), 1e-10)
    assert bspline_interpolation_matrix(16, 32).shape == (16, 4)  # at least four control points per axis


def test_the_elastic_field_has_sigma_at_the_control_points_and_is_smooth():
    augment = _augment(elastic=True, elastic_sigma=4.0, elastic_grid=8)
    fields = torch.stack([augment.elastic_field((33, 33, 33), _gen(seed)) for seed in range(4)])
    assert fields.shape == (4, 3, 33, 33, 33)
    at_control = fields[:, :, ::8, ::8, ::8]  # 4 x 3 x 125 independent N(0, 4) values
    assert abs(float(at_control.std()) / 4.0 - 1) < 0.1
    assert abs(float(at_control.mean())) < 0.5
    steps = torch.cat([fields.diff(dim=d).abs().flatten() for d in (2, 3, 4)])
    assert float(steps.mean()) < 0.2 * 4.0 and float(steps.max()) < 4.0


def test_strongly_anisotropic_voxels_rotate_in_plane_and_keep_z_slabs():
    shape = (8, 24, 24)
    augment = _augment(rotate=True, rotate_degrees=45.0, spacing=(3.0, 1.0, 1.0))
    assert augment.fixed_axis == 0
    matrices = augment.sample(4, shape, _gen(0)).matrices
    e0 = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    assert torch.equal(matrices[:, 0], e0.expand(4, 3)) and torch.equal(matrices[:, :, 0], e0.expand(4, 3))
    plane = matrices[:, 1:, 1:]
    assert _close(plane @ plane.transpose(1, 2), torch.eye(2, dtype=torch.float64).expand(4, 2, 2), 1e-12)
    assert (plane[:, 0, 1].abs() > 0.01).all()  # really rotated
    # a z-slab pattern stays a z-slab pattern
    z = _coordinates(shape)[0]
    image, target, weight = z.expand(4, 1, *shape).contiguous(), z.long().expand(4, *shape).contiguous(), torch.ones(4, *shape)
    out_image, out_target, _ = augment(image, target, weight, _gen(0))
    inside = out_target >= 0
    assert (out_target == -1).any()  # rotated corners left the patch
    assert torch.equal(out_target[inside], z.long().expand(4, *shape)[inside])
    interior = _uniform_around(inside, 0) & inside
    assert _close(out_image[:, 0][interior], z.expand(4, *shape)[interior], 1e-4)
    # the elastic displacement is in-plane too
    field = _augment(elastic=True, spacing=(3.0, 1.0, 1.0)).elastic_field(shape, _gen(1))
    assert (field[0] == 0).all() and field[1:].abs().max() > 0.5


def test_mildly_anisotropic_voxels_rotate_in_3d_in_physical_space():
    spacing = torch.tensor([2.0, 1.0, 1.0], dtype=torch.float64)
    augment = _augment(rotate=True, rotate_degrees=30.0, spacing=tuple(spacing.tolist()))
    assert augment.fixed_axis is None
    matrices = augment.sample(6, (8, 16, 16), _gen(0)).matrices
    physical = spacing[:, None] * matrices / spacing[None, :]  # S M S^-1 is the rotation itself
    eye = torch.eye(3, dtype=torch.float64).expand(6, 3, 3)
    assert _close(physical @ physical.transpose(1, 2), eye, 1e-12)
    assert _close(torch.linalg.det(physical), torch.ones(6, dtype=torch.float64), 1e-12)
    assert not torch.allclose(matrices @ matrices.transpose(1, 2), eye, atol=1e-3)  # not a rotation of voxel indices
    assert (matrices[:, 0, 1:].abs().sum(1) > 1e-3).all()  # z is mixed with y and x
    # the elastic sigma is in voxels of the finest axis: half of it along z
    fields = torch.stack([_augment(elastic=True, elastic_grid=4, spacing=(2.0, 1.0, 1.0)).elastic_field((17, 33, 33), _gen(s))
                          for s in range(4)])
    ratio = float(fields[:, 0, ::2, ::4, ::4].std() / fields[:, 1:, ::2, ::4, ::4].std())
    assert 0.4 < ratio < 0.6


@pytest.mark.parametrize("batch", [1, 3])
def test_channels_last_input_batches_of_one_and_several_channels(batch):
    shape = (8, 16, 20)
    base = torch.randn(batch, 1, *shape, generator=_gen(3))
    image = torch.cat((base, 2 * base), 1)  # two channels: the second is twice the first
    target = torch.randint(-1, 3, (batch, *shape), generator=_gen(4)).to(torch.int32)
    weight = (target >= 0).float()
    augment = _strong()
    plain = augment(image, target, weight, _gen(5))
    last = augment(image.contiguous(memory_format=torch.channels_last_3d), target, weight, _gen(5))
    assert all(torch.equal(a, b) for a, b in zip(plain, last))
    out_image, out_target, out_weight = plain
    assert out_image.shape == image.shape and out_target.shape == target.shape == out_weight.shape
    assert out_target.dtype == torch.int32 and out_weight.dtype == torch.float32
    assert _close(out_image[:, 1], 2 * out_image[:, 0], 1e-5)
    assert not torch.equal(out_image, image)


def test_from_config_reads_the_train_section():
    off = SpatialAugment.from_config(Config().train, None)
    assert not off.enabled
    train = Config.from_dict({"train": {"elastic": True, "elastic_sigma": 3.0, "rotate": True, "spatial_probability": 0.25}}).train
    augment = SpatialAugment.from_config(train, (1.0, 0.5, 0.5))
    assert augment.enabled and augment.elastic and augment.rotate and not augment.scale
    assert augment.elastic_sigma == 3.0 and augment.probability == 0.25 and augment.spacing == (1.0, 0.5, 0.5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_the_cpu():
    shape = (16, 48, 48)
    image, target = torch.randn(4, 1, *shape, generator=_gen(3)), torch.randint(-1, 3, (4, *shape), generator=_gen(4))
    weight = (target >= 0).float()
    augment = _strong(probability=0.5)
    cpu = augment(image, target, weight, _gen(6))
    cuda = augment(image.cuda(), target.cuda(), weight.cuda(), _gen(6))
    assert all(t.device.type == "cuda" for t in cuda)
    assert _close(cuda[0].cpu(), cpu[0], 1e-3)
    assert (cuda[1].cpu() == cpu[1]).float().mean() > 0.999
