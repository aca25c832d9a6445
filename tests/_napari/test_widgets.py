"""The napari plugin, driven the way a user drives it (pytest-qt, a real viewer under Xvfb)."""

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from napari_sparse3d.evaluation.metrics import mean_foreground_dice
from napari_sparse3d.loop.corrections import uncertain_slices
from napari_sparse3d.sample_data import make_cells

PLUGIN = "napari-sparse3d"
MANIFEST = Path(__file__).parents[2] / "src" / "napari_sparse3d" / "napari.yaml"


def test_manifest_python_names_import_without_torch():
    names = [c["python_name"] for c in yaml.safe_load(MANIFEST.read_text())["contributions"]["commands"]]
    assert len(names) >= 4
    code = (
        "import importlib, sys\n"
        f"for name in {names!r}:\n"
        "    module, attr = name.split(':')\n"
        "    assert callable(getattr(importlib.import_module(module), attr)), name\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


def test_npe2_validate_passes():
    out = subprocess.run([sys.executable, "-m", "npe2", "validate", PLUGIN], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "valid" in (out.stdout + out.stderr).lower()


def test_synthetic_sample_restores_the_register(make_napari_viewer):
    from napari_sparse3d._napari.state import state_for

    viewer = make_napari_viewer()
    viewer.open_sample(PLUGIN, "synthetic")
    viewer.window.add_plugin_dock_widget(PLUGIN, "Annotate slices")
    state = state_for(viewer)
    assert state.image_layer.name == "synthetic cells"
    assert state.labels_layer.name == "annotations"
    register = state.register()
    assert len(register) == 6 and all(len(v) == 2 for v in register.as_dict().values())


def _viewer_with_cells(make_napari_viewer, shape=(24, 48, 48), seed=3, show=False):
    image, truth = make_cells(shape, seed=seed)
    viewer = make_napari_viewer(show=show)
    viewer.add_image(image, name="cells")
    _, annotate = viewer.window.add_plugin_dock_widget(PLUGIN, "Annotate slices")
    _, train = viewer.window.add_plugin_dock_widget(PLUGIN, "Train and predict")
    return viewer, annotate, train, truth


def _annotate_slice(viewer, annotate, truth, axis, index):
    """What a user does: go to the slice, paint the truth there, mark it annotated."""
    state = annotate.state
    state.go_to(axis, index)
    assert state.current_slice() == (axis, index)
    key = [slice(None)] * 3
    key[axis] = index
    state.labels_layer.data[tuple(key)] = truth[tuple(key)]
    state.labels_layer.refresh()
    assert annotate.toggle_mark() is True


def _wait_done(qtbot, train, timeout=120_000):
    qtbot.waitUntil(lambda: not train.running, timeout=timeout)


def test_annotate_train_correct_retrain(make_napari_viewer, qtbot):
    viewer, annotate, train, truth = _viewer_with_cells(make_napari_viewer)
    state = annotate.state
    assert state.image_layer.name == "cells"
    layer = annotate.create_labels_layer()
    assert layer.data.shape == truth.shape and state.labels_layer is layer

    # a weak first round: one suggested slice along z
    axis, index = annotate.next_slice()
    assert axis == 0 and index in (11, 12)  # the middle of 24 slices
    _annotate_slice(viewer, annotate, truth, axis, index)
    assert f"z: {index}" in annotate.register_info.value and "background" in annotate.count_info.value

    previews = []
    train.preview_every = 1.0
    train.seconds.value = 8
    # the network alone: with the pixel classifier one slice already gives ~0.95 here, and this test
    # needs a first round that the corrections can visibly improve
    train.advanced["model.pixel_classifier"].value = False
    assert train.config().model.pixel_classifier is False
    original_paint = train._paint
    train._paint = lambda blocks: (previews.append((train.phase, len(blocks))), original_paint(blocks))[-1]
    state.go_to(1, 20)  # what the user looks at during training
    assert train.start(warm=False)
    qtbot.waitUntil(lambda: state.prediction_layer is not None, timeout=60_000)
    _wait_done(qtbot, train)
    assert train.last_error is None
    during = [p for p in previews if p[0] == "training"]
    assert len(during) >= 2, previews  # the prediction layer updated while training ran
    assert state.model is not None and train.plot.iterations

    # score on the voxels no round ever annotates
    corrections = {1: [12, 30], 2: [16]}
    final_mask = np.zeros(truth.shape, bool)
    final_mask[index] = True
    for a, indices in corrections.items():
        for i in indices:
            key = [slice(None)] * 3
            key[a] = i
            final_mask[tuple(key)] = True
    first = mean_foreground_dice(state.prediction_layer.data, truth, mask=~final_mask)

    # correct the prediction on three slices, as a user paints: through the layer's edit API
    for a, indices in corrections.items():
        for i in indices:
            state.go_to(a, i)
            key = [slice(None)] * 3
            key[a] = i
            wrong = np.nonzero(state.prediction_layer.data[tuple(key)] != truth[tuple(key)])
            coords = [None, None, None]
            coords[a] = np.full(wrong[0].shape, i)
            others = [d for d in range(3) if d != a]
            coords[others[0]], coords[others[1]] = wrong
            state.prediction_layer.data_setitem(tuple(coords), truth[tuple(coords)])
    assert state.corrected_slices() == corrections
    train.seconds.value = 12
    accepted = train.use_corrections()
    assert sorted(accepted) == [(1, 12), (1, 30), (2, 16)]
    assert state.register().as_dict() == {0: [index], 1: [12, 30], 2: [16]}
    np.testing.assert_array_equal(state.labels_layer.data[:, 30], truth[:, 30])
    assert train.running
    _wait_done(qtbot, train)
    assert train.last_error is None
    second = mean_foreground_dice(state.prediction_layer.data, truth, mask=~final_mask)
    print(f"Dice outside the annotated slices: first round {first:.3f}, after the correction round {second:.3f}")
    assert second > first + 0.02, (first, second)
    # the uncertainty is kept for the suggestions even though its layer was not asked for
    assert state.uncertainty is not None and state.uncertainty_layer is None
    axis, index = annotate.uncertain_slice()
    expected = uncertain_slices(state.uncertainty, axis, state.register().indices(axis), count=1)
    assert state.current_slice() == (axis, index) and [index] == expected


def test_gui_stays_responsive_while_training(make_napari_viewer, qtbot):
    from qtpy.QtCore import QTimer

    # shown, so that the canvas really draws every refresh of the layers
    viewer, annotate, train, truth = _viewer_with_cells(make_napari_viewer, shape=(32, 64, 64), show=True)
    annotate.create_labels_layer()
    for axis in range(3):
        _annotate_slice(viewer, annotate, truth, axis, truth.shape[axis] // 2)
    state = annotate.state
    views = annotate.show_views()  # the two orthogonal views draw too
    state.go_to(0, 10)
    train.preview_every = 1.0
    train.uncertainty_box.value = True
    train.seconds.value = 10
    ticks = []
    timer = QTimer()
    timer.setInterval(10)
    timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
    timer.start()
    started = time.perf_counter()
    assert train.start(warm=False)
    _wait_done(qtbot, train)
    job_seconds = time.perf_counter() - started
    timer.stop()
    assert train.last_error is None
    delays = np.diff(ticks) - 0.010
    p99 = float(np.percentile(delays, 99))
    p50, longest = np.median(delays), delays.max()
    print(f"timer ticks {len(ticks)}, delay p50 {p50 * 1e3:.1f} ms, p99 {p99 * 1e3:.1f} ms, max {longest * 1e3:.1f} ms;"
          f" {int((delays > 0.05).sum())} ticks over 50 ms; job {job_seconds:.1f} s,"
          f" window {viewer.window._qt_window.width()}x{viewer.window._qt_window.height()}")
    assert len(ticks) > 200
    assert p99 < 0.100
    assert state.uncertainty_layer is not None
    # the side views showed the prediction and the uncertainty as they streamed in
    for side in views.sides:
        assert side.mirror.mirror_of(state.prediction_layer).data is state.prediction_layer.data
        assert side.mirror.mirror_of(state.uncertainty_layer) is not None


def test_training_and_prediction_show_in_napari_activity_dock(make_napari_viewer, qtbot):
    from napari._qt.widgets.qt_progress_bar import QtLabeledProgressBar
    from napari.utils import progress
    from qtpy.QtCore import QTimer

    from napari_sparse3d._napari.progress import INDICATOR_FPS, indicator_movie

    viewer, annotate, train, truth = _viewer_with_cells(make_napari_viewer)
    annotate.create_labels_layer()
    _annotate_slice(viewer, annotate, truth, 0, 12)
    dialog = viewer.window._qt_window._activity_dialog
    movie = indicator_movie(train)
    assert movie is not None and movie.speed() == 100
    seen, speeds = [], []

    def look():
        for bar in dialog.findChildren(QtLabeledProgressBar):
            seen.append((bar.description_label.text(), bar.qt_progress_bar.value(), bar.qt_progress_bar.maximum()))
        if train.running:
            speeds.append(movie.speed())

    timer = QTimer()
    timer.setInterval(50)
    timer.timeout.connect(look)
    timer.start()
    # the bars napari's activity dock was given: a prediction from the trainer's map can begin and end
    # between two ticks of the timer
    opened = []
    registry = progress._all_instances.events.changed

    def record(event):
        opened.extend(p.desc for p in event.added)

    registry.connect(record)
    assert train.start(warm=False, max_iterations=60)
    _wait_done(qtbot, train)
    timer.stop()
    registry.disconnect(record)
    assert train.last_error is None
    training = [(value, top) for text, value, top in seen if text.startswith("napari-sparse3d: training")]
    assert training and max(value for value, _ in training) > 0, seen[-5:]
    values = [value for value, _ in training]
    assert values == sorted(values)  # it only moves forward
    assert opened[0] == "napari-sparse3d: starting" and "napari-sparse3d: predicting" in opened, opened
    # the job's bars leave the activity dock when it ends
    qtbot.waitUntil(lambda: not [b for b in dialog.findChildren(QtLabeledProgressBar) if b.isVisible()], timeout=5_000)
    # napari's "in progress" GIF played slowly while the job ran (see progress.py), and at its own speed after
    assert speeds and max(speeds) <= 100 * 0.030 * INDICATOR_FPS + 1, set(speeds)
    assert movie.speed() == 100


def test_stop_is_quick_and_keeps_the_model(make_napari_viewer, qtbot):
    import torch

    viewer, annotate, train, truth = _viewer_with_cells(make_napari_viewer)
    annotate.create_labels_layer()
    _annotate_slice(viewer, annotate, truth, 0, 12)
    train.seconds.value = 600
    phases = []
    original = train._on_yield
    train._on_yield = lambda item: (phases.append((time.perf_counter(), train.phase)), original(item))[-1]
    assert train.start(warm=False)
    qtbot.waitUntil(lambda: len(train.plot.iterations) >= 5, timeout=60_000)
    stopped_at = time.perf_counter()
    train.stop()
    qtbot.waitUntil(lambda: train.phase in ("predicting", "idle"), timeout=10_000)
    took = time.perf_counter() - stopped_at
    print(f"stop -> training ended in {took:.2f} s")
    assert took < 2.0
    _wait_done(qtbot, train)
    model = annotate.state.model
    assert model is not None and train.last_error is None
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert int(model.sparse3d.history[-1]["iteration"]) == train.plot.iterations[-1]
    assert annotate.state.prediction_layer.data.any()


def test_failure_is_notified_and_loses_nothing(make_napari_viewer, qtbot, monkeypatch):
    from napari_sparse3d._napari import annotation as _annotation_widget
    from napari_sparse3d._napari import training as _training_widget
    from napari_sparse3d.engine.training import Trainer

    viewer, annotate, train, truth = _viewer_with_cells(make_napari_viewer)
    annotate.create_labels_layer()
    _annotate_slice(viewer, annotate, truth, 0, 12)
    _annotate_slice(viewer, annotate, truth, 1, 24)
    state = annotate.state
    labels_before = state.labels_layer.data.copy()
    register_before = state.register().as_dict()
    errors = []
    monkeypatch.setattr(_training_widget, "show_error", errors.append)
    monkeypatch.setattr(_annotation_widget, "show_error", errors.append)
    real_step = Trainer._step
    calls = []

    def failing_step(self, lr):
        calls.append(1)
        if len(calls) == 6:
            raise RuntimeError("simulated failure in step 6")
        return real_step(self, lr)

    monkeypatch.setattr(Trainer, "_step", failing_step)
    train.seconds.value = 60
    assert train.start(warm=False)
    _wait_done(qtbot, train)
    assert isinstance(train.last_error, RuntimeError)
    assert errors and "simulated failure in step 6" in errors[0] and "training failed" in errors[0]
    np.testing.assert_array_equal(state.labels_layer.data, labels_before)
    assert state.register().as_dict() == register_before
    assert state.model is not None and len(state.model.sparse3d.history) == 5
    assert train.start_button.enabled and not train.stop_button.enabled
    # the last good model still predicts another layer
    other = viewer.add_image(make_cells((24, 48, 48), seed=9)[0], name="other")
    monkeypatch.setattr(Trainer, "_step", real_step)
    target = train.apply_model(other)
    _wait_done(qtbot, train)
    assert target.name == "other prediction" and target.data.any()


def test_save_load_model_and_form(make_napari_viewer, qtbot, tmp_path):
    viewer, annotate, train, truth = _viewer_with_cells(make_napari_viewer)
    config = train.config()
    assert config.train.learning_rate == pytest.approx(3e-3)
    train.preset.value = "fast"
    assert train.config().model.levels == 3
    train.advanced["train.batch_size"].value = 2
    assert train.config().train.batch_size == 2
    annotate.create_labels_layer()
    _annotate_slice(viewer, annotate, truth, 0, 12)
    assert train.start(warm=False, max_iterations=3)
    _wait_done(qtbot, train)
    path = train.save_model(str(tmp_path / "m.pt"))
    assert path and Path(path).is_file()
    loaded = train.load_model(path)
    assert loaded.sparse3d.class_values == annotate.state.model.sparse3d.class_values
    assert train.load_model(str(tmp_path / "missing.pt")) is None


def test_project_round_trip_headless_napari_headless(make_napari_viewer, qtbot, tmp_path, small_volume, tiny_config):
    import torch

    import napari_sparse3d
    from napari_sparse3d.io.checkpoint import load_checkpoint
    from napari_sparse3d.io.project import Project

    image, labels, truth, slices = small_volume
    path = tmp_path / "cells.zarr"
    Project.create(path, image, labels=labels, annotated_slices=slices, config=tiny_config, spacing=(2.0, 1.0, 1.0))
    napari_sparse3d.run(str(path), max_iterations=3, device="cpu")
    before = Project.open(path)
    before_labels, before_slices = before.annotations()
    before_model = load_checkpoint(before.checkpoint("latest"))

    # napari: the project opens as layers and the docks take it up
    viewer = make_napari_viewer()
    viewer.open(str(path), plugin=PLUGIN)
    assert [layer.name for layer in viewer.layers] == ["cells", "cells annotations", "prediction"]
    assert tuple(viewer.layers["cells"].scale) == (2.0, 1.0, 1.0)
    _, annotate = viewer.window.add_plugin_dock_widget(PLUGIN, "Annotate slices")
    _, train = viewer.window.add_plugin_dock_widget(PLUGIN, "Train and predict")
    state = annotate.state
    assert state.project is not None and state.project.path.resolve() == path.resolve()
    assert state.labels_layer.name == "cells annotations" and state.prediction_layer is viewer.layers["prediction"]
    assert state.register().as_dict() == slices
    # saving unchanged work changes nothing: annotations, register, model, history bit for bit
    assert annotate.save_project()
    same = Project.open(path)
    np.testing.assert_array_equal(same.annotations()[0], before_labels)
    assert same.annotations()[0].dtype == before_labels.dtype
    assert same.annotations()[1] == before_slices and same.history == before.history
    assert same.checkpoint("latest") == before.checkpoint("latest")

    # edits autosave within the debounce delay; Continue resumes the project's model
    annotate.autosave_delay_ms = 200
    state.go_to(0, 3)
    state.labels_layer.data_setitem((np.array([3]), np.array([5]), np.array([5])), 1)
    annotate.toggle_mark()
    qtbot.waitUntil(lambda: Project.open(path).annotated_slices.get(0) == [3, 8, 14], timeout=5000)
    train.checkpoint_every = 1e-6
    assert train.start(warm=True, max_iterations=2)
    _wait_done(qtbot, train)
    assert train.last_error is None

    # headless again: everything napari saved, and the history continues
    after = Project.open(path)
    saved, saved_slices = after.annotations()
    np.testing.assert_array_equal(saved, state.labels_layer.data)
    assert saved_slices == {0: [3, 8, 14], 1: slices[1], 2: slices[2]}
    assert [h["iteration"] for h in after.history] == [1, 2, 3, 4, 5]
    assert after.history[:3] == before.history
    model = load_checkpoint(after.checkpoint("latest"))
    for (name, a), b in zip(model.state_dict().items(), state.model.state_dict().values()):
        assert torch.equal(a, b.cpu()), name
    assert not all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), before_model.state_dict().values()))
    np.testing.assert_array_equal(after.prediction(), state.prediction_layer.data)
    # one writer at a time: the console cannot train into the project napari holds ...
    with pytest.raises(OSError, match="already open for writing"):
        napari_sparse3d.run(str(path), max_iterations=1, device="cpu")
    # ... until napari closes it
    viewer.close()
    qtbot.waitUntil(lambda: state.project is None, timeout=5000)
    res = napari_sparse3d.run(str(path), max_iterations=1, device="cpu")
    assert [r.iteration for r in res.history] == [6]


