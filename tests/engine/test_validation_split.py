"""Held-out validation: which annotated voxels leave training, and the Dice measured on them."""

import numpy as np
import pytest
import torch
from torch import nn

from napari_sparse3d.config import ModelConfig
from napari_sparse3d.engine.annotations import prepare_annotations
from napari_sparse3d.engine.model import UNet3D
from napari_sparse3d.engine.preprocess import Normalization
from napari_sparse3d.engine.validation import MIN_CLASS_VOXELS, TILE, Validator, split_validation
from napari_sparse3d.engine.volume import as_volume

SHAPE = (24, 64, 64)
IDENTITY = Normalization(lower=(-1e9,), upper=(1e9,), mean=(0.0,), std=(1.0,))  # values stay as they are


def _truth(shape=SHAPE):
    truth = np.zeros(shape, np.uint8)
    truth[4:14, 8:40, 6:30] = 1
    truth[10:22, 30:56, 28:58] = 2
    return truth


def _annotations(slices, truth=None, scribbles=()):
    truth = _truth() if truth is None else truth
    labels = np.zeros_like(truth)
    for axis, indices in slices.items():
        index = [slice(None)] * 3
        index[axis] = indices
        labels[tuple(index)] = truth[tuple(index)]
    for box, value in scribbles:
        labels[box] = value
    return prepare_annotations(labels, truth.shape, slices)


def _annotated(a):
    return int(np.count_nonzero(a.target >= 0))


def _check_partition(original, training, held):
    """Every annotated voxel is either trained on or held out, with its class; nothing else changes."""
    assert held.shape == original.target.shape and held.dtype == np.int16
    both = (training.target >= 0) & (held >= 0)
    assert not both.any()
    merged = np.where(held >= 0, held, training.target)
    np.testing.assert_array_equal(merged, original.target)
    assert training.class_values == original.class_values
    assert training.annotated_slices == original.annotated_slices


def _held_plane(held):
    """``(axis, index)`` of the one plane holding every held-out voxel, or None."""
    where = np.argwhere(held >= 0)
    axes = [a for a in range(3) if np.unique(where[:, a]).size == 1]
    return (axes[0], int(where[0, axes[0]])) if len(axes) == 1 else None


def test_whole_slice_held_out_with_three_slices_per_axis():
    original = _annotations({0: [6, 12, 18], 1: [14, 32, 50], 2: [12, 30, 48]})
    before = original.target.copy()
    training, held = split_validation(original, 0.1, seed=0)
    np.testing.assert_array_equal(original.target, before)  # the input is not touched
    _check_partition(original, training, held)
    # one whole slice of one axis, the middle one of its three: every annotated voxel of that plane
    axis, index = _held_plane(held)
    assert index == original.annotated_slices[axis][1]
    plane = np.take(original.target, index, axis=axis) >= 0
    assert plane.all() and (held >= 0).sum() == plane.sum()
    assert not (np.take(training.target, index, axis=axis) >= 0).any()  # the network never sees that plane
    # a z-slice (64 x 64) would be 20% of the annotations, over twice the share: a y- or x-slice is taken
    assert axis in (1, 2) and 0.05 < (held >= 0).sum() / _annotated(original) < 0.1
    # every class keeps training voxels, and the held-out slice holds foreground to measure
    assert (training.counts() > 0).all()
    assert set(np.unique(held[held >= 0])) >= {1, 2}


def test_tiles_hold_out_about_the_share_with_two_slices_per_axis():
    original = _annotations({0: [8, 16], 1: [20, 44], 2: [16, 40]})
    total = _annotated(original)
    for share in (0.1, 0.25):
        training, held = split_validation(original, share, seed=1)
        _check_partition(original, training, held)
        fraction = (held >= 0).sum() / total
        assert abs(fraction - share) <= TILE * TILE / 2 / total + 1e-9, (share, fraction)
        assert (training.counts() > 0).all()
        # square in-plane tiles: no whole annotated slice is held out
        for axis, indices in original.annotated_slices.items():
            for i in indices:
                assert (np.take(training.target, i, axis=axis) >= 0).any()


