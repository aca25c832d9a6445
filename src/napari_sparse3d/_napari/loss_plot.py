"""A small live plot of the training loss and the validation Dice, drawn with QPainter (no plotting dependency)."""

from __future__ import annotations

from typing import Any

import numpy as np
from qtpy.QtCore import QPointF, Qt
from qtpy.QtGui import QColor, QPainter, QPen, QPolygonF
from qtpy.QtWidgets import QWidget

__all__ = ["LossPlot"]

LOSS_COLOUR = QColor(255, 170, 60)
DICE_COLOUR = QColor(90, 200, 120)


class LossPlot(QWidget):
    """The training loss (raw in grey, smoothed in orange, log scale, left) and the validation Dice (green, 0..1, right)."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setMinimumHeight(90)
        self.iterations: list[int] = []
        self.losses: list[float] = []
        self.smoothed: list[float] = []
        # validation Dice, only on the steps that measured it (every train.validation_every steps)
        self.val_iterations: list[int] = []
        self.val_dices: list[float] = []

    def clear(self) -> None:
        self.iterations, self.losses, self.smoothed = [], [], []
        self.val_iterations, self.val_dices = [], []
        self.update()

    def add(self, iteration: int, loss: float, val_dice: float | None = None) -> None:
        self.iterations.append(int(iteration))
        self.losses.append(float(loss))
        previous = self.smoothed[-1] if self.smoothed else float(loss)
        self.smoothed.append(0.9 * previous + 0.1 * float(loss))
        if val_dice is not None and np.isfinite(val_dice):
            self.val_iterations.append(int(iteration))
            self.val_dices.append(float(val_dice))
        self.update()

    def paintEvent(self, event: Any) -> None:
        painter = QPainter(self)
        rect = self.rect().adjusted(4, 4, -4, -14)
        painter.fillRect(self.rect(), QColor(38, 41, 48))
        if len(self.losses) < 2:
            painter.setPen(QColor(160, 160, 160))
            painter.drawText(rect, Qt.AlignCenter, "training loss · validation Dice")
            painter.end()
            return
        logs = np.log10(np.maximum(np.asarray(self.losses), 1e-6))
        lo, hi = float(logs.min()), float(logs.max())
        hi = hi if hi > lo else lo + 1e-3
        first, last = self.iterations[0], self.iterations[-1]
        span = max(last - first, 1)

        def x_of(iteration: int) -> float:
            return rect.left() + rect.width() * (iteration - first) / span

        def points(values: np.ndarray) -> QPolygonF:
            step = max(1, len(values) // max(rect.width(), 1))
            poly = QPolygonF()
            for i in range(0, len(values), step):
                poly.append(QPointF(x_of(self.iterations[i]), rect.bottom() - rect.height() * (values[i] - lo) / (hi - lo)))
            return poly

        painter.setPen(QPen(QColor(110, 110, 110), 1))
        painter.drawPolyline(points(logs))
        painter.setPen(QPen(LOSS_COLOUR, 2))
        painter.drawPolyline(points(np.log10(np.maximum(np.asarray(self.smoothed), 1e-6))))
        text = f"loss {self.smoothed[-1]:.3g} (from {10 ** logs[0]:.3g})"
        if self.val_dices:  # second axis on the right: Dice 0 at the bottom, 1 at the top
            dice = [
                QPointF(x_of(i), rect.bottom() - rect.height() * min(max(d, 0.0), 1.0))
                for i, d in zip(self.val_iterations, self.val_dices)
            ]
            painter.setPen(QPen(DICE_COLOUR, 2))
            painter.drawPolyline(QPolygonF(dice))
            painter.setBrush(DICE_COLOUR)
            for point in dice:
                painter.drawEllipse(point, 2.0, 2.0)
            painter.drawText(rect, Qt.AlignRight | Qt.AlignTop, "1")
            painter.drawText(rect, Qt.AlignRight | Qt.AlignBottom, "0")
            text += f" · val Dice {self.val_dices[-1]:.2f}"
        painter.setPen(QColor(200, 200, 200))
        painter.drawText(4, self.height() - 2, f"{text} · iteration {last}")
        painter.end()
