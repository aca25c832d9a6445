"""Predictions written to zarr are OME-Zarr label images: scale from the spacing, optional pyramid, read back by ome-zarr."""

import json

import numpy as np
import pytest
import zarr
from ome_zarr.io import parse_url
from ome_zarr.reader import Reader

import napari_sparse3d
from napari_sparse3d.cli import main
from napari_sparse3d.io.arrays import load_array
from napari_sparse3d.io.ome import pyramid_factors


def _read_back(path):
    """Axes, per-level scales and arrays, as ome-zarr-py (the library that wrote them) reads them."""
    node = next(iter(Reader(parse_url(str(path)))()))
    scales = [t[0]["scale"] for t in node.metadata["coordinateTransformations"]]
    return [a["name"] for a in node.metadata["axes"]], scales, node.data


def test_a_prediction_carries_the_spacing_as_its_scale(tiny_checkpoint, tmp_path):
    model, _ = tiny_checkpoint
    image = np.random.default_rng(0).normal(size=(12, 40, 36)).astype(np.float32)
    labels = napari_sparse3d.predict(image, model, out=tmp_path / "labels.zarr", spacing=(2.0, 0.5, 0.5))
    axes, scales, data = _read_back(tmp_path / "labels.zarr")
    assert axes == ["z", "y", "x"]
    assert scales == [[2.0, 0.5, 0.5]]
    np.testing.assert_array_equal(np.asarray(data[0]), np.asarray(labels[...]))
    assert json.loads((tmp_path / "labels.zarr" / "zarr.json").read_text())["attributes"]["ome"]["version"] == "0.5"
    np.testing.assert_array_equal(np.asarray(load_array(tmp_path / "labels.zarr")[...]), np.asarray(labels[...]))


def test_a_pyramid_downsamples_labels_by_nearest_and_keeps_a_coarse_axis(tiny_checkpoint, tmp_path):
    model, _ = tiny_checkpoint
    image = np.random.default_rng(1).normal(size=(12, 40, 36)).astype(np.float32)
    out = tmp_path / "labels.zarr"
    labels = np.asarray(napari_sparse3d.predict(image, model, out=out, spacing=(2.0, 0.5, 0.5), pyramid=2)[...])
    _, scales, data = _read_back(out)
    # z (2.0) is more than twice y and x (0.5): only y and x halve, until the voxels are comparable
    assert pyramid_factors((2.0, 0.5, 0.5), 2) == [(1, 2, 2), (2, 2, 2)]
    assert scales == [[2.0, 0.5, 0.5], [2.0, 1.0, 1.0], [4.0, 2.0, 2.0]]
    np.testing.assert_array_equal(np.asarray(data[1]), labels[:, ::2, ::2])
    np.testing.assert_array_equal(np.asarray(data[2]), labels[::2, ::4, ::4])
    assert set(np.unique(np.asarray(data[2]))) <= set(np.unique(labels))  # label values, never averages
    np.testing.assert_array_equal(np.asarray(load_array(out)[...]), labels)  # the full resolution


def test_an_earlier_prediction_may_be_replaced_but_not_another_group(tiny_checkpoint, tmp_path):
    model, _ = tiny_checkpoint
    image = np.random.default_rng(2).normal(size=(12, 24, 24)).astype(np.float32)
    out = tmp_path / "labels.zarr"
    napari_sparse3d.predict(image, model, out=out)
    with pytest.raises(ValueError, match="already exists"):
        napari_sparse3d.predict(image, model, out=out)
    napari_sparse3d.predict(image, model, out=out, overwrite=True)
    other = tmp_path / "other.zarr"
    zarr.open_group(str(other), mode="w").create_array("data", shape=(2,), dtype="uint8")
    with pytest.raises(ValueError, match="is not an earlier zarr prediction"):
        napari_sparse3d.predict(image, model, out=other, overwrite=True)
    with pytest.raises(ValueError, match="pyramid must be an integer"):
        napari_sparse3d.predict(image, model, out=tmp_path / "p.zarr", pyramid=-1)
    with pytest.raises(ValueError, match="coarser levels are written to an out path"):
        napari_sparse3d.predict(image, model, pyramid=1)


def test_console_predict_writes_ome_zarr_with_its_pyramid(tiny_checkpoint, tmp_path):
    _, checkpoint = tiny_checkpoint
    image = np.random.default_rng(3).normal(size=(12, 32, 32)).astype(np.float32)
    np.save(tmp_path / "vol.npy", image)
    assert main(["predict", str(checkpoint), str(tmp_path / "vol.npy"), "-o", str(tmp_path / "out"), "--format", "zarr",
                 "--pyramid", "1", "--spacing", "1", "1", "1", "--device", "cpu", "--quiet"]) == 0
    _, scales, data = _read_back(tmp_path / "out" / "vol_labels.zarr")
    assert scales == [[1.0, 1.0, 1.0], [2.0, 2.0, 2.0]]
    assert tuple(data[1].shape) == (6, 16, 16)
