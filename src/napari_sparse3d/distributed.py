"""Prediction on a dask.distributed cluster: many processes or machines, one volume, restartable.

The volume is cut into tiles whose faces lie on the output's chunk grid (the
tiles of :class:`~napari_sparse3d.engine.prediction.TilePredictor`, the same as
in one process), and each tile is one task: a worker reads the input under
the tile's windows (the tile plus the network's context, and the pixel
classifier's margin), predicts it with the same Gaussian blending, and writes
the tile's output chunks once, whole.  Because every tile is computed from
the same global window grid, the result does not depend on which worker did
what: it equals the single-process prediction.

- **Each worker loads the model once**: it is scattered to every worker, and
  a worker keeps the network and the opened input for the run's later tasks.
- **Normalisation** is computed once, here, for the whole volume (as in one process).
- **Restartable**: the output is written into a hidden sibling of ``out``
  (``.NAME.cluster-<fingerprint>``) holding one marker per tile, set after the
  tile's chunks are written.  A run that was interrupted (killed, cancelled,
  the cluster lost) and is started again with the same image, model and
  settings skips the tiles already marked and computes the rest; a run with
  anything else different starts afresh.  Tasks are idempotent, so a worker
  that dies mid-tile costs only that tile, which dask gives to another worker.
- Memory per worker is bounded by the tile (``config.predict.tile_voxels``).

The finished output is the same OME-Zarr label image a single-process
prediction writes (:mod:`napari_sparse3d.io.ome`), renamed into place at the end.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from napari_sparse3d.config import PredictConfig
from napari_sparse3d.engine.prediction import PredictReport, TilePredictor
from napari_sparse3d.engine.preprocess import Normalization
from napari_sparse3d.engine.resample import model_grid
from napari_sparse3d.engine.trained import from_payload, model_info, to_payload
from napari_sparse3d.engine.volume import Box, as_volume, check_spacing
from napari_sparse3d.io.arrays import OUTPUT_ATTRIBUTE, chunks_for, load_array
from napari_sparse3d.io.checkpoint import as_model
from napari_sparse3d.io.files import check_output_path, replace_with
from napari_sparse3d.io.ome import MARK, add_pyramid, check_pyramid, create_label_image
from napari_sparse3d.io.outputs import replaceable

__all__ = ["DistributedResult", "predict_distributed"]

DONE = "tiles_done"  # array of the partial output: one uint8 per tile, 1 once the tile's chunks are written


@dataclass(frozen=True)
class DistributedResult:
    """What :func:`predict_distributed` did: the labels (array ``0`` of the OME-Zarr image at ``out``) and counts."""

    labels: Any
    tiles: int  # tiles of the volume
    skipped: int  # found finished by an earlier, interrupted run
    computed: int  # computed by this run
    seconds: float
    probabilities: Any = None  # (K, Z, Y, X) float32 zarr array, with keep_probabilities


@dataclass(frozen=True)
class _Job:
    """What every task needs besides the model (small: it travels with each task)."""

    image: str
    channel_axis: int | None
    partial: str
    normalization: Normalization
    config: PredictConfig
    device: str
    token: str
    keep_probabilities: bool


_WORKER_CACHE: dict[str, TilePredictor] = {}  # in each worker process: this run's network and opened input


def _predictor(job: _Job, payload: Any) -> TilePredictor:
    found = _WORKER_CACHE.get(job.token)
    if found is None:
        _WORKER_CACHE.clear()  # one run at a time per worker: an earlier run's network goes
        model = from_payload(payload, where="the model sent to the cluster")
        volume = as_volume(load_array(job.image, name="image"), job.channel_axis)
        found = TilePredictor(volume, model, device=job.device, config=job.config, normalization=job.normalization)
        _WORKER_CACHE[job.token] = found
    return found


def _run_tile(index: int, tile: Box, job: _Job, payload: Any) -> int:
    """One task: predict ``tile``, write its chunks, then mark it done (so a marked tile is whole)."""
    block = _predictor(job, payload).predict(tile)
    group = zarr.open_group(job.partial, mode="r+")
    group["0"][tile] = block.labels
    if job.keep_probabilities:
        group["probabilities"][(slice(None), *tile)] = block.probabilities
    group[DONE][index] = 1
    return index


def _digest(payload: dict[str, Any]) -> str:
    h = hashlib.sha256(json.dumps(payload["info"], sort_keys=True, default=str).encode())
    for key in sorted(payload["state_dict"]):
        h.update(key.encode())
        h.update(payload["state_dict"][key].numpy().tobytes())
    return h.hexdigest()


def _check_path(value: Any, name: str, what: str) -> Path:
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"{name} must be a path {what} (the cluster's workers open it), got {type(value).__name__}")
    return Path(value)


def _open_partial(
    partial: Path, fingerprint: str, shape: Sequence[int], dtype: Any, spacing: Sequence[float] | None, tiles: int,
    classes: int, keep_probabilities: bool,
) -> zarr.Group:
    """The partial output of an interrupted run with the same fingerprint, or a fresh one."""
    if partial.exists():
        try:
            group = zarr.open_group(str(partial), mode="r+")
            if dict(group.attrs).get(MARK, {}).get("fingerprint") == fingerprint and DONE in group.array_keys():
                return group
        except Exception:  # unreadable: a fresh start
            pass
        shutil.rmtree(partial, ignore_errors=True)
    array = create_label_image(partial, shape, dtype, chunks_for(shape), spacing)
    array.attrs[OUTPUT_ATTRIBUTE] = {"complete": False}
    group = zarr.open_group(str(partial), mode="r+")
    group.attrs[MARK] = {"kind": "labels", "fingerprint": fingerprint}
    group.create_array(DONE, shape=(tiles,), dtype="uint8", chunks=(1,), fill_value=0)
    if keep_probabilities:
        group.create_array("probabilities", shape=(classes, *shape), dtype="float32",
                           chunks=(classes, *chunks_for(shape)), fill_value=0.0)
    return group


def predict_distributed(
    image: str | os.PathLike,
    model_or_checkpoint: Any,
    out: str | os.PathLike,
    *,
    client: Any,
    spacing: Sequence[float] | None = None,
    overwrite: bool = False,
    device: str = "auto",
    channel_axis: int | None = None,
    progress: Callable[[PredictReport], Any] | None = None,
    keep_probabilities: bool = False,
    pyramid: int = 0,
    tile_voxels: int | None = None,
) -> DistributedResult:
    """Predict the volume at ``image`` on the dask.distributed ``client``'s workers into ``out`` (see the module docstring).

    ``image`` and ``out`` are paths every worker can reach (a shared file system);
    ``out`` becomes an OME-Zarr label image as with :func:`napari_sparse3d.predict`.
    ``progress`` gets a :class:`~napari_sparse3d.engine.prediction.PredictReport`
    (windows) as tiles finish; ``keep_probabilities`` also writes the class
    probabilities (array ``probabilities`` of ``out``); ``tile_voxels`` overrides
    the model's ``config.predict.tile_voxels`` (the unit of work and of memory).
    ``device`` is the workers' ("auto": their GPU when they have one).
    """
    for method in ("scatter", "map"):
        if not callable(getattr(client, method, None)):
            raise TypeError(f"client must be a dask.distributed Client, got {type(client).__name__}")
    image_path = _check_path(image, "image", "to a zarr, tif or npy volume")
    pyramid = check_pyramid(pyramid)
    if tile_voxels is not None and (isinstance(tile_voxels, bool) or not isinstance(tile_voxels, (int, np.integer))
                                    or tile_voxels < 1):
        raise ValueError(f"tile_voxels must be a positive integer, got {tile_voxels!r}")
    final = _check_path(out, "out", "for the OME-Zarr output")
    spacing = check_spacing(spacing)
    model = as_model(model_or_checkpoint, name="model_or_checkpoint")
    info = model_info(model)
    volume = as_volume(load_array(image_path, name="image"), channel_axis)
    shape = volume.spatial_shape
    if spacing is not None and model_grid(shape, spacing, info.spacing) is not None:
        raise ValueError(
            f"spacing {tuple(spacing)} differs from the model's {tuple(info.spacing or ())}: resampled prediction runs in"
            " one process only (predict without client=), or resample the volume to the model's spacing first"
        )
    final = check_output_path(final, name="out", overwrite=overwrite, inputs=[image_path, model_or_checkpoint],
                              is_replaceable=replaceable, what="zarr prediction")
    config = info.config.predict
    if tile_voxels is not None:
        config = dataclasses.replace(config, tile_voxels=int(tile_voxels))
    start = time.perf_counter()
    norm = info.normalization.for_volume(volume)  # once, for the whole volume, as in one process
    planner = TilePredictor(volume, model, device="cpu", config=config, normalization=norm)
    tiles = planner.tiles(chunks_for(shape))
    windows = [len(planner.grid.windows_touching(t)) for t in tiles]
    from napari_sparse3d import __version__

    payload = to_payload(model, where="the cluster", package_version=__version__)
    payload.pop("optimizer", None)  # the workers only predict
    token = _digest(payload)
    fingerprint = hashlib.sha256(json.dumps(
        [token, str(image_path.resolve()), list(shape), dataclasses.asdict(norm), dataclasses.asdict(config),
         [[(b.start, b.stop) for b in t] for t in tiles], bool(keep_probabilities)], default=str,
    ).encode()).hexdigest()
    final.parent.mkdir(parents=True, exist_ok=True)
    # named after the fingerprint: tasks of an earlier run with other settings, still running on the
    # workers after an interruption, can only ever write into their own run's folder
    partial = final.with_name(f".{final.name}.cluster-{fingerprint[:16]}")
    for stale in final.parent.glob(f".{final.name}.cluster-*"):
        if stale != partial:
            shutil.rmtree(stale, ignore_errors=True)
    scale = spacing if spacing is not None else info.spacing
    dtype = np.min_scalar_type(max(max(info.class_values), 1))
    group = _open_partial(partial, fingerprint, shape, dtype, scale, len(tiles), len(info.class_values), keep_probabilities)
    marked = np.asarray(group[DONE][:]) == 1
    pending = [i for i in range(len(tiles)) if not marked[i]]
    job = _Job(str(image_path.resolve()), channel_axis, str(partial.resolve()), norm, config, device, token,
               bool(keep_probabilities))
    done_windows = sum(w for w, m in zip(windows, marked) if m)
    total_windows = sum(windows)
    if pending:
        from distributed import as_completed

        # every worker gets the network once, under a key of this run's own: a dict scattered as it is
        # becomes one future per entry, keyed by the entry's name ("state_dict", "info"), which another
        # run on the same cluster shares, and releases under this one (CI saw "lost dependencies")
        (shared,) = client.scatter([payload], broadcast=True, hash=False)
        futures = client.map(_run_tile, pending, [tiles[i] for i in pending], job=job, payload=shared, pure=False)
        try:
            for finished in as_completed(futures):
                index = finished.result()  # a task's error is raised here, with the worker's traceback
                done_windows += windows[index]
                if progress is not None:
                    progress(PredictReport(done_windows, total_windows, time.perf_counter() - start))
        except BaseException:
            client.cancel(futures)  # the partial output stays: a new run resumes from its finished tiles
            raise
    if pyramid:
        add_pyramid(group, pyramid, scale)
    del group[DONE]
    group["0"].attrs[OUTPUT_ATTRIBUTE] = {"complete": True}
    replace_with(partial, final)
    result = zarr.open_group(str(final), mode="r+")
    return DistributedResult(
        labels=result["0"], tiles=len(tiles), skipped=int(marked.sum()), computed=len(pending),
        seconds=time.perf_counter() - start, probabilities=result["probabilities"] if keep_probabilities else None,
    )
