"""Typed configuration: frozen dataclass groups, YAML + CLI overrides, one validation pass.

`from memfit import config as C` is the one way in (C.Config, C.ConfigError, C.validate, C.from_dict, ...);
the modules below are how it is built, not separate homes:

    options.py   opt() (a field with its --help text, unit parser, choices, jobs, per-job defaults), the unit
                 parsers (parse_bytes / parse_duration / parse_count), the job kinds, ConfigError
    groups.py    the frozen groups and Config, the per-job defaults (job_kind, with_job_defaults,
                 warmup_steps), iter_fields (every leaf option in --help order)
    mapping.py   the YAML / CLI boundary: coerce, from_dict (every problem collected), to_dict, load/save_yaml
    checks.py    validate(cfg) -> every range / combination problem (no file system, no torch)

Every field's `help` metadata becomes its `--flag` help text, so the dataclasses are the single source of
truth for flag names (DESIGN.md "Contracts": one set of flag names everywhere). Nothing here imports
anything heavy (no torch): `memfit --help` must stay fast.
"""

from .checks import validate
from .groups import (GROUPS, BudgetConfig, CheckpointConfig, Config, DataConfig, LoRAConfig, ModelConfig,
                     OOMConfig, OptimConfig, RunConfig, TrainConfig, applies, field_type, iter_fields,
                     job_default, job_kind, warmup_steps, with_job_defaults)
from .mapping import coerce, flag_name, from_dict, load_yaml, save_yaml, to_dict
from .options import (KIND_NAMES, KINDS, PARSERS, TASKS, ConfigError, opt, parse_bytes, parse_count,
                      parse_duration)

__all__ = ["GROUPS", "KINDS", "KIND_NAMES", "PARSERS", "TASKS", "BudgetConfig", "CheckpointConfig", "Config",
           "ConfigError", "DataConfig", "LoRAConfig", "ModelConfig", "OOMConfig", "OptimConfig", "RunConfig",
           "TrainConfig", "applies", "coerce", "field_type", "flag_name", "from_dict", "iter_fields",
           "job_default", "job_kind", "load_yaml", "opt", "parse_bytes", "parse_count", "parse_duration",
           "save_yaml", "to_dict", "validate", "warmup_steps", "with_job_defaults"]
