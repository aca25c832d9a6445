"""The training dock's corrections: where the user fixed the prediction, and turning those slices into annotations."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from magicgui.widgets import Container, Label, PushButton
from napari.utils.notifications import show_info, show_warning
from qtpy.QtWidgets import QVBoxLayout, QWidget

from napari_sparse3d._napari.dock import fit_dtype
from napari_sparse3d.loop.corrections import accept_slices
from napari_sparse3d.loop.slices import AXIS_NAMES

if TYPE_CHECKING:
    from napari_sparse3d._napari.state import LoopState

__all__ = ["CorrectionsBox"]


class CorrectionsBox(QWidget):
    """The corrected slices, "Use corrections and continue" and "Accept this slice of the prediction".

    The dock connects the two buttons: continuing also starts training.
    """

    def __init__(self, state: LoopState, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.state = state
        self.info = Label(value="")
        self.correct_button = PushButton(text="Use corrections and continue (Alt-A)")
        self.accept_button = PushButton(text="Accept this slice of the prediction")
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(Container(widgets=[self.info, self.correct_button, self.accept_button]).native)
        state.on_change(self.show_corrections)

    def enable(self, enabled: bool) -> None:
        self.correct_button.enabled = enabled
        self.accept_button.enabled = enabled

    def show_corrections(self) -> None:
        found = {a: sorted(s) for a, s in self.state.corrected.items() if s}
        if not found:
            self.info.value = "corrections: edit the prediction layer on a slice, then use them"
            return
        listed = "   ".join(f"{AXIS_NAMES[a]}: " + ", ".join(map(str, v)) for a, v in found.items())
        self.info.value = f"corrected slices  {listed}"

    def accept_corrections(self) -> list[tuple[int, int]] | None:
        """Make the corrected slices of the prediction annotated slices; None (and a warning) if there are none."""
        state = self.state
        if state.prediction_layer is None or state.labels_layer is None:
            show_warning("Nothing to correct yet: train first, then fix the prediction layer where it is wrong.")
            return None
        slices = state.corrected_slices()
        if not slices:
            show_warning("No corrected slice found: edit the prediction layer in a 2D view first.")
            return None
        return self._accept(slices)

    def accept_current_slice(self) -> list[tuple[int, int]]:
        """The prediction on the slice on screen is right: make it an annotated slice."""
        current = self.state.current_slice()
        if self.state.prediction_layer is None or current is None:
            show_warning("Show a 2D slice of a predicted volume to accept it.")
            return []
        return self._accept({current[0]: [current[1]]})

    def _accept(self, slices: dict[int, list[int]]) -> list[tuple[int, int]]:
        state = self.state
        labels_layer, register = state.labels_layer, state.register()
        if state.prediction_layer is None or labels_layer is None or register is None:
            show_warning("Choose an annotation layer first.")
            return []
        prediction = np.asarray(state.prediction_layer.data)
        accepted = accept_slices(fit_dtype(labels_layer, prediction), prediction, register, slices)
        labels_layer.refresh()
        state.edited("annotations")  # in place, without a layer event (also when the slice was marked already)
        state.reset_corrections()
        show_info(f"{len(accepted)} slice(s) added to the annotations: " + ", ".join(f"{AXIS_NAMES[a]}={i}" for a, i in accepted))
        return accepted
