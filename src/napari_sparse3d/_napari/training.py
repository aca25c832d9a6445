"""The training dock: Start / Continue / Stop, wiring small parts, each in its own module:

- :class:`~napari_sparse3d._napari.settings.SettingsForm`: preset, budget, device, advanced settings;
- :class:`~napari_sparse3d._napari.training_run.TrainingRun`: what Start / Continue trains on, and its job;
- :class:`~napari_sparse3d._napari.extra_volumes.ExtraVolumesBox`: other image/annotation pairs it also learns from;
- :class:`~napari_sparse3d._napari.runner.JobRunner`: the worker thread of the job that runs;
- :class:`~napari_sparse3d._napari.progress.ProgressView`: progress bar, status line, loss plot;
- :class:`~napari_sparse3d._napari.painter.PredictionPainter`: predicted blocks into napari layers;
- :class:`~napari_sparse3d._napari.corrections_box.CorrectionsBox`: corrected slices into annotations;
- :class:`~napari_sparse3d._napari.model_box.ModelBox`: save, load, apply models.

A job (:mod:`napari_sparse3d.loop.jobs`) yields typed items; :meth:`TrainingWidget._on_yield` hands
each to the handler of its type, on the GUI thread.  The errors of the dock and its parts are shown
through this module's ``show_error``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from functools import partial
from typing import TYPE_CHECKING, Any

from magicgui.widgets import Container, PushButton
from napari.utils.notifications import show_error

from napari_sparse3d._napari.corrections_box import CorrectionsBox
from napari_sparse3d._napari.dock import DockWidget
from napari_sparse3d._napari.extra_volumes import ExtraVolumesBox
from napari_sparse3d._napari.instances_box import InstancesBox
from napari_sparse3d._napari.model_box import ModelBox
from napari_sparse3d._napari.painter import PredictionPainter, PredictionTarget
from napari_sparse3d._napari.progress import ProgressView
from napari_sparse3d._napari.runner import Job, JobRunner
from napari_sparse3d._napari.settings import SettingsForm
from napari_sparse3d._napari.training_run import TrainingRun
from napari_sparse3d.loop.jobs import JobFailed, Phase, Preview, TrainerReady, prediction_job

if TYPE_CHECKING:
    from napari import Viewer
    from napari.layers import Image, Labels
    from napari.qt.threading import GeneratorWorker

    from napari_sparse3d.config import Config
    from napari_sparse3d.engine.model import UNet3D
    from napari_sparse3d.engine.prediction import Block
    from napari_sparse3d.engine.training import TrainReport

__all__ = ["TrainingWidget"]


class TrainingWidget(DockWidget):
    """Train in the background, watch predictions stream in, correct, continue; save, load and apply models."""

    #: Seconds napari waits, when its window closes mid-training, for the step in progress
    #: to finish and the final checkpoint to be written into the project.
    CLOSE_TIMEOUT = 60.0

    def __init__(self, napari_viewer: Viewer) -> None:
        super().__init__(napari_viewer)
        self.phase = "idle"  # then "starting", and what the job says: "training", "predicting", "cancelled", "done"
        self.last_error: BaseException | None = None
        self.preview_every = 3.0  # seconds between previews of the viewed slice during training
        self.checkpoint_every = 30.0  # seconds between checkpoints written into a project
        self._trainer_key: tuple[int, ...] | None = None  # the layers the running training job trains on
        self._handlers: dict[type, Callable[[Any], None]] = {}  # filled by the first item (see _on_yield)

        self.settings = form = SettingsForm()
        self.preset, self.seconds, self.device = form.preset, form.seconds, form.device
        self.uncertainty_box, self.advanced = form.uncertainty_box, form.advanced
        self.start_button = PushButton(text="Start (new model)")
        self.continue_button = PushButton(text="Continue (Alt-T)")
        self.stop_button = PushButton(text="Stop (Alt-S)")
        self.three_d_button = PushButton(text="Show 3D result")
        self.extra = ExtraVolumesBox(self.viewer, self.state, error=self._error)
        self.progress_view = ProgressView()
        self.status, self.progress, self.plot = self.progress_view.status, self.progress_view.bar, self.progress_view.plot
        self.corrections = CorrectionsBox(self.state)
        self.models = ModelBox(self.viewer, self.state, error=self._error)
        self.instances = InstancesBox(self.viewer, self.state, error=self._error)
        self.runner = JobRunner(self.viewer, self.state, parent=self)
        self.painter = PredictionPainter(
            self.viewer, self.state, show_uncertainty=lambda: self.uncertainty_box.value, error=self._error, parent=self
        )

        layout = self.scrolling_column()
        layout.addWidget(self.settings)
        buttons = Container(widgets=[self.start_button, self.continue_button, self.stop_button], layout="horizontal")
        layout.addWidget(buttons.native)
        layout.addWidget(self.progress_view)
        layout.addWidget(self.three_d_button.native)
        layout.addWidget(self.corrections)
        layout.addWidget(self.extra)
        layout.addWidget(self.models)
        layout.addWidget(self.instances)
        layout.addStretch(1)

        self.start_button.clicked.connect(lambda: self.start(warm=False))
        self.continue_button.clicked.connect(lambda: self.start(warm=True))
        self.stop_button.clicked.connect(self.stop)
        self.three_d_button.clicked.connect(self.show_3d)
        self.corrections.correct_button.clicked.connect(self.use_corrections)
        self.corrections.accept_button.clicked.connect(self.accept_current_slice)
        self.models.apply_button.clicked.connect(lambda: self.apply_model(self.models.apply_to.value))
        self.models.save_button.clicked.connect(lambda: self.save_model(None))
        self.models.load_button.clicked.connect(lambda: self.load_model(None))
        self.bind_keys([("Alt-T", lambda: self.start(warm=True)), ("Alt-S", self.stop), ("Alt-A", self.use_corrections)])
        self.on_window_close(self._viewer_closing)
        self._update_buttons()

    # -- what the parts hold ----------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self.runner.running

    @property
    def worker(self) -> GeneratorWorker | None:
        return self.runner.worker

    @property
    def stop_event(self) -> threading.Event:
        return self.runner.stop_event

    @property
    def cancel_event(self) -> threading.Event:
        return self.runner.cancel_event

    @property
    def _job_done(self) -> threading.Event:
        return self.runner.done

    def reset_choices(self, *_: object) -> None:
        self.models.apply_to.reset_choices()
        self.extra.reset_choices()

    def config(self) -> Config:
        """The configuration the settings form describes."""
        return self.settings.config()

    def _error(self, message: str) -> None:
        show_error(message)  # this module's name, looked up now: tests replace it

    def _update_buttons(self) -> None:
        running = self.running
        self.start_button.enabled = not running
        self.continue_button.enabled = not running
        self.extra.enable(not running)
        self.stop_button.enabled = running
        self.stop_button.text = "Cancel prediction (Alt-S)" if self.phase == "predicting" else "Stop (Alt-S)"
        self.corrections.enable(not running and self.state.prediction_layer is not None)
        self.models.enable(running=running)
        self.instances.enable(running)

    # -- training -------------------------------------------------------------------------
    def start(self, warm: bool = True, max_seconds: float | None = None, max_iterations: int | None = None) -> bool:
        """Train (``warm``: from the current model) for the form's budget, previewing, then predict everything.

        Returns whether a job started; problems are shown as notifications.
        """
        if self.running:
            return False
        try:
            run = TrainingRun.read(
                self.state, warm=warm, config=self.config(), device=self.device.value, extra=list(self.extra.pairs)
            )
        except (TypeError, ValueError) as exc:
            self._error(f"Cannot train: {exc}")
            return False
        if max_seconds is None and max_iterations is None:
            max_seconds = float(self.seconds.value)
        runner = self.runner
        job = partial(
            run.job,
            max_seconds=max_seconds,
            max_iterations=max_iterations,
            view=lambda: runner.view,
            focus=lambda: runner.focus,
            preview_every=self.preview_every,
            checkpoint_every=self.checkpoint_every,
        )
        self._trainer_key = run.key
        self.progress_view.begin(budgeted=bool(max_seconds), clear_plot=not warm)
        self._launch(job)
        return True

    def stop(self) -> None:
        """Stop training after the current step (the full prediction follows); a second Stop cancels that."""
        if not self.running:
            return
        self.runner.stop(cancel=self.phase == "predicting")
        self.status.value = "stopping…"

    def _launch(self, job: Job) -> None:
        self.last_error = None
        self.phase = "starting"
        self.scroll_to(self.progress_view)  # a dock short of room shows the job's progress
        self.runner.launch(job, on_item=self._on_yield, on_error=self._on_error, on_finished=self._on_finished)
        self._update_buttons()

    def _viewer_closing(self) -> None:
        """The window closes: stop the job; training ends with its final checkpoint in the project."""
        if self.runner.close(self.CLOSE_TIMEOUT):
            self.painter.backup = None

    # -- what the job yields (GUI thread) ---------------------------------------------------
    def _on_yield(self, item: object) -> None:
        if not self._handlers:
            self._handlers = self._item_handlers()
        handler = self._handlers.get(type(item))
        if handler is None:
            raise TypeError(f"napari-sparse3d: a job yielded {item!r}, which the training dock does not handle")
        handler(item)

    def _item_handlers(self) -> dict[type, Callable[[Any], None]]:
        """The handler of each type of item; the engine's types import torch, so this waits for the first item."""
        from napari_sparse3d.engine.prediction import Block, PredictReport
        from napari_sparse3d.engine.training import TrainReport

        return {
            TrainReport: self._on_train_report,
            PredictReport: self.progress_view.predicting,
            Preview: lambda preview: self._paint(preview.blocks),
            Block: lambda block: self._paint([block]),
            Phase: self._on_phase,
            TrainerReady: self._on_trainer,
            PredictionTarget: self._on_target,
            JobFailed: lambda failed: self._on_error(failed.error),
        }

    def _on_train_report(self, report: TrainReport) -> None:
        self.phase = "training"
        self.progress_view.training(report)

    def _paint(self, blocks: list[Block]) -> None:
        self.painter.paint(blocks)

    def _prediction_layer(self) -> Labels:
        return self.painter.layer()

    def _on_phase(self, phase: Phase) -> None:
        self.phase = phase.name
        if phase.name == "predicting":
            self.painter.keep_backup()
            self.progress_view.restart()
        elif phase.name == "cancelled":
            self.painter.restore_backup()
        elif phase.name == "done":
            self.state.reset_corrections()
            self.painter.save_to_project()
        self._update_buttons()

    def _on_trainer(self, ready: TrainerReady) -> None:
        if self._trainer_key is not None:
            self.state.trainer, self.state.trainer_key = ready.trainer, self._trainer_key
        self.state.model = ready.trainer.model
        self._update_buttons()

    def _on_target(self, target: PredictionTarget) -> None:
        self.painter.target = target.layer

    def _on_error(self, exc: BaseException) -> None:
        self.last_error = exc
        if self.phase == "predicting":
            self.painter.restore_backup()
        self._error(f"napari-sparse3d: {'prediction' if self.phase == 'predicting' else 'training'} failed: {exc}")

    def _on_finished(self, seconds: float) -> None:
        self.painter.flush()
        self.progress_view.finished(seconds, cancelled=self.phase == "cancelled", error=self.last_error)
        self.phase = "idle"
        self.painter.target = None
        self._update_buttons()

    def show_3d(self) -> Any:
        """The prediction in 3D, in the orthogonal views dock (opened if needed); training goes on."""
        _, views = self.viewer.window.add_plugin_dock_widget("napari-sparse3d", "Orthogonal views")
        if views.three_d is None:
            views.toggle_3d()
        return views

    # -- corrections ----------------------------------------------------------------------
    def use_corrections(self) -> list[tuple[int, int]]:
        """Turn the corrected slices of the prediction into annotations and continue training."""
        if self.running:
            return []
        accepted = self.corrections.accept_corrections()
        if accepted is None:
            return []
        self.start(warm=True)
        return accepted

    def accept_current_slice(self) -> list[tuple[int, int]]:
        """The prediction on the slice on screen is right: make it an annotated slice."""
        return self.corrections.accept_current_slice()

    # -- models ---------------------------------------------------------------------------
    def save_model(self, path: str | None) -> str | None:
        return self.models.save(path)

    def load_model(self, path: str | None) -> UNet3D | None:
        model = self.models.load(path)
        self._update_buttons()
        return model

    def apply_model(self, layer: Image | None) -> Labels | None:
        """Predict an image layer with the current model into a new Labels layer, block by block."""
        if self.running:
            return None
        target = self.models.new_target(layer)
        if layer is None or target is None:
            return None
        image, model, device = layer.data, self.state.model, self.device.value

        def job(stop: threading.Event, cancel: threading.Event) -> Iterator[object]:
            yield PredictionTarget(target)
            yield from prediction_job(image, model, device=device, cancel=cancel)

        self._trainer_key = None
        self.progress_view.begin(budgeted=False, clear_plot=False)
        self._launch(job)
        self.phase = "predicting"
        return target
