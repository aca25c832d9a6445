"""The training dock's settings form, built from the engine's configuration.

The main settings (preset, budget, device) are always shown; the engine's other
configuration fields sit under a folded "advanced settings" box, filled from the
chosen preset.
"""

from __future__ import annotations

from typing import Any

from magicgui.widgets import CheckBox, ComboBox, Container, FloatSpinBox, SpinBox
from qtpy.QtWidgets import QGroupBox, QVBoxLayout, QWidget

from napari_sparse3d.config import PRESETS, Config

__all__ = ["ADVANCED", "SettingsForm"]

DEVICES = ("auto", "cpu", "cuda", "mps")

# the advanced fields of the form: (section, field) pairs of the engine's configuration
ADVANCED = (
    ("train", "learning_rate"),
    ("train", "batch_size"),
    ("train", "patch_voxels"),
    ("train", "dice_weight"),
    ("train", "foreground_fraction"),
    ("train", "flip"),
    ("train", "rotate90"),
    ("train", "intensity"),
    ("train", "precision"),
    ("model", "levels"),
    ("model", "base_features"),
    ("model", "norm"),
    ("model", "deep_supervision"),
    ("model", "pixel_classifier"),
    ("predict", "overlap"),
    ("predict", "mirror_tta"),
)
CHOICES = {
    ("train", "precision"): ("auto", "bf16", "fp16", "fp32"),
    ("model", "norm"): ("instance", "batch", "none"),
}


def _config_widget(section: str, name: str, value: Any) -> Any:
    label = name.replace("_", " ")
    if (section, name) in CHOICES:
        return ComboBox(name=f"{section}.{name}", label=label, choices=CHOICES[(section, name)], value=value)
    if isinstance(value, bool):
        return CheckBox(name=f"{section}.{name}", label=label, value=value)
    if isinstance(value, int):
        return SpinBox(name=f"{section}.{name}", label=label, value=value, min=0, max=10**9)
    return FloatSpinBox(name=f"{section}.{name}", label=label, value=value, min=0.0, max=1e9, step=1e-4)


class SettingsForm(QWidget):
    """Preset, budget, device and the advanced fields; :meth:`config` is what they describe."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.preset = ComboBox(label="preset", choices=tuple(PRESETS), value="default")
        self.seconds = SpinBox(label="budget (s)", value=60, min=1, max=24 * 3600)
        self.device = ComboBox(label="device", choices=DEVICES, value="auto")
        self.uncertainty_box = CheckBox(label="show uncertainty", value=False)
        defaults = Config()
        self.advanced = Container(
            widgets=[_config_widget(s, n, getattr(getattr(defaults, s), n)) for s, n in ADVANCED]
        )
        self.preset.changed.connect(self.apply_preset)
        self.apply_preset(self.preset.value)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(Container(widgets=[self.preset, self.seconds, self.device, self.uncertainty_box]).native)
        fold = QGroupBox("advanced settings")
        fold.setCheckable(True)
        fold.setChecked(False)
        QVBoxLayout(fold).addWidget(self.advanced.native)
        self.advanced.native.setVisible(False)
        fold.toggled.connect(self.advanced.native.setVisible)
        layout.addWidget(fold)

    def apply_preset(self, name: str) -> None:
        config = Config.from_preset(name)
        for section, field in ADVANCED:
            self.advanced[f"{section}.{field}"].value = getattr(getattr(config, section), field)
        # interactive default: one pass per window (mirroring costs 8x; tick it for a final result)
        self.advanced["predict.mirror_tta"].value = False

    def config(self) -> Config:
        """The configuration the form describes (the preset with the advanced fields over it)."""
        data = Config.from_preset(self.preset.value).to_dict()
        for section, field in ADVANCED:
            data[section][field] = self.advanced[f"{section}.{field}"].value
        return Config.from_dict(data)
