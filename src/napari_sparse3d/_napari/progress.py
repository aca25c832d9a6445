"""How the training dock shows a running job: a progress bar, one status line and the loss plot.

The job's progress also goes to napari's activity dock (a :class:`napari.utils.progress`
bar beside other plugins' jobs), updated at most every ``NAPARI_EVERY`` seconds: napari's
bar processes Qt events on each update.

While a napari progress bar exists, napari's status bar plays an animated "in progress" GIF
at about 33 frames a second. Each frame repaints the main window, and with OpenGL canvases
in it Qt composes the whole window again. Under software OpenGL (llvmpipe: Xvfb, VNC and
remote desktops) that costs milliseconds to tens of milliseconds of the GUI thread per frame,
growing with the window's size, with the GIL held, since napari's main window handles its
events in Python. The training thread then waits for the GIL on almost every torch call.
Measured on the 2-core VM (the responsiveness test, 10 s of training): in a 1154x978 window
the job took 27-30 s with the GIF at full speed and 21-23 s at ``INDICATOR_FPS``; in a
1141x2139 window the pixel classifier's fit alone took 50 s instead of 5 s. So while a job of
ours runs, the GIF plays at ``INDICATOR_FPS`` frames a second; its speed is restored when the
job ends.
"""

from __future__ import annotations

import contextlib
import math
import time
from typing import TYPE_CHECKING, Any

from magicgui.widgets import Label
from qtpy.QtGui import QMovie
from qtpy.QtWidgets import QLabel, QProgressBar, QVBoxLayout, QWidget

from napari_sparse3d._napari.loss_plot import LossPlot

if TYPE_CHECKING:
    from napari_sparse3d.engine.prediction import PredictReport
    from napari_sparse3d.engine.training import TrainReport

__all__ = ["ProgressView"]

#: The progress bar counts in thousandths.
STEPS = 1000
#: Seconds between two updates of napari's activity bar.
NAPARI_EVERY = 0.5
#: Frames a second of napari's "in progress" animation while a job of ours runs (see above).
INDICATOR_FPS = 3.0


def indicator_movie(widget: QWidget) -> QMovie | None:
    """The QMovie of napari's "in progress" indicator in the window holding ``widget``, if found.

    These are napari's private widgets (``_activity_dialog._toggleButton._inProgressIndicator``
    in napari 0.4.19 to 0.9); where a napari version has moved them this returns None and
    the animation is left alone.
    """
    parent: Any = widget
    while parent is not None and not hasattr(parent, "_activity_dialog"):
        parent = parent.parentWidget()
    toggle = getattr(getattr(parent, "_activity_dialog", None), "_toggleButton", None)
    label = getattr(toggle, "_inProgressIndicator", None)
    movie = label.movie() if isinstance(label, QLabel) else None
    return movie if isinstance(movie, QMovie) else None


