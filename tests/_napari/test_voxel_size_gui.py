"""Scale everywhere: a TIFF's voxel size on every plugin layer and as the training spacing; other grids refused."""

import numpy as np
import pytest
import tifffile

from napari_sparse3d._napari.training_run import TrainingRun
from napari_sparse3d.sample_data import make_cells

PLUGIN = "napari-sparse3d"


def _annotate(state, truth, axis, index):
    key = [slice(None)] * 3
    key[axis] = index
    state.labels_layer.data[tuple(key)] = truth[tuple(key)]
    state.register().mark(axis, index)


def test_tiff_voxel_size_goes_on_every_plugin_layer_and_into_training(make_napari_viewer, tmp_path):
    image, truth = make_cells((16, 32, 32), seed=0)
    path = tmp_path / "cells.tif"
    tifffile.imwrite(path, image.astype(np.float32), imagej=True, resolution=(1 / 0.5, 1 / 0.5),
                     metadata={"spacing": 2.0, "unit": "um"})
    viewer = make_napari_viewer()
    [layer] = viewer.open(str(path), plugin="napari")  # napari's own TIFF reader: no scale
    assert np.allclose(layer.scale, 1.0)
    _, annotate = viewer.window.add_plugin_dock_widget(PLUGIN, "Annotate slices")
    _, train = viewer.window.add_plugin_dock_widget(PLUGIN, "Train and predict")
    state = annotate.state
    assert state.image_layer is layer
    assert tuple(layer.scale) == pytest.approx((2.0, 0.5, 0.5))
    assert annotate.voxel_size.origin == "file"
    assert [f.value for f in annotate.voxel_size.fields] == pytest.approx([2.0, 0.5, 0.5])

    labels = annotate.create_labels_layer()
    assert tuple(labels.scale) == pytest.approx((2.0, 0.5, 0.5))
    _annotate(state, truth, 0, 8)
    run = TrainingRun.read(state, warm=False, config=train.config(), device="cpu")
    assert run.spacing == pytest.approx((2.0, 0.5, 0.5))
    prediction = train.painter.layer()  # the layer training streams into
    assert tuple(prediction.scale) == pytest.approx((2.0, 0.5, 0.5))
    train.painter._show_uncertainty(np.zeros(truth.shape, np.float32))
    assert tuple(state.uncertainty_layer.scale) == pytest.approx((2.0, 0.5, 0.5))


def test_unknown_voxel_size_is_asked_for_and_set_on_the_plugin_layers(make_napari_viewer, monkeypatch):
    import napari_sparse3d._napari.voxel_size as voxel_module

    told = []
    monkeypatch.setattr(voxel_module, "show_info", told.append)
    image, truth = make_cells((16, 32, 32), seed=0)
    viewer = make_napari_viewer()
    viewer.add_image(image, name="cells")
    _, annotate = viewer.window.add_plugin_dock_widget(PLUGIN, "Annotate slices")
    box, state = annotate.voxel_size, annotate.state
    assert box.origin == "unknown" and "UNKNOWN" in box.info.value
    assert any("voxel size of 'cells' is unknown" in message for message in told)
    labels = annotate.create_labels_layer()
    for field, value in zip(box.fields, (3.0, 0.4, 0.4)):
        field.value = value
    box.apply_button.clicked()
    assert tuple(state.image_layer.scale) == pytest.approx((3.0, 0.4, 0.4))
    assert tuple(labels.scale) == pytest.approx((3.0, 0.4, 0.4))
    assert state.spacing() == pytest.approx((3.0, 0.4, 0.4))
    assert box.origin == "user"
    with pytest.raises(ValueError, match="voxel size"):
        box.apply((1.0, 0.0, 1.0))


def test_layers_on_another_grid_are_refused_with_a_notification(make_napari_viewer, monkeypatch):
    import napari_sparse3d._napari.annotation as annotation_module

    warned = []
    monkeypatch.setattr(annotation_module, "show_warning", warned.append)
    image, truth = make_cells((16, 32, 32), seed=0)
    viewer = make_napari_viewer()
    viewer.add_image(image, name="cells", scale=(2.0, 0.5, 0.5))
    _, annotate = viewer.window.add_plugin_dock_widget(PLUGIN, "Annotate slices")
    state = annotate.state
    unit = viewer.add_labels(np.zeros(truth.shape, np.uint8), name="unit grid")
    annotate.labels.value = unit
    assert state.labels_layer is None and annotate.labels.value is None
    assert len(warned) == 1 and "'unit grid' has scale (1.0, 1.0, 1.0)" in warned[0] and "'cells'" in warned[0]
    shifted = viewer.add_labels(np.zeros(truth.shape, np.uint8), name="shifted", scale=(2.0, 0.5, 0.5),
                                translate=(0.0, 3.0, 0.0))
    annotate.labels.value = shifted
    assert state.labels_layer is None and "translate" in warned[-1]
    # training refuses it too, should a layer be forced in
    state.labels_layer = unit
    with pytest.raises(ValueError, match="scale"):
        TrainingRun.read(state, warm=False, config=None, device="cpu")
