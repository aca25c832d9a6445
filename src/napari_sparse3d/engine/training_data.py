"""What a training run learns from: the volumes, their annotations, the patches drawn and the held-out share.

:class:`TrainingData` keeps, per volume, the image, its normalisation, the
user's annotations, the part of them that trains (a share is held out for the
validation Dice, :mod:`napari_sparse3d.engine.validation`) and a
:class:`~napari_sparse3d.engine.sampling.PatchSampler`; one
:class:`~napari_sparse3d.engine.sampling.MultiSampler` draws batches across them.
The trainer (:mod:`napari_sparse3d.engine.training`) owns the optimisation;
this owns the data, so that new annotations (the correction loop) replace one
volume's targets, its held-out share and the validator in one place.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from napari_sparse3d.config import TrainConfig
from napari_sparse3d.engine.annotations import Annotations, prepare_many
from napari_sparse3d.engine.augment import Augmenter
from napari_sparse3d.engine.pixel_head import AS_IS, PixelClassifier, WithPrior, probability_map, training_samples
from napari_sparse3d.engine.preprocess import Normalization
from napari_sparse3d.engine.resample import ResampledVolume, model_grid
from napari_sparse3d.engine.sampling import MultiSampler, PatchSampler, class_weights
from napari_sparse3d.engine.validation import Validator, split_validation
from napari_sparse3d.engine.volume import Triple, Volume, VolumeLike, as_volume

__all__ = ["TrainingData", "at_model_spacing", "prepare_volumes", "resample_annotations"]


class TrainingData:
    """Volumes, annotations, samplers and the validator of one training run (see the module docstring).

    Parameters
    ----------
    volumes, normalizations, annotations : sequences, one entry per volume
        The annotations in one class order (``class_values``).
    class_values : list of int
    patch_size : (z, y, x)
    tc : TrainConfig
    spacing : (z, y, x) or None
        The model's voxel size (in-plane 90 degree rotations only where y and x voxels are square).
    seed : int
        Which voxels are held out (the training draws use the trainer's generator).
    head : PixelClassifier, optional
        The network's pixel classifier: fitted here on the training voxels of every volume
        (again after new annotations), its probabilities joining each image as extra channels.
    head_dtype : torch.dtype
        ``torch.bfloat16`` fits the classifier under bfloat16 autocast and computes its
        probabilities' products in bfloat16 (the trainer's precision, where the hardware
        has it; prediction then computes them the same way); otherwise float32.
    """

    def __init__(
        self,
        volumes: Sequence[VolumeLike],
        normalizations: Sequence[Normalization],
        annotations: Sequence[Annotations],
        *,
        class_values: Sequence[int],
        patch_size: Triple,
        tc: TrainConfig,
        spacing: Sequence[float] | None,
        seed: int,
        head: PixelClassifier | None = None,
        head_dtype: torch.dtype = torch.float32,
    ) -> None:
        self.volumes, self.normalizations = list(volumes), list(normalizations)
        self.head, self.head_dtype = head, head_dtype
        self.class_values, self.patch_size, self.tc, self.seed = list(class_values), patch_size, tc, int(seed)
        self.foreground = [k for k, v in enumerate(self.class_values) if v != 0]
        spacing = spacing or (1.0, 1.0, 1.0)
        augmenter = Augmenter(
            tc.flip, tc.rotate90, tc.intensity, square_yx=math.isclose(spacing[1], spacing[2]),
            intensity_channels=self.volumes[0].channels,
        )
        self.annotations: list[Annotations] = list(annotations)  # what the user annotated
        self.held_out: list[np.ndarray] = []
        trainings = []
        for index, full in enumerate(self.annotations):
            training, held = split_validation(full, tc.validation, self.seed + index)
            trainings.append(training)
            self.held_out.append(held)
        self.training_targets = [t.target for t in trainings]
        # what the network reads: the normalised image, with the classifier's probabilities when it has one
        self.sources: list[Any] = list(self.volumes)
        self.source_norms: list[Any] = list(self.normalizations)
        if head is not None:
            self._fit_head()
        self.sampler = MultiSampler([
            PatchSampler(
                source, norm, training.target, class_weights(training.counts(), tc.class_balance), patch_size,
                self.foreground, foreground_fraction=tc.foreground_fraction, augmenter=augmenter,
            )
            for source, norm, training in zip(self.sources, self.source_norms, trainings)
        ])
        self.validator = self._validator()

    def _fit_head(self) -> None:
        """Fit the pixel classifier on every volume's training voxels; refresh the probability channels."""
        head = self.head
        assert head is not None
        items = list(zip(self.volumes, self.normalizations, self.training_targets))
        head.fit(*training_samples(head, items, seed=self.seed), seed=self.seed, dtype=self.head_dtype)
        for i, (volume, norm) in enumerate(zip(self.volumes, self.normalizations)):
            probabilities = probability_map(head, volume, norm, self.head_dtype)
            if isinstance(self.sources[i], WithPrior):
                self.sources[i].probabilities = probabilities  # the samplers and the validator read it
            else:
                self.sources[i], self.source_norms[i] = WithPrior(volume, norm, probabilities), AS_IS

    def prior_map(self, index: int = 0) -> np.ndarray | None:
        """The classifier's probabilities over volume ``index`` as training reads them, or ``None`` without a classifier.

        Prediction of that volume can read them (``prior_map=``) instead of computing them again.
        """
        source = self.sources[index]
        return source.probabilities if isinstance(source, WithPrior) else None

    def _validator(self) -> Validator | None:
        items = [(v, n, h) for v, n, h in zip(self.sources, self.source_norms, self.held_out) if bool((h >= 0).any())]
        if not items:
            return None
        validator = Validator(
            items, self.patch_size, len(self.class_values), self.foreground, batch_size=self.tc.batch_size, seed=self.seed
        )
        return validator if validator.enabled else None

    def update(self, index: int, annotations: Annotations) -> None:
        """New annotations for volume ``index``: its training targets, held-out share and the validator follow.

        The held-out share is drawn again (with the same seed), so a validation Dice
        measured after corrections is comparable with the next ones, not with the earlier.
        """
        training, held = split_validation(annotations, self.tc.validation, self.seed + index)
        self.annotations[index] = annotations
        self.held_out[index] = held
        self.training_targets[index] = training.target
        if self.head is not None:
            self._fit_head()
        self.sampler.set_targets(training.target, class_weights(training.counts(), self.tc.class_balance), index)
        self.validator = self._validator()


