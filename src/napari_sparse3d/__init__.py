"""napari-sparse3d: dense 3D segmentation from a few annotated slices.

The public API is imported lazily, so ``import napari_sparse3d`` (and so
napari's plugin discovery) does not load torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = [
    "Config", "RunResult", "__version__", "clean_labels", "export", "instances_from_prediction", "predict", "run",
]

if TYPE_CHECKING:  # pragma: no cover
    from napari_sparse3d.api import RunResult, predict, run
    from napari_sparse3d.config import Config
    from napari_sparse3d.engine.postprocess import clean_labels, instances_from_prediction
    from napari_sparse3d.modelzoo import export

_LAZY = {
    "run": "api",
    "predict": "api",
    "RunResult": "api",
    "Config": "config",
    "clean_labels": "engine.postprocess",
    "instances_from_prediction": "engine.postprocess",
    "export": "modelzoo",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
