"""A memory monitor (nothing in train/ or jobs/ uses it yet; tests do): process RSS, system available RAM,
and on a GPU the caching allocator's allocated/reserved (current and peak) and what NVML says is in use.

All readings go through memfit.device (the only module that touches torch.cuda memory APIs/NVML).
`sample()` is cheap (a few syscalls); `peaks` keeps the maxima since construction or `reset()`.
"""

from __future__ import annotations

import time


class MemoryMonitor:
    def __init__(self, device=None) -> None:
        if device is None:
            from memfit.device import detect
            device = detect()
        self.device = device
        self.peaks: dict[str, int] = {}
        self.last: dict[str, int] = {}
        self.low_ram = 2 ** 62

    def sample(self) -> dict[str, int]:
        from memfit.device import memory_stats
        st = memory_stats(self.device)
        st["time"] = int(time.time())
        for k, v in st.items():
            if k in ("time", "ram_available"):
                continue
            if v > self.peaks.get(k, -1):
                self.peaks[k] = int(v)
        self.low_ram = min(self.low_ram, st.get("ram_available", self.low_ram))
        self.last = st
        return st

    def reset(self) -> None:
        from memfit.device import reset_peak
        reset_peak(self.device)
        self.peaks.clear()
        self.low_ram = 2 ** 62

    def summary(self) -> dict[str, int]:
        """Peaks seen so far plus the lowest available host RAM."""
        out = dict(self.peaks)
        if self.low_ram < 2 ** 62:
            out["ram_available_min"] = int(self.low_ram)
        return out

    def line(self) -> str:
        s = self.last or self.sample()
        gib = 2 ** 30
        parts = [f"rss {s['rss'] / gib:.2f}G", f"ram free {s['ram_available'] / gib:.1f}G"]
        if "allocated" in s:
            parts += [f"cuda alloc {s['allocated'] / gib:.2f}G (peak {s.get('max_allocated', 0) / gib:.2f}G)",
                      f"reserved {s['reserved'] / gib:.2f}G"]
        if "nvml_used" in s:
            parts.append(f"nvml {s['nvml_used'] / gib:.2f}G")
        return ", ".join(parts)
