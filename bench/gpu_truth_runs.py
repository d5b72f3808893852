"""bench/gpu_truth.py's memfit side: real memfit training runs (assemble_job + train, in-process) with
their memory truth, and the planner's prediction for exactly the same configuration.

Models are built from their configs with random weights (weights change neither memory nor speed), so
nothing but this repository has to travel to a GPU machine. Truth: on CUDA torch.cuda peak allocated /
reserved (via memfit.device) and NVML sampled every 10 ms; on CPU the live-tensor tracker
(memfit.memtrack), whose ByteLimit raises a real torch.OutOfMemoryError above a byte limit.
"""

from __future__ import annotations

import contextlib
import gc
import json
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from memfit.data.synth import IndexedBatches   # light: numpy only (the torch-free import of gpu_truth holds)

GiB, MiB = 2 ** 30, 2 ** 20

# Fine-tuning bases, as config.json contents: the real models' shapes (SmolLM2-135M, all-MiniLM-L6-v2)
# and tiny stand-ins for --tiny. Dropout off in the bases: the OOM rows compare losses across runs.
BASES = {
    "smollm2-135m": dict(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         max_position_embeddings=2048, tie_word_embeddings=True, rope_theta=100000.0),
    "minilm-l6": dict(model_type="bert", vocab_size=30522, hidden_size=384, num_hidden_layers=6,
                      num_attention_heads=12, intermediate_size=1536, max_position_embeddings=512,
                      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=2),
    "llama-tiny": dict(model_type="llama", vocab_size=512, hidden_size=64, intermediate_size=128,
                       num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=256, tie_word_embeddings=True),
    "bert-tiny": dict(model_type="bert", vocab_size=512, hidden_size=32, num_hidden_layers=1,
                      num_attention_heads=2, intermediate_size=64, max_position_embeddings=128,
                      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=2),
}


@dataclass(frozen=True)
class RunSpec:
    name: str
    kind: str                  # pretrain | lora | qlora | classify
    arch: str                  # pretrain: gpt2 | llama; else the BASES key
    params: int                # pretrain: target parameters (memfit's sizer picks layers/width)
    vocab: int
    seq: int
    micro: int
    eff: int
    precision: str = "bf16"
    ckpt: bool = False
    optimizer: str = "adamw"
    steps: int = 5

    @property
    def needs_bnb(self) -> bool:
        return self.kind == "qlora" or self.optimizer != "adamw"


def base_dir(workdir: Path, base: str, weights: bool = False) -> Path:
    """A model folder for `base`: config.json always; random weights and a word-level tokenizer when
    asked (QLoRA loads weights in 4-bit from a folder, merge needs a tokenizer)."""
    from transformers import CONFIG_MAPPING
    d = dict(BASES[base])
    folder = workdir / ("base-" + base + ("-weights" if weights else ""))
    if (folder / "config.json").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    cfg = CONFIG_MAPPING[d.pop("model_type")](**d)
    if weights:
        import torch
        from transformers import AutoModelForCausalLM
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
        word_tokenizer(cfg.vocab_size).save_pretrained(folder)
    cfg.save_pretrained(folder)
    return folder


def word_tokenizer(vocab: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    words = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab)}}
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="</s>")


def make_config(spec: RunSpec, gpu: str, budget: int, workdir: Path, **train):
    """The memfit Config of a run: what `memfit train/finetune/classify` would be given."""
    from memfit.config import Config
    task = {"pretrain": "pretrain", "classify": "classify"}.get(spec.kind, "finetune")
    model = {"target_params": spec.params, "arch": spec.arch, "dropout": 0.0}
    if spec.kind != "pretrain":
        model = {"model": str(base_dir(workdir, spec.arch))}   # the plan reads only config.json
    return Config().replace(
        task=task, model=model,
        data={"vocab_size": spec.vocab, "seq_len": spec.seq, "max_seq_len": None if task == "pretrain" else spec.seq},
        train={"batch_size": spec.micro, "effective_batch": spec.eff, "max_steps": spec.steps,
               "precision": spec.precision, "gradient_checkpointing": spec.ckpt, "log_every": 1,
               "eval_every": 0, "sample_tokens": 0, "seed": 0, **train},
        optim={"optimizer": spec.optimizer, "lr": 1e-3 if task == "pretrain" else 2e-4, "warmup_steps": 1},
        lora={"lora": spec.kind in ("lora", "qlora"), "qlora": spec.kind == "qlora"},
        budget={"gpu": gpu, "gpu_memory": budget}, run={"quiet": True})


# ---------------------------------------------------------------- the prediction (picklable: plan workers)