def test_cancelled_prediction_restores_the_previous_one(make_napari_viewer):
    from napari_sparse3d.engine.prediction import Block
    from napari_sparse3d.loop.jobs import Phase

    viewer, annotate, train, truth = _viewer_with_cells(make_napari_viewer)
    annotate.create_labels_layer()
    layer = train._prediction_layer()
    layer.data[...] = truth
    previous = layer.data.copy()
    train._on_yield(Phase("predicting"))
    train._on_yield(Block((slice(0, 4),) * 3, np.zeros((2, 4, 4, 4), np.float32), np.full((4, 4, 4), 2, np.uint8)))
    assert (layer.data[:4, :4, :4] == 2).all()
    train._on_yield(Phase("cancelled"))
    np.testing.assert_array_equal(layer.data, previous)


def test_bad_layers_get_notifications_not_tracebacks(make_napari_viewer, monkeypatch):
    from napari_sparse3d._napari import annotation as _annotation_widget
    from napari_sparse3d._napari import training as _training_widget

    errors = []
    monkeypatch.setattr(_training_widget, "show_error", errors.append)
    monkeypatch.setattr(_annotation_widget, "show_error", errors.append)
    viewer, annotate, train, truth = _viewer_with_cells(make_napari_viewer)
    viewer.add_image(np.zeros((20, 30), np.float32), name="flat")  # 2D: never offered
    assert all(layer is None or layer.name != "flat" for layer in annotate.image.choices)
    # training without an annotation layer
    assert train.start(warm=False) is False
    assert "choose an image layer and its annotation layer" in errors[-1]
    # a multichannel (4D) layer
    four_d = viewer.add_image(np.zeros((2, 24, 48, 48), np.float32), name="two channels")
    annotate.image.value = four_d
    annotate.create_labels_layer()
    assert train.start(warm=False) is False
    assert "expected a 3D grey image" in errors[-1]
    # annotations that cannot be trained on: nothing annotated, then a single class
    annotate.image.value = viewer.layers["cells"]
    layer = annotate.create_labels_layer()
    assert train.start(warm=False) is False
    assert "labels hold no annotations" in errors[-1]
    layer.data[3, :5, :5] = 1
    assert train.start(warm=False) is False
    assert "only one class" in errors[-1]
    assert not train.running
    # a checkpoint that is not one
    bad = Path(viewer.layers["cells"].name + ".pt")
    assert train.load_model(str(Path("/nonexistent") / bad)) is None
    assert "Could not load a model" in errors[-1]
