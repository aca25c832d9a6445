"""Checkpoint files: a trained network written atomically, and read back as untrusted input.

What a checkpoint holds is :mod:`napari_sparse3d.engine.trained`'s; this module
decides where it goes (a unique name beside the target, flushed, then renamed)
and what a path, a dict or a model given by a user means.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from napari_sparse3d.engine.model import UNet3D
from napari_sparse3d.engine.trained import from_payload, read_payload, require_trained, to_payload, write_payload
from napari_sparse3d.io.files import write_aside

__all__ = ["as_model", "load_checkpoint", "save_checkpoint"]


def save_checkpoint(model: UNet3D, path: str | os.PathLike) -> Path:
    """Write ``model`` (which must carry ``model.sparse3d``) atomically: write aside, then rename."""
    from napari_sparse3d import __version__

    payload = to_payload(model, where=str(path), package_version=__version__)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with write_aside(path) as tmp:  # a unique name beside it, flushed to disk, then renamed
        write_payload(payload, tmp)
    return path


def load_checkpoint(source: str | os.PathLike | dict, *, map_location: str = "cpu") -> UNet3D:
    """Rebuild the network of a checkpoint (path or loaded dict), with ``model.sparse3d`` attached."""
    if isinstance(source, dict):
        return from_payload(source, where="checkpoint dict")
    where = str(source)
    if Path(source).is_dir():
        raise ValueError(f"checkpoint: {where!r} is a folder; give the path of a checkpoint file (.pt)")
    if not Path(source).is_file():
        raise ValueError(f"checkpoint: file {where!r} does not exist")
    return from_payload(read_payload(source, where=where, map_location=map_location), where=where)


def as_model(model_or_checkpoint: Any, *, name: str = "model") -> UNet3D:
    """Accept a trained model, a checkpoint path, or a loaded checkpoint dict."""
    if isinstance(model_or_checkpoint, (str, os.PathLike, dict)):
        return load_checkpoint(model_or_checkpoint)
    if hasattr(model_or_checkpoint, "state_dict"):
        return require_trained(model_or_checkpoint, name)
    raise TypeError(
        f"{name} must be a trained model, a checkpoint path or a checkpoint dict, got {type(model_or_checkpoint).__name__}"
    )
