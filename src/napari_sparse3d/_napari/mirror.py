"""Layers of one napari viewer shown in another viewer model (the orthogonal and 3D views).

A napari layer holds its own slice of the data, so one layer cannot show two
planes at once: each extra canvas gets a *mirror* of every layer it shows, a
layer of the same kind over the **same data array** (nothing is copied), with
the display settings kept in step.  What is painted into a mirrored Labels layer
lands in the shared array; the stroke is moved into the original layer's undo
history and announced by the original's ``paint`` event (with the axis of the
view it was painted in), so undo, autosave and the correction tracking see one
annotation layer, whichever canvas the user painted in.  Undo and redo in a
mirror are the original's.

Mirrors are refreshed (re-sliced) at most every ``refresh_ms`` after the
original's data changes (painting, undo, a refresh by the plugin); the original
re-slicing for a move of its own viewer's sliders is no change of data.
:meth:`LayerMirror.close` removes them and every connection: a closed view keeps
nothing alive.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from napari.layers import Image, Labels, Layer
from qtpy.QtCore import QObject, QTimer

__all__ = ["LayerMirror", "mirrorable"]

#: Display settings copied from the original to its mirrors.
_COMMON = ("visible", "opacity", "blending", "scale", "translate")
_IMAGE = (*_COMMON, "contrast_limits", "colormap", "gamma")
_LABELS = (*_COMMON, "colormap", "contour", "show_selected_label", "preserve_labels", "n_edit_dimensions")
#: Tool settings a mirror's canvas may change too (napari's keyboard shortcuts work in it): kept both ways.
_TOOLS = ("mode", "selected_label", "brush_size")


def mirrorable(layer: Layer) -> bool:
    """An image or labels layer of at least three dimensions."""
    return isinstance(layer, (Image, Labels)) and layer.ndim >= 3 and not getattr(layer, "rgb", False)


class LayerMirror(QObject):
    """Mirrors of ``source``'s layers that pass ``accept`` in the viewer model ``target``.

    ``axis()`` names the data axis the target view slices (None in 3D): it goes with
    the strokes painted there.
    """

    def __init__(
        self,
        source: Any,
        target: Any,
        *,
        accept: Callable[[Layer], bool] = mirrorable,
        axis: Callable[[], int | None] = lambda: None,
        refresh_ms: int = 50,
        parent: QObject | None = None,
    ) -> None:
        super().__init__(parent)
        self.source, self.target, self.accept, self.axis = source, target, accept, axis
        self.mirrors: dict[int, Layer] = {}  # id(original) -> its mirror
        self._originals: dict[int, Layer] = {}
        self._connections: dict[int, list[tuple[Any, Callable]]] = {}
        self._dirty: set[int] = set()
        self._timer = QTimer(self)
        self._timer.setSingleShot(True)
        self._timer.setInterval(refresh_ms)
        self._timer.timeout.connect(self._refresh)
        self._reslicing = False  # the source viewer's dims are moving: its layers re-slice, their data is the same
        for event in self._dims_events():
            event.connect(self._reslice_begins, position="first")
            event.connect(self._reslice_ends, position="last")
        self._viewer_connections = [
            (source.layers.events.inserted, self._inserted),
            (source.layers.events.removed, self._removed),
            (source.layers.events.moved, self._reorder),
            (source.layers.selection.events.active, self._activate),
        ]
        for emitter, callback in self._viewer_connections:
            emitter.connect(callback)
        self.update()

    # -- which layers ------------------------------------------------------------------------
    def update(self) -> None:
        """Mirror the source's accepted layers (and drop mirrors of layers no longer accepted)."""
        for layer in list(self.source.layers):
            if self.accept(layer) and id(layer) not in self.mirrors:
                self._add(layer)
            elif not self.accept(layer) and id(layer) in self.mirrors:
                self._drop(layer)
        self._reorder()
        self._activate()

    def mirror_of(self, layer: Layer) -> Layer | None:
        return self.mirrors.get(id(layer))

    def original_of(self, mirror: Layer) -> Layer | None:
        for key, candidate in self.mirrors.items():
            if candidate is mirror:
                return self._originals[key]
        return None

    def _inserted(self, event: Any) -> None:
        if self.accept(event.value):
            self._add(event.value)
            self._reorder()

    def _removed(self, event: Any) -> None:
        if id(event.value) in self.mirrors:
            self._drop(event.value)

    def _add(self, layer: Layer) -> None:
        data, state, kind = layer.as_layer_data_tuple()
        for key in ("metadata", "features", "properties", "name"):
            state.pop(key, None)
        mirror = Layer.create(layer.data, {**state, "name": layer.name}, kind)
        key = id(layer)
        self.mirrors[key], self._originals[key] = mirror, layer
        connections: list[tuple[Any, Callable]] = [(layer.events.data, lambda *_: self._new_data(layer))]
        for name in ("set_data", "paint", "labels_update"):  # a refresh, a stroke, a stroke in progress
            if hasattr(layer.events, name):
                connections.append((getattr(layer.events, name), lambda *_: self._changed(key)))
        names = _LABELS if isinstance(layer, Labels) else _IMAGE
        for name in names:
            if hasattr(layer.events, name):
                connections.append((getattr(layer.events, name), lambda *_, n=name: _copy(layer, mirror, n)))
        if isinstance(layer, Labels):
            for name in _TOOLS:
                connections.append((getattr(layer.events, name), lambda *_, n=name: _copy(layer, mirror, n)))
                connections.append((getattr(mirror.events, name), lambda *_, n=name: _copy(mirror, layer, n)))
            connections.append((mirror.events.paint, lambda event: self._painted(layer, mirror, event)))
            # undo and redo in the mirror's canvas are the original's (its history holds the strokes)
            mirror.undo = lambda: layer.undo()
            mirror.redo = lambda: layer.redo()
        for name in (*names, *(_TOOLS if isinstance(layer, Labels) else ())):
            if hasattr(layer, name):
                _copy(layer, mirror, name)
        for emitter, callback in connections:
            emitter.connect(callback)
        self._connections[key] = connections
        self.target.layers.append(mirror)

    def _drop(self, layer: Layer) -> None:
        key = id(layer)
        for emitter, callback in self._connections.pop(key, []):
            emitter.disconnect(callback)
        mirror = self.mirrors.pop(key)
        self._originals.pop(key)
        self._dirty.discard(key)
        if mirror in self.target.layers:
            self.target.layers.remove(mirror)

    def _reorder(self, *_: Any) -> None:
        """Mirrors in the source's order, below whatever else the target shows (slice lines)."""
        order = [self.mirrors[id(layer)] for layer in self.source.layers if id(layer) in self.mirrors]
        for position, mirror in enumerate(order):
            index = self.target.layers.index(mirror)
            if index != position:
                self.target.layers.move(index, position)

    def _activate(self, *_: Any) -> None:
        """The mirror of the source's active layer is active in the target (so its canvas paints into it)."""
        active = self.source.layers.selection.active
        mirror = self.mirrors.get(id(active)) if active is not None else None
        if mirror is not None and self.target.layers.selection.active is not mirror:
            self.target.layers.selection.active = mirror

    # -- data ------------------------------------------------------------------------------------
    def _new_data(self, layer: Layer) -> None:
        mirror = self.mirrors.get(id(layer))
        if mirror is not None and mirror.data is not layer.data:
            mirror.data = layer.data

    def _painted(self, layer: Labels, mirror: Labels, event: Any) -> None:
        """A stroke in the mirror's canvas: it belongs to the original's history."""
        item = event.value
        if mirror._undo_history and mirror._undo_history[-1] is item:
            mirror._undo_history.pop()
        layer._redo_history.clear()
        layer._undo_history.append(item)
        layer.events.paint(value=item, axis=self.axis())
        layer.refresh()  # its canvas shows the stroke; the other mirrors follow from its set_data

    def _dims_events(self) -> tuple[Any, ...]:
        """The source viewer's events that re-slice its layers."""
        dims = self.source.dims.events
        return (dims.point, dims.current_step, dims.order, dims.ndisplay)

    def _reslice_begins(self, *_: Any) -> None:
        self._reslicing = True

    def _reslice_ends(self, *_: Any) -> None:
        self._reslicing = False

    def _changed(self, key: int) -> None:
        if not self._reslicing:
            self._schedule(key)

    def _schedule(self, key: int) -> None:
        self._dirty.add(key)
        if not self._timer.isActive():
            self._timer.start()

    def _refresh(self) -> None:
        dirty, self._dirty = self._dirty, set()
        for key in dirty:
            mirror = self.mirrors.get(key)
            if mirror is not None and mirror.visible:
                mirror.refresh()

    def close(self) -> None:
        """Remove every mirror and connection."""
        self._timer.stop()
        for event in self._dims_events():
            event.disconnect(self._reslice_begins)
            event.disconnect(self._reslice_ends)
        for emitter, callback in self._viewer_connections:
            emitter.disconnect(callback)
        self._viewer_connections = []
        for layer in list(self._originals.values()):
            self._drop(layer)


def _copy(source: Layer, target: Layer, name: str) -> None:
    value = getattr(source, name)
    try:
        same = bool(getattr(target, name) == value)
    except (TypeError, ValueError):  # arrays compare element-wise
        import numpy as np

        same = bool(np.array_equal(getattr(target, name), value))
    if not same:
        setattr(target, name, value)
