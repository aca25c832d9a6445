"""Orthogonal views: one row per axis, the overlay where the labels are, physical proportions."""

import numpy as np

from napari_sparse3d.evaluation.render import orthogonal_views, save_orthogonal_views


def _volume():
    image = np.zeros((10, 20, 30), np.float32)
    labels = np.zeros(image.shape, np.uint8)
    labels[:, 5:10, 5:10] = 1
    image[labels > 0] = 1.0
    return image, labels


def test_views_show_the_image_left_and_the_overlay_right():
    image, labels = _volume()
    views = orthogonal_views(image, labels, zoom=1)
    assert views.dtype == np.uint8 and views.ndim == 3 and views.shape[2] == 3
    # the z row: image (20x30), a 4-pixel white gap, the overlay (20x30), then 6 white rows
    row = views[:20]
    left, right = row[:, :30].astype(int), row[:, 34:64].astype(int)
    assert (left[..., 0] == left[..., 1]).all()  # grey
    coloured = (right[..., 0] != right[..., 1]) | (right[..., 1] != right[..., 2])
    assert coloured[5:10, 5:10].any() and not coloured[15:, 15:].any()  # colour only on the labelled object


def test_anisotropic_spacing_stretches_the_coarse_axis():
    image, labels = _volume()
    flat = orthogonal_views(image, labels, zoom=1)
    stretched = orthogonal_views(image, labels, zoom=1, spacing=(3.0, 1.0, 1.0))
    # the y and x rows show z; with z three times coarser they are three times taller
    assert stretched.shape[0] - flat.shape[0] == 2 * (10 * 3 - 10)


def test_slices_default_to_the_first_annotated_ones():
    image, labels = _volume()
    image[2] = 0.5  # z = 2 differs from the centre slice
    at_two = orthogonal_views(image, labels, index=(2, 10, 15))
    annotated = orthogonal_views(image, labels, annotated_slices={0: [2, 7]}, index=None)
    centre = orthogonal_views(image, labels)
    np.testing.assert_array_equal(annotated[: at_two.shape[0] // 3], at_two[: at_two.shape[0] // 3])
    assert not np.array_equal(annotated, centre)


def test_saved_png_reads_back(tmp_path):
    from skimage.io import imread

    image, labels = _volume()
    path = save_orthogonal_views(tmp_path / "views.png", image, labels)
    np.testing.assert_array_equal(imread(path), orthogonal_views(image, labels))
