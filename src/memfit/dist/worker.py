"""One torchrun worker started by memfit's launcher (dist/launch.py): `python -m memfit.dist.worker
-m memfit.cli train ...` or `python -m memfit.dist.worker script.py ...`.

It runs the target in this process (runpy: the same process torchrun started, so torchrun's signals and
its watchdog still reach it), and tells the launcher two things through files in $MEMFIT_LAUNCH_DIR:
  pid.<rank>   this worker's pid, so the launcher forwards SIGTERM/SIGINT to the workers themselves (the
               job then stops at an agreed step and saves; torchrun would kill them after 30 s instead);
  code.<rank>  the exit code the job chose.
An agreed code (0 finished, 2 bad input, 3 does not fit, 75 stopped resumably: every rank reaches the same
one) leaves the process as 0, because torchrun turns any non-zero code into a generic failure and tears
the other ranks down; any other code (a crash on this rank) is kept, so torchrun ends the job.
"""

from __future__ import annotations

import os
import runpy
import sys
from pathlib import Path

LAUNCH_DIR_ENV = "MEMFIT_LAUNCH_DIR"
AGREED = (0, 2, 3, 75)


def _code(exit_arg: object) -> int:
    if exit_arg is None:
        return 0
    if isinstance(exit_arg, int):
        return exit_arg
    print(exit_arg, file=sys.stderr)        # sys.exit("message"), as Python itself prints it
    return 1


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def main(argv: list[str]) -> int:
    here = Path(os.environ[LAUNCH_DIR_ENV])
    rank = os.environ.get("RANK", "0")
    _write(here / f"pid.{rank}", str(os.getpid()))
    if argv[:1] == ["-m"]:
        target, run = argv[1], lambda: runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        sys.argv = [target, *argv[2:]]
    else:
        target, run = argv[0], lambda: runpy.run_path(argv[0], run_name="__main__")
        sys.argv = list(argv)
        sys.path.insert(0, str(Path(argv[0]).resolve().parent))    # as `python script.py` does
    try:
        run()
        code = 0
    except SystemExit as e:
        code = _code(e.code)
    _write(here / f"code.{rank}", str(code))
    return 0 if code in AGREED else code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
