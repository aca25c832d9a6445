import numpy as np
import pytest

from napari_sparse3d.engine.annotations import prepare_annotations
from napari_sparse3d.engine.augment import Augmenter
from napari_sparse3d.engine.preprocess import compute_normalization, plan_patch_size
from napari_sparse3d.engine.sampling import PatchSampler, class_weights
from napari_sparse3d.engine.volume import as_volume


def _sampler(small_volume, **kwargs):
    image, labels, _, slices = small_volume
    volume = as_volume(image)
    ann = prepare_annotations(labels, volume.spatial_shape, slices)
    weights = class_weights(ann.counts(), "sqrt")
    return PatchSampler(volume, compute_normalization(volume), ann.target, weights, (8, 16, 16), [1, 2], **kwargs), ann


def test_every_patch_holds_annotations_and_a_third_holds_foreground(small_volume):
    sampler, _ = _sampler(small_volume, foreground_fraction=1 / 3)
    rng = np.random.default_rng(0)
    with_foreground = 0
    for _ in range(150):
        image, target, weight = sampler.sample(1, rng)
        assert image.shape == (1, 1, 8, 16, 16) and target.shape == weight.shape == (1, 8, 16, 16)
        assert (weight > 0).any()
        with_foreground += bool(((target > 0) & (weight > 0)).any())
    assert with_foreground / 150 >= 1 / 3


def test_weights_are_zero_exactly_where_unlabeled(small_volume):
    sampler, _ = _sampler(small_volume)
    _, target, weight = sampler.sample(4, np.random.default_rng(1))
    assert ((target < 0) == (weight == 0)).all()


def test_patch_larger_than_volume_is_padded_with_zero_weight():
    image = np.random.default_rng(0).normal(size=(6, 10, 10)).astype(np.float32)
    labels = np.zeros((6, 10, 10), np.uint8)
    labels[3, 2:5, 2:5] = 1
    volume = as_volume(image)
    ann = prepare_annotations(labels, volume.spatial_shape, {0: [3]})
    no_spatial = Augmenter(flip=False, rotate90=False, intensity=False)  # keep the padding where it is
    sampler = PatchSampler(
        volume, compute_normalization(volume), ann.target, np.ones(2, np.float32), (8, 16, 16), [1], augmenter=no_spatial
    )
    img, target, weight = sampler.sample(2, np.random.default_rng(0))
    assert img.shape == (2, 1, 8, 16, 16)
    assert (weight[:, 6:] == 0).all() and (weight[:, :, 10:] == 0).all()
    assert (weight > 0).sum() == 2 * 10 * 10


def test_augmentation_moves_image_target_and_weight_together():
    rng = np.random.default_rng(3)
    target = rng.integers(0, 3, size=(6, 8, 8))
    image = target[None].astype(np.float32) * 10  # the image encodes the target
    weight = target.astype(np.float32) + 1
    aug = Augmenter(flip=True, rotate90=True, intensity=False)
    for seed in range(20):
        img, t, w = aug(image, target, weight, np.random.default_rng(seed))
        assert np.array_equal(img[0] / 10, t) and np.array_equal(w, t + 1)


def test_intensity_augmentation_changes_only_the_image():
    target = np.ones((4, 6, 6), np.int64)
    image = np.random.default_rng(0).normal(size=(1, 4, 6, 6)).astype(np.float32)
    img, t, _ = Augmenter(flip=False, rotate90=False, intensity=True)(image.copy(), target, target * 1.0, np.random.default_rng(0))
    assert not np.allclose(img, image) and np.array_equal(t, target)


def test_class_weights_favour_rare_classes():
    w = class_weights(np.array([900, 100, 0]), "sqrt")
    assert w[1] > w[0]
    assert (w * np.array([900, 100, 0])).sum() / 1000 == pytest.approx(1.0)
    assert np.allclose(class_weights(np.array([5, 1]), "none"), 1.0)


def test_patch_plan_follows_spacing_and_volume():
    assert plan_patch_size((200, 200, 200), None, (8, 8, 8), 64**3) == (64, 64, 64)
    z, y, x = plan_patch_size((200, 400, 400), (4.0, 1.0, 1.0), (2, 8, 8), 64**3)
    assert z < y == x  # coarse z: fewer voxels along it
    p = plan_patch_size((12, 300, 300), None, (4, 4, 4), 64**3)
    assert p[0] == 12 and p[1] > 64  # a thin volume gives its unused budget to y and x


def test_patches_flatten_along_the_normal_of_the_most_annotated_slices():
    from napari_sparse3d.engine.preprocess import dominant_slice_axis

    cube = plan_patch_size((60, 256, 256), None, (8, 8, 8), 32**3)
    flat = plan_patch_size((60, 256, 256), None, (8, 8, 8), 32**3, flatten_axis=0)
    assert cube == (32, 32, 32) and flat == (16, 48, 48)
    assert abs(np.prod(flat) / np.prod(cube) - 1) < 0.2  # about the same compute
    # an axis that is already thin (anisotropic z) is not flattened further
    thin = plan_patch_size((30, 512, 512), (4.0, 0.5, 0.5), (1, 8, 8), 32**3)
    assert plan_patch_size((30, 512, 512), (4.0, 0.5, 0.5), (1, 8, 8), 32**3, flatten_axis=0)[0] == thin[0]
    assert dominant_slice_axis([130000, 30000, 30000]) == 0
    assert dominant_slice_axis([1, 1, 1]) is None and dominant_slice_axis([0, 0, 0]) is None


def test_slice_counts_follow_the_annotated_slices(small_volume):
    image, labels, _, slices = small_volume
    ann = prepare_annotations(labels, image.shape, slices)
    assert ann.slice_counts() == [2 * 36 * 28, 2 * 20 * 28, 2 * 20 * 36]
