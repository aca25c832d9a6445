"""What both dock widgets share: the viewer they belong to, its shared state, layer helpers.

Nothing in the dock modules imports torch at module level: the manifest's
commands import them, and torch loads when training or a model is first used.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from magicgui.widgets import ComboBox
from qtpy.QtCore import QEvent, QObject, QSize, Qt
from qtpy.QtWidgets import QFrame, QScrollArea, QVBoxLayout, QWidget

from napari_sparse3d._napari.state import state_for

if TYPE_CHECKING:
    from napari.layers import Labels

__all__ = ["DockWidget", "add_layer_like", "fit_dtype", "layer_choices", "layer_combo", "on_close"]


def layer_choices(viewer: Any, kind: type) -> list[Any]:
    """The layers of ``kind`` with at least three dimensions."""
    return [layer for layer in viewer.layers if isinstance(layer, kind) and layer.ndim >= 3]


def layer_combo(viewer: Any, kind: type, label: str) -> ComboBox:
    return ComboBox(label=label, choices=lambda _w: [(layer.name, layer) for layer in layer_choices(viewer, kind)], nullable=True)


def add_layer_like(viewer: Any, like: Any, data: Any, kind: str = "labels", **kwargs: Any) -> Any:
    """Add a layer with ``like``'s scale and translation (the last three axes)."""
    add = viewer.add_labels if kind == "labels" else viewer.add_image
    return add(data, scale=tuple(like.scale[-3:]), translate=tuple(like.translate[-3:]), **kwargs)


def fit_dtype(layer: Labels, values: np.ndarray) -> np.ndarray:
    """The layer's data, widened first if ``values`` do not fit its integer type."""
    data = layer.data
    if np.asarray(values).max(initial=0) > np.iinfo(data.dtype).max:
        layer.data = data = data.astype(np.promote_types(data.dtype, np.min_scalar_type(np.asarray(values).max())))
    return data


class _CloseWatcher(QObject):
    """Runs callbacks when its window receives a close event (before napari tears it down)."""

    def __init__(self, window: Any) -> None:
        super().__init__(window)
        self.callbacks: list[Callable[[], Any]] = []
        window.installEventFilter(self)

    def eventFilter(self, obj: Any, event: Any) -> bool:
        if event.type() == QEvent.Type.Close:
            for callback in list(self.callbacks):
                try:
                    callback()
                except Exception as exc:
                    import warnings

                    warnings.warn(f"napari-sparse3d: while closing: {exc}", RuntimeWarning, stacklevel=1)
        return False  # the window closes as usual


def on_close(window: Any, callback: Callable[[], Any]) -> None:
    """Call ``callback`` (synchronously) when ``window`` is asked to close: flush what must not be lost."""
    watcher = window.findChild(_CloseWatcher)
    if watcher is None:
        watcher = _CloseWatcher(window)
    watcher.callbacks.append(callback)


class _Column(QScrollArea):
    """A vertical scroll area as wide as its content, at least ``MIN_HEIGHT`` px tall (less if the content is)."""

    MIN_HEIGHT = 220

    def __init__(self) -> None:
        super().__init__()
        self.setWidgetResizable(True)
        self.setFrameShape(QFrame.Shape.NoFrame)
        self.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)

    def minimumSizeHint(self) -> QSize:
        body = self.widget()
        if body is None:
            return super().minimumSizeHint()
        width = body.minimumSizeHint().width() + self.verticalScrollBar().sizeHint().width()
        return QSize(width, min(body.sizeHint().height(), self.MIN_HEIGHT))

    def sizeHint(self) -> QSize:
        body = self.widget()
        return super().sizeHint() if body is None else body.sizeHint().expandedTo(self.minimumSizeHint())


class DockWidget(QWidget):
    """Base of the plugin's docks: the real viewer, its shared state, key bindings, layer-list updates."""

    def __init__(self, napari_viewer: Any) -> None:
        super().__init__()
        # napari hands plugins a proxy of the viewer; both docks must share the real one
        napari_viewer = getattr(napari_viewer, "__wrapped__", napari_viewer)
        self.viewer = napari_viewer
        self.state = state_for(napari_viewer)
        for event in (napari_viewer.layers.events.inserted, napari_viewer.layers.events.removed):
            event.connect(self.reset_choices)
        window = getattr(getattr(napari_viewer, "window", None), "_qt_window", None)
        if window is not None:
            # what the plugin holds for this viewer (project lock, trainer, model) goes with its window
            state = self.state
            window.destroyed.connect(lambda *_: state.release())

    def scrolling_column(self) -> QVBoxLayout:
        """The dock's column of widgets, inside a scroll area.

        Without it the dock's minimum height is the sum of its widgets' heights (over 1000 px
        for the training dock), and napari's window grows past a laptop's screen as soon as
        two docks share a side. With it a dock that has too little room scrolls.
        """
        self._column = scroll = _Column()
        body = QWidget()
        scroll.setWidget(body)
        outer = QVBoxLayout(self)
        outer.setContentsMargins(0, 0, 0, 0)
        outer.addWidget(scroll)
        return QVBoxLayout(body)

    def scroll_to(self, widget: QWidget) -> None:
        """Scroll the dock's column (if it has one) so that ``widget`` is in sight."""
        column = getattr(self, "_column", None)
        if column is not None:
            column.ensureWidgetVisible(widget, 0, 0)

    def reset_choices(self, *_: Any) -> None:
        """Refresh the layer menus (called when layers are added or removed)."""

    def on_window_close(self, callback: Callable[[], Any]) -> None:
        """Call ``callback`` when the viewer's window is asked to close (see :func:`on_close`)."""
        window = getattr(getattr(self.viewer, "window", None), "_qt_window", None)
        if window is not None:
            on_close(window, callback)

    def bind_keys(self, bindings: Sequence[tuple[str, Callable[[], Any]]]) -> None:
        for key, action in bindings:
            self.viewer.bind_key(key, lambda _v, f=action: f(), overwrite=True)
