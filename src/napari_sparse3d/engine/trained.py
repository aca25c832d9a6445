"""A trained network and what travels with it: :class:`ModelInfo`, and its checkpoint payload.

A trained :class:`~napari_sparse3d.engine.model.UNet3D` carries a
:class:`ModelInfo` as ``model.sparse3d``: the configuration, the class values
(channel k <-> user's label value), the normalisation statistics and their
mode (each image its own statistics, or these for every image; a checkpoint
written before the mode existed reads as the latter), the patch size and the
voxel spacing the model was trained at (:func:`napari_sparse3d.predict`
resamples an image at another spacing to it).  That is enough to predict, so a
checkpoint is the weights plus this record.  The payload holds only tensors, strings and numbers:
it loads with ``torch.load(weights_only=True)`` and never unpickles code.
Files (where, atomically, refusing what) are :mod:`napari_sparse3d.io.checkpoint`'s business.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from napari_sparse3d.config import Config
from napari_sparse3d.engine.model import UNet3D, build_model
from napari_sparse3d.engine.pixel_head import checked_sigmas
from napari_sparse3d.engine.preprocess import Normalization
from napari_sparse3d.engine.volume import check_spacing, int3

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "ModelInfo",
    "from_payload",
    "model_info",
    "read_payload",
    "require_trained",
    "thin_history",
    "to_payload",
    "write_payload",
]

FORMAT = "napari-sparse3d-checkpoint"
# 2: networks may carry a pixel classifier (model.pixel_classifier); version 1 files load without one
# 3: the classifier is a bag of perceptrons (3-D weights); version 2 files load as a bag of one
FORMAT_VERSION = 3

#: Entries of the per-step history kept in a checkpoint or manifest (and in a Trainer's memory).
HISTORY_LIMIT = 1000
#: The most recent steps are always kept one by one (the project's "best" model looks at the last 50).
HISTORY_RECENT = 100


def thin_history(history: list[dict[str, Any]], limit: int = HISTORY_LIMIT) -> list[dict[str, Any]]:
    """At most ``limit`` entries: the last :data:`HISTORY_RECENT` steps whole, older ones evenly thinned.

    A checkpoint of a model trained for 100,000 steps then holds a loss curve
    of 1,000 points instead of 100,000, and the first and last entries (the
    iteration count) are always kept.
    """
    history = list(history)
    if len(history) <= limit:
        return history
    recent = min(HISTORY_RECENT, limit // 2)
    old, new = history[:-recent], history[-recent:]
    keep = np.unique(np.linspace(0, len(old) - 1, limit - recent).round().astype(int))
    return [old[i] for i in keep] + new


@dataclass
class ModelInfo:
    """What travels with a trained network (its typed attribute ``model.sparse3d``)."""

    config: Config
    class_values: list[int]
    normalization: Normalization
    patch_size: tuple[int, int, int]
    spacing: tuple[float, float, float] | None
    in_channels: int
    history: list[dict[str, Any]] = field(default_factory=list)
    # AdamW's state (moments, step counts), so that a warm start continues rather than restarts;
    # stored beside the weights in a checkpoint, not in this dict
    optimizer_state: dict[str, Any] | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config.to_json(),
            "class_values": [int(v) for v in self.class_values],
            "normalization": self.normalization.to_dict(),
            "patch_size": [int(p) for p in self.patch_size],
            "spacing": None if self.spacing is None else [float(s) for s in self.spacing],
            "in_channels": int(self.in_channels),
            "history": thin_history(self.history),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelInfo:
        raw = json.loads(data["config"]) if isinstance(data["config"], str) else data["config"]
        if isinstance(raw, dict) and isinstance(raw.get("model"), dict):
            # networks saved before the pixel classifier existed have none
            raw["model"].setdefault("pixel_classifier", False)
        class_values = [int(v) for v in data["class_values"]]
        if len(class_values) < 2 or len(set(class_values)) != len(class_values):
            # a network has one output per class: repeated values would make some outputs unreachable
            raise ValueError(f"class_values must be at least two different label values, got {class_values}")
        patch_size = int3(data["patch_size"])
        if min(patch_size) < 1:
            raise ValueError(f"patch_size must be three positive sizes (z, y, x), got {list(patch_size)}")
        return cls(
            config=Config.from_dict(raw),
            class_values=class_values,
            normalization=Normalization.from_dict(data["normalization"]),
            patch_size=patch_size,
            spacing=check_spacing(data["spacing"]),
            in_channels=int(data["in_channels"]),
            history=_checked_history(data.get("history", [])),
        )


def _checked_history(history: Any) -> list[dict[str, Any]]:
    """A checkpoint's training history: one object per step, with its number and loss (a warm start continues it)."""
    if not isinstance(history, list):
        raise ValueError(f"history must be a list of training steps, got {type(history).__name__}")
    for i, entry in enumerate(history):
        step = entry.get("iteration") if isinstance(entry, dict) else None
        if not (isinstance(step, int) and not isinstance(step, bool) and step >= 0
                and isinstance(entry.get("loss"), (int, float))):
            raise ValueError(f"history[{i}] must be an object with a step number 'iteration' and a 'loss', got {entry!r}")
    return list(history)