def _label_axis(target: np.ndarray, axis: int, n_out: int) -> np.ndarray:
    """``target`` resampled along ``axis`` to ``n_out`` voxels without losing annotated voxels.

    Upsampling takes the nearest voxel; downsampling keeps, per output voxel, an
    annotated voxel of its cell when there is one (the largest class index among
    them: -1, unlabeled, loses to any class), so a thin annotated slice survives.
    """
    n_in = target.shape[axis]
    if n_out >= n_in:
        index = np.minimum(((np.arange(n_out) + 0.5) * n_in / n_out).astype(np.int64), n_in - 1)
        return np.take(target, index, axis=axis)
    starts = np.unique(np.floor(np.arange(n_out) * n_in / n_out).astype(np.int64))
    return np.maximum.reduceat(target, starts, axis=axis)


def resample_annotations(annotations: Annotations, shape: Sequence[int]) -> Annotations:
    """Annotations on a grid of ``shape`` voxels (the model's spacing); annotated slice indices follow."""
    target = annotations.target
    for axis, n_out in enumerate(shape):
        target = _label_axis(target, axis, int(n_out))
    slices = {
        axis: sorted({min(int(i * shape[axis] / annotations.target.shape[axis]), shape[axis] - 1) for i in indices})
        for axis, indices in annotations.annotated_slices.items()
    }
    return Annotations(np.ascontiguousarray(target), list(annotations.class_values), slices)


def at_model_spacing(
    volumes: Sequence[VolumeLike],
    annotations: Sequence[Annotations],
    spacings: Sequence[Sequence[float] | None] | None,
    model_spacing: Sequence[float] | None,
) -> tuple[list[VolumeLike], list[Annotations]]:
    """Volumes (and annotations) whose spacing differs from the model's, seen on the model's grid.

    The image is interpolated lazily (:class:`~napari_sparse3d.engine.resample.ResampledVolume`);
    the annotations are resampled once (:func:`resample_annotations`).  A volume
    without a spacing is taken to be at the model's.
    """
    volumes, annotations = list(volumes), list(annotations)
    if spacings is None or model_spacing is None:
        return volumes, annotations
    for i, spacing in enumerate(spacings):
        shape = model_grid(volumes[i].spatial_shape, spacing, model_spacing)
        if shape is not None:
            volumes[i] = ResampledVolume(volumes[i], shape)
            annotations[i] = resample_annotations(annotations[i], shape)
    return volumes, annotations


def prepare_volumes(
    images: Sequence[Any],
    labels: Sequence[Any],
    annotated_slices: Sequence[Mapping[int, Sequence[int]] | None] | None,
    *,
    channel_axis: int | None,
    background_label: int | None,
    class_values: Sequence[int] | None,
    spacings: Sequence[Sequence[float] | None] | None,
    model_spacing: Sequence[float] | None,
) -> tuple[list[VolumeLike], list[Annotations]]:
    """Several training volumes from user inputs: checked, annotated in one class order, on the model's grid."""
    if annotated_slices is None:
        annotated_slices = [None] * len(images)
    if not (len(images) == len(labels) == len(annotated_slices)) or not images:
        raise ValueError(
            f"images, labels and annotated_slices must be non-empty and come one per volume, got {len(images)},"
            f" {len(labels)} and {len(annotated_slices)}"
        )
    if spacings is not None and len(spacings) != len(images):
        raise ValueError(f"spacings must come one per volume ({len(images)}), got {len(spacings)}")
    volumes: list[VolumeLike] = [
        image if isinstance(image, Volume) else as_volume(image, channel_axis, name=f"images[{i}]")
        for i, image in enumerate(images)
    ]
    annotations = prepare_many(
        labels, [v.spatial_shape for v in volumes], annotated_slices, background_label, class_values=class_values
    )
    return at_model_spacing(volumes, annotations, spacings, model_spacing)
