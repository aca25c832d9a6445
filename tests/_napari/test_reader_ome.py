"""A prediction written to zarr opens in napari (through the plugin's reader) at its voxel size."""

import numpy as np
from napari.layers import Labels

import napari_sparse3d


def test_an_ome_zarr_prediction_opens_as_labels_at_its_scale(make_napari_viewer, tiny_checkpoint, tmp_path):
    model, _ = tiny_checkpoint
    image = np.random.default_rng(0).normal(size=(12, 40, 36)).astype(np.float32)
    out = tmp_path / "pred.zarr"
    labels = np.asarray(napari_sparse3d.predict(image, model, out=out, spacing=(2.0, 0.5, 0.5), pyramid=1)[...])
    viewer = make_napari_viewer()
    layers = viewer.open(str(out), plugin="napari-sparse3d")
    assert len(layers) == 1 and isinstance(layers[0], Labels)
    layer = layers[0]
    assert tuple(layer.scale) == (2.0, 0.5, 0.5)
    assert layer.multiscale and len(layer.data) == 2
    np.testing.assert_array_equal(np.asarray(layer.data[0]), labels)
    np.testing.assert_array_equal(np.asarray(layer.data[1]), labels[:, ::2, ::2])
    # the same volume and its prediction line up in world coordinates
    assert np.allclose(layer.extent.world[1], np.array(labels.shape) * (2.0, 0.5, 0.5) - (2.0, 0.5, 0.5))
