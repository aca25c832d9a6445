"""Paints what a job predicts into napari layers, as the blocks arrive.

The blocks go into the loop's prediction layer (created on first use), and
their uncertainty into ``state.uncertainty`` (shown as a layer when asked);
or, when a job applies the model to another image, into that job's own layer
(:class:`PredictionTarget`).  Layers are refreshed at most every 100 ms, so
that a stream of small blocks does not stall the GUI.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from qtpy.QtCore import QObject, QTimer

from napari_sparse3d._napari.dock import add_layer_like, fit_dtype
from napari_sparse3d._napari.state import METADATA_KEY
from napari_sparse3d.loop.corrections import uncertainty as uncertainty_of

if TYPE_CHECKING:
    from napari import Viewer
    from napari.layers import Labels

    from napari_sparse3d._napari.state import LoopState
    from napari_sparse3d.engine.prediction import Block

__all__ = ["PredictionPainter", "PredictionTarget"]

#: Milliseconds between two refreshes of the painted layers.
REFRESH_MS = 100


@dataclass(frozen=True)
class PredictionTarget:
    """A job item: paint this job's blocks into ``layer`` (not into the loop's prediction layer)."""

    layer: Labels


class PredictionPainter(QObject):
    """Paints blocks into the prediction (and uncertainty) layer; keeps the previous prediction to restore."""

    def __init__(
        self,
        viewer: Viewer,
        state: LoopState,
        *,
        show_uncertainty: Callable[[], bool],
        error: Callable[[str], None],
        parent: QObject | None = None,
    ) -> None:
        super().__init__(parent)
        self.viewer = viewer
        self.state = state
        self.show_uncertainty = show_uncertainty
        self.error = error
        self.target: Labels | None = None  # the running job's own layer, if it has one
        self.backup: np.ndarray | None = None  # the prediction before a full prediction started
        self._dirty: set[str] = set()  # the layers to refresh: "prediction", "uncertainty"
        self._timer = QTimer(self)
        self._timer.setSingleShot(True)
        self._timer.setInterval(REFRESH_MS)
        self._timer.timeout.connect(self.refresh)

    @property
    def own(self) -> bool:
        """Whether blocks go into the loop's prediction layer (not into a job's own target)."""
        return self.target is None

    def layer(self) -> Labels:
        """The layer blocks go into: the job's target, or the prediction layer (created if missing)."""
        if self.target is not None:
            return self.target
        state = self.state
        if state.prediction_layer is not None and state.prediction_layer in self.viewer.layers:
            return state.prediction_layer
        image = state.image_layer
        # the role is there when the layer is inserted (the 3D view picks the prediction up by it)
        layer = add_layer_like(
            self.viewer, image, np.zeros(image.data.shape[-3:], np.uint8), name="prediction", opacity=0.5,
            metadata={METADATA_KEY: {"role": "prediction"}},
        )
        state.adopt_prediction(layer)
        # keep the user's annotation layer selected for painting
        if state.labels_layer is not None:
            self.viewer.layers.selection.active = state.labels_layer
        return layer

    def paint(self, blocks: Sequence[Block]) -> None:
        layer = self.layer()
        data = layer.data
        # kept even when not shown: "Most uncertain slice" reads it
        uncertainty = self.state.uncertainty if self.own else None
        if self.own and (uncertainty is None or uncertainty.shape != data.shape):
            uncertainty = self.state.uncertainty = np.zeros(data.shape, np.float32)
        for block in blocks:
            data = fit_dtype(layer, block.labels)
            data[block.region] = block.labels
            if uncertainty is not None:
                uncertainty[block.region] = uncertainty_of(block.probabilities)
        self._dirty.add("prediction")
        if self.show_uncertainty() and self.own:
            self._dirty.add("uncertainty")
        if not self._timer.isActive():
            self._timer.start()

    def refresh(self) -> None:
        """Show what was painted since the last refresh."""
        if "prediction" in self._dirty:
            self.layer().refresh()
        if "uncertainty" in self._dirty and self.state.uncertainty is not None:
            self._show_uncertainty(self.state.uncertainty)
        self._dirty.clear()

    def flush(self) -> None:
        """Refresh now (a job ended)."""
        self._timer.stop()
        self.refresh()

    def _show_uncertainty(self, values: np.ndarray) -> None:
        state = self.state
        if state.uncertainty_layer is None or state.uncertainty_layer not in self.viewer.layers:
            state.uncertainty_layer = add_layer_like(
                self.viewer,
                state.image_layer,
                values,
                "image",
                name="uncertainty",
                colormap="magma",
                contrast_limits=(0.0, 1.0),
                blending="additive",
                visible=True,
            )
        else:
            state.uncertainty_layer.data = values
            state.uncertainty_layer.refresh()

    # -- the prediction before a full prediction ------------------------------------------
    def keep_backup(self) -> None:
        """A full prediction starts: keep the current one, to restore if it is cancelled or fails."""
        layer = self.state.prediction_layer
        self.backup = None if layer is None else np.array(layer.data, copy=True)

    def restore_backup(self) -> None:
        layer = self.state.prediction_layer
        if self.backup is not None and layer is not None and self.own:
            layer.data[...] = self.backup
            layer.refresh()
        self.backup = None

    def save_to_project(self) -> None:
        """Write the finished prediction into the project, if the work is saved into one."""
        state = self.state
        if state.project is None or state.prediction_layer is None or not self.own:
            return
        self.flush()
        try:
            state.project.save_prediction(np.asarray(state.prediction_layer.data))
        except (OSError, ValueError) as exc:
            self.error(f"Prediction NOT saved to {state.project.path}: {exc}")
