"""What a Start or Continue of the training dock trains on, and the job that trains.

:meth:`TrainingRun.read` takes everything from the viewer on the GUI thread when
the button is pressed (a snapshot of the annotations: painting goes on meanwhile)
and says at once what is wrong with it; :meth:`TrainingRun.job` then builds or
updates the trainer in the worker thread and trains
(:func:`napari_sparse3d.loop.jobs.training_job`).  Further image/annotation pairs
(:mod:`napari_sparse3d._napari.extra_volumes`) add training data; previews and
the prediction stay on the chosen image.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from napari_sparse3d._napari.extra_volumes import read_extra
from napari_sparse3d.loop.jobs import ExtraVolume, TrainerReady, build_trainer, check_annotations, training_job, update_trainer

if TYPE_CHECKING:
    from pathlib import Path

    import numpy.typing as npt
    from napari.layers import Image, Labels

    from napari_sparse3d._napari.state import LoopState
    from napari_sparse3d.config import Config
    from napari_sparse3d.engine.model import UNet3D
    from napari_sparse3d.engine.training import Trainer
    from napari_sparse3d.io.project import Project

__all__ = ["TrainingRun"]


@dataclass
class TrainingRun:
    """The inputs of one training run and what it continues: the kept trainer, or a model or checkpoint."""

    image: npt.ArrayLike
    labels: np.ndarray
    slices: dict[int, list[int]]
    spacing: tuple[float, float, float] | None
    config: Config | None  # None: the configuration of the checkpoint it resumes
    device: str
    project: Project | None  # where checkpoints are written, if the work is saved into a project
    trainer: Trainer | None  # the trainer of the previous round, continued (it keeps its optimiser state)
    init: UNet3D | Path | None  # or the model (or project checkpoint) a new trainer starts from
    key: tuple[int, ...]  # the image and annotation layers (ids), extra pairs' too: the state keeps the trainer for them
    extra: list[ExtraVolume] = field(default_factory=list)  # further volumes it learns from (not shown, not predicted)

    @classmethod
    def read(
        cls,
        state: LoopState,
        *,
        warm: bool,
        config: Config | None,
        device: str,
        extra: Sequence[tuple[Image, Labels]] = (),
    ) -> TrainingRun:
        """The run that Start (``warm=False``) or Continue starts now; ``extra``: further (image, labels) layer pairs.

        Raises ``TypeError`` or ``ValueError`` saying what is wrong with the layers or the annotations.
        """
        image, labels_layer, register = state.image_layer, state.labels_layer, state.register()
        if image is None or labels_layer is None or register is None:
            raise ValueError("choose an image layer and its annotation layer in the annotation widget first")
        if image.rgb or getattr(image, "multiscale", False) or image.ndim != 3:
            raise ValueError(f"layer {image.name!r}: expected a 3D grey image, got ndim={image.ndim}, rgb={image.rgb}")
        from napari_sparse3d._napari.voxel_size import grid_mismatch

        problem = grid_mismatch(labels_layer, image)
        if problem is not None:
            raise ValueError(f"{problem}: the annotations must lie on the image's voxel grid")
        labels = np.array(labels_layer.data, copy=True)  # a snapshot: painting goes on meanwhile
        if labels.shape != tuple(image.data.shape):
            raise ValueError(
                f"annotation layer {labels_layer.name!r} has shape {labels.shape}, the image {tuple(image.data.shape)}"
            )
        slices = register.as_dict()
        spacing, volumes = read_extra(state, extra)
        key = (id(image), id(labels_layer), *(id(layer) for pair in extra for layer in pair))
        trainer = state.trainer if (warm and state.trainer is not None and state.trainer_key == key) else None
        init: UNet3D | Path | None = state.model if (warm and trainer is None) else None
        if warm and trainer is None and init is None and state.project is not None:
            init = state.project.checkpoint("latest")  # resume the project's training
        if init is not None and state.project is not None and init == state.project.checkpoint("latest"):
            config = None  # the checkpoint's own configuration
        if trainer is None and init is None:  # say what is wrong now, not from the worker a moment later
            check_annotations(labels, slices, volumes)
        return cls(image.data, labels, slices, spacing, config, device, state.project, trainer, init, key, volumes)

    def job(
        self,
        stop: threading.Event,
        cancel: threading.Event,
        *,
        max_seconds: float | None,
        max_iterations: int | None,
        view: Callable[[], tuple[slice, slice, slice] | None],
        focus: Callable[[], Sequence[float] | None],
        preview_every: float,
        checkpoint_every: float,
    ) -> Iterator[object]:
        """Build the trainer (or give the kept one the new annotations), then train, preview and predict."""
        from napari_sparse3d.engine.checkpointing import CheckpointSaver
        from napari_sparse3d.io.checkpoint import as_model

        trainer = self.trainer
        try:
            if trainer is None:
                init = None if self.init is None else as_model(self.init, name="init")
                trainer = build_trainer(
                    self.image, self.labels, self.slices, spacing=self.spacing, config=self.config, device=self.device,
                    init=init, extra=self.extra,
                )
            else:
                update_trainer(trainer, self.labels, self.slices, self.extra)
            yield TrainerReady(trainer)
            yield from training_job(
                trainer,
                max_seconds=max_seconds,
                max_iterations=max_iterations,
                stop=stop,
                cancel=cancel,
                view=view,
                focus=focus,
                preview_every=preview_every,
                saver=None if self.project is None else CheckpointSaver(self.project, checkpoint_every),
            )
        finally:
            self.trainer = self.init = None  # the state keeps what it needs; the worker must not
            self.extra = []
