"""The orthogonal views dock: the planes through the current point along the other two axes, and a 3D look.

Two more napari canvases (a :class:`~napari.components.ViewerModel` each, drawn by
its own :class:`~napari.qt.QtViewer`, napari's pattern for several viewers) show the
image, annotation, prediction and uncertainty layers (:mod:`.mirror`) sliced along
the two axes that the main canvas does not slice.  All canvases share one point:
moving a slider, or clicking (without dragging, while no paint tool is on) in any
canvas, moves the others there.  Each side view draws the fully annotated slices of
the axes it displays as yellow lines and the planes of the other views as thin cyan
lines, and can mark its own slice.  Painting in a side view paints its plane of the
annotation layer (undo included).  *Show 3D result* adds a 3D canvas of the
prediction, which follows it while training goes on.

Removing the dock (or closing napari) closes its canvases and disconnects them.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from magicgui.widgets import Label, PushButton
from napari.components import ViewerModel
from napari.layers import Layer, Shapes
from napari.utils.notifications import show_info
from qtpy.QtCore import QEvent, QTimer
from qtpy.QtWidgets import QHBoxLayout, QVBoxLayout, QWidget

from napari_sparse3d._napari.dock import DockWidget
from napari_sparse3d._napari.mirror import LayerMirror, mirrorable
from napari_sparse3d._napari.state import METADATA_KEY
from napari_sparse3d.loop.slices import AXIS_NAMES

__all__ = ["OrthoViewsWidget", "sliced_axis"]

MARKED_COLOR = "#ffd400"
PLANE_COLOR = "#00c8ff"


def sliced_axis(dims: Any) -> int | None:
    """The data axis (0, 1, 2 of the last three) that a 2D view slices, or None in 3D."""
    if dims.ndisplay != 2:
        return None
    ndim = dims.ndim
    hidden = [a - (ndim - 3) for a in dims.order[:-2] if a >= ndim - 3]
    return hidden[-1] if hidden else None


def _order_slicing(ndim: int, axis: int) -> tuple[int, ...]:
    """A dims order that slices data axis ``axis`` and displays the other two in their order."""
    world = ndim - 3 + axis
    others = [a for a in range(ndim) if a != world]
    return tuple(others[:-2] + [world] + others[-2:])


class _Canvas:
    """One extra canvas: a viewer model, its QtViewer and the mirrors of the main viewer's layers."""

    def __init__(self, main: Any, accept: Any, *, axis: Any, refresh_ms: int, title: str, min_height: int) -> None:
        from napari.qt import QtViewer

        self.model = ViewerModel(title=title)
        self.qt = QtViewer(self.model, show_welcome_screen=False)
        self.qt.setMinimumHeight(min_height)  # a canvas squeezed by other docks shows nothing
        self.mirror = LayerMirror(main, self.model, accept=accept, axis=axis, refresh_ms=refresh_ms)

    def close(self) -> None:
        self.mirror.close()
        self.model.layers.clear()
        qt, self.qt = self.qt, None
        qt.close()  # napari's QtViewer deletes its vispy canvas on close
        qt.deleteLater()


