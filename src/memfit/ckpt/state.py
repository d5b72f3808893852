"""The registry of everything a checkpoint must hold to resume exactly.

Each part (model, optimizer, scheduler, scaler, rng, data, loop, oom, deadline, ...) is registered
under a name and must have `state_dict()` / `load_state_dict()`. The checkpointer saves every
registered part; a new capability that needs resuming registers itself and is saved for free.
"""

from __future__ import annotations

import random
from typing import Any, Protocol

import numpy as np
import torch


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class StateRegistry:
    def __init__(self) -> None:
        self._parts: dict[str, Stateful] = {}

    def register(self, name: str, part: Stateful) -> None:
        if name in self._parts:
            raise KeyError(f"state part {name!r} registered twice")
        if not (hasattr(part, "state_dict") and hasattr(part, "load_state_dict")):
            raise TypeError(f"state part {name!r} has no state_dict/load_state_dict")
        self._parts[name] = part

    def names(self) -> list[str]:
        return list(self._parts)

    def get(self, name: str) -> Stateful | None:
        return self._parts.get(name)

    def state_dict(self) -> dict[str, Any]:
        return {name: part.state_dict() for name, part in self._parts.items()}

    def load_state_dict(self, state: dict[str, Any], strict: bool = True) -> list[str]:
        """Load each registered part; returns the names that the state did not contain."""
        missing = [n for n in self._parts if n not in state]
        if strict and missing:
            raise KeyError(f"checkpoint lacks state for: {', '.join(missing)}")
        for name, part in self._parts.items():
            if name in state:
                part.load_state_dict(state[name])
        return missing


class RNGState:
    """Python, numpy and torch (CPU + every CUDA device) generator states."""

    def state_dict(self) -> dict[str, Any]:
        st = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            st["cuda"] = torch.cuda.get_rng_state_all()
        return st

    def load_state_dict(self, state: dict[str, Any]) -> None:
        random.setstate(state["python"])
        np.random.set_state(state["numpy"])
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])


class ValueState:
    """Wraps a plain dict of counters (the loop's step/tokens/epoch/elapsed) as a Stateful."""

    def __init__(self, **values: Any) -> None:
        self.values = dict(values)

    def __getitem__(self, k: str) -> Any:
        return self.values[k]

    def __setitem__(self, k: str, v: Any) -> None:
        self.values[k] = v

    def state_dict(self) -> dict[str, Any]:
        return dict(self.values)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.values.update(state)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
