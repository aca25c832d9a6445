"""The training dock's instances box: the prediction layer split into objects, in a new Labels layer."""

import numpy as np
from skimage.segmentation import find_boundaries

PLUGIN = "napari-sparse3d"
SCALE = (2.0, 0.5, 0.5)


def _spheres():
    """Two touching balls (radius 10, centres 18 voxels apart) and their three-class target."""
    grid = np.indices((40, 40, 60))
    instances = np.zeros(grid.shape[1:], np.uint16)
    for i, cx in enumerate((21, 39), start=1):
        inside = (grid[0] - 20) ** 2 + (grid[1] - 20) ** 2 + (grid[2] - cx) ** 2 <= 100
        instances[inside & (instances == 0)] = i
    target = (instances > 0).astype(np.uint8)
    target[find_boundaries(instances, mode="inner")] = 2
    return instances, target


def _dock(make_napari_viewer, monkeypatch):
    from napari_sparse3d._napari import instances_box

    notes = []
    monkeypatch.setattr(instances_box, "show_warning", lambda m: notes.append(("warning", m)))
    monkeypatch.setattr(instances_box, "show_info", lambda m: notes.append(("info", m)))
    viewer = make_napari_viewer()
    viewer.add_image(np.zeros((40, 40, 60), np.float32), name="image", scale=SCALE)
    _, train = viewer.window.add_plugin_dock_widget(PLUGIN, "Train and predict")
    return viewer, train, notes


def test_instances_button_adds_an_instance_layer_with_the_prediction_scale(make_napari_viewer, monkeypatch):
    viewer, train, notes = _dock(make_napari_viewer, monkeypatch)
    box = train.instances
    assert not box.button.enabled  # no prediction yet
    assert box.make_instances() is None
    assert notes and notes[-1][0] == "warning" and "No prediction" in notes[-1][1]
    assert len(viewer.layers) == 1

    instances, target = _spheres()
    prediction = viewer.add_labels(target, name="prediction", scale=SCALE, translate=(1.0, 2.0, 3.0))
    train.state.adopt_prediction(prediction)
    train._update_buttons()  # what the dock does when a job ends
    assert box.button.enabled
    box.button.native.click()
    layer = viewer.layers["prediction instances"]
    assert tuple(layer.scale) == SCALE and tuple(layer.translate) == (1.0, 2.0, 3.0)
    found = np.asarray(layer.data)
    assert found.dtype == np.uint32 and found.shape == target.shape
    assert sorted(np.unique(found).tolist()) == [0, 1, 2]  # the two touching spheres, apart
    for i in (1, 2):
        truth = instances == i
        best = found == np.bincount(found[truth]).argmax()
        assert (best & truth).sum() / (best | truth).sum() > 0.8
    assert "2 instances (split by boundary class 2)" in notes[-1][1]
    np.testing.assert_array_equal(prediction.data, target)  # the prediction is untouched

    # again, on a two-class prediction: the same layer is replaced, split by distance peaks
    prediction.data = (target > 0).astype(np.uint8)
    box.button.native.click()
    assert [layer.name for layer in viewer.layers].count("prediction instances") == 1
    assert viewer.layers["prediction instances"].data.max() == 2
    assert "distance-transform peaks" in box.info.value

    # no button while a job runs, and none once the prediction layer is gone
    train.instances.enable(True)
    assert not box.button.enabled
    train.instances.enable(False)
    assert box.button.enabled
    viewer.layers.remove(prediction)
    assert not box.button.enabled
