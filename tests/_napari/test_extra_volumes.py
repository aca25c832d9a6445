"""The training dock's further image/annotation pairs: one model learns from several open volumes."""

import numpy as np
import pytest

from napari_sparse3d.sample_data import make_cells

PLUGIN = "napari-sparse3d"


@pytest.fixture
def docks(make_napari_viewer, monkeypatch):
    """A viewer with "cells" annotated on one slice, both docks, and the notifications the docks show."""
    from napari_sparse3d._napari import training as _training_widget

    errors = []
    monkeypatch.setattr(_training_widget, "show_error", errors.append)
    image, truth = make_cells((24, 48, 48), seed=3)
    viewer = make_napari_viewer()
    viewer.add_image(image, name="cells")
    _, annotate = viewer.window.add_plugin_dock_widget(PLUGIN, "Annotate slices")
    _, train = viewer.window.add_plugin_dock_widget(PLUGIN, "Train and predict")
    annotate.create_labels_layer()
    _annotate_slice(annotate, truth, 0, 12)
    return viewer, annotate, train, errors


def _annotate_slice(annotate, truth, axis, index):
    state = annotate.state
    state.go_to(axis, index)
    key = [slice(None)] * 3
    key[axis] = index
    state.labels_layer.data[tuple(key)] = truth[tuple(key)]
    state.labels_layer.refresh()
    assert annotate.toggle_mark() is True


def _second_pair(viewer, annotate, shape=(20, 40, 44)):
    """Another image, annotated on one slice through the annotation widget; then back to "cells"."""
    image, truth = make_cells(shape, seed=5)
    cells, cells_labels = annotate.state.image_layer, annotate.state.labels_layer
    other = viewer.add_image(image, name="other")
    annotate.image.value = other
    other_labels = annotate.create_labels_layer()
    _annotate_slice(annotate, truth, 1, 20)
    annotate.image.value = cells
    annotate.labels.value = cells_labels
    assert annotate.state.image_layer is cells and annotate.state.labels_layer is cells_labels
    return other, other_labels


def test_training_learns_from_an_added_pair(docks, qtbot):
    viewer, annotate, train, errors = docks
    state = annotate.state
    other, other_labels = _second_pair(viewer, annotate)
    box = train.extra
    box.reset_choices()
    offered = [layer for layer in box.image.choices if layer is not None]
    assert other in offered and state.image_layer not in offered  # the dock's own pair is not offered
    assert state.labels_layer not in box.labels.choices
    box.image.value = other
    assert box.labels.value is other_labels  # the annotation layer of the image's shape
    assert box.add() and box.pairs == [(other, other_labels)] and box.list.count() == 1
    assert not errors

    train.advanced["train.batch_size"].value = 4
    assert train.start(warm=False, max_iterations=4)
    qtbot.waitUntil(lambda: not train.running, timeout=120_000)
    assert train.last_error is None, train.last_error
    trainer = state.trainer
    assert len(trainer.volumes) == 2 and len(trainer.sampler.samplers) == 2
    assert trainer.volume.spatial_shape == (24, 48, 48) and trainer.volumes[1].spatial_shape == (20, 40, 44)
    assert all(n > 0 for n in trainer.sampler.drawn), trainer.sampler.drawn  # patches from both volumes
    assert trainer.all_annotations[1].annotated_slices == {1: [20]}  # the register of the other layer
    # previews and the prediction are of the chosen image only
    assert state.prediction_layer.data.shape == (24, 48, 48) and state.prediction_layer.data.any()

    # Continue keeps the trainer of the same pairs, and gives it the pairs' new annotations
    other_labels.data[3, 0:4, 0:4] = 1
    assert train.start(warm=True, max_iterations=2)
    qtbot.waitUntil(lambda: not train.running, timeout=120_000)
    assert train.last_error is None, train.last_error
    assert state.trainer is trainer and (trainer.all_annotations[1].target[3, 0:4, 0:4] >= 0).all()

    # without the pair, Continue trains a new trainer on the chosen volume alone (warm-started from the model)
    assert box.remove() and box.pairs == [] and box.list.count() == 0
    assert train.start(warm=True, max_iterations=1)
    qtbot.waitUntil(lambda: not train.running, timeout=120_000)
    assert train.last_error is None, train.last_error
    assert state.trainer is not trainer and len(state.trainer.volumes) == 1


def test_refused_pairs_are_notified_and_not_added(docks):
    from napari_sparse3d._napari.extra_volumes import read_extra

    viewer, annotate, train, errors = docks
    state = annotate.state
    box = train.extra
    image = viewer.add_image(make_cells((20, 40, 44), seed=5)[0], name="other")

    # an annotation layer of another shape
    wrong = viewer.add_labels(np.ones((20, 40, 40), np.uint8), name="wrong shape")
    assert box.add(image, wrong) is False
    assert "shape mismatch" in errors[-1] and "wrong shape" in errors[-1]
    # an image with channels
    four_d = viewer.add_image(np.zeros((2, 20, 40, 44), np.float32), name="two channels")
    labels = viewer.add_labels(np.ones((20, 40, 44), np.uint8), name="other annotations")
    assert box.add(four_d, labels) is False
    assert "channel mismatch" in errors[-1] and "two channels" in errors[-1]
    # an annotation layer without annotations (no painted voxel, no annotated slice)
    empty = viewer.add_labels(np.zeros((20, 40, 44), np.uint8), name="empty")
    assert box.add(image, empty) is False
    assert "holds no annotations" in errors[-1] and "empty" in errors[-1]
    # the dock's own pair
    assert box.add(state.image_layer, state.labels_layer) is False
    assert "annotation widget" in errors[-1]
    assert box.pairs == [] and box.list.count() == 0
    n_errors = len(errors)

    # a good pair, once; its spacing is its image's scale where that differs from the chosen image's
    assert box.add(image, labels)
    assert box.add(image, labels) is False and "in the list already" in errors[-1]
    assert len(box.pairs) == 1 and len(errors) == n_errors + 1
    spacing, volumes = read_extra(state, box.pairs)
    assert spacing is None and volumes[0].spacing is None and volumes[0].slices == {}
    image.scale = (2.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="grid mismatch: layer 'other annotations' has scale"):
        read_extra(state, box.pairs)  # the pair's layers on two grids are not mixed
    labels.scale = (2.0, 1.0, 1.0)
    spacing, volumes = read_extra(state, box.pairs)
    assert spacing == (1.0, 1.0, 1.0) and volumes[0].spacing == (2.0, 1.0, 1.0)

    # a pair that lost its annotations is refused at Start, with a notification
    labels.data[...] = 0
    assert train.start(warm=False, max_iterations=1) is False
    assert "Cannot train" in errors[-1] and "holds no annotations" in errors[-1]
    assert not train.running
    # a pair whose layer leaves the viewer leaves the list
    viewer.layers.remove(labels)
    assert box.pairs == [] and box.list.count() == 0