def plan_figures(cfg, engine: str = "trace", profile=None) -> dict[str, Any]:
    """`memfit plan --json`'s memory and time figures for cfg, in-process."""
    register_profile(profile)
    from memfit.plan import make_plan, plan_to_json
    p = make_plan(cfg, engine=engine)
    m, hf = p.memory, p.model.config
    return {"engine": engine, "peak_tensor_bytes": m.peak_tensor_bytes, "peak_allocated": m.peak_allocated,
            "peak_reserved": m.peak_reserved, "nvidia_smi": m.nvidia_smi, "cuda_context": m.cuda_context,
            "budget": m.budget, "fits": m.fits, "flops_per_step": p.time.flops_per_step,
            "tokens_per_step": p.time.tokens_per_step, "step_seconds": p.time.step_seconds,
            "model": p.model.source, "width": getattr(hf, "hidden_size", None) or getattr(hf, "n_embd", None),
            "plan_json_fits": plan_to_json(p)["fits"]}


def fit_config(cfg, profile=None, **kw):
    """auto-fit (`train --auto-fit`) under cfg's budget: (fitted Config, its one-line explanations)."""
    register_profile(profile)
    from memfit.plan import auto_fit
    return auto_fit(cfg, **kw)


def profile_key(profile) -> str:
    """The --gpu name of a profile as memfit.hardware.get_profile normalises it."""
    return profile.name.strip().lower().replace("_", "-")


def register_profile(profile) -> None:
    """A GPU memfit has no profile for (a new card) is planned as itself: its profile joins the table."""
    if profile is not None and profile.device_type == "cuda":
        from memfit.hardware import PROFILES
        PROFILES.setdefault(profile_key(profile), profile)


def worker_init() -> None:
    """Plan workers see no GPU (planning is pure CPU work) and use one thread each."""
    import os
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    import torch
    torch.set_num_threads(1)


# ---------------------------------------------------------------- data and models

