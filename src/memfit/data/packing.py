"""Packed effective batches for causal-LM fine-tuning: several examples per row, no cross-talk.

Each row of `seq_len` tokens holds whole examples back to back. `position_ids` restart at 0 for every
example, and the batch carries no 2D attention mask to the model: transformers (>= 5) then derives a
block-diagonal causal mask from the restarts (sdpa / eager build it, flash attention goes varlen), so a
token attends only inside its own example. The first label of every example is -100: in the shifted
loss it would be predicted from the previous example's last token. So each example's loss and logits
are those of the example run alone (tests/test_packing.py checks it on GPT-2, Llama and LoRA).

`attention_mask` in the batch marks real tokens (1) against the row's padded tail (0): the meter counts
useful tokens from it and the step cuts all-padding columns; models/loss.py does not hand it to a model
when position_ids are present. Padding gets its own position run, so it never joins an example.

The order is PaddedBatches' (a permutation per (seed, epoch)) and the state is the same (epoch, position
of the next unplaced example), so a resume recomputes the permutation and continues exactly.
"""

from __future__ import annotations

import functools
import json
from typing import Any, Iterator

import numpy as np
import torch

from memfit.data.batches import PaddedBatches


def first_fit(lengths, order: np.ndarray, start: int, rows: int, seq_len: int) -> tuple[list[list[int]], int]:
    """Examples order[start:], in order, each into the first of `rows` rows with room, until one fits in
    none: (example indices per row, position of the first example not placed)."""
    filled = [0] * rows
    placed: list[list[int]] = [[] for _ in range(rows)]
    pos = start
    while pos < len(order):
        n = min(int(lengths[order[pos]]), seq_len)
        r = next((r for r in range(rows) if filled[r] + n <= seq_len), None)
        if r is None:
            break
        placed[r].append(int(order[pos]))
        filled[r] += n
        pos += 1
    return [p for p in placed if p], pos


class PackedBatches(PaddedBatches):
    """Iterable of packed effective batches {input_ids, attention_mask, position_ids, labels}, `rows`
    rows of at most `seq_len` tokens (the width is the fullest row's)."""

    def __init__(self, examples: list[dict[str, Any]], rows: int, pad_id: int, seq_len: int, seed: int = 0,
                 shuffle: bool = True, loop: bool = True) -> None:
        super().__init__(examples, rows, pad_id, seed, shuffle, loop)
        self.seq_len = seq_len
        self.lengths = np.array([len(ex["input_ids"]) for ex in self.examples], dtype=np.int64)
        self.packed = seq_len      # in the state: a padded checkpoint never continues packed (or the reverse)

    def epoch_layout(self, epoch: int = 0) -> list[int]:
        """Examples in each effective batch of one epoch (lengths only: no tensors are built)."""
        return [n for n, _ in self.epoch_batches(epoch)]

    def epoch_batches(self, epoch: int = 0) -> list[tuple[int, int]]:
        """(examples, rows) of each effective batch of one epoch: what the plan and the log report."""
        order, pos, out = self.order(epoch), 0, []
        while pos < len(order):
            placed, nxt = first_fit(self.lengths, order, pos, self.rows, self.seq_len)
            out.append((nxt - pos, len(placed)))
            pos = nxt
        return out

    def __len__(self) -> int:
        return len(self.epoch_layout(0))

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            order = self.order(self.epoch)
            while self.position < len(order):
                placed, self.position = first_fit(self.lengths, order, self.position, self.rows, self.seq_len)
                yield self.collate_rows(placed)   # the state names the NEXT batch (as PaddedBatches)
            if not self.loop:
                self.position = 0
                return
            self.epoch, self.position = self.epoch + 1, 0

    def collate_rows(self, placed: list[list[int]]) -> dict[str, torch.Tensor]:
        return pack_rows([[self.examples[i] for i in row] for row in placed], self.pad_id, self.seq_len)


