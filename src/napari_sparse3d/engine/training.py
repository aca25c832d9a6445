"""Training from sparse annotations: a generator of small progress reports.

:class:`Trainer` holds the state (data, model, optimiser, history);
:meth:`Trainer.steps` is a plain generator that runs one optimisation step
per ``next()`` and yields a :class:`TrainReport`.  Stopping is closing the
generator (or simply not asking for the next step): the model then holds the
weights of the last finished step.  New annotations can be sent in with
``generator.send(labels)`` and take effect at the next step.  The napari
widgets wrap the generator in a worker thread; :func:`napari_sparse3d.run`
just iterates it.
"""

from __future__ import annotations

import copy
import math
import threading
import time
from collections.abc import Generator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from napari_sparse3d.config import Config
from napari_sparse3d.engine.annotations import Annotations, prepare_annotations
from napari_sparse3d.engine.deform import SpatialAugment
from napari_sparse3d.engine.devices import autocast, release_cached_memory, resolve_device, resolve_precision
from napari_sparse3d.engine.losses import SparseLoss
from napari_sparse3d.engine.model import UNet3D
from napari_sparse3d.engine.optim import BackOff, halve_batch, learning_rate, make_optimizer, restore_optimizer
from napari_sparse3d.engine.planning import plan_training
from napari_sparse3d.engine.sampling import Prefetcher
from napari_sparse3d.engine.trained import HISTORY_LIMIT, ModelInfo, model_info, thin_history
from napari_sparse3d.engine.training_data import TrainingData, prepare_volumes
from napari_sparse3d.engine.volume import Volume, VolumeLike, as_volume, check_budget

__all__ = ["TrainReport", "Trainer"]


@dataclass(frozen=True)
class TrainReport:
    """One training step, as yielded by :meth:`Trainer.steps`."""

    iteration: int  # total steps this model has taken (continues across rounds)
    loss: float
    learning_rate: float
    elapsed: float  # seconds since this round started
    step_seconds: float
    progress: float  # fraction of this round's budget used, 0..1 (0 without a budget)
    # steps of this round skipped for a non-finite loss or gradient (weights and optimiser untouched)
    skipped: int = 0
    # Dice on the held-out annotated voxels (mean over foreground classes), on steps that measured it
    val_dice: float | None = None

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


