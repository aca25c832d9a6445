"""The annotation dock: pick the image and its annotation layer, move between the three
axes, jump to suggested slices, mark slices fully annotated, see what is annotated, and
save it all into a project (autosaved while you paint)."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from magicgui.widgets import Container, Label, PushButton
from napari.layers import Image, Labels
from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import QFileDialog

from napari_sparse3d._napari.dock import DockWidget, add_layer_like, layer_choices, layer_combo
from napari_sparse3d._napari.state import METADATA_KEY
from napari_sparse3d._napari.state import watch_edits as _watch
from napari_sparse3d._napari.voxel_size import VoxelSizeBox, grid_mismatch
from napari_sparse3d.loop.corrections import uncertain_slices
from napari_sparse3d.loop.slices import AXIS_NAMES, label_counts, next_even_slice

__all__ = ["AnnotationWidget"]


class AnnotationWidget(DockWidget):
    """Annotate a few orthogonal slices: layers, axes, suggested slices, the annotated-slice register."""

    def __init__(self, napari_viewer: Any) -> None:
        super().__init__(napari_viewer)
        napari_viewer = self.viewer
        self.image = layer_combo(napari_viewer, Image, "image")
        self.labels = layer_combo(napari_viewer, Labels, "annotations")
        self.new_labels = PushButton(text="New annotation layer")
        self.voxel_size = VoxelSizeBox(self.state)
        self.views_button = PushButton(text="Orthogonal views")
        self.axis_buttons = [PushButton(text=f"slice along {name}") for name in AXIS_NAMES]
        self.next_button = PushButton(text="Next suggested slice (Alt-N)")
        self.uncertain_button = PushButton(text="Most uncertain slice (Alt-U)")
        self.mark_button = PushButton(text="Mark slice annotated (Alt-M)")
        self.slice_info = Label(value="")
        self.register_info = Label(value="")
        self.count_info = Label(value="")
        self.project_info = Label(value="project: none (Save as project… to autosave)")
        self.save_project_button = PushButton(text="Save as project…")
        self.autosave_delay_ms = 1500
        self._autosave = QTimer(self)
        self._autosave.setSingleShot(True)
        self._autosave.timeout.connect(self.save_project)
        self._pending: set[str] = set()  # what the next autosave writes: "annotations", "prediction"
        self._watched: Any = None
        self._stop_watching: Any = None
        axes = Container(widgets=self.axis_buttons, layout="horizontal", labels=False)
        self.form = Container(
            widgets=[
                self.image,
                self.labels,
                self.new_labels,
                axes,
                self.next_button,
                self.uncertain_button,
                self.mark_button,
                self.slice_info,
                self.register_info,
                self.count_info,
                self.project_info,
                self.save_project_button,
            ]
        )
        layout = self.scrolling_column()
        layout.addWidget(self.form.native)
        layout.insertWidget(0, self.voxel_size)
        layout.insertWidget(1, self.views_button.native)
        layout.addStretch(1)
        self.image.changed.connect(self._image_chosen)
        self.labels.changed.connect(self._labels_chosen)
        self.new_labels.clicked.connect(self.create_labels_layer)
        self.views_button.clicked.connect(self.show_views)
        for axis, button in enumerate(self.axis_buttons):
            button.clicked.connect(lambda *_, a=axis: self.state.show_axis(a))
        self.next_button.clicked.connect(self.next_slice)
        self.uncertain_button.clicked.connect(self.uncertain_slice)
        self.mark_button.clicked.connect(self.toggle_mark)
        self.save_project_button.clicked.connect(lambda: self.create_project(None))
        self.viewer.dims.events.current_step.connect(self._refresh_info)
        self.viewer.dims.events.order.connect(self._refresh_info)
        self.viewer.dims.events.ndisplay.connect(self._refresh_info)
        self.state.on_change(self._refresh_all)
        self.state.on_edit(self._schedule_save)
        self.on_window_close(self._viewer_closing)  # flush unsaved edits and release the project
        self.bind_keys(
            [
                ("Alt-N", self.next_slice),
                ("Alt-U", self.uncertain_slice),
                ("Alt-M", self.toggle_mark),
                ("Alt-1", lambda: self.state.show_axis(0)),
                ("Alt-2", lambda: self.state.show_axis(1)),
                ("Alt-3", lambda: self.state.show_axis(2)),
            ]
        )
        self.reset_choices()

    # -- layers ---------------------------------------------------------------------------
    def reset_choices(self, *_: Any) -> None:
        self.image.reset_choices()
        self.labels.reset_choices()
        if self.image.value is None and self.image.choices:
            self.image.value = self.image.choices[-1]
        if self.state.labels_layer is None or self.state.labels_layer not in self.viewer.layers:
            match = self._matching_labels()
            if match is not None:
                self.labels.value = match
        self._refresh_all()

    def _matching_labels(self) -> Any:
        image = self.image.value
        if image is None:
            return None
        candidates = []
        for layer in layer_choices(self.viewer, Labels):
            meta = layer.metadata.get(METADATA_KEY) or {}
            if layer is self.state.prediction_layer or layer.name.endswith(" prediction") or meta.get("role") == "prediction":
                continue
            if tuple(layer.data.shape[-3:]) == tuple(image.data.shape[-3:]) and grid_mismatch(layer, image) is None:
                candidates.append((0 if meta.get("project") else 1, len(candidates), layer))
        return min(candidates)[2] if candidates else None

    def _image_chosen(self, layer: Any) -> None:
        self.state.image_layer = layer
        self.voxel_size.image_chosen(layer)  # its scale, or its file's voxel size, or ask for it
        current = self.labels.value
        if current is None or layer is None or current.data.shape[-3:] != layer.data.shape[-3:] or grid_mismatch(current, layer):
            self.labels.value = self._matching_labels()
        self.state.changed()

    def _labels_chosen(self, layer: Any) -> None:
        state = self.state
        image = state.image_layer
        problem = None if layer is None or image is None else grid_mismatch(layer, image)
        if problem is not None:  # layers on different grids are not mixed: refuse, say why
            show_warning(f"napari-sparse3d: not used as the annotation layer: {problem}. Give both the same voxel size.")
            self.labels.value = None
            return
        if self._stop_watching is not None:
            self._stop_watching()
            self._stop_watching = None
        if self._pending:
            self.save_project()  # the previous layer's last edits go to its project first
        state.labels_layer = layer
        self._watched = layer
        # (no layer: the project's layer was removed, or napari is closing; the project stays
        # attached for the final flush and the training job's last checkpoint)
        if state.project is not None and layer is not None and layer is not state.project_layer:
            # a project saves one layer: choosing another must not overwrite its annotations
            name, chosen = getattr(state.project_layer, "name", "?"), getattr(layer, "name", "no layer")
            show_info(f"Project {state.project.path.name} is saved from layer {name!r}; {chosen!r} is not saved into it.")
            state.detach_project()
        if layer is not None:
            self._stop_watching = _watch(layer, lambda: (self._schedule_save("annotations"), self._refresh_all()))
            state.register().on_change(lambda: self._schedule_save("annotations"))  # type: ignore[union-attr]
            path = (layer.metadata.get(METADATA_KEY) or {}).get("project")
            if path and state.project is None:
                try:
                    state.attach_project(path)
                except (OSError, ValueError) as exc:
                    show_error(f"Could not open the project {path} for saving: {exc}")
        state.changed()

    def show_views(self) -> Any:
        """Open the orthogonal views dock (or bring it forward)."""
        _, widget = self.viewer.window.add_plugin_dock_widget("napari-sparse3d", "Orthogonal views")
        return widget

    # -- projects ---------------------------------------------------------------------------
    def _schedule_save(self, kind: str = "annotations") -> None:
        if self.state.project is not None:
            self._pending.add(kind)
            self._autosave.start(self.autosave_delay_ms)  # restarts: saves once edits pause

    def save_project(self) -> bool:
        """Write what changed (annotations and register, corrected prediction) into the project now.

        The autosave calls this once edits pause, and so do choosing another layer and
        closing the viewer.
        """
        self._autosave.stop()
        state = self.state
        pending, self._pending = self._pending or {"annotations"}, set()
        if state.project is None:
            return False
        try:
            if "annotations" in pending and state.project_layer is not None:
                register = state.register(state.project_layer)
                state.project.save_annotations(np.asarray(state.project_layer.data), register.as_dict())  # type: ignore[union-attr]
            prediction = state.prediction_layer
            if "prediction" in pending and prediction is not None and prediction.data.shape == state.project.shape:
                state.project.save_prediction(np.asarray(prediction.data))
        except (OSError, ValueError) as exc:
            self._pending |= pending  # tried again with the next edit or on close
            show_error(f"NOT saved to {state.project.path}: {exc}")
            return False
        self.project_info.value = f"project: {state.project.path.name} · saved {time.strftime('%H:%M:%S')}"
        return True

    def _viewer_closing(self) -> None:
        if self._pending or self._autosave.isActive():
            self.save_project()
        if self._stop_watching is not None:
            self._stop_watching()
            self._stop_watching = None

    def create_project(self, path: str | None) -> Any:
        """Make a project of the image, annotations, prediction and model, and autosave into it."""
        from napari_sparse3d.io.project import Project

        state = self.state
        if state.image_layer is None or state.labels_layer is None:
            show_warning("Choose an image and an annotation layer first.")
            return None
        if path is None:
            path = QFileDialog.getExistingDirectory(self, "New project folder (an empty or new *.zarr folder)")
            if not path:
                return None
        try:
            project = Project.create(
                path,
                np.asarray(state.image_layer.data),
                labels=np.asarray(state.labels_layer.data),
                annotated_slices=state.register().as_dict(),  # type: ignore[union-attr]
                spacing=state.spacing(),
            )
            try:
                if state.model is not None:
                    project.save_checkpoint(state.model_snapshot())  # not torn by a training worker
                if state.prediction_layer is not None:
                    project.save_prediction(np.asarray(state.prediction_layer.data))
            finally:
                project.close()
        except (OSError, ValueError, TypeError) as exc:
            show_error(f"Could not create the project {path}: {exc}")
            return None
        state.detach_project()
        state.attach_project(project.path)
        self.project_info.value = f"project: {project.path.name} · saved {time.strftime('%H:%M:%S')}"
        return state.project

    def create_labels_layer(self) -> Any:
        """A new annotation layer with the image's shape, scale and translation."""
        image = self.image.value
        if image is None:
            show_warning("Choose an image layer first.")
            return None
        if image.rgb or getattr(image, "multiscale", False):
            show_error(f"Layer {image.name!r}: RGB and multiscale images are not supported; use a 3D grey image.")
            return None
        shape = tuple(image.data.shape[-3:])
        layer = add_layer_like(self.viewer, image, np.zeros(shape, np.uint8), name=f"{image.name} annotations")
        self.labels.reset_choices()
        self.labels.value = layer
        return layer

    # -- slices ---------------------------------------------------------------------------
    def _axis(self) -> int:
        current = self.state.current_slice()
        return current[0] if current is not None else 0

    def next_slice(self) -> tuple[int, int] | None:
        """Go to the next evenly spaced unannotated slice of the current axis."""
        register = self.state.register()
        if register is None:
            show_warning("Choose an image and an annotation layer first.")
            return None
        axis = self._axis()
        current = self.state.current_slice()
        index = next_even_slice(register.shape[axis], register.indices(axis), current[1] if current else None)
        self.state.go_to(axis, index)
        return axis, index

    def uncertain_slice(self) -> tuple[int, int] | None:
        """Go to the unannotated slice of the current axis where the network is least sure."""
        register = self.state.register()
        if register is None or self.state.uncertainty is None:
            show_info("No prediction yet: train first (going to an evenly spaced slice instead).")
            return self.next_slice()
        axis = self._axis()
        indices = uncertain_slices(self.state.uncertainty, axis, register.indices(axis), count=1)
        if not indices:
            return None
        self.state.go_to(axis, indices[0])
        return axis, indices[0]

    def toggle_mark(self) -> bool | None:
        """Mark the slice on screen fully annotated (its unpainted voxels are background), or unmark it."""
        register = self.state.register()
        current = self.state.current_slice()
        if register is None or current is None:
            show_warning("Show a 2D slice of an image with an annotation layer to mark it.")
            return None
        return register.toggle(*current)

    def _refresh_info(self, *_: Any) -> None:
        register = self.state.register()
        current = self.state.current_slice()
        if register is None:
            self.slice_info.value = "Choose an image and an annotation layer (or create one)."
            self.register_info.value = ""
            self.count_info.value = ""
            return
        if current is not None:
            axis, index = current
            marked = register.is_marked(axis, index)
            self.slice_info.value = f"{AXIS_NAMES[axis]} = {index}: " + ("fully annotated" if marked else "not marked")
            self.mark_button.text = ("Unmark slice (Alt-M)" if marked else "Mark slice annotated (Alt-M)")
        else:
            self.slice_info.value = "3D view: switch to 2D to annotate slices"
        if self.state.project is not None and not self.project_info.value.startswith("project: " + self.state.project.path.name):
            self.project_info.value = f"project: {self.state.project.path.name}"
        self.register_info.value = "annotated slices  " + register.describe()

    def _refresh_all(self, *_: Any) -> None:
        """Slice info and the voxel counts (a pass over the volume: not on every slider move)."""
        self._refresh_info()
        register = self.state.register()
        if register is None:
            return
        counts = label_counts(np.asarray(self.state.labels_layer.data), register)
        names = {0: "background"}
        self.count_info.value = "voxels  " + (
            ", ".join(f"{names.get(k, k)}: {v:,}" for k, v in counts.items()) if counts else "none yet"
        )
