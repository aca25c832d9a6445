"""Make the README's screenshots from the real plugin, on a virtual screen.

    xvfb-run -a -s "-screen 0 1920x1080x24" .venv/bin/python docs/screenshots.py

Drives the loop a user goes through — annotate two slices with the orthogonal
views open, train with the prediction streaming in (the validation Dice beside
the loss), correct a slice, continue, look at the result in 3D, split it into
instances — and saves the whole napari window at each stage into ``docs/images/``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

OUT = Path(__file__).parent / "images"


def wait(app, condition, timeout=600.0):
    start = time.perf_counter()
    while not condition():
        app.processEvents()
        time.sleep(0.02)
        if time.perf_counter() - start > timeout:
            raise TimeoutError("the plugin did not get there in time")


def pause(app, seconds):
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        app.processEvents()
        time.sleep(0.02)


def main() -> int:
    import os
    import tempfile

    # napari saves changed settings: keep ours away from the user's own settings file
    os.environ["NAPARI_CONFIG"] = str(Path(tempfile.mkdtemp()) / "settings.yaml")
    import napari
    from napari.settings import get_settings
    from qtpy.QtWidgets import QApplication

    from napari_sparse3d.sample_data import make_cells

    # no notification toasts over the screenshots
    get_settings().application.gui_notification_level = "none"
    OUT.mkdir(parents=True, exist_ok=True)
    image, truth = make_cells((48, 96, 96), classes=3, seed=1)
    viewer = napari.Viewer(title="napari-sparse3d")
    viewer.window.resize(1850, 1040)
    viewer.add_image(image, name="cells")
    _, annotate = viewer.window.add_plugin_dock_widget("napari-sparse3d", "Annotate slices")
    _, train = viewer.window.add_plugin_dock_widget("napari-sparse3d", "Train and predict")
    app = QApplication.instance()
    state = annotate.state
    labels = annotate.create_labels_layer()

    # 1. annotate: the suggested slice of two axes, painted and marked
    marked = []
    for axis in (0, 1):
        state.show_axis(axis)
        axis, index = annotate.next_slice()
        marked.append(index)
        key = [slice(None)] * 3
        key[axis] = index
        labels.data[tuple(key)] = truth[tuple(key)]
        labels.refresh()
        annotate.toggle_mark()
    # the orthogonal views, docked left of the canvas
    from qtpy.QtCore import Qt

    views = annotate.show_views()
    window = viewer.window._qt_window
    viewer.window._qt_viewer.dockLayerControls.setVisible(False)  # room for the views (the tools are napari's own)
    window.addDockWidget(Qt.DockWidgetArea.LeftDockWidgetArea, views.parent())
    window.resizeDocks([views.parent()], [520], Qt.Orientation.Horizontal)
    window.resizeDocks([views.parent()], [820], Qt.Orientation.Vertical)
    # the docks scroll when they are short of room: the annotation dock as tall as its content, training the rest
    from qtpy.QtWidgets import QScrollArea

    compact = annotate.findChild(QScrollArea).widget().sizeHint().height() + 10
    window.resizeDocks([annotate.parent(), train.parent()], [compact, 1040 - compact], Qt.Orientation.Vertical)
    state.go_to(0, marked[0])
    views.move_to((marked[0], marked[1], 50))
    viewer.reset_view()
    pause(app, 0.5)
    views.reset_views()
    pause(app, 1.0)
    viewer.screenshot(str(OUT / "1-annotate.png"), canvas_only=False)

    # 2. train: the viewed slice's prediction streams in
    train.preview_every = 2.0
    train.seconds.value = 60
    train.uncertainty_box.value = False
    if not train.start(warm=False):
        raise RuntimeError("training did not start")
    wait(app, lambda: (state.prediction_layer is not None and len(train.plot.iterations) > 30) or train.last_error)
    if train.last_error is not None:
        raise RuntimeError(f"training failed: {train.last_error}")
    pause(app, 3.0)
    viewer.screenshot(str(OUT / "2-training.png"), canvas_only=False)
    wait(app, lambda: not train.running)
    pause(app, 1.0)
    before = float(np.mean(state.prediction_layer.data == truth))

    # 3. correct: fix the prediction on a slice of the third axis, then continue
    state.go_to(2, 60)
    key = (slice(None), slice(None), 60)
    wrong = state.prediction_layer.data[key] != truth[key]
    zz, yy = np.nonzero(wrong)
    state.prediction_layer.data_setitem((zz, yy, np.full(zz.shape, 60)), truth[zz, yy, 60])
    viewer.layers.selection.active = state.prediction_layer
    train.scroll_to(train.corrections)
    pause(app, 1.0)
    viewer.screenshot(str(OUT / "3-correct.png"), canvas_only=False)
    train.seconds.value = 40
    train.use_corrections()
    wait(app, lambda: not train.running)
    state.go_to(0, 30)
    pause(app, 1.0)
    viewer.screenshot(str(OUT / "4-retrained.png"), canvas_only=False)
    train.show_3d()
    pause(app, 2.0)
    viewer.screenshot(str(OUT / "6-3d.png"), canvas_only=False)
    views.toggle_3d()
    after = float(np.mean(state.prediction_layer.data == truth))
    print(f"voxel accuracy: {before:.3f} after the first round, {after:.3f} after the correction round")
    dice = list(train.plot.val_dices)
    print(f"validation Dice shown beside the loss: {dice[-1] if dice else None}")

    # 5. instances: split the cells along the predicted boundary class
    train.instances.min_size.value = 20
    layer = train.instances.make_instances()
    for other in viewer.layers:
        other.visible = other is layer or other.name == "cells"
    train.scroll_to(train.instances)
    pause(app, 1.0)
    viewer.screenshot(str(OUT / "5-instances.png"), canvas_only=False)
    print(f"instances: {int(layer.data.max())}")
    viewer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
