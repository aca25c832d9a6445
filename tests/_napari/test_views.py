"""The orthogonal views dock: linked points, painting in a side view, slice lines, 3D, nothing left after closing."""

import gc
from types import SimpleNamespace

import numpy as np
from qtpy.QtWidgets import QScrollArea

from napari_sparse3d._napari.mirror import LayerMirror
from napari_sparse3d._napari.state import METADATA_KEY
from napari_sparse3d._napari.views import MARKED_COLOR, PLANE_COLOR

PLUGIN = "napari-sparse3d"


def _viewer(make_napari_viewer, shape=(20, 30, 40)):
    rng = np.random.default_rng(0)
    viewer = make_napari_viewer()
    viewer.add_image(rng.random(shape).astype(np.float32), name="image", scale=(2.0, 1.0, 1.0))
    _, annotate = viewer.window.add_plugin_dock_widget(PLUGIN, "Annotate slices")
    labels = annotate.create_labels_layer()
    views = annotate.show_views()
    return viewer, annotate, views, labels


def _point(model):
    return np.asarray(model.dims.point)[-3:]


def _click(views, model, world, moves=0):
    """A mouse press at ``world``, ``moves`` drag events, a release: what napari sends a drag callback."""
    event = SimpleNamespace(type="mouse_press", position=tuple(world), modifiers=())
    callback = views._click(model, event)
    try:
        next(callback)
        for step in range(moves):
            event.type, event.position = "mouse_move", tuple(np.asarray(world) + step + 1)
            next(callback)
        event.type = "mouse_release"
        next(callback)
    except StopIteration:
        pass


def test_views_slice_the_other_axes_and_share_the_point(make_napari_viewer):
    viewer, annotate, views, labels = _viewer(make_napari_viewer)
    state = annotate.state
    y_view, x_view = views.sides
    assert (y_view.axis, x_view.axis) == (1, 2)
    assert y_view.model.dims.order[-3] == 1 and x_view.model.dims.order[-3] == 2
    # the mirrors share the main layers' arrays: nothing is copied
    mirror = y_view.mirror.mirror_of(labels)
    assert mirror is not None and mirror.data is labels.data
    assert np.allclose(mirror.scale, labels.scale)

    # moving the y-view's slider moves the main view's point and the x-view's
    y_view.model.dims.set_point(1, 7.0)
    assert _point(viewer)[1] == 7.0 and _point(x_view.model)[1] == 7.0
    # so does the main slider (its z) for both side views
    viewer.dims.set_point(0, 2.0 * 5)
    assert _point(y_view.model)[0] == 10.0 and _point(x_view.model)[0] == 10.0

    # a click without a drag in the x-view moves every view to the clicked point (world coordinates)
    _click(views, x_view.model, (12.0, 21.0, 33.0))
    for model in (viewer, y_view.model, x_view.model):
        assert np.allclose(_point(model), (12.0, 21.0, 33.0)), model
    assert list(state.data_point()) == [6, 21, 33]
    # a drag pans: it does not move the point
    _click(views, y_view.model, (4.0, 3.0, 5.0), moves=3)
    assert np.allclose(_point(viewer), (12.0, 21.0, 33.0))
    # a click with a paint tool on paints, it does not move
    labels.mode = "paint"
    _click(views, viewer, (4.0, 3.0, 5.0))
    assert np.allclose(_point(viewer), (12.0, 21.0, 33.0))

    # slicing the main view along y turns the side views to z and x
    state.show_axis(1)
    assert (y_view.axis, x_view.axis) == (0, 2)
    assert y_view.model.dims.order[-3] == 0


def test_a_stroke_in_the_y_view_lands_on_that_plane_with_undo(make_napari_viewer):
    viewer, annotate, views, labels = _viewer(make_napari_viewer)
    state = annotate.state
    y_view = views.sides[0]
    viewer.layers.selection.active = labels
    labels.mode, labels.selected_label, labels.brush_size = "paint", 2, 5
    mirror = y_view.mirror.mirror_of(labels)
    # the tools follow the main layer, and the side canvas paints into the mirror
    assert (mirror.mode, mirror.selected_label, mirror.brush_size) == ("paint", 2, 5)
    assert y_view.model.layers.selection.active is mirror
    views.move_to((2.0 * 10, 12.0, 20.0))
    edits = []
    labels.events.paint.connect(lambda event: edits.append(getattr(event, "axis", None)))

    mirror.paint((10, 12, 20), 2)  # what the brush does on a click in the y-view's canvas

    painted = np.argwhere(labels.data == 2)
    assert len(painted) > 1
    assert set(painted[:, 1]) == {12}, "the stroke must stay on the y plane of the view"
    assert len(set(painted[:, 0])) > 1 and len(set(painted[:, 2])) > 1  # a disc in (z, x)
    assert edits == [1]  # the annotation layer announces the stroke, with the view's axis
    assert len(labels._undo_history) == 1 and not mirror._undo_history
    # the x-view's mirror shares the painted array
    assert views.sides[1].mirror.mirror_of(labels).data is labels.data

    mirror.undo()  # Ctrl-Z in the y-view undoes on the annotation layer
    assert not labels.data.any()
    labels.redo()
    assert len(np.argwhere(labels.data == 2)) == len(painted)
    assert state.labels_layer is labels


def test_corrections_painted_in_a_side_view_are_recorded_on_its_axis(make_napari_viewer):
    viewer, annotate, views, labels = _viewer(make_napari_viewer)
    state = annotate.state
    prediction = viewer.add_labels(
        np.ones(labels.data.shape, np.uint8), name="prediction", scale=labels.scale,
        metadata={METADATA_KEY: {"role": "prediction"}},
    )
    state.adopt_prediction(prediction)
    x_view = views.sides[1]
    viewer.layers.selection.active = prediction
    prediction.mode, prediction.selected_label, prediction.brush_size = "paint", 2, 3
    views.move_to((2.0 * 4, 9.0, 31.0))
    x_view.mirror.mirror_of(prediction).paint((4, 9, 31), 2)
    assert (prediction.data == 2).any()
    assert state.corrected_slices() == {2: [31]}


