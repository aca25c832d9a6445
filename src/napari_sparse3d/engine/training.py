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
import warnings
from collections.abc import Generator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from napari_sparse3d.config import Config
from napari_sparse3d.engine.augment import Augmenter
from napari_sparse3d.engine.devices import autocast, release_cached_memory, resolve_device, resolve_precision
from napari_sparse3d.engine.losses import SparseLoss
from napari_sparse3d.engine.model import UNet3D
from napari_sparse3d.engine.planning import plan_training
from napari_sparse3d.engine.sampling import PatchSampler, Prefetcher, class_weights
from napari_sparse3d.engine.trained import HISTORY_LIMIT, ModelInfo, model_info, thin_history
from napari_sparse3d.engine.volume import Annotations, Volume, as_volume, check_budget, prepare_annotations

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
    volume : Volume
        The image (see :func:`napari_sparse3d.engine.volume.as_volume`).
    annotations : Annotations
        From :func:`napari_sparse3d.engine.volume.prepare_annotations`.
    spacing : (z, y, x) or None
    config : Config
    device : str
        "auto", "cpu", "cuda", "cuda:N" or "mps".
    seed : int
    init : UNet3D, optional
        Warm start: continue from this trained network (its classes, normalisation
        and architecture are kept; see :func:`napari_sparse3d.engine.planning.plan_training`).

    Most callers want :meth:`from_inputs`, which checks user inputs first.
    """

    def __init__(
        self,
        volume: Volume,
        annotations: Annotations,
        *,
        spacing: Sequence[float] | None = None,
        config: Config | None = None,
        device: str = "auto",
        seed: int = 0,
        init: UNet3D | None = None,
    ) -> None:
        self.volume = volume
        self.device = resolve_device(device)
        self.weights_lock = threading.RLock()  # held while a step changes the weights (see snapshot)
        self.seed = int(seed)
        self.rng = np.random.default_rng(self.seed)
        torch.manual_seed(self.seed)
        plan = plan_training(volume, annotations, spacing=spacing, config=config, device_type=self.device.type, init=init)
        self.config, self.normalization, self.class_values = plan.config, plan.normalization, plan.class_values
        self.spacing, self.patch_size, self.history = plan.spacing, plan.patch_size, plan.history
        annotations, model = plan.annotations, plan.model
        self.precision = resolve_precision(self.device, self.config.train.precision)
        self.model: UNet3D = model.to(self.device)
        if self.config.train.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last_3d)
        # what travels with the network; its history is this trainer's list, so it grows step by step
        self.model.sparse3d = ModelInfo(
            self.config, list(self.class_values), self.normalization, self.patch_size, self.spacing, volume.channels, self.history
        )
        self.iteration = int(self.history[-1]["iteration"]) if self.history else 0
        tc = self.config.train
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=tc.learning_rate, weight_decay=tc.weight_decay)
        if plan.optimizer_state is not None:
            self._restore_optimizer(plan.optimizer_state)
        self.model.sparse3d.optimizer_state = self.optimizer.state_dict()
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.precision == torch.float16)
        self._lr_scale = 1.0
        self._round_precision = self.precision
        self.skipped_steps = 0  # over all rounds
        foreground = [k for k, v in enumerate(self.class_values) if v != 0]
        self.loss_fn = SparseLoss(
            len(self.class_values),
            dice_weight=tc.dice_weight,
            dice_classes=foreground if 0 in self.class_values else None,
            scale_factors=self.model.scale_factors(),
        )
        spacing = self.spacing or (1.0, 1.0, 1.0)
        self.sampler = PatchSampler(
            volume,
            self.normalization,
            annotations.target,
            class_weights(annotations.counts(), tc.class_balance),
            self.patch_size,
            foreground,
            foreground_fraction=tc.foreground_fraction,
            augmenter=Augmenter(tc.flip, tc.rotate90, tc.intensity, square_yx=math.isclose(spacing[1], spacing[2])),
        )
        self.annotations = annotations
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

    # -- state ------------------------------------------------------------------------
    def _restore_optimizer(self, state: Any) -> None:
        """Continue AdamW's moments from a checkpoint; a state that does not fit the network is refused."""
        params = list(self.model.parameters())
        try:
            saved = state["state"]
            for index, entry in saved.items():
                for key in ("exp_avg", "exp_avg_sq"):
                    if tuple(entry[key].shape) != tuple(params[int(index)].shape):
                        raise ValueError(f"state {index}.{key} has shape {tuple(entry[key].shape)}")
            self.optimizer.load_state_dict(state)
        except (KeyError, IndexError, TypeError, ValueError, AttributeError, RuntimeError) as exc:
            self.optimizer = torch.optim.AdamW(
                params, lr=self.config.train.learning_rate, weight_decay=self.config.train.weight_decay
            )
            warnings.warn(
                f"init: the checkpoint's optimiser state does not fit this network ({exc}); AdamW starts afresh",
                RuntimeWarning,
                stacklevel=3,
            )

    def update_annotations(self, labels: Any, annotated_slices: Mapping[int, Sequence[int]] | None = None) -> None:
        """Replace the annotations (same classes) — the correction loop's entry point."""
        if isinstance(labels, Annotations):
            annotations = labels
        else:
            annotations = prepare_annotations(
                labels, self.volume.spatial_shape, annotated_slices, class_values=self.class_values
            )
        self.annotations = annotations
        self.sampler.set_targets(annotations.target, class_weights(annotations.counts(), self.config.train.class_balance))
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
        if self.batch_size <= 1:
            raise MemoryError(
                f"out of {self.device.type} memory even with one patch of {tuple(self.patch_size)} voxels; choose a"
                " smaller config.train.patch_voxels or the 'default' preset"
            ) from exc
        self.batch_size //= 2
        warnings.warn(
            f"out of {self.device.type} memory: training goes on with batch size {self.batch_size}", RuntimeWarning, stacklevel=3
        )

    # -- the loop ---------------------------------------------------------------------
    def _learning_rate(self, step_in_round: int, progress: float) -> float:
        tc = self.config.train
        lr = tc.learning_rate
        if tc.warmup_steps and step_in_round < tc.warmup_steps:
            lr *= (step_in_round + 1) / tc.warmup_steps
        if tc.lr_schedule == "poly":
            lr *= (1.0 - min(progress, 0.999)) ** 0.9
        return lr

    def _step(self, lr: float) -> float | None:
        """Forward and backward of one step; ``None`` when it is skipped (non-finite loss or gradient).

        A skipped step leaves the weights and the optimiser's state (moments,
        step count) exactly as they were: the gradients are checked before
        ``optimizer.step`` and then dropped.
        """
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        tc = self.config.train
        if self._prefetcher is not None and self.batch_size == tc.batch_size:
            image, target, weight = self._prefetcher.get()
        else:
            image, target, weight = self.sampler.sample(self.batch_size, self.rng)
        x = torch.from_numpy(image).to(self.device, non_blocking=True)
        if tc.channels_last:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        t = torch.from_numpy(target).to(self.device, non_blocking=True)
        w = torch.from_numpy(weight).to(self.device, non_blocking=True)
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
            return None
        return value  # the update is applied by the loop, under weights_lock

    #: Consecutive skipped steps after which the learning rate is halved, after which
    #: the rest of the round runs in float32, and after which training gives up.
    BACKOFF_LR, BACKOFF_FP32, GIVE_UP = 3, 6, 10

    def _back_off(self, consecutive: int) -> None:
        """React to ``consecutive`` skipped steps in a row (see the class constants)."""
        where = f"iteration {self.iteration + 1}"
        if consecutive == self.BACKOFF_LR:
            self._lr_scale *= 0.5
            warnings.warn(
                f"{consecutive} training steps in a row had a non-finite loss or gradient ({where});"
                f" the learning rate is halved for the rest of this round",
                RuntimeWarning,
                stacklevel=4,
            )
        elif consecutive == self.BACKOFF_FP32 and self._round_precision != torch.float32:
            self._round_precision = torch.float32
            self.scaler = torch.amp.GradScaler("cuda", enabled=False)
            warnings.warn(
                f"{consecutive} training steps in a row had a non-finite loss or gradient ({where}), also at a lower"
                " learning rate; the rest of this round trains in float32",
                RuntimeWarning,
                stacklevel=4,
            )
        elif consecutive >= self.GIVE_UP:
            raise FloatingPointError(
                f"training stopped at {where}: {consecutive} steps in a row had a non-finite loss or gradient,"
                f" also at half the learning rate and in float32, so none of them changed the weights (the model"
                f" keeps those of its last good step). Look for extreme values in the image (the clip bounds are"
                f" {self.normalization.lower}..{self.normalization.upper}) or lower config.train.learning_rate"
                f" (now {self.config.train.learning_rate})"
            )

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
            lr = self._learning_rate(done, progress)
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
