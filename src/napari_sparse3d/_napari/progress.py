"""How the training dock shows a running job: a progress bar, one status line and the loss plot."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from magicgui.widgets import Label
from qtpy.QtWidgets import QProgressBar, QVBoxLayout, QWidget

from napari_sparse3d._napari.loss_plot import LossPlot

if TYPE_CHECKING:
    from napari_sparse3d.engine.prediction import PredictReport
    from napari_sparse3d.engine.training import TrainReport

__all__ = ["ProgressView"]

#: The progress bar counts in thousandths.
STEPS = 1000


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

    def predicting(self, report: PredictReport) -> None:
        self.bar.setValue(int(STEPS * report.progress))
        self.status.value = f"predicting: {report.windows_done}/{report.windows_total} windows · {report.elapsed:.0f} s"

    def restart(self) -> None:
        """The full prediction starts: the bar counts its windows from zero."""
        self.bar.setValue(0)

    def finished(self, seconds: float, *, cancelled: bool, error: BaseException | None) -> None:
        if error is None:
            self.status.value = f"{'cancelled' if cancelled else 'done'} after {seconds:.0f} s"
            self.bar.setValue(STEPS)
        else:
            self.status.value = f"failed: {error}"
