"""Long jobs of the interactive loop as generators, without Qt.

The napari widgets run these in a worker thread and handle what they yield on
the GUI thread; tests can iterate them directly.

:func:`training_job` trains and, every few seconds, predicts the region the
user is looking at (a :class:`Preview`); when the budget is used or
``stop`` is set it predicts the whole volume block by block, nearest the view
first (:class:`Phase` marks the switch).  :func:`prediction_job` is the second
half alone, for applying a model to any volume.  Both stop within one step or
one batch of windows when their flags are set.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Generator, Sequence

from .config import PredictConfig
from .prediction import Block, PredictReport, predict_blocks, predict_region
from .training import TrainReport, Trainer

__all__ = ["Phase", "Preview", "training_job", "prediction_job", "PREVIEW_CONFIG"]

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
    predict_after: bool = True,
    device: str | None = None,
    saver: Any = None,
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
    stop = stop or threading.Event()
    cancel = cancel or threading.Event()
    device = device or str(trainer.device)
    yield Phase("training")
    steps = trainer.steps(max_seconds=max_seconds, max_iterations=max_iterations)
    interval = preview_every
    last_preview = time.perf_counter()
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
                    blocks = list(predict_region(trainer.volume, trainer.model, region, device=device, config=PREVIEW_CONFIG))
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
    if predict_after:
        yield from prediction_job(trainer.volume, trainer.model, device=device, cancel=cancel, focus=focus)
    else:
        yield Phase("done")


def prediction_job(
    volume: Any,
    model: Any,
    *,
    device: str = "auto",
    cancel: threading.Event | None = None,
    focus: Callable[[], Sequence[float] | None] | None = None,
    config: PredictConfig | None = None,
) -> Generator[Phase | Block | PredictReport, None, None]:
    """Predict ``volume`` block by block (nearest ``focus()`` first), yielding blocks and progress."""
    cancel = cancel or threading.Event()
    yield Phase("predicting")
    reports: list[PredictReport] = []
    priority = focus() if focus is not None else None
    blocks = predict_blocks(volume, model, device=device, config=config, priority=priority, progress=reports.append)
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
    while reports:
        yield reports.pop(0)
    yield Phase("done")
