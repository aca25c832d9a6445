"""Bad input gets a ValueError or TypeError naming the argument, what was expected and what came."""

import numpy as np
import pytest

import napari_sparse3d

SHAPE = (10, 16, 16)


def _good():
    rng = np.random.default_rng(0)
    image = rng.random(SHAPE).astype(np.float32)
    labels = np.zeros(SHAPE, np.uint8)
    labels[5, 2:6, 2:6] = 1
    return image, labels, {0: [5]}


def _with(**changes):
    image, labels, slices = _good()
    kwargs = {"annotated_slices": slices, "max_iterations": 1}
    image = changes.pop("image", image)
    labels = changes.pop("labels", labels)
    kwargs.update(changes)
    return image, labels, kwargs


def _nan_image():
    image = _good()[0]
    image[3, 4, 5] = np.nan
    return image


def _inf_image():
    image = _good()[0]
    image[0, 0, 0] = np.inf
    return image


def _only_foreground():
    labels = np.zeros(SHAPE, np.uint8)
    labels[5, 2:6, 2:6] = 1
    return labels


CASES = {
    "2D image": (dict(image=np.zeros((16, 16), np.float32), labels=np.zeros((16, 16), np.uint8)), ValueError, r"image must be a 3D volume.*got 2D"),
    "4D image without channel axis": (dict(image=np.zeros((2,) + SHAPE, np.float32)), ValueError, r"image is 4D.*channel_axis"),
    "5D image": (dict(image=np.zeros((1, 2) + SHAPE, np.float32)), ValueError, r"image must be a 3D volume.*5D"),
    "shape mismatch": (dict(labels=np.zeros((10, 16, 15), np.uint8)), ValueError, r"labels must have the image's spatial shape \(10, 16, 16\), got \(10, 16, 15\)"),
    "no annotations": (dict(labels=np.zeros(SHAPE, np.uint8), annotated_slices=None), ValueError, r"labels hold no annotations"),
    "one class, no background": (dict(labels=_only_foreground(), annotated_slices=None), ValueError, r"only one class \(label 1\)"),
    "only background": (dict(labels=np.zeros(SHAPE, np.uint8)), ValueError, r"only one class \(background\)"),
    "NaN in image": (dict(image=_nan_image()), ValueError, r"image contains 1 NaN or infinite"),
    "inf in image": (dict(image=_inf_image()), ValueError, r"image contains 1 NaN or infinite"),
    "fractional labels": (dict(labels=np.full(SHAPE, 0.5, np.float32)), ValueError, r"labels contain fractional values"),
    "negative labels": (dict(labels=np.full(SHAPE, -1, np.int16)), ValueError, r"labels contain negative values \(min -1\)"),
    "slice out of range": (dict(annotated_slices={0: [10]}), ValueError, r"annotated_slices\[0\]: index 10 is out of range for axis 0 of size 10"),
    "negative slice": (dict(annotated_slices={1: [-1]}), ValueError, r"annotated_slices\[1\]: index -1 is out of range"),
    "bad slice axis": (dict(annotated_slices={3: [1]}), ValueError, r"annotated_slices: axis must be 0, 1 or 2"),
    "slices not a dict": (dict(annotated_slices=[5]), TypeError, r"annotated_slices must be a dict"),
    "fractional slice index": (dict(annotated_slices={0: [2.5]}), TypeError, r"indices must be integers, got 2.5"),
    "negative seconds": (dict(max_seconds=-1), ValueError, r"max_seconds must be a positive finite number of seconds, got -1"),
    "zero iterations": (dict(max_iterations=0), ValueError, r"max_iterations must be a positive integer, got 0"),
    "fractional iterations": (dict(max_iterations=2.5), TypeError, r"max_iterations must be an integer"),
    "empty image": (dict(image=np.zeros((0, 16, 16), np.float32), labels=np.zeros((0, 16, 16), np.uint8)), ValueError, r"image must not be empty, got shape \(0, 16, 16\)"),
    "object image": (dict(image=np.empty(SHAPE, dtype=object)), TypeError, r"image must have a numeric or boolean dtype, got dtype object"),
    "object labels": (dict(labels=np.empty(SHAPE, dtype=object)), TypeError, r"labels must have a numeric or boolean dtype, got dtype object"),
    "complex image": (dict(image=np.zeros(SHAPE, np.complex64)), TypeError, r"image must have a numeric or boolean dtype"),
    "image not an array": (dict(image={"a": 1}), TypeError, r"image must be an array"),
    "missing image file": (dict(image="/nonexistent/volume.tif"), ValueError, r"image: file '/nonexistent/volume.tif' does not exist"),
    "bad spacing": (dict(spacing=(1.0, 0.0, 1.0)), ValueError, r"spacing must be three positive finite numbers"),
    "spacing wrong length": (dict(spacing=(1.0, 1.0)), ValueError, r"spacing must be three"),
    "bad device": (dict(device="tpu"), ValueError, r"device must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps', got 'tpu'"),
    "cuda without cuda": (dict(device="cuda"), ValueError, r"CUDA is not available"),
    "bad seed": (dict(seed=-3), TypeError, r"seed must be a non-negative integer"),
    "bad config type": (dict(config=3), TypeError, r"config must be None, a preset name, a dict or a Config"),
    "bad preset": (dict(config="huge"), ValueError, r"preset must be one of"),
    "channel axis on 3D": (dict(channel_axis=0), ValueError, r"image with a channel_axis must be 4D"),
    "bad background label": (dict(background_label=0), ValueError, r"background_label must be a label value >= 1"),
    "progress not callable": (dict(progress="yes"), TypeError, r"progress must be a callable"),
}


def test_a_compressed_tiff_is_read_page_by_page(tmp_path, monkeypatch):
    import tifffile

    from napari_sparse3d.io.arrays import TiffPages, load_array

    volume = np.random.default_rng(0).integers(0, 60000, (12, 40, 30), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "stack.tif", volume, compression="zlib")
    lazy = load_array(tmp_path / "stack.tif")
    assert isinstance(lazy, TiffPages) and lazy.shape == volume.shape and lazy.dtype == volume.dtype
    read = []
    real = tifffile.TiffPage.asarray
    monkeypatch.setattr(tifffile.TiffPage, "asarray", lambda page, *a, **k: read.append(page.index) or real(page, *a, **k))
    np.testing.assert_array_equal(lazy[3:5, 10:20, 5:9], volume[3:5, 10:20, 5:9])
    assert sorted(read) == [3, 4]  # only the pages of the region
    np.testing.assert_array_equal(lazy[::5], volume[::5])
    np.testing.assert_array_equal(lazy[7], volume[7])
    np.testing.assert_array_equal(np.asarray(lazy), volume)
    # and the engine reads regions through it
    from napari_sparse3d.engine.volume import as_volume

    np.testing.assert_array_equal(as_volume(lazy).read((slice(2, 4), slice(0, 5), slice(0, 5)))[0], volume[2:4, :5, :5])


def test_an_uncompressed_tiff_is_memory_mapped(tmp_path):
    import tifffile

    from napari_sparse3d.io.arrays import load_array

    volume = np.arange(4 * 6 * 5, dtype=np.uint16).reshape(4, 6, 5)
    tifffile.imwrite(tmp_path / "plain.tif", volume)
    mapped = load_array(tmp_path / "plain.tif")
    assert isinstance(mapped, np.memmap)
    np.testing.assert_array_equal(mapped, volume)
