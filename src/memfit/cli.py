"""The `memfit` command. Flags are generated from the config dataclasses (one set of names for
plan/train/finetune/classify); heavy libraries are imported only by the subcommand that runs.

Exit codes: 0 finished; 75 stopped resumably (deadline, SIGTERM/SIGINT) with the resume command
printed; 2 bad configuration or input (every problem listed); 3 does not fit even at micro-batch 1;
1 anything else. A closed stdout (`memfit plan | head`) changes none of them: memfit stops printing.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from memfit import config as C
from memfit import console
from memfit.jobs import startup

EXIT_OK, EXIT_ERROR, EXIT_BAD_INPUT, EXIT_NO_FIT, EXIT_STOPPED = 0, 1, 2, 3, 75

# Which option groups each job subcommand shows (all accept the same names for shared options).
JOB_GROUPS = {
    "train": ("data", "model", "optim", "train", "checkpoint", "budget", "oom", "run"),
    "finetune": ("data", "model", "optim", "train", "checkpoint", "budget", "oom", "lora", "run"),
    "classify": ("data", "model", "optim", "train", "checkpoint", "budget", "oom", "run"),
    "plan": ("data", "model", "optim", "train", "checkpoint", "budget", "oom", "lora", "run"),
}
GROUP_TITLES = {"data": "data", "model": "model", "optim": "optimizer", "train": "training loop",
                "checkpoint": "checkpoints and resume", "budget": "budgets (memory, time, disk)",
                "oom": "out-of-memory recovery", "lora": "LoRA / QLoRA", "run": "run directory and output"}


# The job kinds each subcommand runs: its --help lists only the fields they read, with their defaults.
COMMAND_TASKS = {"train": ("pretrain",), "finetune": ("finetune",), "classify": ("classify",),
                 "plan": ("pretrain", "finetune", "classify"), "data": ("pretrain",)}


def _show(v: Any) -> str:
    return " ".join(map(str, v)) if isinstance(v, tuple) else str(v)


def default_text(group: str, f, tasks: tuple[str, ...]) -> str:
    """' [default: X]', or one default per job kind where they differ ('2e-05 full fine-tuning, ...')."""
    kinds = [k for t in tasks for k in (("finetune", "lora") if t == "finetune" else (t,))]
    if f.metadata.get("per_job") is None:
        d = getattr(getattr(C.Config(), group), f.name)
        return "" if d in (None, (), "") else f" [default: {_show(d)}]"
    per = {k: C.job_default(f, k) for k in kinds if C.job_default(f, k) is not None}
    if not per:
        return ""
    if len(set(per.values())) == 1 and len(per) == len(kinds):
        return f" [default: {_show(next(iter(per.values())))}]"
    return " [default: " + ", ".join(f"{_show(v)} {C.KIND_NAMES[k]}" for k, v in per.items()) + "]"


def _add_config_flags(p: argparse.ArgumentParser, groups: tuple[str, ...],
                      tasks: tuple[str, ...] = C.TASKS) -> None:
    p.add_argument("--config", metavar="YAML", help="Load options from a YAML file (flags override it).")
    p.add_argument("--set", metavar="GROUP.KEY=VALUE", action="append", default=[],
                   help="Dotted override, e.g. --set train.lr=3e-4 (repeatable).")
    seen: set[str] = set()
    for group in groups:
        g = p.add_argument_group(GROUP_TITLES[group])
        for name, f in C.iter_fields():
            if name != group or not any(C.applies(f, t) for t in tasks):
                continue
            flag = C.flag_name(f)
            if flag in seen:
                continue
            seen.add(flag)
            help_text = (f.metadata["help"] + default_text(group, f, tasks)).replace("%", "%%")
            tp = C.field_type(group, f)
            kw: dict[str, Any] = dict(dest=f"{group}.{f.name}", default=argparse.SUPPRESS, help=help_text)
            if tp is bool:
                g.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
            elif "tuple" in str(tp):
                g.add_argument(flag, nargs="+", metavar="X", **kw)
            else:
                # Kept as text here: config.from_dict parses and validates, collecting every problem.
                choices = f.metadata.get("choices")
                kind = f.metadata.get("parse") or getattr(tp, "__name__", "")
                metavar = "{" + ",".join(choices) + "}" if choices else \
                    {"bytes": "SIZE", "duration": "TIME", "count": "N", "int": "N", "float": "X"}.get(
                        kind, "N" if "int" in str(tp) else "X" if "float" in str(tp) else "TEXT")
                g.add_argument(flag, metavar=metavar, **kw)


def config_from_args(args: argparse.Namespace, task: str,
                     problems_out: list[str] | None = None) -> C.Config:
    """YAML (if any) < flags < --set overrides; raises ConfigError listing every problem (or, with
    problems_out, reports them there and returns the config with those values left at defaults)."""
    problems: list[str] = []
    base = C.Config(task=task)
    if getattr(args, "config", None):
        try:
            base = C.load_yaml(args.config, base)
        except C.ConfigError as e:
            problems += e.problems
        except OSError as e:
            problems.append(f"--config {args.config}: {e.strerror}")
    raw: dict[str, Any] = {k: v for k, v in vars(args).items() if "." in k}
    for item in getattr(args, "set", []) or []:
        if "=" not in item:
            problems.append(f"--set {item!r}: expected GROUP.KEY=VALUE")
            continue
        k, v = item.split("=", 1)
        raw[k.strip()] = v.strip()
    from memfit.hardware import with_platform
    cfg = with_platform(C.with_job_defaults(C.from_dict(raw, base, problems)))
    if problems_out is not None:
        problems_out.extend(problems)
    elif problems:
        raise C.ConfigError(problems)
    return cfg


def _add_console_flags(p: argparse.ArgumentParser) -> None:
    """--verbose / --quiet for the commands without config flags (the same dests as the jobs' options)."""
    p.add_argument("--verbose", dest="run.verbose", action="store_true",
                   help="Show the libraries' own output too: progress bars, load reports, warnings.")
    p.add_argument("--quiet", dest="run.quiet", action="store_true", help="No progress bar.")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="memfit",
        description="Train and fine-tune language models on hardware too small for comfort: plan the job "
                    "against a budget, survive OOM/interruption/deadlines/full disks, resume exactly.",
        epilog="Exit codes: 0 finished, 75 stopped resumably (rerun with --resume auto), 2 bad "
               "configuration or input, 3 does not fit even at micro-batch 1, 1 other errors.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    t = sub.add_parser("train", help="Pretrain a GPT from scratch (default: a few-M GPT on Shakespeare).",
                       description="Pretrain a GPT-2- or Llama-style model from scratch on local text "
                                   "or an embedded corpus. With no arguments: a small GPT on Shakespeare.")
    _add_config_flags(t, JOB_GROUPS["train"], COMMAND_TASKS["train"])

    f = sub.add_parser("finetune", help="Fine-tune a causal LM (full, LoRA or QLoRA) on JSONL/text.")
    _add_config_flags(f, JOB_GROUPS["finetune"], COMMAND_TASKS["finetune"])

    c = sub.add_parser("classify", help="Fine-tune an encoder (BERT-style) for sequence classification.")
    _add_config_flags(c, JOB_GROUPS["classify"], COMMAND_TASKS["classify"])
    from memfit.dist import launch
    for job_parser in (t, f, c):
        launch.add_flags(job_parser)
    la = sub.add_parser("launch", help="Run your script (which calls memfit.fit) on N processes with torchrun.",
                        description="Run SCRIPT on N processes under torchrun (`python -m torch.distributed.run`): "
                                    "memfit.fit in the script detects the job and trains on every process. "
                                    "Exits with the code the processes agreed on (0, 75, 2, 3).")
    launch.add_flags(la)
    la.add_argument("script", help="The Python script to run on every process.")
    la.add_argument("script_args", nargs=argparse.REMAINDER, help="Its arguments.")

    pl = sub.add_parser("plan", help="Predict memory, time and disk against a budget; --fit picks knobs.")
    _add_config_flags(pl, JOB_GROUPS["plan"], COMMAND_TASKS["plan"])
    pl.add_argument("--task", choices=("pretrain", "full", "lora", "qlora", "classify"), default=None,
                    help="Which job to plan when the model alone does not say.")
    pl.add_argument("--fit", action="store_true", help="Choose the knobs that fit the budget.")
    pl.add_argument("--json", action="store_true", help="Print the plan as JSON.")

    e = sub.add_parser("eval", help="Loss and perplexity of a saved model on any data.")
    e.add_argument("--model", required=True, help="HF-format model folder (e.g. runs/x/final_model).")
    e.add_argument("--data", nargs="+", required=True, help="Data to evaluate on (same syntax as train).")
    e.add_argument("--seq-len", type=int, default=None, help="Block size (default: the model's context).")
    e.add_argument("--batch-size", type=int, default=8)
    e.add_argument("--max-batches", type=int, default=0, help="0 = all of the data.")
    e.add_argument("--text-field", default="text")

    g = sub.add_parser("generate", help="Generate text from a saved model.")
    g.add_argument("--model", required=True, help="HF-format model folder.")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=60)
    g.add_argument("--temperature", type=float, default=0.8,
                   help="Sampling temperature (default 0.8: readable text from small models); 0 = greedy.")
    g.add_argument("--top-k", type=int, default=40, help="Sample from the k most likely tokens.")
    g.add_argument("--seed", type=int, default=0)

    ex = sub.add_parser("export", help="Write a checkpoint of a run as an HF-format model folder.")
    ex.add_argument("--run", required=True, help="Run directory (runs/<name>).")
    ex.add_argument("--checkpoint", default="latest", help="latest, best, or a step-N directory name.")
    ex.add_argument("--out", required=True, help="Output folder.")

    m = sub.add_parser("merge", help="Merge a LoRA adapter into its base on CPU and save an HF folder.")
    m.add_argument("--base", default=None, help="Base model: HF folder, .gguf file, or hub id (default: the "
                   "adapter's base_model_name_or_path; memfit's adapters name a local folder).")
    m.add_argument("--adapter", required=True, help="Adapter folder (peft format).")
    m.add_argument("--out", required=True)
    m.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp16")
    m.add_argument("--device", default="cpu")

    for tool in (e, g, ex, m):
        _add_console_flags(tool)

    d = sub.add_parser("data", help="Data tools.")
    dsub = d.add_subparsers(dest="data_command", metavar="ACTION")
    di = dsub.add_parser("inspect", help="Counts, tokens per epoch, sample blocks, bytes/token.")
    _add_config_flags(di, ("data",), COMMAND_TASKS["data"])
    from memfit.jobs import doctor, runs
    for command in (doctor, runs):   # self-contained commands: the module adds its parser, sets run_command
        command.add_parser(sub)
    return p


