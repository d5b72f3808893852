"""Would this resume fit the checkpoint it continues? Checked before anything is written.

A resume may change how training goes on (learning rate, batch split, evaluation, budgets) but not what
is being trained: the model, the tokenizer and the token stream must be the checkpoint's, or the loaded
weights, the data position and the saved tokenizer/ would not belong together. Such a change is refused
(exit 2) by `resume_problems`, which only reads: the run directory stays byte-identical.

The checkpoint's options come from its run's config.yaml; where that is gone, a from-scratch model's
weight shapes (safetensors header) are compared with the shapes these options would build.
"""

from __future__ import annotations

import json
from pathlib import Path

from memfit import config as C

# (group, field) that define the model, the tokenizer or the token stream; "*" = the whole group.
FIXED = {("data", "data"), ("data", "val_data"), ("data", "val_fraction"), ("data", "text_field"),
         ("data", "text_split"), ("data", "tokenizer"), ("data", "vocab_size"), ("data", "seq_len"),
         ("data", "stride"), ("data", "max_seq_len"), ("data", "packing"), ("data", "max_examples"), ("data", "subset_ratio"), ("data", "encoding"),
         ("model", "arch"), ("model", "target_params"), ("model", "model"), ("lora", "*")}


def fixed_differences(old: C.Config, new: C.Config) -> list[str]:
    import dataclasses
    diffs = [f"task: {old.task!r} -> {new.task!r}"] if old.task != new.task else []
    if new.task == "finetune" and old.data.packing == "auto":    # a run writes on/off; "auto" there is a run from before packing: padded
        old = old.replace(data={"packing": "off"})
    for group in C.GROUPS:
        a, b = getattr(old, group), getattr(new, group)
        for f in dataclasses.fields(a):
            if (group, f.name) in FIXED or (group, "*") in FIXED:
                va, vb = getattr(a, f.name), getattr(b, f.name)
                if va != vb:
                    diffs.append(f"{C.flag_name(f)}: {_show(va)} -> {_show(vb)}")
    return diffs


def _show(v) -> str:
    return " ".join(map(str, v)) if isinstance(v, tuple) else repr(v)


def resumed_checkpoint(cfg: C.Config, run_dir: Path) -> tuple[Path | None, Path | None]:
    """(the newest step-<N> a resume would consider, the config.yaml of the run it belongs to)."""
    from memfit.ckpt.policy import list_checkpoints
    spec = cfg.checkpoint.resume
    if not spec:
        return None, None
    if spec.startswith("weights:"):       # a new run: only the model must match (no config compared)
        return Path(spec[len("weights:"):]).expanduser(), None
    if spec == "auto":
        entries = list_checkpoints(run_dir / "checkpoints")
        return (entries[-1].path if entries else None), run_dir / "config.yaml"
    p = Path(spec).expanduser()
    if p.is_file():
        p = p.parent
    if (p / "checkpoints").is_dir():                       # a run directory
        entries = list_checkpoints(p / "checkpoints")
        return (entries[-1].path if entries else None), p / "config.yaml"
    if p.name.startswith("step-"):                          # runs/x/checkpoints/step-N
        return p, p.parent.parent / "config.yaml"
    entries = list_checkpoints(p)                           # a checkpoints/ directory
    return (entries[-1].path if entries else None), p.parent / "config.yaml"


def resume_problems(cfg: C.Config, run_dir: Path) -> list[str]:
    ckpt, cfg_file = resumed_checkpoint(cfg, run_dir)
    if ckpt is None:
        return []
    fix = (f"resume with the checkpoint's options, start a new run from its weights only with "
           f"--resume weights:{ckpt} --output-dir NEW_DIR, or choose another --output-dir")
    if cfg.checkpoint.resume.startswith("weights:"):
        fix = "give the model options (--arch, --target-params, --seq-len) those weights were trained with"
    if cfg_file is not None and cfg_file.exists():
        try:
            old = C.load_yaml(cfg_file)
        except (C.ConfigError, OSError, ValueError):
            old = None
        if old is not None:
            diffs = fixed_differences(old, cfg)
            if diffs:
                return [f"--resume {cfg.checkpoint.resume}: {ckpt} was trained with other options "
                        f"({'; '.join(diffs)}; see {cfg_file}); a resume keeps the model, tokenizer and "
                        f"data: {fix}"]
            return []
    if cfg.task == "pretrain":
        why = shape_mismatch(cfg, ckpt)
        if why:
            return [f"--resume {cfg.checkpoint.resume}: {ckpt} holds another model ({why}): {fix}"]
    return []


def shape_mismatch(cfg: C.Config, ckpt: Path) -> str | None:
    """How the checkpoint's weights differ from the model these options build (None: they match or
    the checkpoint cannot be read, which the resume itself reports)."""
    from memfit.ckpt.formats import CheckpointError, read_safetensors_header
    try:
        manifest = json.loads((ckpt / "manifest.json").read_text())
        have: dict[str, list[int]] = {}
        for name in manifest.get("model_files", ["model.safetensors"]):
            header, _ = read_safetensors_header(ckpt / name)
            meta = header.pop("__metadata__", None) or {}
            have.update({k: v["shape"] for k, v in header.items()})
            for alias, canon in json.loads(meta.get("memfit_aliases", "{}")).items():   # tied weights
                have[alias] = header[canon]["shape"] if canon in header else have.get(canon)
    except (OSError, ValueError, KeyError, CheckpointError):
        return None
    vocab = next((s[0] for k, s in have.items() if k.endswith(("wte.weight", "embed_tokens.weight"))), None)
    if vocab is None:
        return "no token embedding in its weights"
    import torch

    from memfit.models import build_causal_lm, size_model
    shape = size_model(cfg.model.target_params, cfg.model.arch, vocab, cfg.data.seq_len)
    with torch.device("meta"):        # shapes only: no memory, no initialisation
        want = {k: list(v.shape) for k, v in build_causal_lm(shape).state_dict().items()}
    diff = [k for k in want if k in have and want[k] != have[k]]
    missing = [k for k in want if k not in have]
    if not diff and not missing:
        return None
    if diff:
        k = diff[0]
        return f"{len(diff)} tensors differ, e.g. {k} is {have[k]} there and {want[k]} here"
    return f"{len(missing)} tensors of this model are not in it, e.g. {missing[0]}"
