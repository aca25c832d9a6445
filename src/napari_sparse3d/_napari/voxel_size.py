"""The voxel size of the chosen image: read from its file, asked for when unknown, put on the plugin's layers.

napari draws a layer at its ``scale``; training takes the image's scale as the
voxel ``spacing``.  An image opened without a scale (every reader but a few leaves
it at 1) is looked up in its file's metadata (:func:`napari_sparse3d.io.voxel_size.file_voxel_size`:
TIFF resolution tags, ImageJ spacing, OME); when the file records none, the dock
says so and asks for it.  *Set voxel size* puts the size on the image and on the
layers the plugin uses with it (annotations, prediction, uncertainty), so they
stay on one grid.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from magicgui.widgets import Container, FloatSpinBox, Label, PushButton
from napari.utils.notifications import show_info
from qtpy.QtWidgets import QVBoxLayout, QWidget

from napari_sparse3d.loop.slices import AXIS_NAMES

__all__ = ["VoxelSizeBox", "grid_mismatch"]


def grid_mismatch(layer: Any, image: Any) -> str | None:
    """Why ``layer`` does not lie on ``image``'s voxel grid (scale, translation of the last three axes), or None."""
    for name in ("scale", "translate"):
        ours, theirs = np.asarray(getattr(layer, name))[-3:], np.asarray(getattr(image, name))[-3:]
        if not np.allclose(ours, theirs, rtol=1e-6, atol=1e-9):
            return (
                f"layer {layer.name!r} has {name} {tuple(round(float(v), 6) for v in ours)}, "
                f"the image {image.name!r} {tuple(round(float(v), 6) for v in theirs)}"
            )
    return None


class VoxelSizeBox(QWidget):
    """Voxel size (z, y, x) fields, where it came from, and *Set voxel size*."""

    def __init__(self, state: Any, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.state = state
        self.fields = [
            FloatSpinBox(label=f"voxel {name}", value=1.0, min=1e-6, max=1e6, step=0.1) for name in AXIS_NAMES
        ]
        self.apply_button = PushButton(text="Set voxel size")
        self.info = Label(value="")
        self.origin = "unknown"  # "file", "layer", "user" or "unknown"
        self._asked: set[int] = set()  # images already told that their voxel size is unknown
        box = Container(widgets=[Container(widgets=self.fields, layout="horizontal"), self.apply_button, self.info])
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(box.native)
        self.apply_button.clicked.connect(lambda: self.apply(None))

    def image_chosen(self, image: Any) -> None:
        """Take the image's scale, or the voxel size its file records, or ask."""
        if image is None:
            self.info.value = ""
            return
        scale = tuple(float(s) for s in image.scale[-3:])
        if np.allclose(scale, 1.0):
            from napari_sparse3d.io.voxel_size import file_voxel_size

            path = getattr(getattr(image, "source", None), "path", None)
            found = file_voxel_size(path) if path else None
            if found is not None:
                self.apply(found, origin="file")
                show_info(f"napari-sparse3d: voxel size of {image.name!r} from its file: {_describe(found)}")
                return
            self._show(scale, "unknown")
            if id(image) not in self._asked:
                self._asked.add(id(image))
                show_info(
                    f"napari-sparse3d: the voxel size of {image.name!r} is unknown (cubes assumed); "
                    "if its voxels are not cubes, enter it in the annotation dock and press Set voxel size."
                )
            return
        self._show(scale, "layer")

    def _show(self, size: tuple[float, ...], origin: str) -> None:
        self.origin = origin
        for field, value in zip(self.fields, size):
            field.value = value
        self.info.value = {
            "file": "voxel size: from the file's metadata",
            "layer": "voxel size: the image layer's scale",
            "user": "voxel size: set here",
            "unknown": "voxel size: UNKNOWN, cubes assumed (enter it if they are not)",
        }[origin]

    def layers(self) -> list[Any]:
        """The image and the layers the plugin uses with it."""
        state = self.state
        found = []
        for layer in (state.image_layer, state.labels_layer, state.prediction_layer, state.uncertainty_layer):
            if layer is not None and layer not in found and layer in state.viewer.layers:
                found.append(layer)
        return found

    def apply(self, size: tuple[float, float, float] | None = None, *, origin: str = "user") -> bool:
        """Put ``size`` (default: the fields) on the image and the plugin's layers; training uses it as spacing."""
        if size is None:
            size = tuple(float(field.value) for field in self.fields)  # type: ignore[assignment]
        if self.state.image_layer is None:
            show_info("napari-sparse3d: choose an image first.")
            return False
        if len(size) != 3 or not all(np.isfinite(size)) or min(size) <= 0:  # type: ignore[arg-type]
            raise ValueError(f"voxel size: expected three positive numbers (z, y, x), got {size!r}")
        for layer in self.layers():
            scale = np.array(layer.scale, float)
            scale[-3:] = size
            layer.scale = scale
        self._show(size, origin)  # type: ignore[arg-type]
        self.state.viewer.reset_view()
        self.state.changed()
        return True


def _describe(size: tuple[float, float, float]) -> str:
    return " × ".join(f"{v:g}" for v in size) + " (z × y × x)"
