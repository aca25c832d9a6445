"""The training dock's further volumes: other open image/annotation pairs that training also learns from.

One model then learns from the chosen image (the one previewed, predicted and
corrected) and from each pair in the list
(:meth:`napari_sparse3d.engine.training.Trainer.from_many`, through
:func:`napari_sparse3d.loop.jobs.build_trainer`).  A pair's annotated slices are
the register the plugin keeps for its annotation layer (mirrored into the
layer's metadata by :class:`~napari_sparse3d._napari.state.LoopState`); a layer
without one holds scribbles (0 is "not annotated" everywhere).  A pair's spacing
is its image layer's scale: where the scales differ from the chosen image's, the
pair is resampled to that one's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from magicgui.widgets import ComboBox, Container, Label, PushButton
from napari.layers import Image, Labels
from napari.utils.notifications import show_info
from qtpy.QtWidgets import QListWidget, QVBoxLayout, QWidget

from napari_sparse3d._napari.dock import layer_choices
from napari_sparse3d._napari.state import METADATA_KEY
from napari_sparse3d.loop.jobs import ExtraVolume

if TYPE_CHECKING:
    from napari import Viewer

    from napari_sparse3d._napari.state import LoopState

__all__ = ["ExtraVolumesBox", "annotated_slices", "check_pair", "layer_scale", "read_extra"]


def layer_scale(layer: Any) -> tuple[float, float, float]:
    """The voxel spacing of a layer: its scale along the last three axes."""
    return tuple(float(s) for s in layer.scale[-3:])  # type: ignore[return-value]


def annotated_slices(layer: Any) -> dict[int, list[int]]:
    """The fully annotated slices of an annotation layer, as the plugin's register keeps them (none: scribbles)."""
    saved = (layer.metadata.get(METADATA_KEY) or {}).get("annotated_slices") or {}
    return {int(axis): sorted(int(i) for i in indices) for axis, indices in saved.items() if indices}


def check_pair(state: LoopState, image: Any, labels: Any) -> None:
    """Raise ``ValueError`` saying why ``(image, labels)`` cannot be a further training volume."""
    if image is None or labels is None:
        raise ValueError("choose an image layer and its annotation layer to add")
    layers = state.viewer.layers
    for layer in (image, labels):
        if layer not in layers:
            raise ValueError(f"layer {layer.name!r} is no longer in the viewer")
    if image is state.image_layer or labels is state.labels_layer:
        raise ValueError(
            f"{image.name!r} / {labels.name!r}: the image or annotation layer chosen in the annotation widget"
            " trains already"
        )
    if labels is state.prediction_layer or (labels.metadata.get(METADATA_KEY) or {}).get("role") == "prediction":
        raise ValueError(f"layer {labels.name!r} is a prediction, not annotations")
    if image.rgb or getattr(image, "multiscale", False) or image.ndim != 3:
        raise ValueError(
            f"channel mismatch: image layer {image.name!r} has ndim={image.ndim}, rgb={image.rgb}; the model"
            " learns from 3D grey images (one channel), like the chosen image"
        )
    image_shape, labels_shape = tuple(image.data.shape), tuple(labels.data.shape)
    if labels_shape != image_shape:
        raise ValueError(
            f"shape mismatch: annotation layer {labels.name!r} has shape {labels_shape}, image layer"
            f" {image.name!r} {image_shape}"
        )
    from napari_sparse3d._napari.voxel_size import grid_mismatch

    problem = grid_mismatch(labels, image)
    if problem is not None:
        raise ValueError(f"grid mismatch: {problem}")
    if not annotated_slices(labels) and not np.any(np.asarray(labels.data)):
        raise ValueError(
            f"annotation layer {labels.name!r} holds no annotations: paint some, or mark annotated slices"
            " in the annotation widget"
        )


def read_extra(
    state: LoopState, pairs: Sequence[tuple[Any, Any]]
) -> tuple[tuple[float, float, float] | None, list[ExtraVolume]]:
    """The model's spacing and a snapshot of each pair, checked (``ValueError`` naming the layers).

    Without pairs, or when every pair's scale is the chosen image's, the spacing is
    the one a single-volume run uses (:meth:`LoopState.spacing`) and no pair is
    resampled; otherwise it is the chosen image's scale, and each pair carries its own.
    """
    if not pairs or state.image_layer is None:
        return state.spacing(), []
    main = layer_scale(state.image_layer)
    differ = any(not np.allclose(layer_scale(image), main) for image, _ in pairs)
    volumes = []
    for image, labels in pairs:
        check_pair(state, image, labels)
        volumes.append(
            ExtraVolume(
                image.data,
                np.array(labels.data, copy=True),  # a snapshot: painting goes on meanwhile
                annotated_slices(labels),
                layer_scale(image) if differ else None,
            )
        )
    return (main if differ else state.spacing()), volumes


