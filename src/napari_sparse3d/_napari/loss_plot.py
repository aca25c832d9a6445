"""A small live plot of the training loss, drawn with QPainter (no plotting dependency)."""

from __future__ import annotations

from typing import Any

import numpy as np
from qtpy.QtCore import QPointF, Qt
from qtpy.QtGui import QColor, QPainter, QPen, QPolygonF
from qtpy.QtWidgets import QWidget

__all__ = ["LossPlot"]


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

    def paintEvent(self, event: Any) -> None:
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