def _run_guarded(fn: Callable[[], int]) -> int:
    """Map failures to the documented exit codes, printing one clear message."""
    try:
        return fn()
    except C.ConfigError as e:
        if _rank_zero():      # (N ranks: every rank exits 2 with rank 0's problems; it says them once)
            print(e.format(), file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("memfit: interrupted", file=sys.stderr)
        return 130
    except startup.StartupInterrupted as e:
        print(startup.message(e, None), file=sys.stderr)
        return EXIT_ERROR
    except Exception as e:  # noqa: BLE001
        from memfit.ckpt.formats import CheckpointError
        from memfit.data.readers import DataError
        if isinstance(e, DataError):
            print(C.ConfigError(e.problems).format(), file=sys.stderr)
            return EXIT_BAD_INPUT
        from memfit.device import DoesNotFit
        if isinstance(e, CheckpointError):
            print(f"memfit: cannot resume: {e}", file=sys.stderr)
            return EXIT_BAD_INPUT
        if isinstance(e, DoesNotFit):
            if _rank_zero():
                print(f"memfit: does not fit: {e}", file=sys.stderr)
            return EXIT_NO_FIT
        from memfit.device import is_oom
        if is_oom(e):   # outside the forward/backward (loading the model, the optimizer step): no
            # micro-batch helps there; the last checkpoint is intact (saves are atomic)
            from memfit.train.oom import GENERIC_ADVICE
            print(f"memfit: does not fit: out of memory outside the forward/backward "
                  f"({str(e).splitlines()[0][:200]}). {GENERIC_ADVICE}", file=sys.stderr)
            return EXIT_NO_FIT
        return _unexpected(e)


def _rank_zero() -> bool:
    from memfit.dist.env import current
    return current().is_main


def _unexpected(e: Exception) -> int:
    """One readable line; the traceback goes to memfit.log (or, with no run directory, above the line)."""
    import traceback

    from memfit.metrics import log_exception
    logfile = log_exception(e)
    if logfile is None:
        traceback.print_exception(e, file=sys.stderr)
    notes = [n.removeprefix("memfit: ") for n in getattr(e, "__notes__", []) if n.startswith("memfit:")]
    first = (str(e).strip().splitlines() or [""])[0][:300]
    where = f" ({'; '.join(notes)})" if notes else ""
    tail = f" Full traceback: {logfile}" if logfile is not None else ""
    print(f"memfit: error: {type(e).__name__}: {first}{where}.{tail}", file=sys.stderr)
    return EXIT_ERROR


def subprocess_exit(cmd: list[str]) -> int:
    import subprocess
    return subprocess.run(cmd, check=False).returncode


def main(argv: list[str] | None = None) -> int:
    """The command. `memfit ... | head`: a reader that goes away only stops the printing (no traceback;
    the exit code is the command's own)."""
    with console.pipe_safe_stdout():
        return _main(argv)


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    from memfit.jobs.flagnames import parse_args
    args = parse_args(parser, argv)   # unknown flags: the subcommand's usage, HF Trainer names answered
    if args.command is None:
        parser.print_help()
        return EXIT_OK
    console.quiet_libraries(verbose=bool(getattr(args, "run.verbose", False)),   # before any library is imported
                            quiet=bool(getattr(args, "run.quiet", False)))
    if hasattr(args, "run_command"):
        return _run_guarded(lambda: args.run_command(args))

    if args.command in ("train", "finetune", "classify", "eval", "generate"):
        # Expandable segments unless the user chose allocator settings: before anything touches CUDA.
        from memfit.train.oom import configure_allocator
        configure_allocator()
    if args.command in ("train", "finetune", "classify"):
        task = {"train": "pretrain"}.get(args.command, args.command)

        startup.install()      # until the loop's handlers take over: a signal means "nothing saved yet"

        def job() -> int:
            from memfit.dist import launch
            problems: list[str] = []
            how = launch.from_args(args, problems)
            cfg = config_from_args(args, task, problems)
            from memfit.jobs import dispatch as jobs
            if problems:  # every problem at once, before torchrun starts or a file is written (a good
                problems += jobs.check(cfg)  # launch: rank 0 checks the job, every rank exits 2 with it)
            if problems:
                raise C.ConfigError(problems)
            if how.wanted:
                return launch.run(how, ["-m", "memfit.cli", *launch.strip_flags(list(sys.argv[1:] if argv is None
                                                                                  else argv))])
            return jobs.run(cfg)
        return _run_guarded(job)
    if args.command == "launch":
        def launch_script() -> int:
            from pathlib import Path

            from memfit.dist import launch
            problems: list[str] = []
            how = launch.from_args(args, problems)
            if not Path(args.script).is_file():
                problems.append(f"{args.script}: no such script")
            if problems:
                raise C.ConfigError(problems)
            target = [args.script, *args.script_args]
            if not how.wanted:      # one process: the script runs as `python script.py` would run it
                return subprocess_exit([sys.executable, *target])
            return launch.run(how, target)
        return _run_guarded(launch_script)
    if args.command == "plan":
        def plan() -> int:
            cfg = config_from_args(args, "pretrain")
            from memfit.plan import plan_main
            return plan_main(cfg, fit=args.fit or cfg.budget.auto_fit, as_json=args.json, task=args.task)
        return _run_guarded(plan)
    if args.command == "eval":
        from memfit.jobs import tools
        return _run_guarded(lambda: tools.eval_main(args))
    if args.command == "generate":
        from memfit.jobs import tools
        return _run_guarded(lambda: tools.generate_main(args))
    if args.command == "export":
        from memfit.jobs import tools
        return _run_guarded(lambda: tools.export_main(args))
    if args.command == "merge":
        from memfit.jobs.merge import merge_main
        return _run_guarded(lambda: merge_main(args))
    if args.command == "data":
        if args.data_command != "inspect":
            parser.parse_args(["data", "--help"])
        from memfit.data.inspect import inspect_main
        return _run_guarded(lambda: inspect_main(config_from_args(args, "pretrain")))
    return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
