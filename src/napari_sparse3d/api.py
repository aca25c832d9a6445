"""The headless API: :func:`run` (train + predict) and :func:`predict`.

Both are thin: they check their arguments, then drive the same generators
the napari widgets use (:meth:`Trainer.steps`, :func:`predict_blocks`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from .config import Config
from .data import _chunks, as_volume, check_budget, check_finite, check_spacing, prepare_annotations

__all__ = ["RunResult", "run", "predict", "resolve_config"]

#: Budget of :func:`run` when neither ``max_seconds`` nor ``max_iterations`` is given.
DEFAULT_SECONDS = 120.0


@dataclass
class RunResult:
    """What :func:`run` returns; see its docstring."""

    labels: np.ndarray
    probabilities: np.ndarray
    model: Any
    patch_size: tuple[int, int, int]
    history: list = field(default_factory=list)
    class_values: list[int] = field(default_factory=list)

    def save(self, path: str | os.PathLike) -> Path:
        """Write a checkpoint that :func:`predict` and the console command accept."""
        from .checkpoint import save_checkpoint

        return save_checkpoint(self.model, path)


def resolve_config(config: Any, device_type: str = "cpu") -> Config:
    """``None`` (the preset for the device), a preset name, a nested dict, or a :class:`Config`."""
    if config is None:
        from .config import default_preset

        return Config.from_preset(default_preset(device_type))
    if isinstance(config, Config):
        return config
    if isinstance(config, str):
        return Config.from_preset(config)
    if isinstance(config, Mapping):
        return Config.from_dict(config)
    raise TypeError(f"config must be None, a preset name, a dict or a Config, got {type(config).__name__}")


def _check_seed(seed: Any) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise TypeError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)


def _check_progress(progress: Any) -> None:
    if progress is not None and not callable(progress):
        raise TypeError(f"progress must be a callable taking a report, or None, got {type(progress).__name__}")


def _check_volume_finite(volume: Any, name: str = "image") -> None:
    z, y, x = volume.spatial_shape
    step = max(1, 2**24 // (y * x * volume.channels))  # read ~16M voxels at a time
    for z0 in range(0, z, step):
        check_finite(name, volume.read((slice(z0, z0 + step), slice(None), slice(None))))


def run(
    image: Any,
    labels: Any = None,
    *,
    annotated_slices: Mapping[int, Sequence[int]] | None = None,
    spacing: Sequence[float] | None = None,
    max_seconds: float | None = None,
    max_iterations: int | None = None,
    device: str = "auto",
    seed: int = 0,
    config: Any = None,
    progress: Callable[[Any], Any] | None = None,
    channel_axis: int | None = None,
    background_label: int | None = None,
    init: Any = None,
    checkpoint_every: float = 30.0,
) -> RunResult:
    """Train a 3D U-Net on sparse annotations of ``image`` and segment all of it.

    Parameters
    ----------
    image : array (Z, Y, X), path, or project directory
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
        and patch shape.  Default: isotropic.
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

    Returns
    -------
    RunResult
        ``labels`` (Z, Y, X) with the user's label values (0 = background),
        ``probabilities`` (K, Z, Y, X) float32, ``model``, ``patch_size``,
        ``history`` (one TrainReport per step), ``class_values`` and ``save(path)``.

    Raises
    ------
    TypeError, ValueError
        For bad input, naming the argument, what was expected and what was given.
    """
    check_budget(max_seconds, max_iterations)
    seed = _check_seed(seed)
    _check_progress(progress)
    from .project import Project, is_project

    labels_given = labels is not None
    # one writer at a time: refused while napari (or another run) writes into the project
    project = Project.open(image, writable=True) if is_project(image) else None
    try:
        return _run_in(
            project, image, labels, labels_given, annotated_slices, spacing, max_seconds, max_iterations, device,
            seed, config, progress, channel_axis, background_label, init, checkpoint_every,
        )
    finally:
        if project is not None:
            project.close()


def _run_in(
    project: Any, image: Any, labels: Any, labels_given: bool, annotated_slices: Any, spacing: Any,
    max_seconds: float | None, max_iterations: int | None, device: str, seed: int, config: Any,
    progress: Any, channel_axis: int | None, background_label: int | None, init: Any, checkpoint_every: float,
) -> RunResult:
    """:func:`run` once its project, if any, is open for writing."""
    if project is not None:
        image = project.image()
        if labels is None:
            labels, saved_slices = project.annotations()
            annotated_slices = saved_slices if annotated_slices is None else annotated_slices
        if spacing is None:
            spacing = project.spacing
        if config is None:
            config = project.config()
        if init is None:
            init = project.checkpoint("latest")
    elif labels is None:
        raise TypeError("labels must be an integer array or a path (0 = not annotated); only a project path may come without")
    if isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, (int, float)) or not checkpoint_every > 0:
        raise ValueError(f"checkpoint_every must be a positive number of seconds, got {checkpoint_every!r}")
    spacing = check_spacing(spacing)
    from .devices import resolve_device

    # a warm start without a configuration keeps the checkpoint's own (not the device's preset)
    cfg = None if config is None and init is not None else resolve_config(config, resolve_device(device).type)
    volume = as_volume(image, channel_axis)
    class_values = None
    if init is not None:  # a correction round may touch a single class: the model knows the others
        from .checkpoint import as_model

        init = as_model(init, name="init")
        class_values = init.sparse3d.class_values
    annotations = prepare_annotations(
        labels, volume.spatial_shape, annotated_slices, background_label, class_values=class_values
    )
    _check_volume_finite(volume)
    if max_seconds is None and max_iterations is None:
        max_seconds = DEFAULT_SECONDS

    from .training import Trainer

    trainer = Trainer(volume, annotations, spacing=spacing, config=cfg, device=device, seed=seed, init=init)
    if project is not None and labels_given:
        project.save_annotations(labels, annotated_slices or {})
    history = []
    from .project import CheckpointSaver

    saver = CheckpointSaver(project, checkpoint_every)
    for report in trainer.steps(max_seconds=max_seconds, max_iterations=max_iterations):
        history.append(report)
        saver.step(trainer.model)
        if progress is not None:
            progress(report)
    trainer.release()
    saver.final(trainer.model)
    labels_out, probabilities = _predict_volume(volume, trainer.model, device, progress, keep_probabilities=True)
    if project is not None:
        project.save_prediction(labels_out, probabilities)
    return RunResult(
        labels=labels_out,
        probabilities=probabilities,
        model=trainer.model,
        patch_size=tuple(trainer.patch_size),  # type: ignore[arg-type]
        history=history,
        class_values=list(trainer.class_values),
    )


def _predict_volume(
    volume: Any,
    model: Any,
    device: str,
    progress: Callable[[Any], Any] | None,
    *,
    out: Any = None,
    keep_probabilities: bool = False,
) -> tuple[Any, np.ndarray | None]:
    from .prediction import predict_blocks

    info = model.sparse3d
    shape = volume.spatial_shape
    if out is None:
        dtype = np.min_scalar_type(max(max(info.class_values), 1))
        out = np.zeros(shape, dtype=dtype)
    probabilities = np.zeros((len(info.class_values),) + shape, np.float32) if keep_probabilities else None
    chunks = getattr(out, "chunks", None)  # zarr: every output chunk is then written once, whole
    if not (isinstance(chunks, tuple) and len(chunks) == 3 and all(isinstance(c, (int, np.integer)) for c in chunks)):
        chunks = None
    for block in predict_blocks(volume, model, device=device, progress=progress, chunks=chunks):
        out[block.region] = block.labels
        if probabilities is not None:
            probabilities[(slice(None),) + block.region] = block.probabilities
    return out, probabilities


class _Output:
    """Where :func:`predict` writes: an array, marked incomplete until the last block is in.

    A path gets a zarr array written aside (a hidden sibling) and renamed into place
    at the end, so an interrupted run never leaves a half-written array under the
    name asked for, nor destroys what was there; the aside copy and a caller's
    zarr array carry ``{"napari_sparse3d": {"complete": false}}`` until finished,
    which :func:`~napari_sparse3d.data.load_array` refuses to read.
    """

    def __init__(self, out: Any, shape: tuple[int, ...], class_values: list[int], *, overwrite: bool, inputs: Sequence[Any]) -> None:
        from .data import OUTPUT_ATTRIBUTE
        from .files import is_zarr_array

        self.final: Path | None = None
        self.array: Any = None
        if out is None:
            return
        if isinstance(out, (str, os.PathLike)):
            import zarr

            from .files import aside_path, check_output_path

            self.final = check_output_path(
                out, name="out", overwrite=overwrite, inputs=inputs, is_replaceable=is_zarr_array, what="zarr prediction"
            )
            self.final.parent.mkdir(parents=True, exist_ok=True)
            self.tmp = aside_path(self.final)
            dtype = np.min_scalar_type(max(max(class_values), 1))
            self.array = zarr.create_array(str(self.tmp), shape=shape, dtype=dtype, chunks=_chunks(shape))
            self.array.attrs[OUTPUT_ATTRIBUTE] = {"complete": False}
            return
        if not hasattr(out, "shape") or not hasattr(out, "__setitem__"):
            raise TypeError(f"out must be a writable array (zarr or numpy) or a path, got {type(out).__name__}")
        if tuple(out.shape) != tuple(shape):
            raise ValueError(f"out must have the image's spatial shape {shape}, got {tuple(out.shape)}")
        kind = np.dtype(out.dtype).kind
        if kind not in "iu" or np.iinfo(out.dtype).max < max(class_values):
            raise ValueError(f"out must have an integer dtype that holds label values up to {max(class_values)}, got {out.dtype}")
        self.array = out
        self._mark(False)

    def _mark(self, complete: bool) -> None:
        from .data import OUTPUT_ATTRIBUTE

        attrs = getattr(self.array, "attrs", None)
        if attrs is not None and hasattr(attrs, "__setitem__"):
            try:
                attrs[OUTPUT_ATTRIBUTE] = {"complete": complete}
            except Exception:  # a read-only or foreign attribute store: nothing to mark
                pass

    def finish(self) -> Any:
        self._mark(True)
        if self.final is None:
            return self.array
        import zarr

        from .files import replace_with

        replace_with(self.tmp, self.final)
        return zarr.open_array(str(self.final), mode="r+")

    def abandon(self) -> None:
        """After an error (not a kill): remove the aside copy; a caller's array stays marked incomplete."""
        if self.final is not None:
            import shutil

            shutil.rmtree(self.tmp, ignore_errors=True)


