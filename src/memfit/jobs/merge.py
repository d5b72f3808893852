"""`memfit merge`: fold a LoRA adapter into its base and write a stock-loadable HF folder.

    memfit merge --adapter runs/x/final_model --out merged --dtype fp16 --device cpu [--base smollm2]

The base is loaded exactly as training loaded it (a .gguf base through the same dequantized cache), in
fp32 whatever the target dtype: W + (alpha/r) * B @ A is computed in fp32 and rounded once, at the end.
A QLoRA adapter merges into the full-precision base (the 4-bit weights were a training-time
approximation of it). Merging runs on the CPU by default, as the users' guides do to spare the GPU;
host RAM holds one fp32 copy of the model (the merge is in place, the dtype cast goes tensor by tensor)
and save_pretrained writes safetensors shards of at most 2 GB.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

from memfit import config as C

log = logging.getLogger("memfit")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def adapter_base_spec(adapter: str | Path) -> str | None:
    """The base an adapter folder names (base_model_name_or_path), or None."""
    try:
        return json.loads((Path(adapter) / "adapter_config.json").read_text()).get("base_model_name_or_path")
    except (OSError, ValueError):
        return None


def merge_problems(base: str | None, adapter: str, out: str, dtype: str, device: str) -> list[str]:
    from memfit.models.load import source_problems
    a = Path(adapter)
    problems = []
    if not (a / "adapter_config.json").is_file():
        problems.append(f"--adapter {adapter}: no adapter_config.json there (give a peft adapter folder, "
                        "e.g. runs/<name>/final_model)")
    elif base is None and not adapter_base_spec(a):
        problems.append(f"--adapter {adapter}: its adapter_config.json names no base: give --base")
    if base is not None or adapter_base_spec(a):
        problems += source_problems(base or adapter_base_spec(a), "--base")
    o = Path(out)
    if o.exists() and (not o.is_dir() or any(o.iterdir())):
        problems.append(f"--out {out}: exists and is not empty (choose a new folder)")
    if dtype not in DTYPES:
        problems.append(f"--dtype {dtype}: choose one of {', '.join(DTYPES)}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        problems.append(f"--device {device}: no CUDA device here (use --device cpu)")
    return problems


def merge_adapter(base: str | None, adapter: str | Path, out: str | Path, dtype: str = "fp16",
                  device: str = "cpu") -> Path:
    """Merge and save; returns the output folder. base None: the adapter's base_model_name_or_path.
    Raises ConfigError for bad arguments."""
    problems = merge_problems(base, str(adapter), str(out), dtype, device)
    if problems:
        raise C.ConfigError(problems)
    base = base or adapter_base_spec(adapter)
    from peft import PeftModel

    from memfit.export import export_hf
    from memfit.models.load import load_causal_lm, load_tokenizer, resolve_source

    from memfit.metrics import StageBar
    t0 = time.perf_counter()
    with StageBar("merge", ["load base", "apply adapter", "merge", f"cast to {dtype}", "save"]) as bar:
        src = resolve_source(base)                   # a .gguf base: dequantized once (its own bar)
        model = load_causal_lm(src)                  # fp32, the same load as training
        bar.done()
        peft_model = PeftModel.from_pretrained(model, str(adapter))
        if device != "cpu":
            peft_model.to(device)
        bar.done()
        merged = peft_model.merge_and_unload()
        bar.done()
        merged.to("cpu")
        merged.to(DTYPES[dtype])                     # parameter by parameter: no second full copy
        merged.config.use_cache = True
        bar.done()
        adapter_has_tokenizer = any((Path(adapter) / f).exists() for f in TOKENIZER_FILES)
        if adapter_has_tokenizer:
            from transformers import AutoTokenizer
            tokenizer = AutoTokenizer.from_pretrained(str(adapter))
        else:
            tokenizer = load_tokenizer(src)
        info = {"base": base, "adapter": str(adapter), "dtype": dtype,
                "adapter_config": json.loads((Path(adapter) / "adapter_config.json").read_text())}
        out = export_hf(merged, tokenizer, Path(out),
                        extra_files={"memfit_merge.json": json.dumps(info, indent=1)})
        bar.done()
    log.info(f"merged {adapter} into {src.spec} as {dtype} in {time.perf_counter() - t0:.1f}s -> {out}")
    return out


def merge_main(args: argparse.Namespace) -> int:
    from memfit.metrics import setup_logging
    setup_logging(None)
    out = merge_adapter(args.base, args.adapter, args.out, args.dtype, args.device)
    print(f"memfit: merged model written to {out} "
          f"(load it with AutoModelForCausalLM.from_pretrained('{out}'))")
    return 0
