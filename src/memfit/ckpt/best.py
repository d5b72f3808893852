"""best/ and early stopping: which evaluation metric decides, whether an evaluation is a new best, and
the patience counter. The tracker is the registry part 'checkpointer', so the best value and the
patience count survive a resume (they are in state.pt)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

_GREATER_IS_BETTER = ("acc", "f1", "precision", "recall", "auc", "bleu", "rouge", "exact", "match", "score")


class BestTracker:
    def __init__(self, metric: str, greater_is_better: bool | None, patience: int | None) -> None:
        self.metric = metric
        self.greater = greater_is_better if greater_is_better is not None else \
            any(k in metric.lower() for k in _GREATER_IS_BETTER)
        self.patience = patience
        self.value: float | None = None
        self.step: int | None = None
        self.bad_evals = 0
        self._warned = False

    def state_dict(self) -> dict[str, Any]:
        return {"best_value": self.value, "best_step": self.step, "bad_evals": self.bad_evals}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self.value, self.step, self.bad_evals = d.get("best_value"), d.get("best_step"), d.get("bad_evals", 0)

    def metric_value(self, metrics: dict) -> float | None:
        m = self.metric
        for key in (m, f"eval_{m}", m.removeprefix("val_"), f"val_{m}"):
            if key in metrics:
                try:
                    return float(metrics[key])
                except (TypeError, ValueError):
                    return None
        return None

    def judge(self, step: int, metrics: dict, log: Callable[[str], None]) -> float | None:
        """The metric's value when this evaluation is a new best (recorded), else None (a bad evaluation
        counts towards the patience; a missing metric is logged once)."""
        value = self.metric_value(metrics)
        if value is None:
            if not self._warned:
                log(f"checkpoint: --metric-for-best {self.metric} is not among the evaluation metrics "
                    f"({', '.join(metrics) or 'none'}); best/ is not tracked")
                self._warned = True
            return None
        better = self.value is None or (value > self.value if self.greater else value < self.value)
        if math.isnan(value) or not better:
            self.bad_evals += 1
            return None
        self.value, self.step, self.bad_evals = value, step, 0
        return value

    def should_stop(self) -> bool:
        return bool(self.patience) and self.bad_evals >= self.patience
