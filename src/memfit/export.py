"""Hugging Face-format output: config.json + model.safetensors + tokenizer files.

Stock `AutoModelForCausalLM.from_pretrained(dir)` and `AutoTokenizer.from_pretrained(dir)` load it;
nothing memfit-specific is needed to use the result. Written to a temporary sibling and renamed, so
a crash mid-export never leaves a half-written final_model/ (nor none: memfit.atomic.swap_in).
"""

from __future__ import annotations

import os
from pathlib import Path

from memfit.atomic import rmtree, swap_in
from memfit.runfiles import record_path


def export_hf(model, tokenizer, out_dir: Path, extra_files: dict[str, str] | None = None) -> Path:
    out_dir = Path(out_dir)
    record_path(out_dir)      # before its .tmp-<pid> exists (a no-op outside a run directory)
    tmp = out_dir.with_name(out_dir.name + f".tmp-{os.getpid()}")
    rmtree(tmp)
    try:
        # safetensors, sharded at 2GB so saving never needs a second full copy of a large model in RAM.
        model.save_pretrained(tmp, safe_serialization=True, max_shard_size="2GB")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    except BaseException:
        rmtree(tmp)   # a full disk or a stop: no half-written folder left behind
        raise
    return swap_in(tmp, out_dir)     # fsynced, then in place; the old folder goes only afterwards