class Trainer:
    """State of one training session; see the module docstring.

    Parameters
    ----------
    volume : Volume or sequence of Volume
        The image (see :func:`napari_sparse3d.engine.volume.as_volume`), or several
        images at one spacing: patches are then drawn across all of them.
    annotations : Annotations or sequence of Annotations
        From :mod:`~napari_sparse3d.engine.annotations` (one per volume, in one class order).
    spacing : (z, y, x) or None
    config : Config
    device : str
        "auto", "cpu", "cuda", "cuda:N" or "mps".  ``seed``: int.
    init : UNet3D, optional
        Warm start: continue from this trained network (its classes, normalisation
        and architecture are kept; see :func:`napari_sparse3d.engine.planning.plan_training`).
    Most callers want :meth:`from_inputs` (or :meth:`from_many`), which check user inputs first.
    """

    def __init__(
        self,
        volume: VolumeLike | Sequence[VolumeLike],
        annotations: Annotations | Sequence[Annotations],
        *,
        spacing: Sequence[float] | None = None,
        config: Config | None = None,
        device: str = "auto",
        seed: int = 0,
        init: UNet3D | None = None,
    ) -> None:
        volumes = list(volume) if isinstance(volume, (list, tuple)) else [volume]
        annotation_list = list(annotations) if isinstance(annotations, (list, tuple)) else [annotations]
        self.volumes: list[VolumeLike] = volumes
        self.volume = volumes[0]  # the one the napari loop shows and corrects
        self.device = resolve_device(device)
        self.weights_lock = threading.RLock()  # held while a step changes the weights (see snapshot)
        self.seed = int(seed)
        self.rng = np.random.default_rng(self.seed)
        torch.manual_seed(self.seed)
        plan = plan_training(volumes, annotation_list, spacing=spacing, config=config, device_type=self.device.type, init=init)
        self.config, self.normalization, self.class_values = plan.config, plan.normalization, plan.class_values
        self.spacing, self.patch_size, self.history = plan.spacing, plan.patch_size, plan.history
        model = plan.model
        # per volume: its own statistics ("image" normalisation) or the stored ones ("dataset")
        self.normalizations = [self.normalization.for_volume(v) for v in volumes]
        self.precision = resolve_precision(self.device, self.config.train.precision)
        self.model: UNet3D = model.to(self.device)
        if self.config.train.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last_3d)
        # what travels with the network; its history is this trainer's list, so it grows step by step
        self.model.sparse3d = ModelInfo(
            self.config, list(self.class_values), self.normalization, self.patch_size, self.spacing, self.volume.channels,
            self.history,
        )
        self.iteration = int(self.history[-1]["iteration"]) if self.history else 0
        tc = self.config.train
        self.optimizer = make_optimizer(self.model, tc)
        if plan.optimizer_state is not None:
            self.optimizer = restore_optimizer(self.optimizer, self.model, plan.optimizer_state, tc)
        self.model.sparse3d.optimizer_state = self.optimizer.state_dict()
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.precision == torch.float16)
        self._lr_scale = 1.0
        self._round_precision = self.precision
        self._rescaling = False  # the last skipped step was float16 loss scaling at work
        self.skipped_steps = 0  # over all rounds
        foreground = [k for k, v in enumerate(self.class_values) if v != 0]
        self.loss_fn = SparseLoss(
            len(self.class_values),
            dice_weight=tc.dice_weight,
            dice_classes=foreground if 0 in self.class_values else None,
            scale_factors=self.model.scale_factors(),
        )
        self.data = TrainingData(
            volumes, self.normalizations, plan.annotations, class_values=self.class_values, patch_size=self.patch_size,
            tc=tc, spacing=self.spacing, seed=self.seed, head=self.model.pixel_head,
            head_dtype=torch.bfloat16 if self.precision == torch.bfloat16 else torch.float32,
        )
        self.sampler = self.data.sampler
        self.spatial = SpatialAugment.from_config(tc, self.spacing)
        self.torch_rng = torch.Generator().manual_seed(self.seed)  # the spatial augmentation's draws
        self._prefetcher: Prefetcher | None = None
        self.batch_size = tc.batch_size  # halved when the GPU runs out of memory

    @classmethod
    def from_inputs(
        cls,
        image: Any,
        labels: Any,
        annotated_slices: Mapping[int, Sequence[int]] | None = None,
        *,
        channel_axis: int | None = None,
        background_label: int | None = None,
        spacing: Sequence[float] | None = None,
        config: Config | None = None,
        device: str = "auto",
        seed: int = 0,
        init: UNet3D | None = None,
    ) -> Trainer:
        """The one way to start a training run from user inputs: arrays in, checked, a :class:`Trainer` out.

        ``image`` is an array (or a :class:`~napari_sparse3d.engine.volume.Volume`),
        ``labels`` napari-style (0 = not annotated); with a warm start (``init``) the
        labels are indexed by the model's classes, so a correction round may touch
        a single class.  Files are opened by the caller (:mod:`napari_sparse3d.io`).
        """
        volume = image if isinstance(image, Volume) else as_volume(image, channel_axis)
        class_values = None if init is None else model_info(init, "init").class_values
        annotations = prepare_annotations(
            labels, volume.spatial_shape, annotated_slices, background_label, class_values=class_values
        )
        return cls(volume, annotations, spacing=spacing, config=config, device=device, seed=seed, init=init)

    @classmethod
    def from_many(
        cls,
        images: Sequence[Any],
        labels: Sequence[Any],
        annotated_slices: Sequence[Mapping[int, Sequence[int]] | None] | None = None,
        *,
        channel_axis: int | None = None,
        background_label: int | None = None,
        spacing: Sequence[float] | None = None,
        spacings: Sequence[Sequence[float] | None] | None = None,
        config: Config | None = None,
        device: str = "auto",
        seed: int = 0,
        init: UNet3D | None = None,
    ) -> Trainer:
        """:meth:`from_inputs` for several volumes: one model learns from all of them.

        ``labels`` and ``annotated_slices`` come one per image; the classes are the
        union of the volumes' (a volume may annotate only some).  ``spacing`` is the
        model's; a volume whose own entry in ``spacings`` differs is resampled to it.
        """
        info = None if init is None else model_info(init, "init")
        class_values = None if info is None else info.class_values
        model_spacing = info.spacing if info is not None and spacing is None else spacing
        volumes, annotations = prepare_volumes(
            images, labels, annotated_slices, channel_axis=channel_axis, background_label=background_label,
            class_values=class_values, spacings=spacings, model_spacing=model_spacing,
        )
        return cls(volumes, annotations, spacing=spacing, config=config, device=device, seed=seed, init=init)

    # -- state ------------------------------------------------------------------------
    @property
    def annotations(self) -> Annotations:
        """The annotations of the first volume (the one the napari loop corrects)."""
        return self.data.annotations[0]

    @property
    def all_annotations(self) -> list[Annotations]:
        """The annotations of every volume, as the user made them (held-out voxels included)."""
        return self.data.annotations

    def update_annotations(
        self, labels: Any, annotated_slices: Mapping[int, Sequence[int]] | None = None, *, index: int = 0
    ) -> None:
        """Replace the annotations (same classes) of volume ``index`` — the correction loop's entry point."""
        if isinstance(labels, Annotations):
            annotations = labels
        else:
            annotations = prepare_annotations(
                labels, self.volumes[index].spatial_shape, annotated_slices, class_values=self.class_values
            )
        self.data.update(index, annotations)
        if self._prefetcher is not None:
            self._prefetcher.invalidate()

    def snapshot(self) -> nn.Module:
        """A copy of the model as of the last finished step (weights, history, optimiser state); any thread."""
        with self.weights_lock:
            return copy.deepcopy(self.model)

    def release(self) -> None:
        """Give cached GPU memory back (call when training stops)."""
        self.optimizer.zero_grad(set_to_none=True)
        release_cached_memory(self.device)

    def _out_of_memory(self, exc: BaseException) -> None:
        """Retry with half the batch (and say so), down to one patch; then give up with advice."""
        self.optimizer.zero_grad(set_to_none=True)
        release_cached_memory(self.device)
        self.batch_size = halve_batch(self.batch_size, self.device.type, self.patch_size, exc)

    # -- the loop ---------------------------------------------------------------------
    def _step(self, lr: float) -> float | None:
        """Forward and backward of one step; ``None`` when it is skipped (non-finite loss or gradient).

        A skipped step leaves the weights and the optimiser's state (moments,
        step count) exactly as they were: the gradients are checked before
        ``optimizer.step`` and then dropped.
        """
        self._rescaling = False
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        tc = self.config.train
        if self._prefetcher is not None and self.batch_size == tc.batch_size:
            image, target, weight = self._prefetcher.get()
        else:
            image, target, weight = self.sampler.sample(self.batch_size, self.rng)
        x = torch.from_numpy(image).to(self.device, non_blocking=True)
        t = torch.from_numpy(target).to(self.device, non_blocking=True)
        w = torch.from_numpy(weight).to(self.device, non_blocking=True)
        if self.spatial.enabled:  # one grid_sample for the batch, on the device
            x, t, w = self.spatial(x, t, w, self.torch_rng)
        if tc.channels_last:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        self.model.train()
        with autocast(self.device, self._round_precision):
            outputs = self.model(x)
        loss = self.loss_fn(outputs, t, w)
        value = float(loss.detach())
        self.optimizer.zero_grad(set_to_none=True)
        if not math.isfinite(value):
            return None
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), tc.grad_clip)
        if not bool(torch.isfinite(norm)):
            # clip_grad_norm_ has already multiplied the gradients by NaN: drop them unused
            self.optimizer.zero_grad(set_to_none=True)
            if self.scaler.is_enabled():
                self.scaler.update()  # float16: a lower loss scale for the next step
                # the scaler finding its scale (2**16, halved per overflow) is no divergence: below 1 it counts
                self._rescaling = self.scaler.get_scale() >= 1.0
            return None
        return value  # the update is applied by the loop, under weights_lock

    def _validate(self) -> float | None:
        """The validation Dice every ``config.train.validation_every`` steps (None between, or with nothing held out)."""
        validator = self.data.validator
        if validator is None or self.iteration % self.config.train.validation_every:
            return None
        return validator.dice(self.model, self.device, self._round_precision)

    def _back_off(self, consecutive: int) -> None:
        """React to ``consecutive`` skipped steps in a row (see :class:`~napari_sparse3d.engine.optim.BackOff`)."""
        action = BackOff.react(
            consecutive,
            f"iteration {self.iteration + 1}",
            float32_already=self._round_precision == torch.float32,
            advice=f"Look for extreme values in the image (the clip bounds are {self.normalization.lower}.."
            f"{self.normalization.upper}) or lower config.train.learning_rate (now {self.config.train.learning_rate})",
        )
        if action == "halve_lr":
            self._lr_scale *= 0.5
        elif action == "float32":
            self._round_precision = torch.float32
            self.scaler = torch.amp.GradScaler("cuda", enabled=False)

    def steps(
        self, max_seconds: float | None = None, max_iterations: int | None = None
    ) -> Generator[TrainReport, Any, None]:
        """Train, yielding a :class:`TrainReport` after every step.

        Runs until ``max_seconds`` or ``max_iterations`` (this round's budget;
        either or both) is used, or forever when neither is given — the
        caller stops by closing the generator.  A value sent into the
        generator is taken as new labels (or ``(labels, annotated_slices)``).
        The learning rate warms up, then decays polynomially over the budget.
        """
        check_budget(max_seconds, max_iterations)
        if self.config.train.prefetch:
            self._prefetcher = Prefetcher(self.sampler, self.config.train.batch_size, self.rng)
        try:
            yield from self._loop(max_seconds, max_iterations)
        finally:  # also when the caller closes the generator
            if self._prefetcher is not None:
                self._prefetcher.close()
                self._prefetcher = None

    def _loop(self, max_seconds: float | None, max_iterations: int | None) -> Generator[TrainReport, Any, None]:
        start = time.perf_counter()
        step_seconds = 0.0
        done = 0
        skipped = consecutive = 0
        # back-off state lasts one round: the next round starts at full speed again
        self._lr_scale = 1.0
        self._round_precision = self.precision
        if self.precision == torch.float16 and not self.scaler.is_enabled():  # last round fell back to float32
            self.scaler = torch.amp.GradScaler("cuda")
        while True:
            elapsed = time.perf_counter() - start
            progress = 0.0
            if max_seconds is not None:
                # stop when the next step would overrun the budget
                if done and elapsed + step_seconds > max_seconds:
                    break
                progress = max(progress, elapsed / max_seconds)
            if max_iterations is not None:
                if done >= max_iterations:
                    break
                progress = max(progress, done / max_iterations)
            lr = learning_rate(self.config.train, done, progress)
            t0 = time.perf_counter()
            try:
                loss = self._step(lr * self._lr_scale)
            except torch.OutOfMemoryError as exc:
                self._out_of_memory(exc)
                continue
            step_seconds = time.perf_counter() - t0
            if loss is None:
                skipped += 1
                self.skipped_steps += 1
                if self._rescaling:
                    continue
                consecutive += 1
                self._back_off(consecutive)
                continue
            consecutive = 0
            # weights, iteration, history and optimiser state change together: a snapshot
            # taken from another thread (the GUI's "Save model") sees one finished step
            with self.weights_lock:
                self.scaler.step(self.optimizer)
                self.scaler.update()
                done += 1
                self.iteration += 1
                report = TrainReport(
                    iteration=self.iteration,
                    loss=loss,
                    learning_rate=lr * self._lr_scale,
                    elapsed=time.perf_counter() - start,
                    step_seconds=time.perf_counter() - t0,
                    progress=min(1.0, max(progress, done / max_iterations if max_iterations else 0.0)),
                    skipped=skipped,
                    val_dice=self._validate(),
                )
                self.history.append(report.to_dict())
                if len(self.history) > 2 * HISTORY_LIMIT:  # bounded memory over any number of steps
                    self.history[:] = thin_history(self.history)
                self.model.sparse3d.optimizer_state = self.optimizer.state_dict()
            step_seconds = report.step_seconds
            sent = yield report
            if sent is not None:
                if isinstance(sent, tuple):
                    self.update_annotations(*sent)
                else:
                    self.update_annotations(sent)