def test_scribbles_are_tiled_too():
    truth = _truth()
    scribbles = [((slice(3, 4), slice(0, 64), slice(0, 64)), 1), ((slice(5, 6), slice(0, 64), slice(0, 64)), 2)]
    original = _annotations({}, truth, scribbles)  # no annotated slices: only painted voxels
    training, held = split_validation(original, 0.1, seed=0)
    _check_partition(original, training, held)
    assert abs((held >= 0).sum() / _annotated(original) - 0.1) < 0.05
    assert (training.counts() > 0).all()


def test_a_class_never_vanishes():
    truth = _truth()
    truth[truth == 2] = 0
    truth[12, 20:30, 40:50] = 2  # class 2 lives on the middle z-slice only (100 voxels)
    original = _annotations({0: [6, 12, 18], 1: [14, 32, 50], 2: [12, 30, 48]}, truth)
    training, held = split_validation(original, 0.1, seed=0)
    _check_partition(original, training, held)
    assert _held_plane(held)[0] != 0  # the z-slice 12 would take all of class 2: another axis's slice is held out
    assert training.counts()[2] == original.counts()[2] == 100
    # tiles, and shares that ask for (nearly) everything: no class gives more than half of its voxels
    tiles = _annotations({0: [8, 12], 1: [20, 44], 2: [16, 40]}, truth)
    for annotations in (original, tiles):
        for share in (0.1, 0.5, 1.0):
            training, held = split_validation(annotations, share, seed=3)
            _check_partition(annotations, training, held)
            assert (held >= 0).any()
            assert (training.counts() >= np.ceil(annotations.counts() / 2)).all(), (share, training.counts())


