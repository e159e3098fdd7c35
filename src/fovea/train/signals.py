"""Graceful stop on SIGTERM / SIGINT: the loop finishes the current step, writes ``last.pt`` and exits
with 143 / 130 (128 + the signal number), so pre-empted or interrupted runs resume exactly."""
from __future__ import annotations

import os
import signal
import sys
import threading
from types import FrameType
from typing import Any


class RunInterrupted(Exception):
    """Raised by the loop after the stop checkpoint is written; ``code`` is the process exit status."""

    def __init__(self, signum: int, step: int, checkpoint: str) -> None:
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        self.code = 128 + signum
        name = signal.Signals(signum).name
        super().__init__(f"stopped by {name} after step {step}; checkpoint {checkpoint} written "
                         "(run the same command again to resume)")


class StopRequest:
    """Installs handlers for SIGTERM and SIGINT that record the first signal instead of dying.

    A second SIGINT (Ctrl-C twice) restores the default behaviour and interrupts at once. Handlers can
    only be installed from the main thread; elsewhere this is a no-op (``signum`` stays 0).
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signum = 0
        self._old: dict[int, Any] = {}

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        if self.signum and signum == signal.SIGINT:
            self.restore()
            raise KeyboardInterrupt
        if not self.signum:
            self.signum = signum
            if os.environ.get("RANK", "0") == "0":  # one message for all the ranks of a torchrun job
                print(f"\n[fovea] {signal.Signals(signum).name} received: finishing this step, then writing "
                      "checkpoints/last.pt (Ctrl-C again to stop at once)", file=sys.stderr, flush=True)

    def install(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._old[s] = signal.signal(s, self._handler)
        return self

    def restore(self) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old.clear()

    def __enter__(self) -> "StopRequest":
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.restore()
