"""The plugin's dock widgets: thin Qt over :mod:`.session`, :mod:`._state` and :mod:`.jobs`.

* :class:`AnnotationWidget` — pick the image and its annotation layer, move
  between the three axes, jump to suggested slices, mark slices fully
  annotated, see what is annotated.
* :class:`TrainingWidget` — settings form, Start / Continue / Stop, progress and
  loss plot, streaming predictions, corrections, model save / load / apply.

Nothing here imports torch at module level: the manifest's commands import
this module, and torch loads when training or a model is first used.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np
from magicgui.widgets import CheckBox, ComboBox, Container, FloatSpinBox, Label, PushButton, SpinBox
from napari.layers import Image, Labels
from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtCore import QPointF, Qt, QTimer
from qtpy.QtGui import QColor, QPainter, QPen, QPolygonF
from qtpy.QtWidgets import QFileDialog, QGroupBox, QProgressBar, QVBoxLayout, QWidget

from ._state import METADATA_KEY, state_for
from .config import PRESETS, Config
from .session import AXIS_NAMES, accept_slices, label_counts, next_even_slice, uncertain_slices, uncertainty

__all__ = ["AnnotationWidget", "TrainingWidget", "LossPlot"]

DEVICES = ("auto", "cpu", "cuda", "mps")


def _layer_choices(viewer: Any, kind: type) -> list[Any]:
    return [layer for layer in viewer.layers if isinstance(layer, kind) and layer.ndim >= 3]


def _add_layer_combo(viewer: Any, kind: type, label: str) -> ComboBox:
    combo = ComboBox(label=label, choices=lambda _w: [(l.name, l) for l in _layer_choices(viewer, kind)], nullable=True)
    return combo


# ---------------------------------------------------------------------------------------
class AnnotationWidget(QWidget):
    """Annotate a few orthogonal slices: layers, axes, suggested slices, the annotated-slice register."""

    def __init__(self, napari_viewer: Any) -> None:
        super().__init__()
        # napari hands plugins a proxy of the viewer; both widgets must share the real one
        napari_viewer = getattr(napari_viewer, "__wrapped__", napari_viewer)
        self.viewer = napari_viewer
        self.state = state_for(napari_viewer)
        self.image = _add_layer_combo(napari_viewer, Image, "image")
        self.labels = _add_layer_combo(napari_viewer, Labels, "annotations")
        self.new_labels = PushButton(text="New annotation layer")
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
        self._watched: Any = None
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
        layout = QVBoxLayout(self)
        layout.addWidget(self.form.native)
        layout.addStretch(1)
        self.image.changed.connect(self._image_chosen)
        self.labels.changed.connect(self._labels_chosen)
        self.new_labels.clicked.connect(self.create_labels_layer)
        for axis, button in enumerate(self.axis_buttons):
            button.clicked.connect(lambda *_, a=axis: self.state.show_axis(a))
        self.next_button.clicked.connect(self.next_slice)
        self.uncertain_button.clicked.connect(self.uncertain_slice)
        self.mark_button.clicked.connect(self.toggle_mark)
        self.save_project_button.clicked.connect(lambda: self.create_project(None))
        self.viewer.dims.events.current_step.connect(self._refresh_info)
        self.viewer.dims.events.order.connect(self._refresh_info)
        self.viewer.dims.events.ndisplay.connect(self._refresh_info)
        for event in (napari_viewer.layers.events.inserted, napari_viewer.layers.events.removed):
            event.connect(self.reset_choices)
        self.state.on_change(self._refresh_info)
        for key, action in (
            ("Alt-N", self.next_slice),
            ("Alt-U", self.uncertain_slice),
            ("Alt-M", self.toggle_mark),
            ("Alt-1", lambda: self.state.show_axis(0)),
            ("Alt-2", lambda: self.state.show_axis(1)),
            ("Alt-3", lambda: self.state.show_axis(2)),
        ):
            napari_viewer.bind_key(key, lambda _v, f=action: f(), overwrite=True)
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
        self._refresh_info()

    def _matching_labels(self) -> Any:
        image = self.image.value
        if image is None:
            return None
        candidates = []
        for layer in _layer_choices(self.viewer, Labels):
            meta = layer.metadata.get(METADATA_KEY) or {}
            if layer is self.state.prediction_layer or layer.name.endswith(" prediction") or meta.get("role") == "prediction":
                continue
            if tuple(layer.data.shape[-3:]) == tuple(image.data.shape[-3:]):
                candidates.append((0 if meta.get("project") else 1, len(candidates), layer))
        return min(candidates)[2] if candidates else None

    def _image_chosen(self, layer: Any) -> None:
        self.state.image_layer = layer
        if self.labels.value is None or self.labels.value.data.shape[-3:] != getattr(layer, "data", np.empty(0)).shape[-3:]:
            self.labels.value = self._matching_labels()
        self.state.changed()

    def _labels_chosen(self, layer: Any) -> None:
        if self._watched is not None:
            for event in (self._watched.events.paint, self._watched.events.data):
                event.disconnect(self._schedule_save)
        self.state.labels_layer = layer
        self._watched = layer
        if layer is not None:
            layer.events.paint.connect(self._schedule_save)
            layer.events.data.connect(self._schedule_save)
            self.state.register().on_change(self._schedule_save)  # type: ignore[union-attr]
            path = (layer.metadata.get(METADATA_KEY) or {}).get("project")
            if path and (self.state.project is None or str(self.state.project.path.resolve()) != path):
                try:
                    self.state.attach_project(path)
                except (OSError, ValueError) as exc:
                    show_error(f"Could not open the project {path}: {exc}")
        self.state.changed()

    # -- projects ---------------------------------------------------------------------------
    def _schedule_save(self, *_: Any) -> None:
        if self.state.project is not None:
            self._autosave.start(self.autosave_delay_ms)  # restarts: saves once edits pause

    def save_project(self) -> bool:
        """Write the annotations and the register into the project now (autosave calls this)."""
        self._autosave.stop()
        state = self.state
        if state.project is None or state.labels_layer is None:
            return False
        try:
            state.project.save_annotations(np.asarray(state.labels_layer.data), state.register().as_dict())
        except (OSError, ValueError) as exc:
            show_error(f"Annotations NOT saved to {state.project.path}: {exc}")
            return False
        self.project_info.value = f"project: {state.project.path.name} · saved {time.strftime('%H:%M:%S')}"
        return True

    def create_project(self, path: str | None) -> Any:
        """Make a project of the image, annotations, prediction and model, and autosave into it."""
        from .project import Project

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
            if state.model is not None:
                project.save_checkpoint(state.model)
            if state.prediction_layer is not None:
                project.save_prediction(np.asarray(state.prediction_layer.data))
        except (OSError, ValueError, TypeError) as exc:
            show_error(f"Could not create the project {path}: {exc}")
            return None
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
        layer = self.viewer.add_labels(
            np.zeros(shape, np.uint8),
            name=f"{image.name} annotations",
            scale=tuple(image.scale[-3:]),
            translate=tuple(image.translate[-3:]),
        )
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
        counts = label_counts(np.asarray(self.state.labels_layer.data), register)
        names = {0: "background"}
        self.count_info.value = "voxels  " + (
            ", ".join(f"{names.get(k, k)}: {v:,}" for k, v in counts.items()) if counts else "none yet"
        )


# ---------------------------------------------------------------------------------------
class LossPlot(QWidget):
    """A small live plot of the training loss (raw in grey, smoothed in colour), log scale."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setMinimumHeight(90)
        self.iterations: list[int] = []
        self.losses: list[float] = []
        self.smoothed: list[float] = []

    def clear(self) -> None:
        self.iterations, self.losses, self.smoothed = [], [], []
        self.update()

    def add(self, iteration: int, loss: float) -> None:
        self.iterations.append(int(iteration))
        self.losses.append(float(loss))
        previous = self.smoothed[-1] if self.smoothed else float(loss)
        self.smoothed.append(0.9 * previous + 0.1 * float(loss))
        self.update()

    def paintEvent(self, event: Any) -> None:  # noqa: N802 (Qt name)
        painter = QPainter(self)
        rect = self.rect().adjusted(4, 4, -4, -14)
        painter.fillRect(self.rect(), QColor(38, 41, 48))
        if len(self.losses) < 2:
            painter.setPen(QColor(160, 160, 160))
            painter.drawText(rect, Qt.AlignCenter, "training loss")
            painter.end()
            return
        logs = np.log10(np.maximum(np.asarray(self.losses), 1e-6))
        lo, hi = float(logs.min()), float(logs.max())
        hi = hi if hi > lo else lo + 1e-3
        first, last = self.iterations[0], self.iterations[-1]
        span = max(last - first, 1)

        def points(values: np.ndarray) -> QPolygonF:
            step = max(1, len(values) // max(rect.width(), 1))
            poly = QPolygonF()
            for i in range(0, len(values), step):
                x = rect.left() + rect.width() * (self.iterations[i] - first) / span
                y = rect.bottom() - rect.height() * (values[i] - lo) / (hi - lo)
                poly.append(QPointF(x, y))
            return poly

        painter.setPen(QPen(QColor(110, 110, 110), 1))
        painter.drawPolyline(points(logs))
        painter.setPen(QPen(QColor(255, 170, 60), 2))
        painter.drawPolyline(points(np.log10(np.maximum(np.asarray(self.smoothed), 1e-6))))
        painter.setPen(QColor(200, 200, 200))
        painter.drawText(
            4, self.height() - 2, f"loss {self.smoothed[-1]:.3g} (from {10 ** logs[0]:.3g}) · iteration {last}"
        )
        painter.end()


# the advanced fields of the form: (section, field) pairs of the engine's configuration
ADVANCED = (
    ("train", "learning_rate"),
    ("train", "batch_size"),
    ("train", "patch_voxels"),
    ("train", "dice_weight"),
    ("train", "foreground_fraction"),
    ("train", "flip"),
    ("train", "rotate90"),
    ("train", "intensity"),
    ("train", "precision"),
    ("model", "levels"),
    ("model", "base_features"),
    ("model", "norm"),
    ("model", "deep_supervision"),
    ("predict", "overlap"),
    ("predict", "mirror_tta"),
)
CHOICES = {
    ("train", "precision"): ("auto", "bf16", "fp16", "fp32"),
    ("model", "norm"): ("instance", "batch", "none"),
}


def _config_widget(section: str, name: str, value: Any) -> Any:
    label = name.replace("_", " ")
    if (section, name) in CHOICES:
        return ComboBox(name=f"{section}.{name}", label=label, choices=CHOICES[(section, name)], value=value)
    if isinstance(value, bool):
        return CheckBox(name=f"{section}.{name}", label=label, value=value)
    if isinstance(value, int):
        return SpinBox(name=f"{section}.{name}", label=label, value=value, min=0, max=10**9)
    return FloatSpinBox(name=f"{section}.{name}", label=label, value=value, min=0.0, max=1e9, step=1e-4)


class TrainingWidget(QWidget):
    """Train in the background, watch predictions stream in, correct, continue; save, load and apply models."""

    def __init__(self, napari_viewer: Any) -> None:
        super().__init__()
        # napari hands plugins a proxy of the viewer; both widgets must share the real one
        napari_viewer = getattr(napari_viewer, "__wrapped__", napari_viewer)
        self.viewer = napari_viewer
        self.state = state_for(napari_viewer)
        self.worker: Any = None
        self.stop_event = threading.Event()
        self.cancel_event = threading.Event()
        self.phase = "idle"
        self.backup: np.ndarray | None = None  # the prediction before a full prediction started
        self.last_error: BaseException | None = None
        self._dirty: set[str] = set()
        self._refresh_timer = QTimer(self)
        self._refresh_timer.setSingleShot(True)
        self._refresh_timer.setInterval(100)
        self._refresh_timer.timeout.connect(self._refresh_layers)
        self._started = 0.0
        self._budget: float | None = None
        self.preview_every = 3.0  # seconds between previews of the viewed slice during training
        self.checkpoint_every = 30.0  # seconds between checkpoints written into a project

        # settings: the main ones, then the engine's configuration fields, folded away
        self.preset = ComboBox(label="preset", choices=tuple(PRESETS), value="default")
        self.seconds = SpinBox(label="budget (s)", value=60, min=1, max=24 * 3600)
        self.device = ComboBox(label="device", choices=DEVICES, value="auto")
        self.uncertainty_box = CheckBox(label="show uncertainty", value=False)
        defaults = Config()
        self.advanced = Container(
            widgets=[_config_widget(s, n, getattr(getattr(defaults, s), n)) for s, n in ADVANCED]
        )
        self.preset.changed.connect(self._apply_preset)
        self._apply_preset(self.preset.value)
        self.start_button = PushButton(text="Start (new model)")
        self.continue_button = PushButton(text="Continue (Alt-T)")
        self.stop_button = PushButton(text="Stop (Alt-S)")
        self.correct_button = PushButton(text="Use corrections and continue (Alt-A)")
        self.accept_button = PushButton(text="Accept this slice of the prediction")
        self.status = Label(value="Annotate a few slices, then Start.")
        self.corrections_info = Label(value="")
        self.apply_to = _add_layer_combo(napari_viewer, Image, "apply to")
        self.apply_button = PushButton(text="Predict this image")
        self.save_button = PushButton(text="Save model…")
        self.load_button = PushButton(text="Load model…")
        self.progress = QProgressBar()
        self.progress.setRange(0, 1000)
        self.plot = LossPlot()

        layout = QVBoxLayout(self)
        layout.addWidget(Container(widgets=[self.preset, self.seconds, self.device, self.uncertainty_box]).native)
        fold = QGroupBox("advanced settings")
        fold.setCheckable(True)
        fold.setChecked(False)
        fold_layout = QVBoxLayout(fold)
        fold_layout.addWidget(self.advanced.native)
        self.advanced.native.setVisible(False)
        fold.toggled.connect(self.advanced.native.setVisible)
        layout.addWidget(fold)
        buttons = Container(widgets=[self.start_button, self.continue_button, self.stop_button], layout="horizontal")
        layout.addWidget(buttons.native)
        layout.addWidget(self.progress)
        layout.addWidget(self.status.native)
        layout.addWidget(self.plot)
        layout.addWidget(Container(widgets=[self.corrections_info, self.correct_button, self.accept_button]).native)
        model_box = Container(
            widgets=[
                Container(widgets=[self.save_button, self.load_button], layout="horizontal", labels=False),
                self.apply_to,
                self.apply_button,
            ]
        )
        layout.addWidget(model_box.native)
        layout.addStretch(1)

        self.start_button.clicked.connect(lambda: self.start(warm=False))
        self.continue_button.clicked.connect(lambda: self.start(warm=True))
        self.stop_button.clicked.connect(self.stop)
        self.correct_button.clicked.connect(self.use_corrections)
        self.accept_button.clicked.connect(self.accept_current_slice)
        self.apply_button.clicked.connect(lambda: self.apply_model(self.apply_to.value))
        self.save_button.clicked.connect(lambda: self.save_model(None))
        self.load_button.clicked.connect(lambda: self.load_model(None))
        for event in (napari_viewer.layers.events.inserted, napari_viewer.layers.events.removed):
            event.connect(self.reset_choices)
        for key, action in (("Alt-T", lambda: self.start(warm=True)), ("Alt-S", self.stop), ("Alt-A", self.use_corrections)):
            napari_viewer.bind_key(key, lambda _v, f=action: f(), overwrite=True)
        self.state.on_change(self._show_corrections)
        self._update_buttons()

    def _show_corrections(self) -> None:
        found = {a: sorted(s) for a, s in self.state.corrected.items() if s}
        if not found:
            self.corrections_info.value = "corrections: edit the prediction layer on a slice, then use them"
            return
        listed = "   ".join(f"{AXIS_NAMES[a]}: " + ", ".join(map(str, v)) for a, v in found.items())
        self.corrections_info.value = f"corrected slices  {listed}"

    # -- settings -------------------------------------------------------------------------
    def reset_choices(self, *_: Any) -> None:
        self.apply_to.reset_choices()

    def _apply_preset(self, name: str) -> None:
        config = Config.from_preset(name)
        for section, field in ADVANCED:
            self.advanced[f"{section}.{field}"].value = getattr(getattr(config, section), field)
        # interactive default: one pass per window (mirroring costs 8x; tick it for a final result)
        self.advanced["predict.mirror_tta"].value = False

    def config(self) -> Config:
        """The configuration the form describes (the preset with the advanced fields over it)."""
        data = Config.from_preset(self.preset.value).to_dict()
        for section, field in ADVANCED:
            data[section][field] = self.advanced[f"{section}.{field}"].value
        return Config.from_dict(data)

    # -- training -------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self.worker is not None

    def _update_buttons(self) -> None:
        running = self.running
        self.start_button.enabled = not running
        self.continue_button.enabled = not running
        self.stop_button.enabled = running
        self.correct_button.enabled = not running and self.state.prediction_layer is not None
        self.accept_button.enabled = not running and self.state.prediction_layer is not None
        self.apply_button.enabled = not running
        self.save_button.enabled = self.state.model is not None
        self.stop_button.text = "Cancel prediction (Alt-S)" if self.phase == "predicting" else "Stop (Alt-S)"

    def _inputs(self) -> tuple[Any, np.ndarray, dict[int, list[int]]]:
        state = self.state
        if state.image_layer is None or state.labels_layer is None:
            raise ValueError("choose an image layer and its annotation layer in the annotation widget first")
        image = state.image_layer
        if image.rgb or getattr(image, "multiscale", False) or image.ndim != 3:
            raise ValueError(f"layer {image.name!r}: expected a 3D grey image, got ndim={image.ndim}, rgb={image.rgb}")
        labels = np.array(state.labels_layer.data, copy=True)  # a snapshot: painting goes on meanwhile
        if labels.shape != tuple(image.data.shape):
            raise ValueError(
                f"annotation layer {state.labels_layer.name!r} has shape {labels.shape}, the image {tuple(image.data.shape)}"
            )
        return image.data, labels, state.register().as_dict()  # type: ignore[union-attr]

    def start(self, warm: bool = True, max_seconds: float | None = None, max_iterations: int | None = None) -> bool:
        """Train (``warm``: from the current model) for the form's budget, previewing, then predict everything.

        Returns whether a job started; problems are shown as notifications.
        """
        if self.running:
            return False
        try:
            image, labels, slices = self._inputs()
            config = self.config()
        except (TypeError, ValueError) as exc:
            show_error(f"Cannot train: {exc}")
            return False
        state = self.state
        max_seconds = float(self.seconds.value) if max_seconds is None and max_iterations is None else max_seconds
        key = (id(state.image_layer), id(state.labels_layer))
        trainer = state.trainer if (warm and state.trainer is not None and state.trainer_key == key) else None
        init = state.model if (warm and trainer is None) else None
        if warm and trainer is None and init is None and state.project is not None:
            init = state.project.checkpoint("latest")  # resume the project's training
        if init is not None and state.project is not None and init == state.project.checkpoint("latest"):
            config = None  # the checkpoint's own configuration
        if trainer is None and init is None:
            from .data import prepare_annotations

            try:  # say what is wrong with the annotations now, not from the worker a moment later
                prepare_annotations(labels, labels.shape, slices or None)
            except (TypeError, ValueError) as exc:
                show_error(f"Cannot train: {exc}")
                return False
        device = self.device.value
        spacing = state.spacing()
        project = state.project
        self.stop_event, self.cancel_event = threading.Event(), threading.Event()
        self._budget = max_seconds
        if not warm:
            self.plot.clear()

        def job():
            from .checkpoint import as_model
            from .data import as_volume, prepare_annotations
            from .jobs import training_job
            from .project import CheckpointSaver
            from .training import Trainer

            nonlocal trainer, init
            if trainer is None:
                volume = as_volume(image)
                init = None if init is None else as_model(init, name="init")
                class_values = init.sparse3d.class_values if init is not None else None
                annotations = prepare_annotations(labels, volume.spatial_shape, slices, class_values=class_values)
                trainer = Trainer(volume, annotations, spacing=spacing, config=config, device=device, init=init)
            else:
                trainer.update_annotations(labels, slices)
            yield ("trainer", trainer)
            yield from training_job(
                trainer,
                max_seconds=max_seconds,
                max_iterations=max_iterations,
                stop=self.stop_event,
                cancel=self.cancel_event,
                view=lambda: self._view,
                focus=lambda: self._focus,
                preview_every=self.preview_every,
                saver=None if project is None else CheckpointSaver(project, self.checkpoint_every),
            )

        self._launch(job, key)
        return True

    def _launch(self, job: Any, key: tuple | None) -> None:
        from napari.qt.threading import create_worker

        self._key = key
        self._remember_view()
        self.last_error = None
        self.phase = "starting"
        self._started = time.perf_counter()

        def guarded():
            # errors travel as items: superqt drops the error and finished signals of a worker
            # whose work raised RuntimeError (it takes it for a deleted Qt object), and torch
            # raises RuntimeError for many failures
            try:
                yield from job()
            except Exception as exc:  # noqa: BLE001 - every failure must reach the user
                yield ("error", exc)

        self.worker = create_worker(guarded, _ignore_errors=True)
        self.worker.yielded.connect(self._on_yield)
        self.worker.errored.connect(self._on_error)
        self.worker.finished.connect(self._on_finished)
        self.viewer.dims.events.current_step.connect(self._remember_view)
        self.viewer.dims.events.ndisplay.connect(self._remember_view)
        self.viewer.dims.events.order.connect(self._remember_view)
        self.worker.start()
        self._update_buttons()

    def _remember_view(self, *_: Any) -> None:
        # read by the worker thread: plain attribute assignments are atomic
        self._view = self.state.view_region()
        point = self.state.data_point()
        self._focus = None if point is None else tuple(float(p) for p in point)

    def stop(self) -> None:
        """Stop training after the current step (the full prediction follows); a second Stop cancels that."""
        if not self.running:
            return
        if self.phase == "predicting":
            self.cancel_event.set()
        else:
            self.stop_event.set()
        self.status.value = "stopping…"

    # -- what the worker yields (GUI thread) ----------------------------------------------
    def _on_yield(self, item: Any) -> None:
        from .jobs import Phase, Preview
        from .prediction import Block, PredictReport
        from .training import TrainReport

        if isinstance(item, TrainReport):
            self.phase = "training"
            self.plot.add(item.iteration, item.loss)
            self.progress.setValue(int(1000 * item.progress))
            eta = ""
            if item.progress > 0.02 and self._budget:
                eta = f" · ~{max(0.0, item.elapsed / item.progress - item.elapsed):.0f} s left"
            self.status.value = f"training: iteration {item.iteration} · {item.elapsed:.0f} s{eta} · loss {item.loss:.3f}"
        elif isinstance(item, Preview):
            self._paint(item.blocks)
        elif isinstance(item, Block):
            self._paint([item])
        elif isinstance(item, PredictReport):
            self.progress.setValue(int(1000 * item.progress))
            self.status.value = f"predicting: {item.windows_done}/{item.windows_total} windows · {item.elapsed:.0f} s"
        elif isinstance(item, Phase):
            self.phase = item.name
            if item.name == "predicting":
                layer = self.state.prediction_layer
                self.backup = None if layer is None else np.array(layer.data, copy=True)
                self.progress.setValue(0)
            elif item.name == "cancelled":
                self._restore_backup()
            elif item.name == "done":
                self.state.reset_corrections()
                self._save_prediction()
            self._update_buttons()
        elif isinstance(item, tuple) and item[0] == "trainer":
            trainer = item[1]
            if getattr(self, "_key", None) is not None:
                self.state.trainer, self.state.trainer_key = trainer, self._key
            self.state.model = trainer.model
            self._class_values = list(trainer.class_values)
            self._update_buttons()
        elif isinstance(item, tuple) and item[0] == "error":
            self._on_error(item[1])
        elif isinstance(item, tuple) and item[0] == "target":
            self._target_layer = item[1]

    def _prediction_layer(self) -> Any:
        target = getattr(self, "_target_layer", None)
        if target is not None:
            return target
        state = self.state
        if state.prediction_layer is None or state.prediction_layer not in self.viewer.layers:
            image = state.image_layer
            layer = self.viewer.add_labels(
                np.zeros(image.data.shape[-3:], np.uint8),
                name="prediction",
                scale=tuple(image.scale[-3:]),
                translate=tuple(image.translate[-3:]),
                opacity=0.5,
            )
            layer.metadata[METADATA_KEY] = {"role": "prediction"}
            state.adopt_prediction(layer)
            # keep the user's annotation layer selected for painting
            if state.labels_layer is not None:
                self.viewer.layers.selection.active = state.labels_layer
        return state.prediction_layer

    def _paint(self, blocks: list[Any]) -> None:
        layer = self._prediction_layer()
        data = layer.data
        own = getattr(self, "_target_layer", None) is None  # not "apply to another layer"
        show_uncertainty = self.uncertainty_box.value and own
        # kept even when not shown: "Most uncertain slice" reads it
        if own and (self.state.uncertainty is None or self.state.uncertainty.shape != data.shape):
            self.state.uncertainty = np.zeros(data.shape, np.float32)
        for block in blocks:
            values = block.labels
            if values.max(initial=0) > np.iinfo(data.dtype).max:
                layer.data = data = data.astype(np.uint16)
            data[block.region] = values
            if own:
                self.state.uncertainty[block.region] = uncertainty(block.probabilities)  # type: ignore[index]
        self._dirty.add("prediction")
        if show_uncertainty:
            self._dirty.add("uncertainty")
        if not self._refresh_timer.isActive():
            self._refresh_timer.start()

    def _refresh_layers(self) -> None:
        if "prediction" in self._dirty:
            self._prediction_layer().refresh()
        if "uncertainty" in self._dirty and self.state.uncertainty is not None:
            state = self.state
            if state.uncertainty_layer is None or state.uncertainty_layer not in self.viewer.layers:
                image = state.image_layer
                state.uncertainty_layer = self.viewer.add_image(
                    state.uncertainty,
                    name="uncertainty",
                    scale=tuple(image.scale[-3:]),
                    translate=tuple(image.translate[-3:]),
                    colormap="magma",
                    contrast_limits=(0.0, 1.0),
                    blending="additive",
                    visible=True,
                )
            else:
                state.uncertainty_layer.data = state.uncertainty
                state.uncertainty_layer.refresh()
        self._dirty.clear()

    def _save_prediction(self) -> None:
        state = self.state
        if state.project is None or state.prediction_layer is None or getattr(self, "_target_layer", None) is not None:
            return
        self._refresh_timer.stop()
        self._refresh_layers()
        try:
            state.project.save_prediction(np.asarray(state.prediction_layer.data))
        except (OSError, ValueError) as exc:
            show_error(f"Prediction NOT saved to {state.project.path}: {exc}")

    def _restore_backup(self) -> None:
        layer = self.state.prediction_layer
        if self.backup is not None and layer is not None and getattr(self, "_target_layer", None) is None:
            layer.data[...] = self.backup
            layer.refresh()
        self.backup = None

    def _on_error(self, exc: BaseException) -> None:
        self.last_error = exc
        if self.phase == "predicting":
            self._restore_backup()
        show_error(f"napari-sparse3d: {'prediction' if self.phase == 'predicting' else 'training'} failed: {exc}")

    def _on_finished(self) -> None:
        for event in (self.viewer.dims.events.current_step, self.viewer.dims.events.ndisplay, self.viewer.dims.events.order):
            event.disconnect(self._remember_view)
        self._refresh_timer.stop()
        self._refresh_layers()
        elapsed = time.perf_counter() - self._started
        if self.last_error is None:
            self.status.value = f"{'cancelled' if self.phase == 'cancelled' else 'done'} after {elapsed:.0f} s"
            self.progress.setValue(1000)
        else:
            self.status.value = f"failed: {self.last_error}"
        self.worker = None
        self.phase = "idle"
        self._target_layer = None
        self._update_buttons()

    # -- corrections ----------------------------------------------------------------------
    def use_corrections(self) -> list[tuple[int, int]]:
        """Turn the corrected slices of the prediction into annotations and continue training."""
        if self.running:
            return []
        state = self.state
        if state.prediction_layer is None or state.labels_layer is None:
            show_warning("Nothing to correct yet: train first, then fix the prediction layer where it is wrong.")
            return []
        slices = state.corrected_slices()
        if not slices:
            show_warning("No corrected slice found: edit the prediction layer in a 2D view first.")
            return []
        accepted = self._accept(slices)
        self.start(warm=True)
        return accepted

    def accept_current_slice(self) -> list[tuple[int, int]]:
        """The prediction on the slice on screen is right: make it an annotated slice."""
        current = self.state.current_slice()
        if self.state.prediction_layer is None or current is None:
            show_warning("Show a 2D slice of a predicted volume to accept it.")
            return []
        return self._accept({current[0]: [current[1]]})

    def _accept(self, slices: dict[int, list[int]]) -> list[tuple[int, int]]:
        state = self.state
        labels_layer = state.labels_layer
        prediction = np.asarray(state.prediction_layer.data)
        if prediction.max(initial=0) > np.iinfo(labels_layer.data.dtype).max if labels_layer.data.dtype.kind in "ui" else False:
            labels_layer.data = labels_layer.data.astype(np.uint16)
        accepted = accept_slices(labels_layer.data, prediction, state.register(), slices)
        labels_layer.refresh()
        state.reset_corrections()
        show_info(f"{len(accepted)} slice(s) added to the annotations: " + ", ".join(f"{AXIS_NAMES[a]}={i}" for a, i in accepted))
        return accepted

    # -- models ---------------------------------------------------------------------------
    def save_model(self, path: str | None) -> str | None:
        if self.state.model is None:
            show_warning("No model to save yet.")
            return None
        if path is None:
            path, _ = QFileDialog.getSaveFileName(self, "Save model", "model.pt", "Checkpoints (*.pt)")
            if not path:
                return None
        from .checkpoint import save_checkpoint

        try:
            save_checkpoint(self.state.model, path)
        except (OSError, ValueError) as exc:
            show_error(f"Could not save the model to {path}: {exc}")
            return None
        show_info(f"Model saved to {path}")
        return str(path)

    def load_model(self, path: str | None) -> Any:
        if path is None:
            path, _ = QFileDialog.getOpenFileName(self, "Load model", "", "Checkpoints (*.pt)")
            if not path:
                return None
        from .checkpoint import load_checkpoint

        try:
            model = load_checkpoint(path)
        except (OSError, ValueError, TypeError) as exc:
            show_error(f"Could not load a model from {path}: {exc}")
            return None
        self.state.model = model
        self.state.trainer = None  # Continue warm-starts from the loaded weights
        self._update_buttons()
        show_info(f"Model loaded from {path}: classes {model.sparse3d.class_values}")
        return model

    def apply_model(self, layer: Any) -> Any:
        """Predict an image layer with the current model into a new Labels layer, block by block."""
        if self.running:
            return None
        if self.state.model is None:
            show_warning("No model yet: train one or load one.")
            return None
        if layer is None or layer.ndim != 3 or layer.rgb:
            show_error(f"Cannot predict {getattr(layer, 'name', layer)!r}: choose a 3D grey image layer.")
            return None
        target = self.viewer.add_labels(
            np.zeros(layer.data.shape, np.uint8),
            name=f"{layer.name} prediction",
            scale=tuple(layer.scale),
            translate=tuple(layer.translate),
            opacity=0.5,
        )
        model, device = self.state.model, self.device.value
        self.stop_event, self.cancel_event = threading.Event(), threading.Event()
        self._budget = None

        def job():
            from .data import as_volume
            from .jobs import prediction_job

            yield ("target", target)
            yield from prediction_job(as_volume(layer.data), model, device=device, cancel=self.cancel_event)

        self._launch(job, None)
        self.phase = "predicting"
        return target

