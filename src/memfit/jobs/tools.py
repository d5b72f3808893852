"""Small subcommands around a saved model: eval, generate, export."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from memfit import config as C


def _load_model_dir(path: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    p = Path(path)
    problems = []
    if not p.is_dir():
        problems.append(f"--model {path}: not a directory (expected an HF-format folder, e.g. runs/x/final_model)")
    elif not (p / "config.json").exists():
        problems.append(f"--model {path}: no config.json in it (expected an HF-format folder)")
    if problems:
        raise C.ConfigError(problems)
    model = AutoModelForCausalLM.from_pretrained(p)
    tokenizer = AutoTokenizer.from_pretrained(p)
    return model, tokenizer


def eval_main(args: argparse.Namespace) -> int:
    from memfit.data import build_streams, check_data
    from memfit.device import detect
    from memfit.precision import Precision
    from memfit.train.evaluate import evaluate_loss

    model, tokenizer = _load_model_dir(args.model)
    ctx = getattr(model.config, "n_positions", None) or getattr(model.config, "max_position_embeddings", 1024)
    seq_len = args.seq_len or ctx
    cfg = C.Config().replace(data={"data": tuple(args.data), "val_data": tuple(args.data),
                                   "seq_len": seq_len, "tokenizer": args.model, "text_field": args.text_field,
                                   "shuffle_buffer_size": 0})
    problems = check_data(cfg)
    if seq_len > ctx:
        problems.append(f"--seq-len {seq_len} is longer than the model's context ({ctx})")
    if problems:
        raise C.ConfigError(problems)
    device = detect()
    model.to(device.torch_device)
    _, val = build_streams(cfg, tokenizer, args.batch_size, 0)
    from memfit.metrics import phase_bar
    # A stream's length is unknown until it is read: the bar counts batches (its rate, elapsed time) and
    # knows its end only under --max-batches.
    bar = phase_bar("eval", args.max_batches or None, "batch")
    try:
        m = evaluate_loss(model, _counted(iter(val), bar),
                          Precision("fp32", device.type, "eval"), args.batch_size, args.max_batches,
                          device.torch_device)
    finally:
        bar.close()
    print(f"loss {m['val_loss']:.4f}  perplexity {m['val_ppl']:.2f}  tokens {m['val_tokens']}")
    return 0


def _counted(batches, bar):
    """`batches`, advancing `bar` as each one is handed on (the evaluation stops pulling at --max-batches)."""
    for batch in batches:
        yield batch
        bar.update(1)


def generate_main(args: argparse.Namespace) -> int:
    model, tokenizer = _load_model_dir(args.model)
    model.eval()
    enc = tokenizer(args.prompt, return_tensors="pt")
    kw: dict = dict(pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    from memfit.train.evaluate import SAMPLING, generate_in_context
    if args.temperature > 0:
        torch.manual_seed(args.seed)
        kw.update(SAMPLING, temperature=args.temperature, top_k=args.top_k)
    else:
        kw.update(do_sample=False, repetition_penalty=1.3)
    out, note = generate_in_context(model, enc["input_ids"], args.max_new_tokens, **kw)
    print(args.prompt + tokenizer.decode(out[0], skip_special_tokens=True))
    if note:
        print(f"memfit: {note}", file=sys.stderr)
    return 0


def export_main(args: argparse.Namespace) -> int:
    """Rebuild the run's model from its config and a checkpoint's weights, save it HF-style.

    The weights come through the checkpoint reader: every model file (one or shards) checked against
    the manifest, then loaded strictly, so a damaged or foreign checkpoint is refused (exit 2) before
    anything is written."""
    from transformers import AutoTokenizer

    from memfit.ckpt.formats import CheckpointError
    from memfit.ckpt.io import MANIFEST
    from memfit.ckpt.policy import list_checkpoints
    from memfit.ckpt.salvage import verified_weights
    from memfit.export import export_hf
    from memfit.jobs.pretrain import build_pretrain_model
    from memfit.metrics import StageBar

    run = Path(args.run)
    problems = []
    if not (run / "config.yaml").exists():
        problems.append(f"--run {run}: no config.yaml (not a memfit run directory)")
    if args.checkpoint == "best":
        ck = run / "best"
    elif args.checkpoint == "latest":       # the newest installed step-<N> (what --resume auto takes)
        entries = list_checkpoints(run / "checkpoints")
        ck = entries[-1].path if entries else run / "checkpoints" / "latest"
    else:
        ck = run / "checkpoints" / args.checkpoint
    if not (ck / MANIFEST).exists():
        problems.append(f"--checkpoint {args.checkpoint}: {ck}/{MANIFEST} not found "
                        "(not a finished checkpoint)")
    if problems:
        raise C.ConfigError(problems)
    with StageBar("export", ["verify checkpoint", "build model", "load weights", "save"]) as bar:
        try:
            step, state = verified_weights(ck)
        except CheckpointError as e:
            raise C.ConfigError([f"--checkpoint {args.checkpoint}: {ck} is damaged: {e}; nothing exported"
                                 ]) from None
        bar.done()
        cfg = C.load_yaml(run / "config.yaml")
        tokenizer = AutoTokenizer.from_pretrained(run / "tokenizer")
        model, _ = build_pretrain_model(cfg, len(tokenizer), tokenizer)
        bar.done()
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as e:     # another model's weights: missing / unexpected keys, other shapes
            lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
            raise C.ConfigError([(f"--checkpoint {args.checkpoint}: {ck} does not match the model of "
                                  f"{run}/config.yaml: {'; '.join(lines[:3])}")]) from None
        model.tie_weights()
        bar.done()
        out = export_hf(model, tokenizer, Path(args.out))
        bar.done()
    print(f"exported {ck} (step {step}) -> {out}")
    return 0
