"""When a training run writes its model: every few seconds, at the end, and which one is "best".

The policy is the engine's; where the model goes is not: any
:class:`CheckpointSink` will do (a :class:`napari_sparse3d.io.project.Project`
is one), so the engine never imports the store.

"Best" is judged by the validation Dice (:mod:`.validation`) when the model's
history holds recent measurements: the mean of the last :data:`VAL_WINDOW`
of them, higher is better.  Three, because one measurement on a few fixed
patches swings with every step's weights while the mean of three (75 steps at
the default ``validation_every``) follows the trend and still finds a peak
within a few measurements.  Without measurements (validation off, too few
annotations, no measurement yet) it is the mean training loss over the last
:data:`BEST_WINDOW` steps, lower is better.  The two do not compare: when the
criterion changes, the new checkpoint becomes the best.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from typing import Any, Protocol

import numpy as np

from napari_sparse3d.engine.model import UNet3D
from napari_sparse3d.engine.trained import model_info

__all__ = ["BEST_WINDOW", "VAL_WINDOW", "CheckpointSaver", "CheckpointSink", "best_score"]

#: Without validation, the "best" checkpoint is the one with the lowest mean loss over its last this many steps.
BEST_WINDOW = 50
#: With validation, it is the one with the highest mean of its last this many validation Dice measurements.
VAL_WINDOW = 3


class CheckpointSink(Protocol):
    """Somewhere to keep the latest (and the best) model of a training run."""

    @property
    def best(self) -> tuple[str, float] | None:
        """``(criterion, value)`` of the best checkpoint kept so far (``"val_dice"`` or ``"loss"``), or None."""

    def save_checkpoint(self, model: UNet3D, *, best: bool = False, extra: Mapping[str, Any] | None = None) -> Any:
        """Keep ``model`` as the latest checkpoint (and as the best one with ``best``, ``extra`` naming its score)."""


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not math.isfinite(value):
        return None
    return float(value)


def best_score(model: UNet3D) -> tuple[str, float]:
    """``("val_dice", mean of the recent measurements)`` or ``("loss", recent mean loss)`` of a model's history.

    Measurements count when they are recent: within the last :data:`VAL_WINDOW`
    times ``validation_every`` steps (a history continued from an earlier round
    without validation does not keep judging by its old Dice).
    """
    info = model_info(model)
    history = info.history
    if history:
        every = int(getattr(info.config.train, "validation_every", 25))
        last = int(history[-1].get("iteration", 0))
        dice = [
            (int(h.get("iteration", 0)), v) for h in history if (v := _number(h.get("val_dice"))) is not None
        ]
        recent = [v for i, v in dice if i > last - VAL_WINDOW * every][-VAL_WINDOW:]
        if recent:
            return "val_dice", float(np.mean(recent))
    losses = [v for h in history[-BEST_WINDOW:] if (v := _number(h.get("loss"))) is not None]
    return "loss", float(np.mean(losses)) if losses else float("inf")


class CheckpointSaver:
    """Writes the model into ``sink`` every ``every`` seconds of training, and at the end; no sink, no writes."""

    def __init__(self, sink: CheckpointSink | None, every: float) -> None:
        self.sink, self.every, self.clock = sink, every, time.perf_counter
        self.last = self.clock()

    def _save(self, model: UNet3D) -> None:
        assert self.sink is not None
        metric, value = best_score(model)
        best = self.sink.best
        if best is None or best[0] != metric:
            is_best = True  # nothing yet, or a criterion that does not compare with the new one
        elif metric == "val_dice":
            is_best = value >= best[1]
        else:
            is_best = value <= best[1]
        extra = {"best_metric": metric, "best_value": value if math.isfinite(value) else None} if is_best else None
        self.sink.save_checkpoint(model, best=is_best, extra=extra)
        self.last = self.clock()

    def step(self, model: UNet3D) -> None:
        """After a training step: save when ``every`` seconds have passed since the last save."""
        if self.sink is not None and self.clock() - self.last >= self.every:
            self._save(model)

    def final(self, model: UNet3D) -> None:
        """When training ends (not after a failure: the sink keeps its last good checkpoint)."""
        if self.sink is not None:
            self._save(model)
