"""What a training run will be: network, configuration, normalisation, classes and patch shape.

:func:`plan_training` decides it once, before the first step, either from the
data (a new model: normalisation statistics from the image, the network's
kernels and strides from the voxel spacing, a patch of the configured size
that is roughly cubic in physical units) or from a trained network (a warm
start keeps its architecture, classes, normalisation and patch shape, so the
model goes on learning the same task).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from napari_sparse3d.config import Config, default_preset
from napari_sparse3d.engine.model import UNet3D, build_model
from napari_sparse3d.engine.preprocess import Normalization, compute_normalization, dominant_slice_axis, plan_patch_size
from napari_sparse3d.engine.trained import model_info, require_trained
from napari_sparse3d.engine.volume import Annotations, VolumeLike

__all__ = ["TrainingPlan", "plan_training"]


@dataclass
class TrainingPlan:
    """The decisions :func:`plan_training` made (see the module docstring)."""

    model: UNet3D
    config: Config
    normalization: Normalization
    class_values: list[int]
    annotations: Annotations  # indexed by ``class_values``
    spacing: tuple[float, float, float] | None
    patch_size: tuple[int, int, int]
    history: list[dict[str, Any]]
    optimizer_state: dict[str, Any] | None


def plan_training(
    volume: VolumeLike,
    annotations: Annotations,
    *,
    spacing: Sequence[float] | None,
    config: Config | None,
    device_type: str,
    init: UNet3D | None,
) -> TrainingPlan:
    """Plan a new model, or the continuation of ``init``; ``config`` defaults to the device's preset."""
    spacing = None if spacing is None else (float(spacing[0]), float(spacing[1]), float(spacing[2]))
    if init is not None:
        model = require_trained(init, "init")
        info = model_info(model, "init")
        if info.in_channels != volume.channels:
            raise ValueError(f"init: the model takes {info.in_channels} channels, the image has {volume.channels}")
        # the architecture is the checkpoint's; training and prediction settings may change
        plan = TrainingPlan(
            model=model,
            config=Config(info.config.model, config.train, config.predict) if config else info.config,
            normalization=info.normalization,
            class_values=list(info.class_values),
            # new labels may hold only some of the model's classes: index them the model's way
            annotations=annotations.remap(info.class_values),
            spacing=info.spacing if spacing is None else spacing,
            patch_size=info.patch_size,
            history=list(info.history),
            optimizer_state=info.optimizer_state,
        )
    else:
        config = config or Config.from_preset(default_preset(device_type))
        model = build_model(volume.channels, len(annotations.class_values), config.model, spacing)
        flatten = dominant_slice_axis(annotations.slice_counts()) if config.train.flatten_patches else None
        patch_size = config.train.patch_size or plan_patch_size(
            volume.spatial_shape, spacing, model.divisor, config.train.patch_voxels, flatten_axis=flatten
        )
        if any(p % d for p, d in zip(patch_size, model.divisor)):
            raise ValueError(f"config.train.patch_size {patch_size} must be a multiple of the network's stride {model.divisor}")
        plan = TrainingPlan(
            model=model,
            config=config,
            normalization=compute_normalization(volume),
            class_values=list(annotations.class_values),
            annotations=annotations,
            spacing=spacing,
            patch_size=patch_size,
            history=[],
            optimizer_state=None,
        )
    # the planned architecture (kernels and strides from the spacing) travels in the configuration, so a
    # checkpoint rebuilds this very network whatever spacing a later warm start trains with
    plan.config = plan.config.replace(
        model={"kernel_sizes": [list(k) for k in model.kernel_sizes], "strides": [list(s) for s in model.strides]}
    )
    return plan
