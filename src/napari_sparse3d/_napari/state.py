"""What the plugin's dock widgets share for one viewer (napari, no Qt, no torch).

One :class:`LoopState` per viewer (see :func:`state_for`) holds the chosen
image and annotation layers, the register of fully annotated slices of each
annotation layer, the prediction layer and the slices the user corrected in
it, and the current model.  The register of a layer is mirrored into
``layer.metadata["napari_sparse3d"]`` so that it travels with the layer.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from napari_sparse3d.loop.slices import SliceRegister

if TYPE_CHECKING:
    from napari.layers import Image, Labels

    from napari_sparse3d.engine.model import UNet3D
    from napari_sparse3d.engine.training import Trainer
    from napari_sparse3d.io.project import Project

__all__ = ["METADATA_KEY", "LoopState", "painted_indices", "state_for", "watch_edits"]

METADATA_KEY = "napari_sparse3d"

_STATES: weakref.WeakKeyDictionary[Any, LoopState] = weakref.WeakKeyDictionary()


def state_for(viewer: Any) -> LoopState:
    """The shared state of ``viewer``'s widgets (created on first use)."""
    try:
        return _STATES[viewer]
    except KeyError:
        state = _STATES[viewer] = LoopState(viewer)
        return state


def watch_edits(layer: Any, callback: Callable[[], None]) -> Callable[[], None]:
    """Call ``callback`` after every change of a Labels layer's data; returns the function that stops it.

    Painting, filling and erasing emit ``paint``; replacing the data emits ``data``.
    napari's undo and redo emit neither (they only refresh the view), so the layer's
    ``undo``/``redo`` are wrapped for as long as the watch lasts.
    """
    connections = [(layer.events.paint, lambda *_: callback()), (layer.events.data, lambda *_: callback())]
    for event, handler in connections:
        event.connect(handler)
    wrapped = {}
    for name in ("undo", "redo"):
        original = getattr(layer, name)

        def replay(original: Callable[[], Any] = original) -> Any:
            result = original()
            callback()
            return result

        wrapped[name] = replay
        setattr(layer, name, replay)

    def stop() -> None:
        for event, handler in connections:
            event.disconnect(handler)
        for name, replay in wrapped.items():
            if layer.__dict__.get(name) is replay:
                del layer.__dict__[name]  # back to the class's method

    return stop


def painted_indices(atom: Any, axis: int) -> set[int]:
    """The indices along data ``axis`` (of the last three) that one napari paint history atom changed.

    napari's brush, fill and polygon record a masked bounding box (``slice_key``,
    ``mask``); ``data_setitem`` records fancy indices, old and new values.
    """
    key = getattr(atom, "slice_key", None)
    if key is not None:
        bounds = key[-3 + axis]
        mask = getattr(atom, "mask", None)
        if mask is None:
            return set(range(int(bounds.start), int(bounds.stop)))
        mask = np.asarray(mask)
        others = tuple(a for a in range(mask.ndim) if a != mask.ndim - 3 + axis)
        return {int(bounds.start) + int(i) for i in np.flatnonzero(mask.any(axis=others))}
    indices = atom[0] if isinstance(atom, tuple) else getattr(atom, "indices", None)
    if indices is None or len(indices) < 3:
        return set()
    return {int(v) for v in np.unique(np.asarray(indices[-3 + axis]))}


