"""Signals before training starts: SIGTERM/SIGINT while the tokenizer trains or the model is built.

Until the loop's GracefulInterrupt takes over (which saves a checkpoint and exits 75), nothing can be
saved: Python's default would die silently with 143 on SIGTERM, or print a traceback on Ctrl-C. Here
either signal raises StartupInterrupted, which the CLI turns into one line that says nothing was saved
and how to rerun (exit 1: not "stopped resumably", since there is no checkpoint to resume).
"""

from __future__ import annotations

import signal
import threading


class StartupInterrupted(BaseException):
    """A signal arrived before the first training step (BaseException: `except Exception` in
    start-up code must not swallow it)."""

    def __init__(self, signame: str) -> None:
        super().__init__(signame)
        self.signame = signame


def _raise(signum, _frame) -> None:
    raise StartupInterrupted(signal.Signals(signum).name)


_installed = False     # only the CLI installs these; memfit.fit keeps its caller's handlers


def install() -> None:
    """From here until handed over: SIGTERM and SIGINT raise StartupInterrupted (main thread only)."""
    global _installed
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, _raise)
        _installed = True


def hand_over() -> None:
    """Back to the defaults, for the loop's own handlers to take over (and restore on their exit).
    Nothing to do where install() did not run (memfit.fit in a script or a notebook)."""
    global _installed
    if _installed and threading.current_thread() is threading.main_thread():
        _installed = False
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)


def message(e: StartupInterrupted, run_dir: str | None) -> str:
    where = f" in {run_dir}" if run_dir else ""
    return (f"memfit: stopped by {e.signame} during start-up (before the first training step): nothing was "
            f"saved yet{where}, so there is nothing to resume; run the same command again to start over")
