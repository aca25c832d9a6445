import pytest
import torch

from napari_sparse3d.engine.losses import SparseLoss, downsample_targets, soft_dice_loss, weighted_cross_entropy


def _setup(seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 3, 4, 6, 6, generator=g)
    target = torch.randint(0, 3, (2, 4, 6, 6), generator=g)
    weight = (torch.rand(2, 4, 6, 6, generator=g) < 0.3).float() * torch.rand(2, 4, 6, 6, generator=g)
    return logits, target, weight


_COARSE = torch.randn(2, 3, 2, 3, 3, generator=torch.Generator().manual_seed(5))

LOSSES = {
    "cross_entropy": lambda lo, t, w: weighted_cross_entropy(lo, t, w),
    "dice": lambda lo, t, w: soft_dice_loss(lo, t, w > 0),
    "combined": lambda lo, t, w: SparseLoss(3, dice_weight=1.0)(lo, t, w),
    # the coarse output is held fixed: what matters is that the full-resolution term ignores unlabeled voxels
    "deep_supervision": lambda lo, t, w: SparseLoss(3, dice_weight=1.0, scale_factors=[(2, 2, 2)])([lo, _COARSE], t, w),
}


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_unlabeled_voxels_change_neither_loss_nor_gradients(name):
    loss_fn = LOSSES[name]
    logits, target, weight = _setup()
    unlabeled = (weight == 0).unsqueeze(1).expand_as(logits)
    a = logits.clone().requires_grad_(True)
    b = logits.clone()
    b[unlabeled] = torch.randn(int(unlabeled.sum())) * 50  # wild logits where nothing is annotated
    b.requires_grad_(True)
    target_b = target.clone()
    target_b[weight == 0] = (target_b[weight == 0] + 1) % 3  # and different targets there too
    la, lb = loss_fn(a, target, weight), loss_fn(b, target_b, weight)
    la.backward()
    lb.backward()
    assert torch.allclose(la, lb, atol=1e-6)
    assert torch.allclose(a.grad[~unlabeled], b.grad[~unlabeled], atol=1e-6)
    assert a.grad[unlabeled].abs().max() == 0 and b.grad[unlabeled].abs().max() == 0
    assert a.grad[~unlabeled].abs().max() > 0


@pytest.mark.parametrize("loss_fn", [weighted_cross_entropy, lambda lo, t, w: soft_dice_loss(lo, t, w > 0)])
def test_gradient_is_zero_on_unlabeled_voxels(loss_fn):
    logits, target, weight = _setup(1)
    logits.requires_grad_(True)
    loss_fn(logits, target, weight).backward()
    assert logits.grad[(weight == 0).unsqueeze(1).expand_as(logits)].abs().max() == 0
    assert logits.grad[(weight > 0).unsqueeze(1).expand_as(logits)].abs().max() > 0


def test_cross_entropy_is_the_weighted_mean():
    logits, target, weight = _setup(2)
    per_voxel = torch.nn.functional.cross_entropy(logits, target, reduction="none")
    expected = (weight * per_voxel).sum() / weight.sum()
    assert torch.allclose(weighted_cross_entropy(logits, target, weight), expected, atol=1e-6)


def test_all_unlabeled_gives_zero_cross_entropy_not_nan():
    logits, target, _ = _setup()
    assert weighted_cross_entropy(logits, target, torch.zeros(2, 4, 6, 6)).item() == 0.0


def test_perfect_prediction_has_zero_dice_loss():
    target = torch.randint(0, 2, (1, 4, 4, 4))
    logits = torch.nn.functional.one_hot(target, 2).movedim(-1, 1).float() * 100
    assert soft_dice_loss(logits, target, torch.ones(1, 4, 4, 4)).item() < 1e-4


def test_downsampled_targets_keep_a_thin_annotated_plane():
    target = torch.zeros(1, 4, 4, 4, dtype=torch.long)
    weight = torch.zeros(1, 4, 4, 4)
    target[0, 1] = 1  # an annotated plane at an odd index: striding by 2 would lose it
    weight[0, 1] = 1
    soft, w = downsample_targets(target, weight, 2, (2, 2, 2))
    assert w.shape == (1, 2, 2, 2) and (w[0, 0] > 0).all() and (w[0, 1] == 0).all()
    assert torch.allclose(soft[0, 1, 0], torch.ones(2, 2))
