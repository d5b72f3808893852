"""Data pipeline throughput and memory against the default model's training speed.

    python bench/data_stream.py [--mb 512] [--workers 0] [--max-seconds S] [--dir /tmp/memfit_bench_corpus]

1. Generates (once; reused) a >= 500 MB corpus of real English: paragraphs of the embedded corpora
   drawn at random into 8 text files (one document per file, streamed in 1 MiB units).
2. Trains the default 8k byte-level BPE on its first ~20 MB (timed separately, not in the figures).
3. Streams the training split (seq 256, effective batch 16 rows, shuffle buffer on) for one whole
   epoch (or --max-seconds), sampling the process RSS (workers included) every 20 batches.
4. Measures the default model's training speed in the same process: a GPT-2 of 4 layers x 256 wide,
   vocab 8192, seq 256, micro-batch 16, bf16 autocast on CPU, AdamW, a few timed steps.

Last line: ``tokens_per_s=<n> rss_growth_mb=<n> trainer_ratio=<n>`` where trainer_ratio is the
pipeline's tokens/s divided by the model's training tokens/s (the issue asks for >= 20), and
rss_growth_mb is the peak RSS while streaming minus the RSS before the first batch (< 200 MB).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def rss_mb() -> float:
    import psutil
    p = psutil.Process()
    total = p.memory_info().rss
    for c in p.children(recursive=True):
        try:
            total += c.memory_info().rss
        except psutil.Error:
            pass
    return total / 2**20


def trainer_tokens_per_s(steps: int = 6, warmup: int = 2) -> tuple[float, int]:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=4, n_embd=256, n_head=8, vocab_size=8192, n_positions=256,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(0, 8192, (16, 256))
    t0 = time.perf_counter()
    for i in range(warmup + steps):
        if i == warmup:
            t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return 16 * 256 * steps / (time.perf_counter() - t0), n_params


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=int, default=512, help="corpus size in MB (>= 500 for the issue)")
    ap.add_argument("--dir", default="/tmp/memfit_bench_corpus")
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--max-seconds", type=float, default=None, help="stop streaming after this long")
    ap.add_argument("--trainer-steps", type=int, default=6)
    args = ap.parse_args(argv)

    from memfit.config import Config
    from memfit.data.stream import build_streams
    from memfit.data.synth import make_big_corpus
    from memfit.data.tokenizer import build_tokenizer

    t = time.perf_counter()
    files = make_big_corpus(args.dir, args.mb * 1_000_000, n_files=8)
    size = sum(f.stat().st_size for f in files)
    print(f"corpus: {len(files)} files, {size / 1e6:.0f} MB in {args.dir} ({time.perf_counter() - t:.1f}s)",
          flush=True)
    cfg = Config().replace(data={"data": (args.dir,), "num_workers": args.workers})
    t = time.perf_counter()
    tok = build_tokenizer(cfg, None)
    print(f"tokenizer: BPE {len(tok)} trained on ~20 MB in {time.perf_counter() - t:.1f}s", flush=True)

    train, _ = build_streams(cfg, tok, 16, seed=cfg.train.seed)
    rss0 = rss_mb()
    peak = rss0
    tokens = 0
    n = 0
    t0 = time.perf_counter()
    last_report = t0
    it = iter(train)
    while train.epoch == 0:
        b = next(it)
        tokens += b["input_ids"].numel()
        n += 1
        if n % 20 == 0:
            peak = max(peak, rss_mb())
            now = time.perf_counter()
            if now - last_report > 15:
                last_report = now
                print(f"  {n:,} batches, {tokens / 1e6:.1f}M tokens, {train.stats['bytes_read'] / 1e6:.0f} MB "
                      f"read, {tokens / (now - t0):,.0f} tok/s, rss +{peak - rss0:.0f} MB", flush=True)
            if args.max_seconds and now - t0 > args.max_seconds:
                break
    elapsed = time.perf_counter() - t0
    peak = max(peak, rss_mb())
    train.close()
    pipe = tokens / elapsed
    print(f"stream: {n:,} batches, {tokens:,} tokens, {train.stats['bytes_read'] / 1e6:.0f} MB read in "
          f"{elapsed:.1f}s (epoch {train.epoch}, workers {args.workers})", flush=True)

    tr, n_params = trainer_tokens_per_s(args.trainer_steps)
    print(f"trainer: GPT-2 {n_params / 1e6:.2f}M params (4x256, vocab 8192), seq 256, micro-batch 16, "
          f"bf16 autocast, AdamW: {tr:,.0f} tok/s", flush=True)
    print(f"tokens_per_s={pipe:.0f} rss_growth_mb={peak - rss0:.1f} trainer_ratio={pipe / tr:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