class Stream(IndexedBatches):
    """Effective batches of random tokens, one per optimizer step, resumable. Fine-tuning batches are
    padded (a quarter of the rows 3/4 long) with the prompt quarter unlabelled; classify: a label per row."""

    def __init__(self, spec: RunSpec, seed: int = 0) -> None:
        self.spec, self.seed = spec, seed

    def batch(self, i: int) -> dict:
        import torch
        s = self.spec
        g = torch.Generator().manual_seed(self.seed * 100003 + i)
        ids = torch.randint(3, s.vocab, (s.eff, s.seq), generator=g)
        mask = torch.ones_like(ids)
        if s.kind == "pretrain":
            return {"input_ids": ids, "attention_mask": mask, "labels": ids.clone()}
        mask[: max(1, s.eff // 4), (3 * s.seq) // 4:] = 0
        if s.kind == "classify":
            return {"input_ids": ids * mask, "attention_mask": mask,
                    "labels": torch.randint(0, 2, (s.eff,), generator=g)}
        labels = ids.clone()
        labels[:, : s.seq // 4] = -100
        labels[mask == 0] = -100
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def classify_loss(model, batch):
    """memfit classify's loss (finetune/classify.py: fp32 logits, summed cross-entropy, rows counted)."""
    import torch.nn.functional as F
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    return F.cross_entropy(logits, batch["labels"], reduction="sum"), batch["labels"].numel()


def build_model(spec: RunSpec, cfg, device):
    """The model memfit's job for cfg trains, from config, random weights (seeded)."""
    import torch
    torch.manual_seed(0)
    if spec.kind == "pretrain":
        from memfit.jobs.pretrain import build_pretrain_model
        return build_pretrain_model(cfg, spec.vocab)[0]
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification
    folder = cfg.model.model
    if spec.kind == "classify":
        return AutoModelForSequenceClassification.from_config(AutoConfig.from_pretrained(folder))
    from memfit.models.lora import apply_lora
    lo = cfg.lora
    if spec.kind == "qlora":
        from memfit.models.load import load_causal_lm, resolve_source
        from memfit.precision import resolve_precision
        prec, _ = resolve_precision(cfg.train.precision, device)
        weights = base_dir(Path(folder).parent, spec.arch, weights=True)   # written only when a QLoRA row runs
        model = load_causal_lm(resolve_source(str(weights)), qlora=True,
                               compute_dtype=prec.autocast_dtype or torch.float32, device=device.torch_device)
    else:
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
    return apply_lora(model, lo.lora_r, lo.lora_alpha, lo.lora_dropout, lo.lora_target_modules,
                      qlora=spec.kind == "qlora", gradient_checkpointing=cfg.train.gradient_checkpointing)


# ---------------------------------------------------------------- the truth

class Truth:
    """Peak memory of one run. start() before the model is built; track() around train(); stop()."""

    def __init__(self, device, limit: int | None = None, nvml_base: int | None = None,
                 measure: bool = True) -> None:
        self.device, self.limit, self.nvml_base, self.measure = device, limit, nvml_base, measure or bool(limit)
        self.cuda = device.type == "cuda"
        self.baseline = 0
        self.tracker = None
        self._poll: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        from memfit.device import empty_cache, reset_peak
        gc.collect()
        if self.cuda:
            empty_cache(self.device)
            reset_peak(self.device)
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        elif self.measure:
            from memfit.memtrack import LiveTensorTracker
            base = LiveTensorTracker(count_existing=True)   # tensors alive before this run (not its own)
            with base:
                pass
            self.baseline = base.current_bytes

    def _sample(self) -> None:
        from memfit.device import nvml_process_used_bytes, nvml_used_bytes
        while not self._stop.is_set():
            for key, v in (("device", nvml_used_bytes()), ("process", nvml_process_used_bytes())):
                if v is not None and v > self._poll.get(key, -1):
                    self._poll[key] = v
            self._stop.wait(0.01)

    @contextlib.contextmanager
    def track(self):
        if self.cuda or not self.measure:
            yield
            return
        from memfit.memtrack import ByteLimit, LiveTensorTracker
        self.tracker = ByteLimit(self.baseline + self.limit) if self.limit else LiveTensorTracker()
        with self.tracker:
            yield

    def stop(self) -> dict[str, Any]:
        if not self.cuda and not self.measure:
            return {}
        if not self.cuda:
            return {"tensor_peak": self.tracker.peak_bytes - self.baseline}
        from memfit.device import memory_stats, synchronize
        synchronize(self.device)
        st = memory_stats(self.device)
        time.sleep(0.03)
        self._stop.set()
        self._thread.join()
        out = {"peak_allocated": st["max_allocated"], "peak_reserved": st["max_reserved"],
               "tensor_peak": st["max_allocated"]}
        if "process" in self._poll:
            out.update(nvml_peak_used=self._poll["process"], nvml_method="NVML process list")
        elif "device" in self._poll and self.nvml_base is not None:
            out.update(nvml_peak_used=self._poll["device"] - self.nvml_base,
                       nvml_method="NVML device used minus its reading before this process touched CUDA")
        return out


def run_memfit(spec: RunSpec, cfg, device, *, limit: int | None = None, nvml_base: int | None = None,
               loss_wrap: Callable | None = None, on_step: Callable | None = None, model=None,
               measure: bool = True) -> dict:
    """One real memfit training run (jobs.assemble_job + train.loop.train) with its memory truth.
    measure=False: no tracker on CPU (its dispatch hook costs ~5x in speed; the throughput rows)."""
    from memfit.api import release
    from memfit.ckpt.state import seed_everything
    from memfit.jobs.common import assemble_job
    from memfit.models.loss import causal_lm_loss
    from memfit.train.loop import train

    truth = Truth(device, limit, nvml_base, measure)
    truth.start()
    seed_everything(0)
    model = model if model is not None else build_model(spec, cfg, device)
    loss = classify_loss if spec.kind == "classify" else causal_lm_loss
    job = assemble_job(cfg, model, Stream(spec), spec.steps, device, None,
                       loss_fn=loss_wrap(loss) if loss_wrap else loss, checkpoint=False)
    job.cadence.quiet, job.hooks.on_step = True, on_step
    t0 = time.perf_counter()
    try:
        with truth.track():
            result = train(job)
        mem = truth.stop()
    except BaseException:
        truth._stop.set()
        release(job)
        raise
    rows = job.history.rows
    train_rows = [r for r in rows if r["kind"] == "train"]
    out = {"status": result.status, "steps": result.step, "seconds": time.perf_counter() - t0,
           "losses": [r["loss"] for r in train_rows], "tokens": [r["tokens"] for r in train_rows],
           "micro_batches": [r["micro_batch"] for r in train_rows],
           "loss_scale": [r.get("loss_scale") for r in train_rows],
           "oom_events": [{k: e.get(k) for k in ("step", "old_micro_batch", "new_micro_batch", "reason")}
                          for e in rows if e["kind"] == "oom"],
           "final_micro_batch": job.oom.micro_batch_size, "precision": job.precision.name, **mem}
    release(job)
    del job, model
    gc.collect()
    from memfit.device import empty_cache
    empty_cache(device)
    return out


def err_pct(pred: float | None, meas: float | None) -> float | None:
    if pred is None or not meas:
        return None
    return 100.0 * (pred - meas) / meas


def compare(pred: dict, meas: dict) -> dict[str, float | None]:
    """Signed % error of each predicted figure against its measurement (+: the plan over-predicts)."""
    if "peak_reserved" not in meas:     # CPU: live tensor bytes are the truth
        return {"tensor_peak": err_pct(pred["peak_tensor_bytes"], meas["tensor_peak"])}
    return {"peak_allocated": err_pct(pred["peak_allocated"], meas["peak_allocated"]),
            "peak_reserved": err_pct(pred["peak_reserved"], meas["peak_reserved"]),
            "nvml_used": err_pct(pred["nvidia_smi"], meas.get("nvml_peak_used"))}


def spec_json(spec: RunSpec) -> dict:
    return asdict(spec)


def spec_replace(spec: RunSpec, **kw) -> RunSpec:
    return replace(spec, **kw)


def dump(obj: Any) -> str:
    return json.dumps(obj, indent=1, default=str)
