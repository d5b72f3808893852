"""The option machinery: `opt()` (a field with its --help text, unit parser, choices, jobs and per-job
defaults), the unit parsers applied at the YAML/CLI boundary, the job kinds, and ConfigError.

Sizes ("20GB", "512MiB") and durations ("9h", "90m", "60s") are parsed at the boundary into plain ints
(bytes) and floats (seconds), so the rest of the code never parses strings.
"""

from __future__ import annotations

import re
from dataclasses import field
from typing import Any


class ConfigError(ValueError):
    """Every problem found in one validation pass; the CLI prints them all and exits 2."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__(self.format())

    def format(self) -> str:
        lines = [f"memfit: {len(self.problems)} problem(s) with this configuration:"]
        lines += [f"  - {p}" for p in self.problems]
        return "\n".join(lines)


# ---------------------------------------------------------------- units

_BYTE_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9,
               "gb": 10**9, "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20,
               "gib": 2**30, "tib": 2**40}
_TIME_UNITS = {"": 1, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "hr": 3600, "d": 86400}


def parse_bytes(text: str | int | float) -> int:
    """'20GB' -> 20_000_000_000 (decimal, as disks are sold); '16GiB' -> binary."""
    if isinstance(text, (int, float)):
        return int(text)
    m = re.fullmatch(r"\s*([0-9.]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _BYTE_UNITS:
        raise ValueError(f"not a size: {text!r} (examples: 20GB, 512MiB, 16e9)")
    return int(float(m.group(1)) * _BYTE_UNITS[m.group(2).lower()])


def parse_duration(text: str | int | float) -> float:
    """'9h' -> 32400.0; '1h30m' -> 5400.0; a bare number is seconds."""
    if isinstance(text, (int, float)):
        return float(text)
    parts = re.findall(r"([0-9.]+)\s*([a-zA-Z]*)", str(text))
    if not parts or "".join(a + b for a, b in parts) != re.sub(r"\s", "", str(text)):
        raise ValueError(f"not a duration: {text!r} (examples: 9h, 90m, 1h30m, 60s)")
    total = 0.0
    for num, unit in parts:
        if unit.lower() not in _TIME_UNITS:
            raise ValueError(f"not a duration: {text!r} (unknown unit {unit!r})")
        total += float(num) * _TIME_UNITS[unit.lower()]
    return total


def parse_count(text: str | int | float) -> int:
    """'10M' -> 10_000_000, '1.5B' -> 1_500_000_000, '350k' -> 350_000."""
    if isinstance(text, (int, float)):
        return int(text)
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([kKmMbBgG]?)\s*", str(text))
    if not m:
        raise ValueError(f"not a count: {text!r} (examples: 10M, 350k, 1.5B)")
    mult = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9}[m.group(2).lower()]
    return int(float(m.group(1)) * mult)


def parse_switch(text: str | bool) -> str:
    """auto/on/off; YAML 1.1 reads a bare on/off (and true/false) as a bool, and an old config.yaml
    held the switch as one: True -> 'on', False -> 'off'."""
    if isinstance(text, bool):
        return "on" if text else "off"
    return str(text).strip().lower()


# Field kinds for the CLI/YAML boundary: metadata["parse"] names one of these.
PARSERS = {"bytes": parse_bytes, "duration": parse_duration, "count": parse_count, "switch": parse_switch}


# Job kinds a field can apply to (Config.task values). Defaults may differ by `job_kind()`, which
# also tells LoRA/QLoRA fine-tuning ("lora") apart from full fine-tuning ("finetune").
TASKS = ("pretrain", "finetune", "classify", "custom")
KINDS = ("pretrain", "finetune", "lora", "classify", "custom")
KIND_NAMES = {"pretrain": "pretraining", "finetune": "full fine-tuning", "lora": "with --lora/--qlora",
              "classify": "classify", "custom": "memfit.fit"}


def opt(default: Any, help: str, parse: str | None = None, choices: tuple | None = None,
        flag: str | None = None, jobs: tuple[str, ...] = TASKS,
        per_job: dict[str, Any] | None = None) -> Any:
    """A config field with its --help text (and optional unit parser / choices / flag name).

    jobs: the Config.task values that read the field (--help and config.yaml show it only there).
    per_job: the default for each job kind (KINDS); the field's own default is then None ("the job's
    default"), filled in by with_job_defaults() once the job kind is known."""
    meta = {"help": help, "parse": parse, "choices": choices, "flag": flag, "jobs": jobs,
            "per_job": per_job}
    if isinstance(default, (list, dict, set)):
        raise TypeError("use tuples for sequence defaults (configs are frozen)")
    if per_job is not None and (default is not None or set(per_job) != set(KINDS)):
        raise TypeError("a per-job field defaults to None and names a default for every job kind")
    return field(default=default, metadata=meta)


PRE, FT, CLS = ("pretrain",), ("finetune",), ("classify",)