class _SideView(_Canvas):
    """A canvas slicing one axis, with its slice lines, its position and a button to mark its slice."""

    def __init__(self, owner: OrthoViewsWidget, slot: int) -> None:
        self.owner = owner
        self.axis: int = slot + 1
        super().__init__(owner.viewer, mirrorable, axis=lambda: self.axis, refresh_ms=50, title=f"side view {slot + 1}",
                         min_height=150)
        self.lines = Shapes(ndim=3, name="slices", opacity=0.8)
        self.model.layers.append(self.lines)
        self.mirror.update()  # the mirrors' active layer again (adding the lines selected them)
        self.info = Label(value="")
        self.mark_button = PushButton(text="Mark")
        self.mark_button.clicked.connect(self.toggle_mark)
        self.widget = QWidget()
        row = QHBoxLayout()
        row.setContentsMargins(0, 0, 0, 0)
        row.addWidget(self.info.native, 1)
        row.addWidget(self.mark_button.native)
        column = QVBoxLayout(self.widget)
        column.setContentsMargins(0, 0, 0, 0)
        column.addWidget(self.qt, 1)
        column.addLayout(row)
        self.model.mouse_drag_callbacks.append(owner._click)
        self.model.dims.events.point.connect(lambda *_: owner._point_moved(self.model))
        self.model.dims.events.ndim.connect(self._new_ndim)  # layers came (or went): slice and place again

    def _new_ndim(self, *_: Any) -> None:
        self.show_axis(self.axis)
        self.owner._point_moved(self.owner.viewer)

    def show_axis(self, axis: int) -> None:
        self.axis = axis
        ndim = self.model.dims.ndim
        if ndim >= 3 and tuple(self.model.dims.order) != _order_slicing(ndim, axis):
            self.model.dims.order = _order_slicing(ndim, axis)
            self.model.reset_view()

    def index(self) -> int | None:
        point = self.owner.data_point()
        return None if point is None else int(point[self.axis])

    def toggle_mark(self) -> bool | None:
        register, index = self.owner.state.register(), self.index()
        if register is None or index is None:
            return None
        return register.toggle(self.axis, index)

    def refresh_overlay(self) -> None:
        """The slice lines and the line under the canvas (its position, marked or not)."""
        state = self.owner.state
        image, register, point = state.image_layer, state.register(), self.owner.data_point()
        if image is None or register is None or point is None:
            self.info.value, self.lines.data = "", []
            return
        shape = state.shape
        rows, cols = [a for a in range(3) if a != self.axis]
        lines, colors = [], []
        for axis, other in ((rows, cols), (cols, rows)):
            marked = register.indices(axis)
            # the plane first: a marked slice on it stays visible (yellow over blue)
            for index, color in [(int(point[axis]), PLANE_COLOR)] + [(i, MARKED_COLOR) for i in marked]:
                ends = np.zeros((2, 3))
                ends[:, self.axis] = point[self.axis]
                ends[:, axis] = index
                ends[:, other] = (0, shape[other] - 1)  # (within the image: lines must not widen the sliders' range)
                lines.append(ends)
                colors.append(color)
        self.lines.scale, self.lines.translate = image.scale[-3:], image.translate[-3:]
        self.lines.data = []
        self.lines.add_lines(lines, edge_color=colors, edge_width=max(shape) / 400)
        index = int(point[self.axis])
        marked = register.is_marked(self.axis, index)
        self.info.value = f"{AXIS_NAMES[self.axis]} = {index}: " + ("fully annotated" if marked else "not marked")
        self.mark_button.text = "Unmark" if marked else "Mark"