def predict(
    image: Any,
    model_or_checkpoint: Any,
    *,
    out: Any = None,
    overwrite: bool = False,
    device: str = "auto",
    progress: Callable[[Any], Any] | None = None,
    channel_axis: int | None = None,
) -> Any:
    """Segment ``image`` with a trained model (fully automatic use).

    Parameters
    ----------
    image : array (Z, Y, X) or path
        As for :func:`run`.
    model_or_checkpoint : model, checkpoint path or checkpoint dict
        ``RunResult.model``, or what ``RunResult.save`` wrote.
    out : zarr/numpy array or path, optional
        Written block by block as windows finish, so a large volume never has
        to fit in memory; a path creates a zarr array there (written aside and
        renamed into place when complete).  An existing path is refused unless
        ``overwrite`` and it is an earlier zarr array; never the input itself.
        Until the last block is written the array is marked incomplete, and
        :func:`~napari_sparse3d.data.load_array` refuses to read it.
    overwrite : bool
        Replace an existing zarr array at ``out``.
    device, progress, channel_axis
        As for :func:`run`.

    Returns
    -------
    array
        The labels, (Z, Y, X) with the user's label values; ``out`` when given.
    """
    _check_progress(progress)
    from .checkpoint import as_model
    from .devices import resolve_device

    resolve_device(device)
    model = as_model(model_or_checkpoint, name="model_or_checkpoint")
    volume = as_volume(image, channel_axis)
    target = _Output(out, volume.spatial_shape, model.sparse3d.class_values, overwrite=overwrite, inputs=[image, model_or_checkpoint])
    try:
        labels, _ = _predict_volume(volume, model, device, progress, out=target.array)
    except BaseException:
        target.abandon()
        raise
    return labels if out is None else target.finish()
