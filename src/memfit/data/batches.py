"""Padded effective batches over a list of encoded examples, resumable in O(1).

Fine-tuning sets are small next to pretraining corpora, so the examples are tokenized once and held as
int32 arrays (4 bytes per token). Each epoch visits them in a permutation drawn from (seed, epoch); the
state is just (epoch, position), so a resume recomputes the permutation and continues at the exact next
example without re-reading anything. Rows of an effective batch are sorted longest first: the loop cuts
trailing all-padding columns per micro-batch, so short rows then cost little — and the token-normalised
gradient does not depend on row order.
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np
import torch


class PaddedBatches:
    """Iterable of effective batches {input_ids, attention_mask, labels} (+ any extra per-row ints).

    `labels` per example is either a token list (causal LM: padded with -100) or one int (classification:
    a [rows] tensor). `loop=True` cycles epochs forever (training); `loop=False` is one ordered pass (eval).
    """

    def __init__(self, examples: list[dict[str, Any]], rows: int, pad_id: int, seed: int = 0,
                 shuffle: bool = True, loop: bool = True) -> None:
        if not examples:
            raise ValueError("no examples to batch")
        self.examples = [{k: (np.asarray(v, dtype=np.int32) if isinstance(v, (list, np.ndarray)) else v)
                          for k, v in ex.items()} for ex in examples]
        self.rows, self.pad_id, self.seed = rows, pad_id, seed
        self.shuffle, self.loop = shuffle, loop
        self.epoch, self.position = 0, 0
        self.packed = None         # PackedBatches: the row length

    def __len__(self) -> int:
        """Effective batches per epoch."""
        return -(-len(self.examples) // self.rows)

    def order(self, epoch: int) -> np.ndarray:
        n = len(self.examples)
        if not self.shuffle:
            return np.arange(n)
        return np.random.default_rng([self.seed, epoch]).permutation(n)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            order = self.order(self.epoch)
            while self.position < len(order):
                idx = order[self.position:self.position + self.rows]
                self.position += len(idx)     # the state names the NEXT batch: a checkpoint after this
                yield self.collate(idx)        # step resumes with the batch after it
            if not self.loop:
                self.position = 0
                return
            self.epoch, self.position = self.epoch + 1, 0

    def collate(self, idx) -> dict[str, torch.Tensor]:
        rows = sorted((self.examples[i] for i in idx), key=lambda ex: -len(ex["input_ids"]))
        width = max(len(ex["input_ids"]) for ex in rows)
        ids = np.full((len(rows), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        token_labels = not np.isscalar(rows[0]["labels"]) and np.ndim(rows[0]["labels"]) == 1
        labels = np.full((len(rows), width), -100, dtype=np.int64) if token_labels else \
            np.array([int(ex["labels"]) for ex in rows], dtype=np.int64)
        for r, ex in enumerate(rows):
            n = len(ex["input_ids"])
            ids[r, :n] = ex["input_ids"]
            mask[r, :n] = 1
            if token_labels:
                labels[r, :n] = ex["labels"]
        return {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask),
                "labels": torch.from_numpy(labels)}

    def state_dict(self) -> dict[str, Any]:
        state = {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                 "examples": len(self.examples), "rows": self.rows}
        if self.packed is not None:
            state["packed"] = self.packed
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["examples"] != len(self.examples) or state["seed"] != self.seed:
            raise ValueError(f"the checkpoint's data had {state['examples']} examples "
                             f"(seed {state['seed']}); "
                             f"this run has {len(self.examples)} (seed {self.seed}): not the same data")
        if state.get("packed") != self.packed:
            how = lambda p: f"packed in rows of {p} tokens" if p else "padded"  # noqa: E731
            raise ValueError(f"the checkpoint's batches were {how(state.get('packed'))}; this run's are "
                             f"{how(self.packed)}: not the same data order")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


def token_count(examples: list[dict[str, Any]]) -> int:
    return sum(len(ex["input_ids"]) for ex in examples)
