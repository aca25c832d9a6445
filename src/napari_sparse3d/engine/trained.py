"""Checkpoints: a trained network plus everything needed to use it.

A checkpoint alone is enough to predict: it carries the configuration, the
class values (channel k <-> user's label value), the normalisation
statistics, the patch size and the voxel spacing.  It holds only tensors,
strings and numbers, so it loads with ``torch.load(weights_only=True)`` and
never unpickles code.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .config import Config
from .files import write_aside
from .model import UNet3D, build_model
from .preprocess import Normalization

__all__ = ["ModelInfo", "save_checkpoint", "load_checkpoint", "as_model", "thin_history", "FORMAT", "FORMAT_VERSION"]

FORMAT = "napari-sparse3d-checkpoint"
FORMAT_VERSION = 1

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
    """What travels with a trained network (attached to it as ``model.sparse3d``)."""

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
    def from_dict(cls, data: dict[str, Any]) -> "ModelInfo":
        return cls(
            config=Config.from_json(data["config"]),
            class_values=[int(v) for v in data["class_values"]],
            normalization=Normalization.from_dict(data["normalization"]),
            patch_size=tuple(int(p) for p in data["patch_size"]),  # type: ignore[arg-type]
            spacing=None if data["spacing"] is None else tuple(float(s) for s in data["spacing"]),  # type: ignore[arg-type]
            in_channels=int(data["in_channels"]),
            history=list(data.get("history", [])),
        )


def save_checkpoint(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write ``model`` (which must carry ``model.sparse3d``) atomically: write aside, then rename."""
    info = _info(model, "model")
    from . import __version__

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise ValueError(f"model: weights {bad[:3]} hold NaN or infinite values; refusing to save a broken model to {str(path)!r}")
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "package_version": __version__,
        "info": info.to_dict(),
        "state_dict": state,
    }
    if info.optimizer_state is not None:
        payload["optimizer"] = _cpu(info.optimizer_state)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with write_aside(path) as tmp:  # a unique name beside it, flushed to disk, then renamed
        torch.save(payload, tmp)
    return path


def _torch_version() -> tuple[int, int]:
    major, minor = (torch.__version__.split("+")[0].split(".") + ["0"])[:2]
    try:
        return int(major), int("".join(c for c in minor if c.isdigit()) or 0)
    except ValueError:  # pragma: no cover - an unparsable development version
        return (99, 0)


def load_checkpoint(source: str | os.PathLike | dict, *, map_location: str | torch.device = "cpu") -> UNet3D:
    """Rebuild the network of a checkpoint (path or loaded dict), with ``model.sparse3d`` attached."""
    if isinstance(source, dict):
        payload = source
        where = "checkpoint dict"
    else:
        where = str(source)
        if not Path(source).is_file():
            raise ValueError(f"checkpoint: file {where!r} does not exist")
        if _torch_version() < (2, 6):  # CVE-2025-32434: weights_only loading could still run code
            raise RuntimeError(
                f"checkpoint: loading {where!r} needs torch >= 2.6 (this is torch {torch.__version__}, whose"
                " weights_only loading can run code from a crafted file); upgrade torch"
            )
        try:
            # weights_only: the unpickler builds tensors and plain containers only, so a crafted
            # file cannot run code (torch >= 2.6, see setup.cfg)
            payload = torch.load(source, map_location=map_location, weights_only=True)
        except Exception as exc:  # a truncated, foreign or hostile file
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ValueError(f"checkpoint: {where!r} is not a readable napari-sparse3d checkpoint ({first[:200]})") from None
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
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as exc:
        # a checkpoint from elsewhere is untrusted input: say what is wrong, not where torch noticed it
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"checkpoint: {where!r} does not describe a valid network ({type(exc).__name__}: {detail[:300]})") from None
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise ValueError(f"checkpoint: {where!r} holds NaN or infinite weights ({', '.join(bad[:3])}); it cannot predict")
    optimizer = payload.get("optimizer")
    info.optimizer_state = optimizer if isinstance(optimizer, dict) else None
    model.sparse3d = info  # type: ignore[assignment]
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


def _info(model: Any, name: str) -> ModelInfo:
    info = getattr(model, "sparse3d", None)
    if not isinstance(info, ModelInfo):
        raise TypeError(
            f"{name} must be a model returned by napari_sparse3d.run/train or loaded from a checkpoint"
            f" (it carries normalisation and class values); got a {type(model).__name__} without them"
        )
    return info


def as_model(model_or_checkpoint: Any, *, name: str = "model") -> UNet3D:
    """Accept a trained model, a checkpoint path, or a loaded checkpoint dict."""
    if isinstance(model_or_checkpoint, (str, os.PathLike, dict)):
        return load_checkpoint(model_or_checkpoint)
    if isinstance(model_or_checkpoint, nn.Module):
        _info(model_or_checkpoint, name)
        return model_or_checkpoint  # type: ignore[return-value]
    raise TypeError(
        f"{name} must be a trained model, a checkpoint path or a checkpoint dict, got {type(model_or_checkpoint).__name__}"
    )
