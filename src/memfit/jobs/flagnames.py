"""Argument errors a new user can act on: the HF Trainer's flag names answered with memfit's, every
unknown flag in one message, and every argparse error under the subcommand's own usage line.

argparse hands a subcommand's unknown arguments back to the top-level parser, which then prints
`usage: memfit [-h] COMMAND ...` — the one usage that does not help. `parse_args` reports them from
the subcommand's parser instead (exit 2, before anything is read or written).
"""

from __future__ import annotations

import argparse
import difflib

# HF TrainingArguments / run_*.py names -> memfit's: candidate flags (the first the subcommand has is
# suggested) and a note for what differs. Names that only differ by '_' vs '-' need no entry.
HF_NAMES: dict[str, tuple[tuple[str, ...], str]] = {
    "learning_rate": (("--lr",), ""),
    "num_train_epochs": (("--epochs",), ""),
    "per_device_train_batch_size": (("--batch-size",), "the micro-batch"),
    "per_device_eval_batch_size": (("--batch-size",), "evaluation uses the training micro-batch"),
    "train_batch_size": (("--batch-size",), ""),
    "auto_find_batch_size": (("--auto-fit",), "plans the micro-batch before training; OOM recovery halves "
                             "it during training anyway, keeping the effective batch"),
    "gradient_accumulation_steps": (("--gradient-accumulation-steps", "--effective-batch"), ""),
    "eval_strategy": (("--eval-strategy",), ""),
    "evaluation_strategy": (("--eval-strategy",), ""),
    "eval_steps": (("--eval-every",), ""),
    "save_strategy": (("--save-strategy",), ""),
    "save_steps": (("--save-every",), ""),
    "save_total_limit": (("--keep-last",), "best/ is kept besides"),
    "logging_steps": (("--log-every",), ""),
    "logging_strategy": (("--log-every",), ""),
    "adam_beta1": (("--beta1",), ""),
    "adam_beta2": (("--beta2",), ""),
    "fp16": (("--precision fp16",), "--precision auto already picks fp16 on GPUs without bf16"),
    "bf16": (("--precision bf16",), "--precision auto already picks bf16 where it is native"),
    "half_precision_backend": (("--precision",), ""),
    "lr_scheduler_type": ((), "memfit's schedule is linear warmup then cosine decay to --min-lr-ratio x --lr"),
    "overwrite_output_dir": (("--overwrite",), ""),
    "run_name": (("--name",), ""),
    "resume_from_checkpoint": (("--resume",), "--resume auto continues the latest checkpoint"),
    "metric_for_best_model": (("--metric-for-best",), ""),
    "load_best_model_at_end": ((), "best/ is always kept (chosen by --metric-for-best); final_model/ is "
                               "the last step's weights"),
    "model_name_or_path": (("--model",), ""),
    "dataloader_num_workers": (("--num-workers",), ""),
    "data_seed": (("--seed",), ""),
    "max_seq_length": (("--max-seq-len", "--seq-len"), ""),
    "max_length": (("--max-seq-len", "--seq-len"), ""),
    "block_size": (("--seq-len",), ""),
    "train_file": (("--data",), ""),
    "validation_file": (("--val-data",), ""),
    "dataset_name": (("--data",), "--data hf:ID"),
    "target_modules": (("--lora-target-modules",), ""),
    "r": (("--lora-r",), ""),
    "use_peft": (("--lora",), ""),
    "load_in_4bit": (("--qlora",), ""),
    "push_to_hub": ((), "memfit does not upload: the model is in <run>/final_model/"),
    "do_train": ((), "not needed: the subcommand says what runs"),
    "do_eval": ((), "not needed: validation runs every --eval-every steps"),
}


def _options(p: argparse.ArgumentParser) -> list[str]:
    return [s for a in p._actions for s in a.option_strings if s.startswith("--")]


def selected_parser(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The innermost subcommand parser that `args` went through (`memfit data inspect` -> inspect's)."""
    p = parser
    while True:
        subs = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
        name = getattr(args, subs[0].dest, None) if subs else None
        if name is None or name not in subs[0].choices:
            return p
        p = subs[0].choices[name]


def suggestion(flag: str, value: str | None, options: list[str]) -> str:
    """'did you mean --lr 2e-4?' (or a note saying what memfit does instead) for one unknown flag."""
    key = flag.lstrip("-")
    hf = HF_NAMES.get(key.replace("-", "_"))
    shown_value = f" {value}" if value is not None else ""
    if hf is not None:
        cands, note = hf
        for c in cands:
            if c.split()[0] in options:
                return f"did you mean {c}{shown_value}?" + (f" ({note})" if note else "")
        if note:
            return note
    dashed = "--" + key.replace("_", "-")
    if dashed in options:
        return f"did you mean {dashed}{shown_value}?"
    close = difflib.get_close_matches(dashed, options, n=1, cutoff=0.75)
    return f"did you mean {close[0]}?" if close else "not a memfit option"


def unknown_message(prog: str, extras: list[str], options: list[str], positionals: bool = False) -> str:
    lines: list[str] = []
    strays: list[str] = []
    i = 0
    while i < len(extras):
        tok = extras[i]
        if tok.startswith("-") and not _is_number(tok):
            flag, _, value = tok.partition("=")
            val: str | None = value or None
            if val is None and i + 1 < len(extras) and not (extras[i + 1].startswith("-")
                                                            and not _is_number(extras[i + 1])):
                val = extras[i + 1]
                i += 1
            lines.append(f"  {flag}: {suggestion(flag, val, options)}")
        else:
            strays.append(tok)
        i += 1
    if strays:
        lines.append(f"  unexpected argument(s) {' '.join(strays)}"
                     + ("" if positionals else f": every {prog} input is a --flag"))
    n = len(lines)
    return f"{n} unknown option{'s' if n != 1 else ''}:\n" + "\n".join(lines)


def _is_number(tok: str) -> bool:
    try:
        float(tok)
        return True
    except ValueError:
        return False


def compact_usage(parser: argparse.ArgumentParser, max_lines: int = 3) -> None:
    """Subcommands with dozens of flags get a one-line usage, so an error is not under 30 lines of it."""
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            for sub in a.choices.values():
                if sub.format_usage().count("\n") > max_lines:
                    sub.usage = f"{sub.prog} [OPTIONS]"
                    sub.error = _with_help_hint(sub)
                compact_usage(sub, max_lines)


def _with_help_hint(sub: argparse.ArgumentParser):
    error = sub.error

    def hinted(message: str):
        error(f"{message}\n({sub.prog} --help lists every option)")
    return hinted


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """parser.parse_args, with unknown arguments reported by the subcommand that received them."""
    compact_usage(parser)
    args, extras = parser.parse_known_args(argv)
    if extras:
        sub = selected_parser(parser, args)
        takes = any(not a.option_strings and not isinstance(a, argparse._SubParsersAction) for a in sub._actions)
        sub.error(unknown_message(sub.prog, extras, _options(sub), takes))
    return args
