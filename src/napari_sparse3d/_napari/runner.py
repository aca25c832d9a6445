"""Runs the training dock's jobs in a worker thread, one at a time.

A job is a generator function of two flags, ``stop`` and ``cancel``
(see :mod:`napari_sparse3d.loop.jobs`); :class:`JobRunner` runs it in a napari
worker, hands every item it yields to the GUI thread, keeps the region on
screen where the worker can read it, and reports the job's end.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from napari.utils.notifications import show_warning
from qtpy.QtCore import QObject

from napari_sparse3d.loop.jobs import JobFailed

if TYPE_CHECKING:
    from napari import Viewer
    from napari.qt.threading import GeneratorWorker
    from napari.utils.events import EventEmitter

    from napari_sparse3d._napari.state import LoopState

__all__ = ["Job", "JobRunner"]

#: What the dock runs: called in the worker thread with the job's ``stop`` and ``cancel`` flags.
Job = Callable[[threading.Event, threading.Event], Iterator[object]]


class JobRunner(QObject):
    """One background job at a time: its worker, its stop and cancel flags, the view it reads, its end."""

    def __init__(self, viewer: Viewer, state: LoopState, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.viewer = viewer
        self.state = state
        self.worker: GeneratorWorker | None = None
        self.stop_event = threading.Event()  # ends training after the current step
        self.cancel_event = threading.Event()  # ends the job, also its full prediction
        #: set when the job's generator has ended (after its final checkpoint); set while none runs
        self.done = threading.Event()
        self.done.set()
        self.started = 0.0
        # where the user looks, for previews and the order of the full prediction; written here,
        # read by the worker thread (plain attribute assignments are atomic)
        self.view: tuple[slice, slice, slice] | None = None
        self.focus: tuple[float, ...] | None = None
        self._when_finished: Callable[[float], None] | None = None

    @property
    def running(self) -> bool:
        return self.worker is not None

    def launch(
        self,
        job: Job,
        *,
        on_item: Callable[[object], None],
        on_error: Callable[[BaseException], None],
        on_finished: Callable[[float], None],
    ) -> None:
        """Run ``job`` in a worker: ``on_item(item)`` for what it yields, ``on_finished(seconds)`` at its end."""
        from napari.qt.threading import create_worker

        # fresh flags for this job: a Stop of the last job must not end this one
        stop = self.stop_event = threading.Event()
        cancel = self.cancel_event = threading.Event()
        done = self.done = threading.Event()

        def guarded() -> Iterator[object]:
            # errors travel as items: superqt drops the error and finished signals of a worker
            # whose work raised RuntimeError (it takes it for a deleted Qt object), and torch
            # raises RuntimeError for many failures
            try:
                yield from job(stop, cancel)
            except Exception as exc:
                yield JobFailed(exc)
            finally:
                done.set()  # the final checkpoint is written: closing napari may go on

        self.remember_view()
        self.started = time.perf_counter()
        self._when_finished = on_finished
        self.worker = create_worker(guarded, _ignore_errors=True)
        self.worker.yielded.connect(on_item)
        self.worker.errored.connect(on_error)
        self.worker.finished.connect(self._finished)
        for event in self._view_events():
            event.connect(self.remember_view)
        self.state.job_started()
        self.worker.start()

    def stop(self, *, cancel: bool) -> None:
        """Ask the job to stop training after the current step, or (``cancel``) to end at once."""
        (self.cancel_event if cancel else self.stop_event).set()

    def close(self, timeout: float) -> bool:
        """The window closes: end the job and wait for it (training writes its final checkpoint).

        Returns whether a job ended and was let go of; warns when it did not end within ``timeout`` seconds.
        """
        if not self.running:
            return False
        self.cancel_event.set()
        self.stop_event.set()
        if not self.done.wait(timeout):
            show_warning(f"napari-sparse3d: the training job did not stop within {timeout:.0f} s")
            return False
        # the window goes: its finished signal may never be handled, so let go of the job here
        # (it holds the trainer, the model and the optimiser)
        self.worker = None
        return True

    def remember_view(self, *_: object) -> None:
        self.view = self.state.view_region()
        point = self.state.data_point()
        self.focus = None if point is None else tuple(float(p) for p in point)

    def _view_events(self) -> tuple[EventEmitter, ...]:
        dims = self.viewer.dims.events
        return (dims.current_step, dims.ndisplay, dims.order)

    def _finished(self) -> None:
        for event in self._view_events():
            event.disconnect(self.remember_view)
        elapsed = time.perf_counter() - self.started
        self.worker = None
        self.state.job_finished()
        when_finished, self._when_finished = self._when_finished, None
        if when_finished is not None:
            when_finished(elapsed)