def test_marked_slices_are_lines_in_the_other_views(make_napari_viewer):
    viewer, annotate, views, labels = _viewer(make_napari_viewer)
    register = annotate.state.register()
    y_view, x_view = views.sides
    views.move_to((2.0 * 3, 11.0, 17.0))
    register.mark(0, 6)
    register.mark(2, 25)

    def lines(view, color):
        colors = view.lines.edge_color
        from napari.utils.colormaps.standardize_color import transform_color

        target = np.asarray(transform_color(color)[0])
        return [d for d, c in zip(view.lines.data, colors) if np.allclose(c, target, atol=1e-3)]

    # the y-view shows z = 6 as a line across x, and x = 25 as a line across z, on its plane y = 11
    marked = lines(y_view, MARKED_COLOR)
    assert any(np.all(d[:, 0] == 6) and np.all(d[:, 1] == 11) for d in marked)
    assert any(np.all(d[:, 2] == 25) and np.all(d[:, 1] == 11) for d in marked)
    # the x-view shows z = 6 only (its axes are z and y)
    marked = lines(x_view, MARKED_COLOR)
    assert len(marked) == 1 and np.all(marked[0][:, 0] == 6) and np.all(marked[0][:, 2] == 17)
    # the planes of the other views as thin lines: the y-view crosses at z = 3, x = 17
    planes = lines(y_view, PLANE_COLOR)
    assert any(np.all(d[:, 0] == 3) for d in planes) and any(np.all(d[:, 2] == 17) for d in planes)
    # a slice marked from a side view is marked in the register, and shown there
    assert y_view.toggle_mark() is True and register.is_marked(1, 11)
    assert "fully annotated" in y_view.info.value
    assert any(np.all(d[:, 1] == 11) for d in lines(x_view, MARKED_COLOR))


def test_3d_view_shows_the_prediction(make_napari_viewer, monkeypatch):
    import napari_sparse3d._napari.views as views_module

    viewer, annotate, views, labels = _viewer(make_napari_viewer)
    told = []
    monkeypatch.setattr(views_module, "show_info", told.append)
    assert views.toggle_3d() is False and "train first" in told[0]
    prediction = viewer.add_labels(
        np.zeros(labels.data.shape, np.uint8), name="prediction", scale=labels.scale,
        metadata={METADATA_KEY: {"role": "prediction"}},
    )
    annotate.state.adopt_prediction(prediction)
    assert views.toggle_3d() is True
    model = views.three_d.model
    assert model.dims.ndisplay == 3
    assert [layer.data is prediction.data for layer in model.layers] == [True]
    assert views.toggle_3d() is False and views.three_d is None


def test_closing_the_dock_leaves_no_canvases(make_napari_viewer, qtbot):
    from napari.qt import QtViewer

    rng = np.random.default_rng(0)
    viewer = make_napari_viewer()
    viewer.add_image(rng.random((10, 20, 20)).astype(np.float32), name="image")
    _, annotate = viewer.window.add_plugin_dock_widget(PLUGIN, "Annotate slices")
    labels = annotate.create_labels_layer()
    before = len(QtViewer._instances)
    paint_callbacks = len(labels.events.paint.callbacks)
    drag_callbacks = len(viewer.mouse_drag_callbacks)
    views = annotate.show_views()
    prediction = viewer.add_labels(np.zeros((10, 20, 20), np.uint8), name="prediction",
                                   metadata={METADATA_KEY: {"role": "prediction"}})
    annotate.state.adopt_prediction(prediction)
    views.toggle_3d()
    assert len(QtViewer._instances) == before + 3
    assert len(viewer.mouse_drag_callbacks) == drag_callbacks + 1
    mirrors = [canvas.mirror for canvas in views.canvases()]
    assert all(isinstance(m, LayerMirror) and m.mirrors for m in mirrors)

    viewer.window.remove_dock_widget(views)  # what the dock's close button does
    del views
    from qtpy.QtCore import QCoreApplication, QEvent

    for _ in range(3):
        QCoreApplication.sendPostedEvents(None, QEvent.Type.DeferredDelete)
        qtbot.wait(20)
        gc.collect()
    assert len(QtViewer._instances) == before
    assert len(viewer.mouse_drag_callbacks) == drag_callbacks
    assert all(not m.mirrors for m in mirrors)
    assert len(labels.events.paint.callbacks) == paint_callbacks
    # the viewer goes on working without the views
    viewer.dims.set_point(0, 3)
    labels.data[3, 4, 5] = 1
    labels.refresh()


def test_the_plugin_docks_on_one_side_fit_a_laptop_screen(make_napari_viewer, qtbot):
    """Annotation, training and views docks stacked on the right: the window still fits a 1080-px screen."""
    viewer, annotate, views, _ = _viewer(make_napari_viewer)
    dock, train = viewer.window.add_plugin_dock_widget(PLUGIN, "Train and predict")
    window = viewer.window._qt_window
    window.show()
    qtbot.waitExposed(window)
    for widget in (annotate, train, views):
        assert window.dockWidgetArea(widget.parentWidget()) == window.dockWidgetArea(dock)
    assert window.minimumSizeHint().height() < 1000, window.minimumSizeHint()
    # a dock given less room than its widgets need scrolls instead of hiding them
    assert train.findChild(QScrollArea).widget().sizeHint().height() > 700
    assert annotate.findChild(QScrollArea).minimumSizeHint().height() <= 220
