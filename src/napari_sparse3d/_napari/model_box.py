"""The training dock's models: save the current model, load one, and choose an image to predict with it."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
from magicgui.widgets import Container, PushButton
from napari.layers import Image
from napari.utils.notifications import show_info, show_warning
from qtpy.QtWidgets import QFileDialog, QVBoxLayout, QWidget

from napari_sparse3d._napari.dock import add_layer_like, layer_combo

if TYPE_CHECKING:
    from napari import Viewer
    from napari.layers import Labels

    from napari_sparse3d._napari.state import LoopState
    from napari_sparse3d.engine.model import UNet3D

__all__ = ["ModelBox"]


class ModelBox(QWidget):
    """The buttons "Save model…" and "Load model…", the image to apply the model to, and "Predict this image".

    The dock connects the buttons and runs the prediction; errors go to ``error`` (the dock shows them).
    """

    def __init__(self, viewer: Viewer, state: LoopState, *, error: Callable[[str], None], parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.viewer = viewer
        self.state = state
        self.error = error
        self.save_button = PushButton(text="Save model…")
        self.load_button = PushButton(text="Load model…")
        self.apply_to = layer_combo(viewer, Image, "apply to")
        self.apply_button = PushButton(text="Predict this image")
        files = Container(widgets=[self.save_button, self.load_button], layout="horizontal", labels=False)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(Container(widgets=[files, self.apply_to, self.apply_button]).native)

    def enable(self, *, running: bool) -> None:
        self.apply_button.enabled = not running
        self.save_button.enabled = self.state.model is not None

    def save(self, path: str | None) -> str | None:
        """Write the current model to ``path`` (asked for when None); returns the path, or None."""
        if self.state.model is None:
            show_warning("No model to save yet.")
            return None
        if path is None:
            path, _ = QFileDialog.getSaveFileName(self, "Save model", "model.pt", "Checkpoints (*.pt)")
            if not path:
                return None
        from napari_sparse3d.io.checkpoint import save_checkpoint

        try:
            # a copy taken between two optimiser steps: the worker may be training this model
            save_checkpoint(self.state.model_snapshot(), path)
        except (OSError, ValueError) as exc:
            self.error(f"Could not save the model to {path}: {exc}")
            return None
        show_info(f"Model saved to {path}")
        return str(path)

    def load(self, path: str | None) -> UNet3D | None:
        """Make the model of ``path`` (asked for when None) the current one: Continue warm-starts from it."""
        if path is None:
            path, _ = QFileDialog.getOpenFileName(self, "Load model", "", "Checkpoints (*.pt)")
            if not path:
                return None
        from napari_sparse3d.io.checkpoint import load_checkpoint

        try:
            model = load_checkpoint(path)
        except (OSError, ValueError, TypeError) as exc:
            self.error(f"Could not load a model from {path}: {exc}")
            return None
        self.state.model = model
        self.state.trainer = None  # Continue warm-starts from the loaded weights
        show_info(f"Model loaded from {path}: classes {model.sparse3d.class_values}")
        return model

    def new_target(self, layer: Image | None) -> Labels | None:
        """A new Labels layer to predict ``layer`` into, or None (and a notification) if it cannot be."""
        if self.state.model is None:
            show_warning("No model yet: train one or load one.")
            return None
        if layer is None or layer.ndim != 3 or layer.rgb:
            self.error(f"Cannot predict {getattr(layer, 'name', layer)!r}: choose a 3D grey image layer.")
            return None
        empty = np.zeros(layer.data.shape, np.uint8)
        return add_layer_like(self.viewer, layer, empty, name=f"{layer.name} prediction", opacity=0.5)