def test_too_few_annotations_or_share_zero_hold_out_nothing():
    few = _annotations({0: [8]}, _truth((24, 32, 32)))  # 1024 voxels
    assert _annotated(few) < 2000
    small_class = _truth()
    small_class[small_class == 2] = 0
    small_class[8, 2:4, 2:2 + (MIN_CLASS_VOXELS - 1) // 2] = 2  # a class of fewer than MIN_CLASS_VOXELS voxels
    rare = _annotations({0: [8, 16], 1: [20, 44]}, small_class)
    assert 0 < rare.counts()[2] < MIN_CLASS_VOXELS
    plenty = _annotations({0: [8, 16], 1: [20, 44], 2: [16, 40]})
    for annotations, share in ((few, 0.1), (rare, 0.1), (plenty, 0.0)):
        training, held = split_validation(annotations, share, seed=0)
        assert training is annotations
        assert held.shape == annotations.target.shape and not (held >= 0).any()
        volume = as_volume(np.zeros(held.shape, np.float32))
        validator = Validator([(volume, IDENTITY, held)], (8, 16, 16), 3, [1, 2])
        assert not validator.enabled and validator.dice(nn.Conv3d(1, 3, 1)) is None


def test_same_seed_same_split_other_seed_other_tiles():
    original = _annotations({0: [8, 16], 1: [20, 44], 2: [16, 40]})
    a = split_validation(original, 0.1, seed=5)[1]
    b = split_validation(original, 0.1, seed=5)[1]
    c = split_validation(original, 0.1, seed=6)[1]
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_bad_arguments_are_named():
    original = _annotations({0: [8, 16]})
    with pytest.raises(ValueError, match="share must be a number in"):
        split_validation(original, 1.5, 0)
    with pytest.raises(ValueError, match="share"):
        split_validation(original, -0.1, 0)
    with pytest.raises(TypeError, match="annotations must be"):
        split_validation(original.target, 0.1, 0)
    with pytest.raises(TypeError, match="seed"):
        split_validation(original, 0.1, 0.5)


# -- Validator ----------------------------------------------------------------------------------------


class OneHot(nn.Module):
    """Logits that are a one-hot of a fixed label volume, read at the patch's place (found from the image)."""

    def __init__(self, predict):
        super().__init__()
        self.predict = predict  # image patch (N, 1, z, y, x) -> class indices (N, z, y, x)
        self.scale = nn.Parameter(torch.ones(()))
        self.modes = []

    def forward(self, x):
        self.modes.append(self.training)
        labels = self.predict(x)
        return [torch.nn.functional.one_hot(labels, 3).permute(0, 4, 1, 2, 3).float() * self.scale]


def _setup(slices=None):
    truth = _truth()
    original = _annotations(slices or {0: [8, 16], 1: [20, 44], 2: [16, 40]}, truth)
    training, held = split_validation(original, 0.1, seed=0)
    # the image *is* the truth (0, 1, 2), so a perfect model rounds its input
    return truth, held, as_volume(truth.astype(np.float32)), IDENTITY


def test_dice_is_one_for_a_perfect_model_and_zero_for_background():
    truth, held, volume, norm = _setup()
    validator = Validator([(volume, norm, held)], (8, 16, 16), 3, [1, 2], max_patches=8, batch_size=3)
    perfect = OneHot(lambda x: x[:, 0].round().long().clamp(0, 2))
    background = OneHot(lambda x: torch.zeros_like(x[:, 0], dtype=torch.long))
    wrong = OneHot(lambda x: (3 - x[:, 0].round().long()) % 3)  # 0 -> 0, 1 -> 2, 2 -> 1
    assert validator.enabled
    assert validator.dice(perfect, "cpu") == pytest.approx(1.0)
    assert validator.dice(background, "cpu") == 0.0
    assert validator.dice(wrong, "cpu") == 0.0
    assert perfect.modes and not any(perfect.modes)  # eval mode while measuring ...
    perfect.train()
    validator.dice(perfect)
    assert perfect.training  # ... and the mode is restored
    perfect.eval()
    validator.dice(perfect)
    assert not perfect.training


def test_patches_cover_the_held_out_voxels():
    truth, held, volume, norm = _setup({0: [6, 12, 18], 1: [14, 32, 50], 2: [12, 30, 48]})  # a whole slice
    n = int((held >= 0).sum())
    few = Validator([(volume, norm, held)], (8, 16, 16), 3, [1, 2], max_patches=3)
    many = Validator([(volume, norm, held)], (8, 16, 16), 3, [1, 2], max_patches=40)
    assert few.held_out_voxels == many.held_out_voxels == n
    # greedy: three patches on the held-out y-plane cover three times their 8 x 16 (z, x) section
    assert _held_plane(held)[0] == 1
    assert few.covered_voxels == 3 * 8 * 16 and len(few.patches) == 3
    assert many.covered_voxels == n  # enough patches: every held-out voxel, each counted once
    for item, origin, inside in many.patches:
        assert item == 0 and all(o >= 0 for o in origin)
    # the cached targets hold exactly the held-out voxels, with their classes
    targets = many._targets.numpy()
    assert (targets >= 0).sum() == n
    assert sorted(np.unique(targets[targets >= 0])) == sorted(np.unique(held[held >= 0]))


def test_several_volumes_and_a_real_unet():
    truth, held, volume, norm = _setup()
    empty = np.broadcast_to(np.int16(-1), truth.shape)
    model = UNet3D(1, 3, ModelConfig(levels=2, base_features=4, deep_supervision=True, pixel_classifier=False))
    validator = Validator([(volume, norm, empty), (volume, norm, held)], (8, 16, 16), 3, [1, 2], max_patches=4)
    assert {item for item, _, _ in validator.patches} == {1}
    model.train()
    value = validator.dice(model, torch.device("cpu"))
    assert value is not None and 0.0 <= value <= 1.0
    assert model.training
    with pytest.raises(ValueError, match=r"items\[0\]: the held-out target has shape"):
        Validator([(volume, norm, held[:4])], (8, 16, 16), 3, [1, 2])