def model_info(model: Any, name: str = "model") -> ModelInfo:
    """The :class:`ModelInfo` of a trained network; a ``TypeError`` naming ``name`` for anything else."""
    info = getattr(model, "sparse3d", None)
    if not isinstance(model, nn.Module) or not isinstance(info, ModelInfo):
        raise TypeError(
            f"{name} must be a model returned by napari_sparse3d.run/train or loaded from a checkpoint"
            f" (it carries normalisation and class values); got a {type(model).__name__} without them"
        )
    return info


def require_trained(model: Any, name: str = "model") -> UNet3D:
    """``model`` itself, checked to be a trained network (see :func:`model_info`)."""
    model_info(model, name)
    return model


def _non_finite(state: dict[str, torch.Tensor]) -> list[str]:
    return [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]


def to_payload(model: nn.Module, *, where: str, package_version: str) -> dict[str, Any]:
    """The checkpoint of a trained ``model``: plain containers of CPU tensors, strings and numbers.

    A model with non-finite weights is refused (``where`` names the destination in the error).
    """
    info = model_info(model, "model")
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    bad = _non_finite(state)
    if bad:
        raise ValueError(f"model: weights {bad[:3]} hold NaN or infinite values; refusing to save a broken model to {where!r}")
    payload: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "package_version": package_version,
        "info": info.to_dict(),
        "state_dict": state,
    }
    if info.optimizer_state is not None:
        payload["optimizer"] = _cpu(info.optimizer_state)
    return payload


def write_payload(payload: dict[str, Any], path: str | os.PathLike) -> None:
    with open(path, "wb") as f:  # opened here, a refusal is an OSError naming the file (torch's own: a RuntimeError)
        torch.save(payload, f)


def _torch_version() -> tuple[int, int]:
    major, minor = (torch.__version__.split("+")[0].split(".") + ["0"])[:2]
    try:
        return int(major), int("".join(c for c in minor if c.isdigit()) or 0)
    except ValueError:  # pragma: no cover - an unparsable development version
        return (99, 0)


def read_payload(path: str | os.PathLike, *, where: str, map_location: str | torch.device = "cpu") -> Any:
    """Unpickle a checkpoint file safely: tensors and plain containers only, never code."""
    if _torch_version() < (2, 6):  # CVE-2025-32434: weights_only loading could still run code
        raise RuntimeError(
            f"checkpoint: loading {where!r} needs torch >= 2.6 (this is torch {torch.__version__}, whose"
            " weights_only loading can run code from a crafted file); upgrade torch"
        )
    try:
        # weights_only: the unpickler builds tensors and plain containers only, so a crafted
        # file cannot run code (torch >= 2.6, see setup.cfg)
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # a truncated, foreign or hostile file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"checkpoint: {where!r} is not a readable napari-sparse3d checkpoint ({first[:200]})") from None


def from_payload(payload: Any, *, where: str) -> UNet3D:
    """Rebuild and check the network of a loaded checkpoint; untrusted input gets a ``ValueError`` naming ``where``."""
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"checkpoint: {where!r} is not a napari-sparse3d checkpoint")
    version = payload.get("format_version", 0)
    if not isinstance(version, int) or isinstance(version, bool):
        raise ValueError(f"checkpoint: {where!r}: format_version must be an integer, got {version!r}")
    if version > FORMAT_VERSION:
        raise ValueError(
            f"checkpoint: {where!r} was written by a newer napari-sparse3d (format {payload['format_version']},"
            f" this version reads up to {FORMAT_VERSION}); upgrade napari-sparse3d"
        )
    state = payload.get("state_dict")
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise ValueError(f"checkpoint: {where!r}: 'state_dict' must map parameter names to tensors")
    try:
        info = ModelInfo.from_dict(payload["info"])
        model = build_model(info.in_channels, len(info.class_values), info.config.model, info.spacing)
        model.load_state_dict(state)
        if any(p % d for p, d in zip(info.patch_size, model.divisor)):
            raise ValueError(f"patch_size {list(info.patch_size)} must be a multiple of the network's stride {model.divisor}")
        if model.pixel_head is not None:  # its scales set every block's margin and kernel: refuse absurd ones
            checked_sigmas(model.pixel_head.sigmas)
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as exc:
        # a checkpoint from elsewhere is untrusted input: say what is wrong, not where torch noticed it
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(
            f"checkpoint: {where!r} does not describe a valid network ({type(exc).__name__}: {detail[:300]})"
        ) from None
    bad = _non_finite(state)
    if bad:
        raise ValueError(f"checkpoint: {where!r} holds NaN or infinite weights ({', '.join(bad[:3])}); it cannot predict")
    optimizer = payload.get("optimizer")
    info.optimizer_state = optimizer if isinstance(optimizer, dict) else None
    model.sparse3d = info
    model.eval()
    return model


def _cpu(value: Any) -> Any:
    """A copy of a nested optimiser state with every tensor on the CPU."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().clone()
    if isinstance(value, dict):
        return {k: _cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_cpu(v) for v in value)
    return value