class LoopState:
    def __init__(self, viewer: Any) -> None:
        # a weak reference: the shared state must not keep a closed viewer (and its layers) alive
        self._viewer = weakref.ref(viewer)
        self.image_layer: Image | None = None
        self.labels_layer: Labels | None = None
        self.prediction_layer: Labels | None = None
        self.uncertainty_layer: Image | None = None
        self.model: UNet3D | None = None  # the last good model (a trained torch module)
        self.trainer: Trainer | None = None  # kept between rounds so Continue keeps the optimiser state
        self.trainer_key: tuple[int, ...] | None = None  # ids of the image and annotation layers it trains on (extra pairs too)
        self.uncertainty: np.ndarray | None = None
        # what the network last predicted, to tell the user's corrections from it
        self.reference: np.ndarray | None = None
        self.corrected: dict[int, set[int]] = {0: set(), 1: set(), 2: set()}
        self._registers: dict[int, SliceRegister] = {}
        self._listeners: list[Callable[[], None]] = []
        self._edit_listeners: list[Callable[[str], None]] = []
        self.project: Project | None = None  # the project the work is saved into (held for writing)
        self.project_layer: Labels | None = None  # the annotation layer whose data the project saves
        self._stop_watching_prediction: Callable[[], None] | None = None
        self.job_running = False  # a training or prediction worker runs (it may write the project)
        self._release_after_job: list[Project] = []

    @property
    def viewer(self) -> Any:
        viewer = self._viewer()
        if viewer is None:
            raise RuntimeError("the viewer of this napari-sparse3d state was closed")
        return viewer

    # -- notification -----------------------------------------------------------------
    def on_change(self, callback: Callable[[], None]) -> None:
        self._listeners.append(callback)

    def off_change(self, callback: Callable[[], None]) -> None:
        if callback in self._listeners:
            self._listeners.remove(callback)

    def changed(self) -> None:
        for callback in list(self._listeners):
            callback()

    def on_edit(self, callback: Callable[[str], None]) -> None:
        """``callback("annotations" | "prediction")`` after the plugin or the user changes that data."""
        self._edit_listeners.append(callback)

    def edited(self, kind: str) -> None:
        for callback in list(self._edit_listeners):
            callback(kind)

    def model_snapshot(self) -> UNet3D | None:
        """The current model, copied under the trainer's lock when a worker may be training it."""
        trainer = self.trainer
        if trainer is not None and trainer.model is self.model:
            return trainer.snapshot()
        return self.model

    # -- layers -----------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int, int] | None:
        if self.image_layer is None:
            return None
        return tuple(int(s) for s in self.image_layer.data.shape[-3:])  # type: ignore[return-value]

    def register(self, layer: Any = None) -> SliceRegister | None:
        """The fully-annotated-slice register of an annotation layer (default: the chosen one)."""
        layer = layer if layer is not None else self.labels_layer
        if layer is None:
            return None
        key = id(layer)
        if key not in self._registers:
            saved = (layer.metadata.get(METADATA_KEY) or {}).get("annotated_slices") or {}
            register = SliceRegister(layer.data.shape[-3:], {int(a): v for a, v in saved.items()})
            register.on_change(lambda: self._mirror(layer, register))
            self._registers[key] = register
            self._mirror(layer, register)
        return self._registers[key]

    def _mirror(self, layer: Any, register: SliceRegister) -> None:
        meta = dict(layer.metadata.get(METADATA_KEY) or {})
        meta["annotated_slices"] = {str(a): v for a, v in register.as_dict().items()}
        layer.metadata[METADATA_KEY] = meta
        self.changed()

    def spacing(self) -> tuple[float, float, float] | None:
        if self.image_layer is None:
            return None
        scale = tuple(float(s) for s in self.image_layer.scale[-3:])
        return None if np.allclose(scale, scale[0]) else scale  # type: ignore[return-value]

    # -- projects -----------------------------------------------------------------------
    def adopt_prediction(self, layer: Any) -> None:
        """Use ``layer`` as the prediction layer: track the user's corrections in it."""
        if self.prediction_layer is layer:
            return
        if self._stop_watching_prediction is not None:
            self._stop_watching_prediction()
        self.prediction_layer = layer
        # a stroke painted in an orthogonal view comes with that view's axis (see _napari.mirror)
        layer.events.paint.connect(lambda event: self.record_paint(event.value, getattr(event, "axis", None)))
        # corrections painted (or undone) on the prediction are saved like annotations
        self._stop_watching_prediction = watch_edits(layer, lambda: self.edited("prediction"))
        self.reference = np.array(layer.data, copy=True)
        self.corrected = {0: set(), 1: set(), 2: set()}

    def attach_project(self, path: str | Path) -> Project:
        """Save the chosen annotation layer into (and resume from) the project at ``path``.

        The project is held for writing (another viewer or process gets a clear error)
        until :meth:`detach_project`; its prediction layer is adopted.
        """
        from napari_sparse3d.io.project import Project

        if self.project is not None and Path(self.project.path).resolve() == Path(path).resolve():
            project = self.project
        else:
            project = Project.open(path, writable=True, check_image=False)
            self.detach_project()
        self.project = project
        self.project_layer = self.labels_layer
        for layer in self.viewer.layers:
            meta = layer.metadata.get(METADATA_KEY) or {}
            if meta.get("role") == "prediction" and meta.get("project") == str(project.path.resolve()):
                self.adopt_prediction(layer)
        if self.labels_layer is not None:
            meta = dict(self.labels_layer.metadata.get(METADATA_KEY) or {})
            meta["project"] = str(project.path.resolve())
            self.labels_layer.metadata[METADATA_KEY] = meta
        self.changed()
        return project

    def detach_project(self) -> None:
        """Stop saving into the project and release it for other writers.

        While a job runs it may still write the project's checkpoints: the release
        then waits for :meth:`job_finished`.
        """
        project, self.project, self.project_layer = self.project, None, None
        if project is not None:
            if self.job_running:
                self._release_after_job.append(project)
            else:
                project.close()
            self.changed()

    def job_started(self) -> None:
        self.job_running = True

    def job_finished(self) -> None:
        self.job_running = False
        waiting, self._release_after_job = self._release_after_job, []
        for project in waiting:
            if project is not self.project:
                project.close()

    def release(self) -> None:
        """Drop what a closed viewer's plugin held: the project lock, the trainer, the model."""
        self.job_running = False
        self.detach_project()
        self.job_finished()
        if self._stop_watching_prediction is not None:
            self._stop_watching_prediction()
            self._stop_watching_prediction = None
        trainer, self.trainer, self.model = self.trainer, None, None
        self.trainer_key = None
        self.image_layer = self.labels_layer = self.prediction_layer = self.uncertainty_layer = None
        self.uncertainty = self.reference = None
        self._registers.clear()
        self._listeners.clear()
        self._edit_listeners.clear()
        if trainer is not None and trainer.device.type == "cuda":
            from napari_sparse3d.engine.devices import release_cached_memory

            device = trainer.device
            del trainer  # its tensors go first, then the cache they leave
            release_cached_memory(device)

    # -- where the user looks -----------------------------------------------------------
    def data_point(self) -> np.ndarray | None:
        """The viewer's current point in the image layer's voxel coordinates."""
        if self.image_layer is None:
            return None
        point = np.asarray(self.image_layer.world_to_data(self.viewer.dims.point))[-3:]
        shape = np.asarray(self.shape)
        return np.clip(np.round(point), 0, shape - 1).astype(int)

    def current_slice(self) -> tuple[int, int] | None:
        """``(axis, index)`` of the slice on screen, or None in 3D display."""
        if self.image_layer is None or self.viewer.dims.ndisplay != 2:
            return None
        ndim = self.viewer.dims.ndim
        hidden = [a - (ndim - 3) for a in self.viewer.dims.not_displayed if a >= ndim - 3]
        if not hidden:
            return None
        axis = hidden[-1]
        point = self.data_point()
        return axis, int(point[axis])  # type: ignore[index]

    def view_region(self) -> tuple[slice, slice, slice] | None:
        """The region to preview: the slice on screen (2D) or the whole volume (3D)."""
        if self.image_layer is None:
            return None
        current = self.current_slice()
        if current is None:
            return (slice(None),) * 3  # type: ignore[return-value]
        axis, index = current
        region = [slice(None)] * 3
        region[axis] = slice(index, index + 1)
        return tuple(region)  # type: ignore[return-value]

    def show_axis(self, axis: int) -> None:
        """Slice the volume along ``axis`` (the other two are displayed)."""
        ndim = self.viewer.dims.ndim
        axis = ndim - 3 + axis
        others = [a for a in range(ndim) if a != axis]
        self.viewer.dims.ndisplay = 2
        self.viewer.dims.order = tuple(others[:-2] + [axis] + others[-2:])

    def go_to(self, axis: int, index: int) -> None:
        """Show slice ``index`` of ``axis``."""
        self.show_axis(axis)
        world_axis = self.viewer.dims.ndim - 3 + axis
        point = np.zeros(self.image_layer.ndim)
        point[-3 + axis] = index
        world = self.image_layer.data_to_world(point)
        self.viewer.dims.set_point(world_axis, float(world[-3 + axis]))

    # -- corrections --------------------------------------------------------------------
    def record_paint(self, atoms: Any, axis: int | None = None) -> None:
        """Note the slices of ``axis`` (default: the one on screen) that a paint event on the prediction changed."""
        if axis is None:
            current = self.current_slice()
            if current is None:
                return
            axis = current[0]
        for atom in atoms or []:
            self.corrected[axis].update(painted_indices(atom, axis))
        self.changed()

    def corrected_slices(self) -> dict[int, list[int]]:
        """The corrected slices; where no paint was seen, the slices of the current axis that differ."""
        found = {a: sorted(s) for a, s in self.corrected.items() if s}
        if found or self.prediction_layer is None or self.reference is None:
            return found
        current = self.current_slice()
        if current is None:
            return {}
        axis = current[0]
        diff = np.asarray(self.prediction_layer.data) != self.reference
        other = tuple(a for a in range(3) if a != axis)
        indices = np.flatnonzero(diff.any(axis=other))
        return {axis: [int(i) for i in indices]} if indices.size else {}

    def reset_corrections(self) -> None:
        self.corrected = {0: set(), 1: set(), 2: set()}
        if self.prediction_layer is not None:
            self.reference = np.array(self.prediction_layer.data, copy=True)
        self.changed()