class ProgressView(QWidget):
    """Progress bar, status line and loss plot, fed with the job's reports."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.bar = QProgressBar()
        self.bar.setRange(0, STEPS)
        self.status = Label(value="Annotate a few slices, then Start.")
        self.plot = LossPlot()
        self.budgeted = False  # the job trains for a time budget: show the time left
        self.val_dice: float | None = None
        self.activity: Any = None  # the job's napari.utils.progress (napari's activity dock shows it)
        self._opened = 0  # counts bars opened and closed (see _open_activity)
        self._activity_shown = (-1.0, -1)  # when, and at which value, it was last updated
        self._indicator: tuple[QMovie, int] | None = None  # napari's animation we slowed, and its speed
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.bar)
        layout.addWidget(self.status.native)
        layout.addWidget(self.plot)

    def begin(self, *, budgeted: bool, clear_plot: bool) -> None:
        """A job starts; ``clear_plot`` for a new model (a continued one extends its curve)."""
        self.budgeted = budgeted
        self.val_dice = None  # the latest validation Dice of this job (measured every few steps)
        if clear_plot:
            self.plot.clear()
        self._close_activity()
        self._open_activity("napari-sparse3d: starting")
        self._slow_indicator()

    def _slow_indicator(self) -> None:
        movie = indicator_movie(self)
        if movie is None or self._indicator is not None:
            return
        delay = movie.nextFrameDelay() or 30  # ms; 0 before the first frame
        speed = movie.speed()
        movie.setSpeed(max(1, min(speed, round(100 * delay * INDICATOR_FPS / 1000))))
        self._indicator = (movie, speed)

    def _to_activity(self, value: int, description: str) -> None:
        """Napari's bar follows the dock's, at most every NAPARI_EVERY seconds (call it last: it runs Qt events)."""
        activity = self.activity
        now = time.perf_counter()
        if activity is None or now - self._activity_shown[0] < NAPARI_EVERY or value == self._activity_shown[1]:
            return
        self._activity_shown = (now, value)
        activity.set_description(description)
        activity.update(max(0, value - activity.n))

    def _open_activity(self, description: str) -> None:
        """A new bar in napari's activity dock.

        napari builds the bar's widget inside ``progress()`` and runs Qt events
        there, so the job's next items, even its end, can be handled before
        ``progress()`` returns: a bar whose job ended meanwhile is closed at once
        instead of staying in the dock for good.
        """
        from napari.utils import progress

        self._opened += 1
        ticket = self._opened
        activity = progress(total=STEPS, desc=description)
        if ticket != self._opened:  # closed (or another bar opened) while napari built this one
            activity.close()
            return
        self.activity = activity
        self._activity_shown = (-1.0, -1)

    def _close_activity(self) -> None:
        self._opened += 1  # a bar still being built is closed when it is done
        activity, self.activity = self.activity, None
        if activity is not None:
            activity.close()
        indicator, self._indicator = self._indicator, None
        if indicator is not None:
            with contextlib.suppress(RuntimeError):  # napari's window may already be gone
                indicator[0].setSpeed(indicator[1])

    def training(self, report: TrainReport) -> None:
        self.plot.add(report.iteration, report.loss, report.val_dice)
        if report.val_dice is not None and math.isfinite(report.val_dice):
            self.val_dice = float(report.val_dice)
        self.bar.setValue(int(STEPS * report.progress))
        eta = ""
        if report.progress > 0.02 and self.budgeted:
            eta = f" · ~{max(0.0, report.elapsed / report.progress - report.elapsed):.0f} s left"
        skipped = f" · {report.skipped} non-finite steps skipped" if report.skipped else ""
        dice = "" if self.val_dice is None else f" · val Dice {self.val_dice:.2f}"
        self.status.value = (
            f"training: iteration {report.iteration} · {report.elapsed:.0f} s{eta} · loss {report.loss:.3f}{dice}{skipped}"
        )
        self._to_activity(self.bar.value(), f"napari-sparse3d: training, iteration {report.iteration}")

    def predicting(self, report: PredictReport) -> None:
        self.bar.setValue(int(STEPS * report.progress))
        self.status.value = f"predicting: {report.windows_done}/{report.windows_total} windows · {report.elapsed:.0f} s"
        self._to_activity(self.bar.value(), "napari-sparse3d: predicting")

    def restart(self) -> None:
        """The full prediction starts: the bar counts its windows from zero."""
        self.bar.setValue(0)
        if self.activity is not None:  # a bar cannot count down: the prediction gets its own
            self.activity.close()
            self.activity = None
            self._open_activity("napari-sparse3d: predicting")

    def finished(self, seconds: float, *, cancelled: bool, error: BaseException | None) -> None:
        if error is None:
            self.status.value = f"{'cancelled' if cancelled else 'done'} after {seconds:.0f} s"
            self.bar.setValue(STEPS)
        else:
            self.status.value = f"failed: {error}"
        self._close_activity()
