"""The training dock: settings form, Start / Continue / Stop, progress and loss plot,
streaming predictions, corrections, model save / load / apply."""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np
from magicgui.widgets import Container, Label, PushButton
from napari.layers import Image
from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import QFileDialog, QProgressBar, QVBoxLayout

from ._dock import DockWidget, _on_close, add_layer_like, layer_combo
from ._loss_plot import LossPlot
from ._settings import SettingsForm
from ._state import METADATA_KEY
from .config import Config
from .session import AXIS_NAMES, accept_slices, uncertainty

__all__ = ["TrainingWidget"]

class TrainingWidget(DockWidget):
    """Train in the background, watch predictions stream in, correct, continue; save, load and apply models."""

    def __init__(self, napari_viewer: Any) -> None:
        super().__init__(napari_viewer)
        napari_viewer = self.viewer
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

        self.settings = SettingsForm()
        form = self.settings
        self.preset, self.seconds, self.device = form.preset, form.seconds, form.device
        self.uncertainty_box, self.advanced = form.uncertainty_box, form.advanced
        self.start_button = PushButton(text="Start (new model)")
        self.continue_button = PushButton(text="Continue (Alt-T)")
        self.stop_button = PushButton(text="Stop (Alt-S)")
        self.correct_button = PushButton(text="Use corrections and continue (Alt-A)")
        self.accept_button = PushButton(text="Accept this slice of the prediction")
        self.status = Label(value="Annotate a few slices, then Start.")
        self.corrections_info = Label(value="")
        self.apply_to = layer_combo(napari_viewer, Image, "apply to")
        self.apply_button = PushButton(text="Predict this image")
        self.save_button = PushButton(text="Save model…")
        self.load_button = PushButton(text="Load model…")
        self.progress = QProgressBar()
        self.progress.setRange(0, 1000)
        self.plot = LossPlot()

        layout = QVBoxLayout(self)
        layout.addWidget(self.settings)
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
        self.bind_keys([("Alt-T", lambda: self.start(warm=True)), ("Alt-S", self.stop), ("Alt-A", self.use_corrections)])
        self.state.on_change(self._show_corrections)
        self._job_done = threading.Event()
        self._job_done.set()
        window = getattr(getattr(self.viewer, "window", None), "_qt_window", None)
        if window is not None:
            _on_close(window, self._viewer_closing)
        self._update_buttons()

    #: Seconds napari waits, when its window closes mid-training, for the step in progress
    #: to finish and the final checkpoint to be written into the project.
    CLOSE_TIMEOUT = 60.0

    def _viewer_closing(self) -> None:
        """The window closes: stop the job; training ends with its final checkpoint in the project."""
        if not self.running:
            return
        self.cancel_event.set()
        self.stop_event.set()
        if not self._job_done.wait(self.CLOSE_TIMEOUT):
            show_warning(f"napari-sparse3d: the training job did not stop within {self.CLOSE_TIMEOUT:.0f} s")
            return
        # the window goes: its finished signal may never be handled, so let go of the job here
        # (it holds the trainer, the model and the optimiser)
        self.worker = None
        self.backup = None

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

    def config(self) -> Config:
        """The configuration the settings form describes."""
        return self.settings.config()

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
            try:
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
            finally:
                trainer = init = None  # the state keeps what it needs; the worker must not

        self._launch(job, key)
        return True

    def _launch(self, job: Any, key: tuple | None) -> None:
        from napari.qt.threading import create_worker

        self._key = key
        self._remember_view()
        self.last_error = None
        self.phase = "starting"
        self._started = time.perf_counter()

        done = self._job_done = threading.Event()

        def guarded():
            # errors travel as items: superqt drops the error and finished signals of a worker
            # whose work raised RuntimeError (it takes it for a deleted Qt object), and torch
            # raises RuntimeError for many failures
            try:
                yield from job()
            except Exception as exc:  # noqa: BLE001 - every failure must reach the user
                yield ("error", exc)
            finally:
                done.set()  # the final checkpoint is written: closing napari may go on

        self.worker = create_worker(guarded, _ignore_errors=True)
        self.worker.yielded.connect(self._on_yield)
        self.worker.errored.connect(self._on_error)
        self.worker.finished.connect(self._on_finished)
        self.viewer.dims.events.current_step.connect(self._remember_view)
        self.viewer.dims.events.ndisplay.connect(self._remember_view)
        self.viewer.dims.events.order.connect(self._remember_view)
        self.state.job_started()
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
            skipped = f" · {item.skipped} non-finite steps skipped" if item.skipped else ""
            self.status.value = (
                f"training: iteration {item.iteration} · {item.elapsed:.0f} s{eta} · loss {item.loss:.3f}{skipped}"
            )
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
            layer = add_layer_like(self.viewer, image, np.zeros(image.data.shape[-3:], np.uint8), name="prediction", opacity=0.5)
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
            data = _fit_dtype(layer, block.labels)
            data[block.region] = block.labels
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
                state.uncertainty_layer = add_layer_like(
                    self.viewer,
                    image,
                    state.uncertainty,
                    "image",
                    name="uncertainty",
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
        self.state.job_finished()
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
        accepted = accept_slices(_fit_dtype(labels_layer, prediction), prediction, state.register(), slices)
        labels_layer.refresh()
        state.edited("annotations")  # in place, without a layer event (also when the slice was marked already)
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
            # a copy taken between two optimiser steps: the worker may be training this model
            save_checkpoint(self.state.model_snapshot(), path)
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
        target = add_layer_like(self.viewer, layer, np.zeros(layer.data.shape, np.uint8), name=f"{layer.name} prediction", opacity=0.5)
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


def _fit_dtype(layer: Any, values: np.ndarray) -> np.ndarray:
    """The layer's data, widened first if ``values`` do not fit its integer type."""
    data = layer.data
    if np.asarray(values).max(initial=0) > np.iinfo(data.dtype).max:
        layer.data = data = data.astype(np.promote_types(data.dtype, np.min_scalar_type(np.asarray(values).max())))
    return data
