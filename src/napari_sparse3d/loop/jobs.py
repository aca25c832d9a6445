"""Long jobs of the interactive loop as generators, without Qt.

The napari widgets run these in a worker thread and handle what they yield on
the GUI thread; tests can iterate them directly.

:func:`training_job` trains and, every few seconds, predicts the region the
user is looking at (a :class:`Preview`); when the budget is used or
``stop`` is set it predicts the whole volume block by block, nearest the view
first (:class:`Phase` marks the switch).  :func:`prediction_job` is the second
half alone, for applying a model to any volume.  Both stop within one step or
one batch of windows when their flags are set.

What a job yields is typed: the engine's reports and blocks, and the small
items below (:class:`Phase`, :class:`Preview`, :class:`TrainerReady`,
:class:`JobFailed`), so that a consumer dispatches on the item's type.

:func:`build_trainer` and :func:`update_trainer` make or refresh the trainer a
job trains: on one volume, or with ``extra`` volumes (:class:`ExtraVolume`)
that add training data while previews and predictions stay on the first.

Importing this module does not import torch (the engine is imported when a job
first runs): the napari docks import it on the GUI thread.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from napari_sparse3d.config import PredictConfig

if TYPE_CHECKING:
    import numpy.typing as npt

    from napari_sparse3d.config import Config
    from napari_sparse3d.engine.checkpointing import CheckpointSaver
    from napari_sparse3d.engine.model import UNet3D
    from napari_sparse3d.engine.prediction import Block, PredictReport
    from napari_sparse3d.engine.training import Trainer, TrainReport
    from napari_sparse3d.engine.volume import Volume

__all__ = [
    "PREVIEW_CONFIG",
    "ExtraVolume",
    "JobFailed",
    "Phase",
    "Preview",
    "TrainerReady",
    "build_trainer",
    "check_annotations",
    "prediction_job",
    "training_job",
    "update_trainer",
]

#: Previews favour speed: windows of the training patch (the least context around the slice on
#: screen), no overlap between them, no mirroring.
PREVIEW_CONFIG = PredictConfig(overlap=0.0, batch_size=2, mirror_tta=False, window="patch")

Region = tuple  # three slices


@dataclass(frozen=True)
class Phase:
    """The job entered a phase: "training", "predicting", "cancelled" or "done"."""

    name: str


@dataclass(frozen=True)
class Preview:
    """A prediction of the viewed region, made with the weights of ``iteration``."""

    blocks: list[Block]
    iteration: int
    seconds: float


@dataclass(frozen=True)
class TrainerReady:
    """The job built (or updated) its trainer and is about to train it."""

    trainer: Trainer


@dataclass(frozen=True)
class JobFailed:
    """The job raised ``error`` and ended (a failure travels as an item, not as an exception)."""

    error: Exception


@dataclass(frozen=True)
class ExtraVolume:
    """A further image and its annotations that a training run learns from (never previewed or predicted).

    Parameters
    ----------
    image : array-like
        A 3D grey image (numpy, zarr, dask).
    labels : numpy.ndarray
        Its napari-style annotations (0 = not annotated), the image's shape.
    slices : mapping of axis to slice indices, optional
        Its fully annotated slices (there, 0 is background).
    spacing : (z, y, x), optional
        Its voxel spacing; it is resampled to the model's spacing where they differ.
        None: taken to be at the model's spacing.
    """

    image: Any
    labels: np.ndarray
    slices: Mapping[int, Sequence[int]] | None = None
    spacing: tuple[float, float, float] | None = None


def check_annotations(
    labels: np.ndarray,
    annotated_slices: Mapping[int, Sequence[int]] | None,
    extra: Sequence[ExtraVolume] | None = None,
) -> None:
    """Raise the ``TypeError``/``ValueError`` a new training run would raise for these annotations.

    For saying what is wrong before a job starts, on the GUI thread (no torch).
    With ``extra`` volumes the classes are those of all volumes together.
    """
    from napari_sparse3d.engine.annotations import prepare_annotations, prepare_many

    if not extra:
        prepare_annotations(labels, labels.shape, annotated_slices or None)
        return
    prepare_many(
        [labels, *(e.labels for e in extra)],
        [labels.shape, *(e.labels.shape for e in extra)],
        [annotated_slices or None, *(e.slices or None for e in extra)],
    )


def build_trainer(
    image: Any,
    labels: np.ndarray,
    annotated_slices: Mapping[int, Sequence[int]] | None,
    *,
    spacing: Sequence[float] | None = None,
    config: Config | None = None,
    device: str = "auto",
    init: UNet3D | None = None,
    extra: Sequence[ExtraVolume] | None = None,
) -> Trainer:
    """A new trainer for ``image`` (the volume the loop shows and corrects) and any ``extra`` volumes.

    Without ``extra`` this is :meth:`~napari_sparse3d.engine.training.Trainer.from_inputs`;
    with them, :meth:`~napari_sparse3d.engine.training.Trainer.from_many` with ``image`` first
    and ``spacing`` the model's (an extra volume with another spacing is resampled to it;
    without a model spacing none is).
    """
    from napari_sparse3d.engine.training import Trainer

    if not extra:
        return Trainer.from_inputs(image, labels, annotated_slices, spacing=spacing, config=config, device=device, init=init)
    spacings = [spacing, *(e.spacing for e in extra)]
    return Trainer.from_many(
        [image, *(e.image for e in extra)],
        [labels, *(e.labels for e in extra)],
        [annotated_slices, *(e.slices for e in extra)],
        spacing=spacing,
        spacings=None if all(s is None for s in spacings) else spacings,
        config=config,
        device=device,
        init=init,
    )


def update_trainer(
    trainer: Trainer,
    labels: np.ndarray,
    annotated_slices: Mapping[int, Sequence[int]] | None,
    extra: Sequence[ExtraVolume] | None = None,
) -> None:
    """Give a kept trainer the current annotations: of its first volume and of each ``extra`` one, in order.

    ``extra`` must be the volumes the trainer was built with (:func:`build_trainer`);
    their annotations are resampled as their images were.
    """
    from napari_sparse3d.engine.annotations import prepare_annotations
    from napari_sparse3d.engine.training_data import resample_annotations

    extra = list(extra or ())
    if len(extra) != len(trainer.volumes) - 1:
        raise ValueError(f"the trainer learns from {len(trainer.volumes)} volumes, got annotations for {1 + len(extra)}")
    trainer.update_annotations(labels, annotated_slices)
    for index, volume in enumerate(extra, start=1):
        try:
            annotations = prepare_annotations(
                volume.labels, volume.labels.shape, volume.slices or None, class_values=trainer.class_values, require_two=False
            )
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"volume {index}: {exc}") from None
        shape = tuple(trainer.volumes[index].spatial_shape)
        if tuple(annotations.target.shape) != shape:
            annotations = resample_annotations(annotations, shape)
        trainer.update_annotations(annotations, index=index)


def training_job(
    trainer: Trainer,
    *,
    max_seconds: float | None = None,
    max_iterations: int | None = None,
    stop: threading.Event | None = None,
    cancel: threading.Event | None = None,
    view: Callable[[], Region | None] | None = None,
    focus: Callable[[], Sequence[float] | None] | None = None,
    preview_every: float = 3.0,
    device: str | None = None,
    saver: CheckpointSaver | None = None,
) -> Generator[TrainReport | Preview | Phase | Block | PredictReport, None, None]:
    """Train ``trainer`` within the budget, with previews, then predict the whole volume.

    Parameters
    ----------
    stop : threading.Event
        Ends training after the current step (the model keeps the weights of
        the last finished step); the full prediction still runs.
    cancel : threading.Event
        Ends the job at once, also during the full prediction.
    view : callable returning three slices or None
        The region on screen, asked before each preview (called from this
        thread: it must only read a value the GUI thread keeps up to date).
    focus : callable returning a (z, y, x) point or None
        Where the full prediction starts.
    preview_every : float
        Seconds between previews; stretched so previews take at most a
        fifth of the time.
    saver : CheckpointSaver, optional
        Writes the model into a project every so often, and when training ends
        (not after a failure: the project keeps its last good checkpoint).
    """
    from napari_sparse3d.engine.prediction import predict_region

    stop = stop or threading.Event()
    cancel = cancel or threading.Event()
    device = device or str(trainer.device)
    yield Phase("training")
    steps = trainer.steps(max_seconds=max_seconds, max_iterations=max_iterations)
    interval = preview_every
    # the first preview follows the first step: with a pixel classifier it is already a segmentation
    last_preview = -float("inf")
    try:
        for report in steps:
            if saver is not None:
                saver.step(trainer.model)
            yield report
            if stop.is_set() or cancel.is_set():
                break
            if view is not None and time.perf_counter() - last_preview >= interval:
                region = view()
                if region is not None:
                    t0 = time.perf_counter()
                    # the volume's statistics and the classifier's probabilities were computed when training
                    # started (and after each correction): not again for every preview
                    blocks = list(predict_region(
                        trainer.volume, trainer.model, region, device=device, config=PREVIEW_CONFIG,
                        normalization=trainer.normalizations[0], prior_map=trainer.data.prior_map(0),
                    ))
                    seconds = time.perf_counter() - t0
                    interval = max(preview_every, 4 * seconds)
                    yield Preview(blocks, report.iteration, seconds)
                last_preview = time.perf_counter()
    finally:
        steps.close()
        trainer.release()
    if saver is not None:
        saver.final(trainer.model)
    if cancel.is_set():
        yield Phase("cancelled")
        return
    yield from prediction_job(
        trainer.volume, trainer.model, device=device, cancel=cancel, focus=focus, prior_map=trainer.data.prior_map(0)
    )


def prediction_job(
    image: Volume | npt.ArrayLike,
    model: UNet3D,
    *,
    device: str = "auto",
    cancel: threading.Event | None = None,
    focus: Callable[[], Sequence[float] | None] | None = None,
    config: PredictConfig | None = None,
    prior_map: Any = None,
) -> Generator[Phase | Block | PredictReport, None, None]:
    """Predict ``image`` block by block (nearest ``focus()`` first), yielding blocks and progress.

    ``image`` is a :class:`~napari_sparse3d.engine.volume.Volume` or a 3D array
    (numpy, zarr, dask: checked with :func:`~napari_sparse3d.engine.volume.as_volume`).
    ``prior_map``: the classifier's probabilities over ``image`` where the trainer
    has them (see :func:`~napari_sparse3d.engine.prediction.predict_blocks`).
    """
    from napari_sparse3d.engine.devices import release_cached_memory, resolve_device
    from napari_sparse3d.engine.prediction import predict_blocks
    from napari_sparse3d.engine.volume import Volume, as_volume

    volume = image if isinstance(image, Volume) else as_volume(image)
    cancel = cancel or threading.Event()
    yield Phase("predicting")
    reports: list[PredictReport] = []
    priority = focus() if focus is not None else None
    blocks = predict_blocks(
        volume, model, device=device, config=config, priority=priority, progress=reports.append, prior_map=prior_map
    )
    try:
        for block in blocks:
            if cancel.is_set():
                yield Phase("cancelled")
                return
            yield block
            while reports:
                yield reports.pop(0)
    finally:
        blocks.close()
        # the GPU allocator keeps what the windows used cached: give it back to the viewer and other processes
        release_cached_memory(resolve_device(device))
    while reports:
        yield reports.pop(0)
    yield Phase("done")
