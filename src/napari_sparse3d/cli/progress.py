"""What the console command shows while it works, and how it answers Ctrl-C and SIGTERM."""

from __future__ import annotations

import signal
import sys
import threading
from typing import Any

__all__ = ["Interrupt", "Progress"]


class Progress:
    """A tqdm bar over the training budget, then over the prediction windows."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.bar: Any = None
        self.phase = ""
        self.notice: str | None = None  # a line to show at the next report (a signal handler may not write)

    def __call__(self, report: Any) -> None:
        from napari_sparse3d.engine.prediction import PredictReport

        if self.notice is not None:
            notice, self.notice = self.notice, None
            (self.bar.write if self.bar is not None else print)(notice, file=sys.stderr)
        if self.quiet:
            self.phase = "predict" if isinstance(report, PredictReport) else "train"
            return
        from tqdm.auto import tqdm

        if isinstance(report, PredictReport):
            if self.phase != "predict":
                self._close()
                self.phase = "predict"
                self.bar = tqdm(total=report.windows_total, desc="predict", unit="window", file=sys.stderr)
            self.bar.update(report.windows_done - self.bar.n)  # redraws at most every mininterval
            return
        if self.phase != "train":
            self._close()
            self.phase = "train"
            self.bar = tqdm(
                total=100, desc="train", file=sys.stderr, mininterval=0.5, bar_format="{l_bar}{bar}| {elapsed}{postfix}"
            )
        skipped = f", {report.skipped} skipped" if report.skipped else ""
        self.bar.set_postfix_str(f"step {report.iteration}, loss {report.loss:.4f}{skipped}", refresh=False)
        self.bar.update(round(100 * report.progress) - self.bar.n)

    def _close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def close(self) -> None:
        self._close()


class Interrupt:
    """Ctrl-C (SIGINT) or SIGTERM (a cluster's scheduler) during training: training ends after the step in
    progress and the model trained so far is predicted and saved as usual.  A second signal, or one before
    training or after it (setting up, predicting), aborts: :func:`main` then exits without a traceback."""

    def __init__(self, progress: Progress) -> None:
        self.progress, self.stop, self.previous = progress, threading.Event(), {}

    def __enter__(self) -> Interrupt:
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            self.previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.stop.is_set() or self.progress.phase != "train":
            raise KeyboardInterrupt
        self.stop.set()
        # writing here could re-enter a write of the main thread in progress (a RuntimeError): the bar shows it
        self.progress.notice = (f"{signal.Signals(signum).name}: training stops after this step; the model trained"
                                " so far is predicted and saved (send it again to abort)")
