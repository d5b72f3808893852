"""Hugging Face-format output: config.json + model.safetensors + tokenizer files.

Stock `AutoModelForCausalLM.from_pretrained(dir)` and `AutoTokenizer.from_pretrained(dir)` load it;
nothing memfit-specific is needed to use the result. Written to a temporary sibling and renamed, so
a crash mid-export never leaves a half-written final_model/.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from memfit.runfiles import record_path


def export_hf(model, tokenizer, out_dir: Path, extra_files: dict[str, str] | None = None) -> Path:
    out_dir = Path(out_dir)
    record_path(out_dir)      # before its .tmp-<pid> exists (a no-op outside a run directory)
    tmp = out_dir.with_name(out_dir.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        # safetensors, sharded at 2GB so saving never needs a second full copy of a large model in RAM.
        model.save_pretrained(tmp, safe_serialization=True, max_shard_size="2GB")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)   # a full disk or a stop: no half-written folder left behind
        raise
    return install_folder(tmp, out_dir)


def install_folder(tmp: Path, out_dir: Path) -> Path:
    """Swap a fully written `tmp` folder into `out_dir`; the old one is removed only afterwards."""
    record_path(out_dir)
    old = out_dir.with_name(out_dir.name + ".old")
    if out_dir.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)
    return out_dir
