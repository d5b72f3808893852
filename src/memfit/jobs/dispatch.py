"""`memfit train | finetune | classify`: the one place a task picks its job kind. Each kind depends on
memfit.jobs.common (the shared run start, assembly and run_job), never the reverse; this module sits
above them all.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

from memfit import config as C
from memfit.jobs.common import KindProblems
from memfit.jobs.common import check as check_job
from memfit.train.job import TrainResult


class Kind(NamedTuple):
    problems: KindProblems                   # its own checks, beyond the shared ones
    run: Callable[[C.Config], TrainResult]   # start_run(cfg, problems) ... run_job(job)


def kind(task: str) -> Kind:
    if task == "finetune":
        from memfit.jobs.finetune import check_finetune, run_causal_lm
        return Kind(check_finetune, run_causal_lm)
    if task == "classify":
        from memfit.jobs.classify import check_classify, run_classify
        return Kind(check_classify, run_classify)
    from memfit.jobs.pretrain import check_pretrain, run_pretrain     # (imports torch-heavy data code)
    return Kind(check_pretrain, run_pretrain)


def check(cfg: C.Config) -> list[str]:
    """Every problem with this job that can be found before building a model."""
    return check_job(cfg, kind(cfg.task).problems)


def run(cfg: C.Config) -> int:
    """Entry point for train/finetune/classify: returns the process exit code."""
    from memfit.train.oom import configure_allocator
    configure_allocator()   # before anything initialises CUDA (the CLI did it already; harmless twice)
    return kind(cfg.task).run(cfg).exit_code
