"""Ctrl-C and the platform's SIGTERM become a request to stop at the next safe point.

    with GracefulInterrupt(log=log.warning) as interrupt:
        while ...:
            optimizer step
            if interrupt.requested: save a full checkpoint, exit 75 with the resume command

The first SIGINT/SIGTERM only sets `requested` (the loop finishes the optimizer step it is in, so the
model, optimizer and data position stay consistent, then saves). A second one aborts at once: checkpoints
are written to a temporary directory and renamed, so abandoning a save half-way leaves the last good
checkpoint as it was. By default the abort is `os._exit(128 + signum)` in a script and an `AbortTraining`
exception in a notebook (os._exit would kill the kernel).

Signal handlers can only be installed from the main thread; elsewhere the context manager installs
nothing (the caller can still call `trigger()`, e.g. from `except KeyboardInterrupt`). A signal that was
ignored when we started (SIG_IGN, as for background jobs) stays ignored. The previous handlers are
restored on exit, so a notebook's Ctrl-C behaves normally again once training returns.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator


class AbortTraining(BaseException):
    """A second interrupt: stop now without saving (not a KeyboardInterrupt, so no emergency save)."""


class StopNow(BaseException):
    """A stop request during a phase that may simply be cut (the final evaluation, the export): raised
    from the handler so the stop takes effect within a moment, not after minutes of evaluation. Only
    used once the last checkpoint is written; every phase it cuts writes to a temporary path first."""


class GracefulInterrupt:
    def __init__(self, log: Callable[[str], None] = print,
                 signals: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM),
                 hard_abort: bool | None = None) -> None:
        self.log = log
        self.signals = tuple(signals)
        self.hard_abort = ("ipykernel" not in sys.modules) if hard_abort is None else hard_abort
        self.requested = False
        self.signal_name: str | None = None
        self.count = 0
        self._previous: dict[int, object] = {}
        self.installed = False
        self._cut = False

    def __enter__(self) -> GracefulInterrupt:
        if threading.current_thread() is not threading.main_thread():
            return self
        for sig in self.signals:
            prev = signal.getsignal(sig)
            if prev is signal.SIG_IGN:
                continue
            self._previous[sig] = prev
            signal.signal(sig, self._handle)
        self.installed = bool(self._previous)
        return self

    def __exit__(self, *exc) -> None:
        for sig, prev in self._previous.items():
            signal.signal(sig, prev if prev is not None else signal.SIG_DFL)
        self._previous.clear()
        self.installed = False

    @contextlib.contextmanager
    def cut_phase(self) -> Iterator[None]:
        """Within this block the first SIGINT/SIGTERM raises StopNow at once (see StopNow)."""
        self._cut = True
        try:
            yield
        finally:
            self._cut = False

    def consume(self) -> str | None:
        """Forget a request that is being honoured another way (a signal during the last step: the run
        saves and finishes instead of stopping); returns its signal name. A new signal is again the first."""
        name, self.requested, self.signal_name, self.count = self.signal_name, False, None, 0
        return name

    def trigger(self, name: str = "KeyboardInterrupt") -> None:
        """Request a stop by hand (a KeyboardInterrupt caught off the handlers' path)."""
        self._request(name)

    def _request(self, name: str) -> None:
        self.count += 1
        if not self.requested:
            self.requested, self.signal_name = True, name
            self.log(f"memfit: received {name}: finishing this step, then saving a checkpoint "
                     f"(send it again to abort at once without saving)")

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self._cut and not self.requested:
            self.count += 1
            self.requested, self.signal_name = True, name
            raise StopNow(name)
        if self.requested:
            self.count += 1
            self.log(f"memfit: second {name}: aborting now; the last finished checkpoint is intact")
            if self.hard_abort:
                try:
                    sys.stdout.flush()
                    sys.stderr.flush()
                finally:
                    os._exit(128 + signum)
            raise AbortTraining(f"second {name}: training aborted without saving")
        self._request(name)