class ExtraVolumesBox(QWidget):
    """Further image/annotation pairs that training learns from: the list, "Add pair" and "Remove".

    Refused pairs go to ``error`` (the dock shows them as notifications); a pair
    whose layer leaves the viewer leaves the list.
    """

    def __init__(self, viewer: Viewer, state: LoopState, *, error: Callable[[str], None], parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.viewer = viewer
        self.state = state
        self.error = error
        self.pairs: list[tuple[Image, Labels]] = []
        self.image = ComboBox(label="image", choices=lambda _w: self._choices(Image), nullable=True)
        self.labels = ComboBox(label="annotations", choices=lambda _w: self._choices(Labels), nullable=True)
        self.add_button = PushButton(text="Add pair")
        self.remove_button = PushButton(text="Remove")
        self.list = QListWidget()
        self.list.setMaximumHeight(80)
        buttons = Container(widgets=[self.add_button, self.remove_button], layout="horizontal", labels=False)
        title = Label(value="also train on (image / annotations):")
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(Container(widgets=[title, self.image, self.labels, buttons]).native)
        layout.addWidget(self.list)
        self.add_button.clicked.connect(lambda: self.add())
        self.remove_button.clicked.connect(lambda: self.remove())
        self.image.changed.connect(self._image_chosen)
        viewer.layers.events.removed.connect(self._layer_removed)
        state.on_change(self.reset_choices)  # the chosen image and annotation layers are not offered

    def _choices(self, kind: type) -> list[tuple[str, Any]]:
        own = (self.state.image_layer, self.state.labels_layer, self.state.prediction_layer, self.state.uncertainty_layer)
        return [(layer.name, layer) for layer in layer_choices(self.viewer, kind) if not any(layer is o for o in own)]

    def _image_chosen(self, image: Any) -> None:
        """Offer the annotation layer of the image's shape, if there is one."""
        if image is None:
            return
        labels = self.labels.value
        if labels is not None and tuple(labels.data.shape) == tuple(image.data.shape):
            return
        for _, layer in self._choices(Labels):
            if tuple(layer.data.shape) == tuple(image.data.shape) and all(layer is not p[1] for p in self.pairs):
                self.labels.value = layer
                return

    def reset_choices(self, *_: Any) -> None:
        self.image.reset_choices()
        self.labels.reset_choices()

    def enable(self, enabled: bool) -> None:
        self.add_button.enabled = enabled
        self.remove_button.enabled = enabled and bool(self.pairs)

    def add(self, image: Image | None = None, labels: Labels | None = None) -> bool:
        """Add ``(image, labels)`` (default: the chosen layers); a refused pair is notified, and nothing added."""
        image = self.image.value if image is None else image
        labels = self.labels.value if labels is None else labels
        try:
            check_pair(self.state, image, labels)
            if any(labels is other for _, other in self.pairs):
                raise ValueError(f"annotation layer {labels.name!r} is in the list already")
        except ValueError as exc:
            self.error(f"Cannot add the pair: {exc}")
            return False
        self.pairs.append((image, labels))
        self._refresh()
        slices = annotated_slices(labels)
        how = f"{sum(map(len, slices.values()))} annotated slice(s)" if slices else "scribbles (no annotated slices)"
        show_info(f"Training also learns from {image.name!r} with {labels.name!r}: {how}")
        return True

    def remove(self, index: int | None = None) -> bool:
        """Remove pair ``index`` (default: the selected one, else the last); returns whether one was removed."""
        if index is None:
            index = self.list.currentRow() if self.list.currentRow() >= 0 else len(self.pairs) - 1
        if not 0 <= index < len(self.pairs):
            return False
        del self.pairs[index]
        self._refresh()
        return True

    def _layer_removed(self, event: Any) -> None:
        gone = event.value
        kept = [pair for pair in self.pairs if all(layer is not gone for layer in pair)]
        if len(kept) != len(self.pairs):
            self.pairs = kept
            self._refresh()

    def _refresh(self) -> None:
        self.list.clear()
        for image, labels in self.pairs:
            self.list.addItem(f"{image.name}  /  {labels.name}")
        self.remove_button.enabled = self.add_button.enabled and bool(self.pairs)
