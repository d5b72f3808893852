"""What does one OOM recovery cost? (seconds; the default model: ~3M GPT-2, vocab 8192, seq 256, micro 16)

One effective batch of 16 sequences runs under memfit's OOMController (memfit.train.oom) with the
loop's accumulate(). An out-of-memory error is raised while the first micro-batch of 16 runs; the
controller drops the partial gradients, frees the exception's frames and the allocator cache, halves
the micro-batch to 8 and redoes the effective batch as 2 x 8. The cost of the recovery is

    time(effective batch with the OOM and the redo) - time(the same effective batch at 8 x 2, no OOM)

for three places the OOM can strike (a real CUDA OOM comes where memory peaks: at the end of the
forward, when the logits and every saved activation are live, or early in the backward):

  before-forward  the --inject-oom-above-tokens hook: nothing computed yet; the controller's own
                  overhead (exception, gc.collect, empty_cache)
  after-forward   at the forward's peak (logits + loss computed, backward not started): the usual case
  end-of-backward in the backward of the first transformer block (nearly all of the micro-batch's
                  forward + backward wasted): the worst case

The optimizer step is identical with and without the OOM and is not timed. Medians of --repeats.

    python bench/oom_cost.py                 # default model, ~1-3 minutes on 2 CPU cores
    python bench/oom_cost.py --quick         # a 200k model, vocab 512, seq 64 (a smoke test)
Last line: recovery_seconds=<after-forward median> worst_case_seconds=<end-of-backward median>
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target-params", type=float, default=3e6)
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--micro", type=int, default=16, help="micro-batch before the OOM (= effective batch)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.target_params, args.vocab_size, args.seq_len, args.repeats = 2e5, 512, 64, 2

    from memfit.train.oom import configure_allocator
    configure_allocator()                       # as the CLI does, before CUDA initialises

    import torch

    from memfit.device import detect, synchronize
    from memfit.models import build_causal_lm, count_params, size_model
    from memfit.precision import resolve_precision
    from memfit.train.oom import OOMController
    from memfit.train.step import accumulate

    device = detect(args.device)
    precision, _ = resolve_precision(args.precision, device)
    torch.manual_seed(0)
    shape = size_model(int(args.target_params), "gpt2", args.vocab_size, args.seq_len)
    model = build_causal_lm(shape).to(device.torch_device)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scaler = precision.make_scaler()
    rows, half = args.micro, max(1, args.micro // 2)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, args.vocab_size, (rows, args.seq_len), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    dev = device.torch_device

    where = {"mode": None}                      # which failure the next attempt at `rows` suffers
    handles: list = []

    def raise_in_backward(module, grad_input, grad_output):
        for h in handles:                       # fires once: the redo at the smaller size runs clean
            h.remove()
        handles.clear()
        raise torch.OutOfMemoryError("simulated: CUDA out of memory in the backward")

    def loss_fn(m, mb):
        from memfit.models.loss import causal_lm_loss
        big = mb["input_ids"].shape[0] > half
        if big and where["mode"] == "end-of-backward":
            handles.append(m.transformer.h[0].register_full_backward_hook(raise_in_backward))
        s, n = causal_lm_loss(m, mb)
        if big and where["mode"] == "after-forward":
            raise torch.OutOfMemoryError("simulated: CUDA out of memory at the forward's peak")
        return s, n

    def one(mode: str | None, start: int) -> float:
        where["mode"] = mode
        ctl = OOMController(start, device, inject_above_tokens=(half * args.seq_len if mode == "before-forward"
                                                                else None))
        synchronize(device)
        t0 = time.perf_counter()
        stats = ctl.run(0, opt, model, lambda mbs: accumulate(
            model, batch, mbs, precision, scaler, loss_fn, dev, before_micro=ctl.check), scaler=scaler)
        synchronize(device)
        dt = time.perf_counter() - t0
        assert stats.rows == rows and ctl.micro_batch_size == (half if mode else start), (mode, ctl.micro_batch_size)
        assert (len(ctl.events) == 1) == bool(mode)
        opt.zero_grad(set_to_none=True)
        return dt

    print(f"model: {count_params(model):,} parameters ({shape.n_layer} layers, {shape.n_embd} wide), vocab "
          f"{args.vocab_size}, seq {args.seq_len}; effective batch {rows} = micro {rows} -> {half} after the OOM; "
          f"{precision.name} on {device.name}; torch threads {torch.get_num_threads()}; "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)
    one(None, half)                             # warm-up: kernels, allocator, autocast caches
    one("after-forward", rows)
    results: dict[str, list[float]] = {"clean": [], "before-forward": [], "after-forward": [],
                                       "end-of-backward": []}
    for _ in range(args.repeats):               # interleaved, so drifting machine load hits all alike
        results["clean"].append(one(None, half))
        for mode in ("before-forward", "after-forward", "end-of-backward"):
            results[mode].append(one(mode, rows))
    clean = statistics.median(results["clean"])
    print(f"{'effective batch at micro ' + str(half) + ', no OOM':<34} {clean:7.3f} s  (median of {args.repeats})")
    costs = {}
    for mode in ("before-forward", "after-forward", "end-of-backward"):
        t = statistics.median(results[mode])
        costs[mode] = t - clean
        print(f"{'with an OOM ' + mode:<34} {t:7.3f} s  -> recovery cost {costs[mode]:+.3f} s "
              f"({costs[mode] / clean:+.2f} of a clean effective batch)")
    print(f"recovery_seconds={costs['after-forward']:.3f} worst_case_seconds={costs['end-of-backward']:.3f} "
          f"overhead_seconds={costs['before-forward']:.3f}")


if __name__ == "__main__":
    main()
