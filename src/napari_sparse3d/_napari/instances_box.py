"""The training dock's instances: split the prediction layer into objects, one id each, in a new Labels layer.

The classes of the prediction are the user's label values; the nuclei task of this project is
three-class (0 background, 1 interior, 2 boundary).  The box runs
:func:`~napari_sparse3d.engine.postprocess.instances_from_prediction` on the GUI thread: a
watershed of a volume of a few million voxels takes two or three seconds.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
from magicgui.widgets import Container, Label, PushButton, SpinBox
from napari.utils.notifications import show_info, show_warning
from qtpy.QtWidgets import QVBoxLayout, QWidget

from napari_sparse3d._napari.dock import add_layer_like
from napari_sparse3d._napari.state import METADATA_KEY

if TYPE_CHECKING:
    from napari import Viewer
    from napari.layers import Labels

    from napari_sparse3d._napari.state import LoopState

__all__ = ["InstancesBox"]


class InstancesBox(QWidget):
    """Interior class, boundary class, smallest object, and "Instances from prediction".

    The button is enabled while there is a prediction layer and no job runs (the dock calls
    :meth:`enable`); errors go to ``error``.
    """

    def __init__(self, viewer: Viewer, state: LoopState, *, error: Callable[[str], None], parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.viewer = viewer
        self.state = state
        self.error = error
        self.interior = SpinBox(label="interior class", value=1, min=1, max=65535)
        self.boundary = SpinBox(
            label="boundary class", value=2, min=0, max=65535,
            tooltip="Used where the prediction holds it; otherwise (or 0) touching objects are split at the "
            "peaks of their distance transform.",
        )
        self.min_size = SpinBox(label="smallest object (voxels)", value=0, min=0, max=10**9)
        self.button = PushButton(text="Instances from prediction")
        self.info = Label(value="")
        self.running = False
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        classes = Container(widgets=[self.interior, self.boundary], layout="horizontal")
        layout.addWidget(Container(widgets=[classes, self.min_size, self.button, self.info]).native)
        self.button.clicked.connect(self.make_instances)
        for event in (viewer.layers.events.inserted, viewer.layers.events.removed):
            event.connect(lambda *_: self.enable())
        state.on_change(self.enable)
        self.enable()

    def prediction(self) -> Labels | None:
        layer = self.state.prediction_layer
        return layer if layer is not None and layer in self.viewer.layers else None

    def enable(self, running: bool | None = None) -> None:
        """Enable the button when there is a prediction and no job runs (``running``: the dock's word)."""
        if running is not None:
            self.running = running
        ready = self.prediction() is not None
        self.button.enabled = ready and not self.running
        self.button.tooltip = "" if ready else "Train (or predict) first: there is no prediction layer yet."

    def make_instances(self) -> Labels | None:
        """Split the prediction layer into instances, into the layer "<prediction> instances" (made or replaced)."""
        layer = self.prediction()
        if layer is None:
            show_warning("No prediction to split into instances yet: train first, or open a project with a prediction.")
            return None
        from napari_sparse3d.engine.postprocess import instances_from_prediction

        labels = np.asarray(layer.data)
        boundary = int(self.boundary.value) or None
        if boundary is not None and not (labels == boundary).any():
            boundary = None  # e.g. a two-class prediction: distance-transform seeds
        try:
            instances = instances_from_prediction(
                labels,
                interior=int(self.interior.value),
                boundary=boundary,
                min_size=int(self.min_size.value),
                spacing=tuple(float(s) for s in layer.scale[-labels.ndim :]),
            )
        except (TypeError, ValueError) as exc:
            self.error(f"Cannot make instances: {exc}")
            return None
        target = self._target(layer, instances)
        how = f"boundary class {boundary}" if boundary is not None else "distance-transform peaks"
        self.info.value = f"{int(instances.max())} instances (split by {how})"
        show_info(f"{target.name}: {self.info.value}")
        return target

    def _target(self, prediction: Labels, instances: np.ndarray) -> Labels:
        name = f"{prediction.name} instances"
        for layer in self.viewer.layers:
            meta: dict[str, Any] = layer.metadata.get(METADATA_KEY) or {}
            if layer.name == name and meta.get("role") == "instances":
                layer.data = instances
                layer.scale, layer.translate = prediction.scale, prediction.translate
                return layer
        layer = add_layer_like(self.viewer, prediction, instances, name=name)
        layer.metadata[METADATA_KEY] = {"role": "instances"}
        # keep the user's annotation layer selected for painting
        if self.state.labels_layer is not None and self.state.labels_layer in self.viewer.layers:
            self.viewer.layers.selection.active = self.state.labels_layer
        return layer
