"""What reaches the console: the libraries' own bars, load reports and warnings (off unless --verbose),
memfit's phase bars (off under --quiet), and a reader that goes away (`memfit plan | head`).

Layer 1 (imports no memfit) so that every layer reads the same switch: the GGUF dequantize bar in models/
as well as the phase bars in metrics.py and the jobs."""

from __future__ import annotations

import contextlib
import logging
import os
import sys

# The libraries whose bars, load reports and advisory warnings fill the console of every run (issue 17).
LIBRARIES = ("transformers", "peft", "huggingface_hub", "datasets", "accelerate", "bitsandbytes", "tokenizers")

PHASE_BARS_OFF = False     # --quiet of the command running now (quiet_libraries sets it)


def quiet_libraries(verbose: bool = False, quiet: bool = False) -> None:
    """The one place memfit decides what third-party output reaches the console: progress bars off (the
    environment variables are read when a library is imported; the calls cover one already imported),
    loggers at ERROR (transformers' LOAD REPORT is a WARNING with ANSI colours), their FutureWarnings
    and DeprecationWarnings hidden. --verbose leaves everything as the
    libraries set it. `quiet` (the CLI's --quiet) turns memfit's phase bars off for this command only: a
    module flag that every call resets (TQDM_DISABLE in os.environ would outlive the command in a notebook
    or test process and silence the bars of every later subprocess, --verbose ones included)."""
    global PHASE_BARS_OFF
    PHASE_BARS_OFF = quiet
    if verbose:
        return
    import warnings
    for k, v in {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error",
                 "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1", "DATASETS_VERBOSITY": "error",
                 "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}.items():
        os.environ.setdefault(k, v)
    for name in LIBRARIES:
        logging.getLogger(name).setLevel(logging.ERROR)
    pattern = r"(" + "|".join(LIBRARIES) + r")(\.|$)"
    for category in (FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category, module=pattern)
    if "transformers" in sys.modules:
        from transformers.utils import logging as tlog
        tlog.set_verbosity_error()
        tlog.disable_progress_bar()
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars
        disable_progress_bars()


def stdout_gone() -> None:
    """The reader of stdout went away (`memfit plan | head -3`): point stdout at /dev/null so what is still
    buffered, and every later line, goes nowhere instead of raising BrokenPipeError again (at exit, Python
    would print 'Exception ignored ... BrokenPipeError' while flushing)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.__stdout__.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass


class PipeSafeStdout:
    """The process's stdout for one command: a reader that goes away (`| head`) changes nothing memfit does
    (a run trains on, a plan still exits 3 when it does not fit; memfit.log keeps every line), it only
    stops the printing. Everything but write/flush is the wrapped stream's."""

    def __init__(self, stream) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            stdout_gone()
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            stdout_gone()

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


@contextlib.contextmanager
def pipe_safe_stdout():
    """While a command runs from the `memfit` entry point (stdout is the process's own), writes to a closed
    pipe go nowhere; a test's or notebook's captured stdout is left as it is."""
    if sys.stdout is not sys.__stdout__ or sys.stdout is None:
        yield
        return
    sys.stdout = PipeSafeStdout(sys.stdout)
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stdout = sys.__stdout__
