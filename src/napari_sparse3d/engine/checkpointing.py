"""When a training run writes its model: every few seconds, at the end, and which one is "best".

The policy is the engine's; where the model goes is not: any
:class:`CheckpointSink` will do (a :class:`napari_sparse3d.io.project.Project`
is one), so the engine never imports the store.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any, Protocol

import numpy as np

from napari_sparse3d.engine.model import UNet3D
from napari_sparse3d.engine.trained import model_info

__all__ = ["BEST_WINDOW", "CheckpointSaver", "CheckpointSink"]

#: The "best" checkpoint is the one with the lowest mean loss over its last this many steps.
BEST_WINDOW = 50


class CheckpointSink(Protocol):
    """Somewhere to keep the latest (and the best) model of a training run."""

    @property
    def best_loss(self) -> float | None:
        """The recent mean loss of the best checkpoint kept so far, or None."""

    def save_checkpoint(self, model: UNet3D, *, best: bool = False, extra: Mapping[str, Any] | None = None) -> Any:
        """Keep ``model`` as the latest checkpoint (and as the best one with ``best``)."""


class CheckpointSaver:
    """Writes the model into ``sink`` every ``every`` seconds of training, and at the end; no sink, no writes."""

    def __init__(self, sink: CheckpointSink | None, every: float) -> None:
        self.sink, self.every, self.clock = sink, every, time.perf_counter
        self.last = self.clock()

    def _save(self, model: UNet3D) -> None:
        assert self.sink is not None
        recent = [h["loss"] for h in model_info(model).history[-BEST_WINDOW:]]
        loss = float(np.mean(recent)) if recent else float("inf")
        best = self.sink.best_loss
        is_best = best is None or loss <= best
        self.sink.save_checkpoint(model, best=is_best, extra={"best_loss": loss} if is_best else None)
        self.last = self.clock()

    def step(self, model: UNet3D) -> None:
        """After a training step: save when ``every`` seconds have passed since the last save."""
        if self.sink is not None and self.clock() - self.last >= self.every:
            self._save(model)

    def final(self, model: UNet3D) -> None:
        """When training ends (not after a failure: the sink keeps its last good checkpoint)."""
        if self.sink is not None:
            self._save(model)