class OrthoViewsWidget(DockWidget):
    """Two linked orthogonal views of the main viewer's layers and an optional 3D view of the prediction."""

    def __init__(self, napari_viewer: Any) -> None:
        super().__init__(napari_viewer)
        self._syncing = False
        self.main_axis = 0
        self.sides = [_SideView(self, 0), _SideView(self, 1)]
        self.three_d: _Canvas | None = None
        self.three_d_button = PushButton(text="Show 3D result")
        self.three_d_button.clicked.connect(self.toggle_3d)
        self._layout = layout = QVBoxLayout(self)
        for side in self.sides:
            layout.addWidget(side.widget, 1)
        layout.addWidget(self.three_d_button.native)
        dims = self.viewer.dims.events
        self._main_events = [
            (dims.point, lambda *_: self._point_moved(self.viewer)),
            (dims.order, self._main_axis_changed),
            (dims.ndisplay, self._main_axis_changed),
        ]
        for emitter, callback in self._main_events:
            emitter.connect(callback)
        self.viewer.mouse_drag_callbacks.append(self._click)
        self.state.on_change(self.refresh_overlays)
        self.on_window_close(self.close_views)
        self._closed = False
        self._main_axis_changed()
        self._point_moved(self.viewer)

    def reset_views(self) -> None:
        """Fit each extra canvas to its layers (as napari's home button does)."""
        for canvas in self.canvases():
            canvas.model.reset_view()

    def showEvent(self, event: Any) -> None:
        super().showEvent(event)
        if not getattr(self, "_fitted", False):  # the canvases have their size only once shown
            self._fitted = True
            QTimer.singleShot(0, lambda: None if self._closed else self.reset_views())

    # -- the shared point ---------------------------------------------------------------------
    def canvases(self) -> list[_Canvas]:
        return [*self.sides, *([self.three_d] if self.three_d is not None else [])]

    def data_point(self) -> np.ndarray | None:
        return self.state.data_point()

    def move_to(self, world: Any) -> None:
        """Move every view to the world point ``world`` (the last three coordinates count)."""
        world = np.asarray(world, float)[-3:]
        ndim = self.viewer.dims.ndim
        self.viewer.dims.set_point(range(ndim - 3, ndim), world)

    def _point_moved(self, model: Any) -> None:
        if self._syncing or self._closed or model.dims.ndim < 3:
            return
        self._syncing = True
        try:
            point = np.asarray(model.dims.point)[-3:]
            for other in [self.viewer, *(side.model for side in self.sides)]:  # (the 3D view shows everything)
                n = other.dims.ndim
                if other is not model and n >= 3 and not np.allclose(np.asarray(other.dims.point)[-3:], point):
                    other.dims.set_point(range(n - 3, n), point)
        finally:
            self._syncing = False
        self.refresh_overlays()

    def _main_axis_changed(self, *_: Any) -> None:
        axis = sliced_axis(self.viewer.dims)
        if axis is not None:
            self.main_axis = axis
        others = [a for a in range(3) if a != self.main_axis]
        for side, side_axis in zip(self.sides, others):
            side.show_axis(side_axis)
        self.refresh_overlays()

    def _click(self, model: Any, event: Any) -> Any:
        """A click without a drag, with no paint tool on, moves every view to the clicked point."""
        active = model.layers.selection.active
        if getattr(active, "mode", "pan_zoom") != "pan_zoom" or event.modifiers:
            return
        start = np.asarray(event.position, float)
        yield
        moved = False
        while event.type == "mouse_move":
            moved = True
            yield
        if not moved or np.allclose(np.asarray(event.position, float), start):
            self.move_to(start)

    def refresh_overlays(self) -> None:
        if self._closed:
            return
        for side in self.sides:
            side.refresh_overlay()

    # -- 3D ---------------------------------------------------------------------------------------
    def toggle_3d(self) -> bool:
        """Show (or hide) the prediction in a 3D canvas; returns whether it is shown."""
        if self.three_d is not None:
            self._layout.removeWidget(self.three_d.qt)
            self.three_d.close()
            self.three_d = None
            self.three_d_button.text = "Show 3D result"
            return False
        if self.state.prediction_layer is None or self.state.prediction_layer not in self.viewer.layers:
            show_info("No prediction yet: train first, then show it in 3D.")
            return False

        def is_prediction(layer: Layer) -> bool:
            meta = layer.metadata.get(METADATA_KEY) or {}
            return mirrorable(layer) and (layer is self.state.prediction_layer or meta.get("role") == "prediction")

        canvas = self.three_d = _Canvas(
            self.viewer, is_prediction, axis=lambda: None, refresh_ms=1000, title="3D result", min_height=260
        )
        canvas.model.dims.ndisplay = 3
        canvas.model.reset_view()
        canvas.model.camera.angles = (0.0, -35.0, 50.0)  # an oblique look, not down the z axis
        self._layout.insertWidget(len(self.sides), canvas.qt, 2)
        self.three_d_button.text = "Hide 3D result"
        return True

    # -- closing ------------------------------------------------------------------------------------
    def event(self, event: QEvent) -> bool:
        # napari removes a closed plugin dock by taking its widget out of the window
        if event.type() == QEvent.Type.ParentChange and self.parent() is None and not self._closed:
            self.close_views()
        return super().event(event)

    def close_views(self) -> None:
        """Close the extra canvases and disconnect everything from the main viewer."""
        if self._closed:
            return
        self._closed = True
        for emitter, callback in self._main_events:
            emitter.disconnect(callback)
        if self._click in self.viewer.mouse_drag_callbacks:
            self.viewer.mouse_drag_callbacks.remove(self._click)
        self.state.off_change(self.refresh_overlays)
        for canvas in self.canvases():
            canvas.close()
        self.sides, self.three_d = [], None
