"""The headless API: :func:`run` (train + predict) and :func:`predict`.

Both are thin: they open files and projects (:mod:`napari_sparse3d.io`), check
their arguments, then drive the same engine the napari docks use
(:meth:`Trainer.from_inputs`, :meth:`Trainer.steps`, :func:`predict_volume`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from napari_sparse3d.config import Config, resolve_config
from napari_sparse3d.engine.checkpointing import CheckpointSaver
from napari_sparse3d.engine.devices import resolve_device
from napari_sparse3d.engine.model import UNet3D
from napari_sparse3d.engine.prediction import PredictReport, predict_volume
from napari_sparse3d.engine.trained import model_info
from napari_sparse3d.engine.training import Trainer, TrainReport
from napari_sparse3d.engine.volume import TrainingInputs, VolumeLike, as_volume, check_budget, check_finite, check_spacing
from napari_sparse3d.io.arrays import open_input
from napari_sparse3d.io.checkpoint import as_model, save_checkpoint
from napari_sparse3d.io.ome import check_pyramid
from napari_sparse3d.io.outputs import PredictionOutput
from napari_sparse3d.io.project import Project, is_project

__all__ = ["RunResult", "predict", "run"]

#: An image or labels: numpy, zarr or dask array (anything with ``shape``, ``dtype`` and slicing), or a file path.
ImageInput = ArrayLike | str | os.PathLike[str]
#: A trained model, a checkpoint path, or a loaded checkpoint dict.
ModelInput = UNet3D | str | os.PathLike[str] | Mapping[str, Any]
#: Called with each training report, then with each prediction report.
Progress = Callable[[TrainReport | PredictReport], object]

#: Budget of :func:`run` when neither ``max_seconds`` nor ``max_iterations`` is given.
DEFAULT_SECONDS = 120.0


@dataclass
class RunResult:
    """What :func:`run` returns; see its docstring."""

    labels: np.ndarray
    probabilities: np.ndarray
    model: UNet3D
    patch_size: tuple[int, int, int]
    history: list[TrainReport] = field(default_factory=list)
    class_values: list[int] = field(default_factory=list)

    def save(self, path: str | os.PathLike) -> Path:
        """Write a checkpoint that :func:`predict` and the console command accept."""
        return save_checkpoint(self.model, path)


def _check_seed(seed: object) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**63:
        raise TypeError(f"seed must be an integer in [0, 2**63), got {seed!r}")
    return int(seed)


def _check_progress(progress: object) -> None:
    if progress is not None and not callable(progress):
        raise TypeError(f"progress must be a callable taking a report, or None, got {type(progress).__name__}")


def _check_volume_finite(volume: VolumeLike, name: str = "image") -> None:
    z, y, x = volume.spatial_shape
    step = max(1, 2**24 // (y * x * volume.channels))  # read ~16M voxels at a time
    for z0 in range(0, z, step):
        check_finite(name, volume.read((slice(z0, z0 + step), slice(None), slice(None))))


def run(
    image: ImageInput,
    labels: ImageInput | None = None,
    *,
    annotated_slices: Mapping[int, Sequence[int]] | None = None,
    spacing: Sequence[float] | None = None,
    max_seconds: float | None = None,
    max_iterations: int | None = None,
    device: str = "auto",
    seed: int = 0,
    config: Config | str | Mapping[str, Any] | None = None,
    progress: Progress | None = None,
    channel_axis: int | None = None,
    background_label: int | None = None,
    init: ModelInput | None = None,
    checkpoint_every: float = 30.0,
    stop: Any = None,
) -> RunResult | list[RunResult]:
    """Train a 3D U-Net on sparse annotations of ``image`` and segment all of it.

    ``image`` may also be a list of volumes (arrays, paths or projects): one model
    then learns from all of them (the 3D U-Net paper's fully automatic use), and
    ``labels``, ``annotated_slices`` and ``spacing`` come one entry per volume
    (``spacing`` may also be one triple for all); a list of :class:`RunResult`
    comes back, one per volume, sharing the model.  Checkpoints go into the first
    project given, each volume's prediction into its own project.

    Parameters
    ----------
    image : array (Z, Y, X), path, or project directory; or a list of them
        numpy, zarr or dask array, or a tif/zarr/npy file.  With
        ``channel_axis`` a 4D array holding channels.  A project
        (:class:`~napari_sparse3d.project.Project`) supplies the image, the
        annotations, the annotated slices, spacing and configuration, and
        training resumes from its latest checkpoint; the run saves checkpoints
        every ``checkpoint_every`` seconds and the prediction back into it.
    labels : int array (Z, Y, X) or path; optional with a project
        napari convention: 0 = not annotated, >= 1 = class label values.
        Given with a project, they replace (and are saved as) its annotations.
    annotated_slices : dict {axis: [indices]}, optional
        Fully annotated slices: inside them an unpainted (0) voxel is background.
    spacing : (z, y, x), optional
        Voxel size; anisotropic spacing changes the network's kernels, strides
        and patch shape.  Default: isotropic.  With several volumes the first one's
        is the model's; a volume at another spacing is resampled to it.
    max_seconds, max_iterations : optional
        Training budget; either or both (default: 120 seconds).
    device : str
        "auto" (CUDA, then MPS, then CPU), "cpu", "cuda", "cuda:N", "mps".
    seed : int
    config : Config, dict or preset name ("fast", "default", "large"), optional
        Default: "large" on CUDA, "default" (tuned for the CPU) elsewhere.
    progress : callable, optional
        Called with each :class:`~napari_sparse3d.training.TrainReport`, then
        with each :class:`~napari_sparse3d.prediction.PredictReport`.
    channel_axis : int, optional
        The channel axis of a 4D ``image``.
    background_label : int, optional
        A label value that means background everywhere (for scribbles).
    init : model or checkpoint, optional
        Warm start: continue training these weights.
    stop : threading.Event, optional
        Set it (from another thread, or a signal handler) to end training after
        the step in progress; the prediction and the saving follow as usual.

    Returns
    -------
    RunResult, or a list of them (one per volume) when ``image`` is a list
        ``labels`` (Z, Y, X) with the user's label values (0 = background),
        ``probabilities`` (K, Z, Y, X) float32, ``model``, ``patch_size``,
        ``history`` (one TrainReport per step), ``class_values`` and ``save(path)``.

    Raises
    ------
    TypeError, ValueError
        For bad input, naming the argument, what was expected and what was given.
    """
    check_budget(max_seconds, max_iterations)
    if stop is not None and not callable(getattr(stop, "is_set", None)):
        raise TypeError(f"stop must be a threading.Event (or None), got {type(stop).__name__}")
    seed = _check_seed(seed)
    _check_progress(progress)
    if isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, (int, float)) or not checkpoint_every > 0:
        raise ValueError(f"checkpoint_every must be a positive number of seconds, got {checkpoint_every!r}")
    if max_seconds is None and max_iterations is None:
        max_seconds = DEFAULT_SECONDS
    budget = {"max_seconds": max_seconds, "max_iterations": max_iterations}
    options = {"device": device, "seed": seed, "channel_axis": channel_axis, "background_label": background_label,
               "stop": stop}
    many = is_many(image)
    images = list(image) if many else [image]
    n = len(images)
    label_list = _per_volume("labels", labels, n, many)
    slice_list = _per_volume("annotated_slices", annotated_slices, n, many, item=lambda v: v is None or isinstance(v, Mapping))
    spacing_list = _per_volume("spacing", spacing, n, many and _spacing_per_volume(spacing, n))
    with ExitStack() as stack:
        inputs, projects, save_labels = [], [], []
        for i, (img, lab, slices, spc) in enumerate(zip(images, label_list, slice_list, spacing_list)):
            name = f"image[{i}]" if many else "image"
            lab = None if lab is None else open_input(lab, name=f"labels[{i}]" if many else "labels")
            if not is_project(img):
                if lab is None and isinstance(img, (str, os.PathLike)) and not Path(img).exists():  # a mistyped project
                    raise ValueError(f"{name}: {str(img)!r} does not exist (neither a file nor a project folder)")
                if lab is None:
                    raise TypeError(
                        f"{'labels[' + str(i) + ']' if many else 'labels'} must be an integer array or a path"
                        " (0 = not annotated); only a project path may come without"
                    )
                inputs.append(TrainingInputs(open_input(img, name=name), lab, slices, spc, config, init if i == 0 else None))
                projects.append(None)
            else:
                # one writer at a time: refused while napari (or another run) writes into the project
                project = stack.enter_context(Project.open(img, writable=True))
                own = project.training_inputs(labels=lab, annotated_slices=slices, spacing=spc, config=config, init=init)
                inputs.append(own)
                projects.append(project)
            save_labels.append(lab is not None)
        results = _train_and_predict(inputs, projects, budget, options, progress, checkpoint_every, save_labels)
    return results if many else results[0]


def is_many(image: Any) -> bool:
    """Whether ``run``'s ``image`` is several volumes: a list or tuple of arrays, paths or projects."""
    return (
        isinstance(image, (list, tuple))
        and len(image) > 0
        and all(isinstance(i, (str, os.PathLike)) or hasattr(i, "shape") for i in image)
    )


def _spacing_per_volume(spacing: Any, n: int) -> bool:
    """Whether ``spacing`` is one entry per volume (each None or three numbers) rather than one for all."""
    if spacing is None or not isinstance(spacing, (list, tuple)) or len(spacing) != n:
        return False
    return all(s is None or hasattr(s, "__len__") for s in spacing)


def _per_volume(name: str, value: Any, n: int, many: bool, item: Callable[[Any], bool] | None = None) -> list[Any]:
    """``value`` spread over ``n`` volumes: a list of one entry per volume when ``many``, else the same for all."""
    if not many:
        return [value] * n
    if value is None:
        return [None] * n
    expected = f"{name} must be a list with one entry per image ({n}) when image is a list"
    if item is not None and item(value):  # one entry where a list was needed: say so rather than guess
        raise TypeError(f"{expected}, got one {type(value).__name__}")
    if not isinstance(value, (list, tuple)) or len(value) != n:
        got = f"{len(value)} entries" if isinstance(value, (list, tuple)) else type(value).__name__
        raise TypeError(f"{expected}, got {got}")
    return list(value)


def _train_and_predict(
    inputs: list[TrainingInputs],
    projects: list[Project | None],
    budget: dict[str, Any],
    options: dict[str, Any],
    progress: Progress | None,
    checkpoint_every: float,
    save_labels: list[bool],
) -> list[RunResult]:
    """:func:`run` once its inputs are known (and its projects, if any, are open for writing).

    One model learns from every volume; checkpoints go into the first project (if any),
    each volume's prediction into its own.
    """
    device = options["device"]
    first = inputs[0]
    init = None if first.init is None else as_model(first.init, name="init")
    # a warm start without a configuration keeps the checkpoint's own (not the device's preset)
    config = None if first.config is None and init is not None else resolve_config(first.config, resolve_device(device).type)
    spacings = [check_spacing(i.spacing) for i in inputs]
    volumes = [as_volume(i.image, options["channel_axis"], name=f"image[{k}]" if len(inputs) > 1 else "image")
               for k, i in enumerate(inputs)]
    common = dict(background_label=options["background_label"], config=config, device=device, seed=options["seed"], init=init)
    for k, volume in enumerate(volumes):
        _check_volume_finite(volume, f"image[{k}]" if len(inputs) > 1 else "image")
    # the time budget covers the whole training, the pixel classifier's fit (in the trainer's set-up) included
    started = time.perf_counter()
    if len(inputs) == 1:
        trainer = Trainer.from_inputs(volumes[0], first.labels, first.annotated_slices, spacing=spacings[0], **common)
    else:
        trainer = Trainer.from_many(
            volumes, [i.labels for i in inputs], [i.annotated_slices for i in inputs], spacing=spacings[0],
            spacings=spacings, **common,
        )
    if budget.get("max_seconds") is not None:
        budget = dict(budget, max_seconds=max(1e-3, budget["max_seconds"] - (time.perf_counter() - started)))
    for project, own, save in zip(projects, inputs, save_labels):
        if project is not None and save:
            project.save_annotations(own.labels, own.annotated_slices or {})
    history = []
    saver = CheckpointSaver(next((p for p in projects if p is not None), None), checkpoint_every)
    stop = options.get("stop")
    for report in trainer.steps(**budget):
        history.append(report)
        saver.step(trainer.model)
        if progress is not None:
            progress(report)
        if stop is not None and stop.is_set():
            break
    trainer.release()
    saver.final(trainer.model)
    results = []
    for index, (volume, project, spc) in enumerate(zip(volumes, projects, spacings)):
        # the classifier's probabilities, as training computed them on this volume (on the model's grid)
        labels, probabilities = predict_volume(
            volume, trainer.model, device=device, progress=progress, keep_probabilities=True, spacing=spc,
            prior_map=trainer.data.prior_map(index),
        )
        if project is not None:
            project.save_prediction(labels, probabilities)
        results.append(RunResult(
            labels=labels,
            probabilities=probabilities,
            model=trainer.model,
            patch_size=trainer.patch_size,
            history=history,
            class_values=list(trainer.class_values),
        ))
    return results


def predict(
    image: ImageInput,
    model_or_checkpoint: ModelInput,
    *,
    spacing: Sequence[float] | None = None,
    out: ArrayLike | str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    device: str = "auto",
    progress: Progress | None = None,
    channel_axis: int | None = None,
    pyramid: int = 0,
    client: Any = None,
) -> Any:  # the labels: a numpy array, or ``out`` (zarr, numpy, ...)
    """Segment ``image`` with a trained model (fully automatic use).

    Parameters
    ----------
    image : array (Z, Y, X) or path
        As for :func:`run`.
    model_or_checkpoint : model, checkpoint path or checkpoint dict
        ``RunResult.model``, or what ``RunResult.save`` wrote.
    spacing : (z, y, x), optional
        The image's voxel size.  A model trained with a spacing learnt object
        sizes in its voxels: an image whose spacing differs from it by more
        than 5% on some axis is resampled to the model's spacing (linear
        interpolation), predicted there, and the class probabilities are
        interpolated back onto the image's grid before the argmax, so the
        labels have the image's shape.  Omitted while the model has a spacing:
        the image is assumed to be at the model's spacing (a ``UserWarning``
        says so).  A model trained without a spacing is never resampled for.
        Resampling holds the model-grid probabilities (4 bytes x classes x
        voxels at the model's spacing) in memory up to 2 GiB, beyond that in a
        temporary file; with ``out`` the labels are written a slab of whole
        chunks at a time (:mod:`napari_sparse3d.engine.resample`).
    out : zarr/numpy array or path, optional
        Written block by block as windows finish, so a large volume never has
        to fit in memory; a path creates an OME-Zarr label image there (OME-NGFF
        0.5: the labels in its array ``0``, ``spacing`` — or the model's — as its
        scale; written aside and renamed into place when complete), which
        :func:`~napari_sparse3d.io.arrays.load_array` and OME-Zarr viewers open.
        An existing path is refused unless ``overwrite`` and it is an earlier
        prediction; never the input itself.
        Until the last block is written the array is marked incomplete, and
        :func:`~napari_sparse3d.io.arrays.load_array` refuses to read it.
    overwrite : bool
        Replace an earlier prediction at ``out``.
    device, progress, channel_axis
        As for :func:`run`.
    pyramid : int
        With an ``out`` path: this many coarser levels (2x per level along the
        axes that are not already coarse; nearest, so labels stay labels).
    client : dask.distributed.Client, optional
        Predict on that cluster's workers, tile by tile, restartably
        (:func:`napari_sparse3d.distributed.predict_distributed`); ``image`` and
        ``out`` must then be paths the workers can reach.

    Returns
    -------
    array
        The labels, (Z, Y, X) with the user's label values; ``out`` when given.
    """
    import warnings  # (local: this change touches predict only)

    _check_progress(progress)
    if client is not None:
        from napari_sparse3d.distributed import predict_distributed

        return predict_distributed(
            image, model_or_checkpoint, out, client=client, spacing=spacing, overwrite=overwrite, device=device,
            channel_axis=channel_axis, progress=progress, pyramid=pyramid,
        ).labels
    spacing = check_spacing(spacing)
    if check_pyramid(pyramid) and not isinstance(out, (str, os.PathLike)):
        raise ValueError(f"pyramid: coarser levels are written to an out path (an OME-Zarr image), but out is {out!r}")
    resolve_device(device)
    model = as_model(model_or_checkpoint, name="model_or_checkpoint")
    volume = as_volume(open_input(image, name="image"), channel_axis)
    info = model_info(model)
    if spacing is None and info.spacing is not None:
        warnings.warn(
            f"predict: the image's spacing is unknown (spacing=None); the model was trained at spacing"
            f" {tuple(info.spacing)} (z, y, x), and the image is assumed to be at that spacing. Pass spacing="
            " to resample an image of another voxel size to the model's.",
            UserWarning,
            stacklevel=2,
        )
    inputs = [image, model_or_checkpoint]
    scale = spacing if spacing is not None else info.spacing  # the image's voxel size, as far as it is known
    target = PredictionOutput(out, volume.spatial_shape, info.class_values, overwrite=overwrite, inputs=inputs,
                              spacing=scale, pyramid=pyramid)
    try:
        labels, _ = predict_volume(volume, model, device=device, progress=progress, out=target.array, spacing=spacing)
    except BaseException:
        target.abandon()
        raise
    return labels if out is None else target.finish()
