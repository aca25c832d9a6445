"""Every edit made in napari reaches the project; saves during training are consistent; closing loses nothing."""

import gc
import threading
import weakref

import numpy as np
import pytest

from napari_sparse3d.io.project import Project
from napari_sparse3d.sample_data import make_cells

PLUGIN = "napari-sparse3d"
DELAY_MS = 150


@pytest.fixture
def attached(make_napari_viewer, tmp_path):
    """A viewer whose annotation layer is saved into a project, with a short autosave delay."""
    image, truth = make_cells((16, 32, 32), seed=1)
    viewer = make_napari_viewer()
    viewer.add_image(image, name="cells")
    _, annotate = viewer.window.add_plugin_dock_widget(PLUGIN, "Annotate slices")
    _, train = viewer.window.add_plugin_dock_widget(PLUGIN, "Train and predict")
    annotate.create_labels_layer()
    annotate.autosave_delay_ms = DELAY_MS
    path = tmp_path / "cells.zarr"
    assert annotate.create_project(str(path)) is not None
    return viewer, annotate, train, truth, path


def _saved(path):
    return Project.open(path).annotations()


def _paint(layer, index, value):
    layer.data_setitem((np.array([index[0]]), np.array([index[1]]), np.array([index[2]])), value)


def test_paint_fill_undo_redo_reach_the_project(attached, qtbot):
    viewer, annotate, train, truth, path = attached
    layer = annotate.state.labels_layer
    _paint(layer, (3, 4, 5), 2)
    qtbot.waitUntil(lambda: _saved(path)[0][3, 4, 5] == 2, timeout=DELAY_MS * 20)
    layer.undo()
    qtbot.waitUntil(lambda: _saved(path)[0][3, 4, 5] == 0, timeout=DELAY_MS * 20)
    layer.redo()
    qtbot.waitUntil(lambda: _saved(path)[0][3, 4, 5] == 2, timeout=DELAY_MS * 20)
    layer.fill((8, 0, 0), 1)  # the whole empty region of slice 8 (napari fills in the displayed plane)
    qtbot.waitUntil(lambda: (_saved(path)[0] == 1).sum() > 100, timeout=DELAY_MS * 20)
    np.testing.assert_array_equal(_saved(path)[0], layer.data)


def test_accepted_slices_and_corrections_reach_the_project(attached, qtbot):
    viewer, annotate, train, truth, path = attached
    state = annotate.state
    # a prediction layer as training leaves it, adopted by the state
    assert train.start(warm=False, max_iterations=1) is False  # no annotations yet: refused, nothing saved
    prediction = viewer.add_labels(truth.astype(np.uint8), name="prediction")
    state.adopt_prediction(prediction)
    state.go_to(0, 5)
    state.register().toggle(0, 5)  # already marked: accepting it changes labels, not the register
    qtbot.waitUntil(lambda: _saved(path)[1] == {0: [5]}, timeout=DELAY_MS * 20)
    assert (_saved(path)[0][5] == 0).all()
    accepted = train.accept_current_slice()
    assert accepted == [(0, 5)]
    qtbot.waitUntil(lambda: np.array_equal(_saved(path)[0][5], truth[5]), timeout=DELAY_MS * 20)
    # a correction painted on the prediction layer is saved as the project's prediction
    _paint(prediction, (9, 9, 9), 2)
    qtbot.waitUntil(lambda: (Project.open(path).prediction() is not None
                             and Project.open(path).prediction()[9, 9, 9] == 2), timeout=DELAY_MS * 20)


def test_choosing_another_layer_never_saves_it_into_the_project(attached, qtbot):
    viewer, annotate, train, truth, path = attached
    state = annotate.state
    first = state.labels_layer
    _paint(first, (1, 1, 1), 1)
    annotate.create_labels_layer()  # a new, empty annotation layer becomes the chosen one
    assert state.labels_layer is not first
    # the first layer's pending edit was flushed, the project is no longer written from here
    saved = _saved(path)[0]
    assert saved[1, 1, 1] == 1
    _paint(state.labels_layer, (2, 2, 2), 2)
    qtbot.wait(DELAY_MS * 4)
    np.testing.assert_array_equal(_saved(path)[0], saved)
    assert state.project is None
    # choosing the project's layer again takes the project up again
    annotate.labels.value = first
    assert state.project is not None and state.project_layer is first


def test_edits_just_before_closing_are_flushed(attached, qtbot):
    viewer, annotate, train, truth, path = attached
    annotate.autosave_delay_ms = 60_000  # the autosave would come far too late
    _paint(annotate.state.labels_layer, (4, 4, 4), 2)
    annotate.state.register().toggle(0, 4)
    viewer.close()
    labels, slices = _saved(path)
    assert labels[4, 4, 4] == 2 and slices == {0: [4]}
    qtbot.waitUntil(lambda: annotate.state.project is None, timeout=5000)  # the lock went with the window
    Project.open(path, writable=True).close()


def _fingerprint(model):
    return tuple(round(float(p.detach().double().sum()), 9) for p in model.parameters())


def test_save_model_during_training_holds_the_weights_of_one_step(attached, qtbot, monkeypatch, tmp_path):
    from napari_sparse3d.engine.training import Trainer
    from napari_sparse3d.io.checkpoint import load_checkpoint

    viewer, annotate, train, truth, path = attached
    state = annotate.state
    state.labels_layer.data[8] = truth[8]
    state.register().toggle(0, 8)
    seen = set()
    real_step = Trainer._step

    def recording_step(self, lr):
        seen.add(_fingerprint(self.model))  # the weights every finished step left (this is the worker)
        return real_step(self, lr)

    monkeypatch.setattr(Trainer, "_step", recording_step)
    train.preview_every = 1e9
    assert train.start(warm=False, max_iterations=400)
    qtbot.waitUntil(lambda: state.model is not None and len(state.model.sparse3d.history) >= 3, timeout=60_000)
    saved = [train.save_model(str(tmp_path / f"m{k}.pt")) for k in range(3)]
    train.cancel_event.set()
    train.stop()
    qtbot.waitUntil(lambda: not train.running, timeout=60_000)
    seen.add(_fingerprint(state.model))
    for file in saved:
        model = load_checkpoint(file)
        assert _fingerprint(model) in seen


def test_closing_napari_mid_training_writes_the_final_checkpoint_and_frees_the_model(attached, qtbot):
    viewer, annotate, train, truth, path = attached
    state = annotate.state
    state.labels_layer.data[8] = truth[8]
    state.register().toggle(0, 8)
    train.checkpoint_every = 1e9  # only the final checkpoint
    train.preview_every = 1e9
    assert train.start(warm=False, max_seconds=600)
    qtbot.waitUntil(lambda: state.model is not None and len(state.model.sparse3d.history) >= 2, timeout=60_000)
    model_ref = weakref.ref(state.model)
    viewer.close()  # waits for the step in progress and the final checkpoint
    project = Project.open(path)
    assert project.checkpoint("latest") is not None
    from napari_sparse3d.io.checkpoint import load_checkpoint

    saved = load_checkpoint(project.checkpoint("latest"))
    assert len(saved.sparse3d.history) >= 2
    qtbot.waitUntil(lambda: state.trainer is None and state.model is None, timeout=10_000)
    qtbot.waitUntil(lambda: not train.running or train._job_done.is_set(), timeout=10_000)
    del saved
    for _ in range(3):
        gc.collect()
        qtbot.wait(50)
    assert threading.active_count() < 20
    assert model_ref() is None  # nothing of the plugin keeps the model (and its optimiser) alive
