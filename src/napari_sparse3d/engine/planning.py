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

import numpy as np

from napari_sparse3d.config import Config, default_preset
from napari_sparse3d.engine.annotations import Annotations
from napari_sparse3d.engine.model import UNet3D, build_model
from napari_sparse3d.engine.objects import context_plan, object_extent
from napari_sparse3d.engine.preprocess import (
    Normalization,
    compute_normalization,
    dominant_slice_axis,
    plan_patch_size,
    side_limits,
)
from napari_sparse3d.engine.trained import model_info, require_trained
from napari_sparse3d.engine.volume import VolumeLike

__all__ = ["TrainingPlan", "plan_training"]


@dataclass
class TrainingPlan:
    """The decisions :func:`plan_training` made (see the module docstring)."""

    model: UNet3D
    config: Config
    normalization: Normalization
    class_values: list[int]
    annotations: list[Annotations]  # one per volume, indexed by ``class_values``
    spacing: tuple[float, float, float] | None
    patch_size: tuple[int, int, int]
    history: list[dict[str, Any]]
    optimizer_state: dict[str, Any] | None


def plan_training(
    volumes: Sequence[VolumeLike],
    annotations: Sequence[Annotations],
    *,
    spacing: Sequence[float] | None,
    config: Config | None,
    device_type: str,
    init: UNet3D | None,
) -> TrainingPlan:
    """Plan a new model, or the continuation of ``init``; ``config`` defaults to the device's preset.

    ``volumes`` and ``annotations`` come one per training volume (all at the model's
    spacing, their annotations indexed by one class order); the patch is planned for
    the largest volume.
    """
    spacing = None if spacing is None else (float(spacing[0]), float(spacing[1]), float(spacing[2]))
    if not volumes or len(volumes) != len(annotations):
        raise ValueError(
            f"plan_training needs one annotation per volume, got {len(volumes)} volumes and {len(annotations)} annotations"
        )
    volume = volumes[0]
    for i, other in enumerate(volumes[1:], 1):
        if other.channels != volume.channels:
            raise ValueError(
                f"images must all have the same number of channels: image 0 has {volume.channels}, image {i} has {other.channels}"
            )
    if len({tuple(a.class_values) for a in annotations}) != 1:
        raise ValueError("annotations of all volumes must use one class order (see prepare_many)")
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
            annotations=[a.remap(info.class_values) for a in annotations],
            spacing=info.spacing if spacing is None else spacing,
            patch_size=info.patch_size,
            history=list(info.history),
            optimizer_state=info.optimizer_state,
        )
    else:
        config = config or Config.from_preset(default_preset(device_type))
        class_values = list(annotations[0].class_values)
        model = build_model(volume.channels, len(class_values), config.model, spacing)
        slice_counts = [sum(counts) for counts in zip(*(a.slice_counts() for a in annotations))]
        flatten = dominant_slice_axis(slice_counts) if config.train.flatten_patches else None
        largest = tuple(max(v.spatial_shape[axis] for v in volumes) for axis in range(3))
        patch_voxels = config.train.patch_voxels
        if config.train.patch_size is None and config.train.plan_from_objects:
            extents = [e for e in (object_extent(a) for a in annotations) if e is not None]
            grown = context_plan(np.max(extents, axis=0) if extents else None, patch_voxels, config.train.batch_size)
            if grown is not None:  # large objects: a patch that holds one, unflattened, and a smaller batch
                patch_voxels, flatten = grown[0], None
                config = config.replace(train={"batch_size": grown[1]})
        patch_size = config.train.patch_size or plan_patch_size(
            largest, spacing, model.divisor, patch_voxels, flatten_axis=flatten
        )
        if any(p % d for p, d in zip(patch_size, model.divisor)):
            raise ValueError(f"config.train.patch_size {patch_size} must be a multiple of the network's stride {model.divisor}")
        limit = tuple(side_limits(largest, model.divisor))
        if config.train.patch_size is not None and any(p > lim for p, lim in zip(patch_size, limit)):
            # a patch is padded to its size: far beyond the volume that is memory spent on padding alone
            raise ValueError(
                f"config.train.patch_size {tuple(patch_size)} is larger than the volume {largest} allows: at most"
                f" {limit} (the volume rounded up to the network's stride {tuple(model.divisor)})"
            )
        plan = TrainingPlan(
            model=model,
            config=config,
            normalization=compute_normalization(volume, mode=config.train.normalization),
            class_values=class_values,
            annotations=list(annotations),
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