def pack_rows(rows: list[list[dict[str, Any]]], pad_id: int, seq_len: int) -> dict[str, torch.Tensor]:
    """Rows of examples -> one packed batch (each example cut to seq_len; see the module docstring)."""
    width = max(sum(min(len(ex["input_ids"]), seq_len) for ex in row) for row in rows)
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    labels = np.full((len(rows), width), -100, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    pos = np.zeros((len(rows), width), dtype=np.int64)
    for r, row in enumerate(rows):
        at = 0
        for ex in row:
            n = min(len(ex["input_ids"]), seq_len)
            ids[r, at:at + n] = ex["input_ids"][:n]
            labels[r, at:at + n] = ex["labels"][:n]
            labels[r, at] = -100          # never predicted from the example before it
            mask[r, at:at + n] = 1
            pos[r, at:at + n] = np.arange(n)
            at += n
        pos[r, at:] = np.arange(width - at)   # the padded tail: a run of its own
    return {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask),
            "position_ids": torch.from_numpy(pos), "labels": torch.from_numpy(labels)}


@functools.lru_cache(maxsize=8)
def _config_probe(model_type: str, config_json: str) -> bool:
    from transformers import AutoConfig, AutoModelForCausalLM
    config = AutoConfig.for_model(model_type, **json.loads(config_json))
    with torch.random.fork_rng(devices=[]):        # the run's seed is set later; draw nothing from it
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return packing_works(model, PROBE_VOCAB)


PROBE_VOCAB = 128


def packing_works_for_config(model_config) -> bool:
    """packing_works on a one-layer, 128-token model of the same class and attention implementation,
    built from the config alone (no weights, ~0.1 s): the decision is made before anything is written
    or loaded. Masking is the class's code, not its size, so the small copy answers for the real one."""
    d = model_config.to_dict()
    for key in ("quantization_config", "architectures", "auto_map", "_name_or_path"):
        d.pop(key, None)
    layers = next((k for k in ("num_hidden_layers", "n_layer", "num_layers", "n_layers") if k in d), None)
    if layers is not None:
        d[layers] = 1
    if isinstance(d.get("layer_types"), list):
        d["layer_types"] = d["layer_types"][:1]
    d["vocab_size"] = PROBE_VOCAB
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        if isinstance(d.get(key), int) and d[key] >= PROBE_VOCAB:
            d[key] = 0
    d.pop("model_type", None)
    d.pop("transformers_version", None)
    try:
        return _config_probe(model_config.model_type, json.dumps(d, sort_keys=True, default=str))
    except Exception:  # noqa: BLE001 - a class that cannot be built small, or has no causal-LM head
        return False


def packing_works(model: torch.nn.Module, vocab: int) -> bool:
    """Does this model keep packed examples apart? Two short examples run packed and alone (eval mode,
    no grad, fixed ids: no RNG is drawn); their logits must agree. An attention implementation that
    ignores position_ids restarts (or a model that does not take position_ids) fails it."""
    try:
        p = next(model.parameters())
    except StopIteration:
        return False
    a = (torch.arange(7) * 7 + 3) % vocab
    b = (torch.arange(5) * 11 + 5) % vocab
    batch = pack_rows([[{"input_ids": a, "labels": a}, {"input_ids": b, "labels": b}]], 0, 12)
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            packed = model(input_ids=batch["input_ids"].to(p.device),
                           position_ids=batch["position_ids"].to(p.device), use_cache=False).logits.float()
            alone = [model(input_ids=x[None].to(p.device), use_cache=False).logits.float() for x in (a, b)]
    except (TypeError, ValueError, RuntimeError):
        return False
    finally:
        model.train(was)
    got = torch.cat([packed[:, :7], packed[:, 7:]], dim=1)
    want = torch.cat(alone, dim=1)
    scale = float(want.abs().max()) + 1e-6
    return bool(float((got - want).abs().max()) <= 1e-3 * scale + 1e-5)


def packing_choice(cfg, model_config) -> tuple[bool, str | None]:
    """(pack this run?, why not, when the model is the reason). Causal-LM fine-tuning only; --packing
    off never packs; on and auto pack where packing_works_for_config says the model masks per example
    (--packing on on a model that does not is refused by jobs/finetune before anything is written)."""
    if cfg.task != "finetune" or cfg.data.packing == "off":
        return False, None
    if packing_works_for_config(model_config):
        return True, None
    attn = getattr(model_config, "_attn_implementation", None) or "default"
    return False, (f"{model_config.model_type} ({attn} attention) does not keep packed examples apart: a "
                   "packed example's logits differ from the example run alone")
