"""The YAML / CLI boundary: a raw value -> the field's type (coerce), nested or flat dicts -> Config
(from_dict, every problem collected), Config -> config.yaml (to_dict, save_yaml, load_yaml), flag names."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import fields
from pathlib import Path
from typing import Any, Optional, get_args, get_origin

from .groups import GROUPS, Config, applies, field_type, iter_fields
from .options import PARSERS, ConfigError


def flag_name(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def coerce(group: str | None, f: dataclasses.Field, value: Any) -> Any:
    """Turn a YAML/CLI value into the field's type (units parsed). Raises ValueError."""
    if value is None:
        return None
    parse = f.metadata.get("parse")
    if parse:
        return PARSERS[parse](value)
    tp = field_type(group, f)
    if get_origin(tp) is Optional or (get_origin(tp) is not None and type(None) in get_args(tp)):
        tp = next(a for a in get_args(tp) if a is not type(None))
    if get_origin(tp) is tuple:
        if isinstance(value, str):
            value = [v for v in re.split(r"[,\s]+", value) if v]
        return tuple(str(v) for v in value)
    if tp is bool:
        if isinstance(value, str):
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(f"not a boolean: {value!r}")
        return bool(value)
    if tp is int:
        if isinstance(value, float) and not value.is_integer():
            raise ValueError(f"not an integer: {value!r}")
        return int(float(value)) if isinstance(value, str) else int(value)
    if tp is float:
        return float(value)
    return str(value)


def from_dict(raw: dict[str, Any], base: Config | None = None,
              problems_out: list[str] | None = None) -> Config:
    """Build a Config from nested ({'train': {'lr': ..}}) or flat ({'lr': ..}) keys, collecting errors.

    With `problems_out`, bad values are reported there and left at their defaults, so the caller
    can go on checking the rest and list every problem at once."""
    base = base or Config()
    problems: list[str] = []
    by_name = {f.name: (g, f) for g, f in iter_fields()}
    changes: dict[str, dict[str, Any]] = {}
    top: dict[str, Any] = {}

    def put(group, f, value, where):
        try:
            v = coerce(group, f, value)
        except ValueError as e:
            problems.append(f"{where}: {e}")
            return
        choices = f.metadata.get("choices")
        if choices and v is not None and v not in choices:
            problems.append(f"{where}: {v!r} is not one of {', '.join(choices)}")
            return
        if group is None:
            top[f.name] = v
        else:
            changes.setdefault(group, {})[f.name] = v

    for key, value in (raw or {}).items():
        key = key.replace("-", "_")
        if key in GROUPS and isinstance(value, dict):
            group_fields = {g.name: g for g in fields(type(getattr(base, key)))}
            for k2, v2 in value.items():
                k2 = k2.replace("-", "_")
                if k2 not in group_fields:
                    problems.append(f"unknown option {key}.{k2}")
                    continue
                put(key, group_fields[k2], v2, f"{key}.{k2}")
        elif "." in key and key.split(".", 1)[0] in GROUPS:
            g, k2 = key.split(".", 1)
            group_fields = {x.name: x for x in fields(type(getattr(base, g)))}
            if k2 not in group_fields:
                problems.append(f"unknown option {key}")
                continue
            put(g, group_fields[k2], value, key)
        elif key in by_name:
            put(*by_name[key], value, key)
        else:
            problems.append(f"unknown option {key!r}")
    if problems and problems_out is None:
        raise ConfigError(problems)
    if problems_out is not None:
        problems_out.extend(problems)
    cfg = dataclasses.replace(base, **top)
    return cfg.replace(**changes)


def to_dict(cfg: Config, applicable_only: bool = True) -> dict[str, Any]:
    """Nested plain dict (tuples as lists) for config.yaml: by default only the fields this job reads
    (a classify run records no tokenizer or arch it never used)."""
    def plain(v):
        if isinstance(v, tuple):
            return list(v)
        return v
    out: dict[str, Any] = {}
    for f in fields(cfg):
        v = getattr(cfg, f.name)
        if not dataclasses.is_dataclass(v):
            out[f.name] = plain(v)
            continue
        kept = {g.name: plain(getattr(v, g.name)) for g in fields(v)
                if not applicable_only or applies(g, cfg.task)}
        if kept:
            out[f.name] = kept
    return out


def load_yaml(path: str | Path, base: Config | None = None) -> Config:
    import yaml
    text = Path(path).read_text()
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:     # one line: where and what (the YAML library's own traceback helps no one)
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError([f"{path}: not valid YAML{at}: {getattr(e, 'problem', None) or e}"]) from None
    if not isinstance(raw, dict):
        raise ConfigError([f"{path}: expected a mapping of options, got {type(raw).__name__}"])
    return from_dict(raw, base)


def save_yaml(cfg: Config, path: str | Path) -> None:
    import yaml
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
