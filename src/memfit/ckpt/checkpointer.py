"""The checkpointer: when to save, where, what to keep, and how to come back.

    run_dir/checkpoints/step-<N>/   model.safetensors (or shards + index), state.pt (full only), manifest.json
    run_dir/checkpoints/latest      name of the newest finished checkpoint (updated last)
    run_dir/best/                   the best evaluation's model (weights, config, tokenizer) + metrics.json (never
                                    rotated)
Every checkpoint also holds config.json and the tokenizer files, so each loads with from_pretrained.

A save writes into `.tmp-step-<N>-<pid>/` tensor by tensor (sha256 and byte count taken on the way out),
fsyncs, verifies the files against the manifest, renames the directory into place, then moves `latest`.
A kill at any moment leaves the previous checkpoints untouched; the next start removes the leftovers.

`state.pt` holds every registry part except `model` (optimizer, scheduler, scaler, rng, data, loop, oom,
deadline, history, this checkpointer's best/patience counters) as plain types and tensors, so it loads
with `torch.load(weights_only=True)` and no code is ever unpickled.

Keep-K: the `keep_last` newest members stay (0: best/ only once the run finishes); with --save-optimizer-state auto only the two newest keep
their state.pt (a corrupt newest still leaves an exact resume), older ones become weights-only.
Disk budget: before writing, predict the size from the tensors; delete old members (never the newest full
one, never best/) until it fits; if it still does not, log why, return None and let training go on. The
bytes of the save in progress are counted as they are written, so usage never passes the budget.
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from memfit.ckpt.io import (
    MANIFEST,
    MODEL_FILE,
    STATE_FILE,
    BudgetExceeded,
    CheckpointError,
    KillSwitch,
    dir_bytes,
    load_model_state,
    split_tensors,
    tensor_stats,
    verify_checkpoint,
    write_checkpoint_dir,
)
from memfit.atomic import DELETING, recover, remove_dir, rmtree, swap_in
from memfit.ckpt.mirror import Mirror
from memfit.ckpt.policy import (
    ASIDE_RE,
    Entry,
    clean_stale,
    list_checkpoints,
    rotate,
    set_aside,
    set_aside_dirs,
    write_latest,
)
from memfit.ckpt.salvage import WEIGHTS_PREFIX, damaged_message, load_weights, read_state
from memfit.ckpt.space import (
    capacity_problem,
    disk_text,
    fmt_bytes,
    fs_margin,
    full_checkpoint_estimate,
)
from memfit.ckpt.state import StateRegistry
from memfit.config import Config, ConfigError
from memfit.runfiles import record

__all__ = ["DEFAULT_SAVE_EVERY_MINUTES", "CheckpointError", "Checkpointer"]

DEFAULT_SAVE_EVERY_MINUTES = 30.0    # when neither --save-every nor --save-every-minutes is given
_GREATER_IS_BETTER = ("acc", "f1", "precision", "recall", "auc", "bleu", "rouge", "exact", "match", "score")


def _manifest_or_none(path: Path) -> dict | None:
    try:
        return json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def _tokenizer_files(tokenizer: Any) -> dict[str, bytes]:
    """The files tokenizer.save_pretrained writes, as bytes (written once, copied into each checkpoint)."""
    if tokenizer is None or not hasattr(tokenizer, "save_pretrained"):
        return {}
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        tokenizer.save_pretrained(d)
        return {p.name: p.read_bytes() for p in sorted(Path(d).iterdir()) if p.is_file()}


class _BestTracker:
    """Registry part 'checkpointer': best metric and patience survive a resume."""

    def __init__(self) -> None:
        self.value: float | None = None
        self.step: int | None = None
        self.bad_evals = 0

    def state_dict(self) -> dict[str, Any]:
        return {"best_value": self.value, "best_step": self.step, "bad_evals": self.bad_evals}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self.value, self.step, self.bad_evals = d.get("best_value"), d.get("best_step"), d.get("bad_evals", 0)


class Checkpointer:
    def __init__(self, run_dir: Path, cfg: Config, registry: StateRegistry, model: torch.nn.Module,
                 log: Callable[[str], None] = print, tokenizer: Any = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        from memfit.config import with_job_defaults
        cfg = with_job_defaults(cfg)      # --metric-for-best unset means the job kind's default
        c = cfg.checkpoint
        self.clock = clock                    # time-based saving (tests inject a fake one)
        self.run_dir = Path(run_dir)
        self.ckdir = self.run_dir / "checkpoints"
        self.best_dir = self.run_dir / "best"
        self.registry, self.model, self.log = registry, model, log
        self.save_every = c.save_every
        minutes = c.save_every_minutes
        if c.save_every is None and minutes is None:
            minutes = DEFAULT_SAVE_EVERY_MINUTES
        self.save_every_s = minutes * 60 if minutes else None
        # --keep-last 0 ("best/ only"): while the run goes on the newest checkpoint stays until a newer one
        # supersedes it (a stop stays resumable); finish() removes it once final_model/ is written.
        self.keep_last = max(1, c.keep_last)
        self.best_only = c.keep_last == 0
        self.tokenizer = tokenizer
        self._side_files: dict[str, bytes] | None = None
        self.mode = c.save_optimizer_state
        self.metric = c.metric_for_best
        self.greater = c.greater_is_better if c.greater_is_better is not None else \
            any(k in self.metric.lower() for k in _GREATER_IS_BETTER)
        self.patience = c.early_stopping_patience
        self.disk_budget = cfg.budget.disk_budget
        self.max_shard_bytes = 2 << 30        # model files above this are split (HF index format)
        self.verify_hashes = True             # re-read and hash every file before the rename

        record(self.run_dir, "checkpoints")
        self.ckdir.mkdir(parents=True, exist_ok=True)
        clean_stale(self.ckdir, log)
        self._clean_best_leftovers()

        self.tracker = _BestTracker()
        if registry.get("checkpointer") is None:
            registry.register("checkpointer", self.tracker)
        self._kill = KillSwitch(self.run_dir)
        self.mirror = Mirror(c.mirror_to, self.keep_last, c.save_optimizer_state, log) if c.mirror_to else None

        self._last_saved: tuple[int, str] | None = None
        self._last_save_t = self.clock()
        self._sizes: dict[str, int] = {}       # last actual size per kind (full / light / best)
        for e in reversed(list_checkpoints(self.ckdir)):
            m = _manifest_or_none(e.path)
            if m and m.get("kind") in ("full", "light"):
                self._sizes.setdefault(m["kind"], dir_bytes(e.path))
        self.full_bytes = self._sizes.get("full") or self._full_estimate(cfg.optim.optimizer)
        # never fill the disk itself; the margin scales with the checkpoint (memfit.ckpt.space)
        self.fs_margin = fs_margin(shutil.disk_usage(self.ckdir).total, self.full_bytes)
        self.no_room: str | None = None        # why the last save found no room (the loop stops on it)
        entries = list_checkpoints(self.ckdir)
        old = [e.path for e in entries[:-1]] + set_aside_dirs(self.ckdir)   # rotation may free these
        problem = capacity_problem(self.run_dir, self.disk_budget, self.full_bytes,
                                   sum(dir_bytes(p) for p in old))
        if problem:     # exit 2 before training: a run that can never save would lose all its work
            raise ConfigError([problem])
        self._warned_metric = False
        self.last_save_seconds: float | None = None
        self.last_save_bytes: int | None = None
        self.peak_bytes = 0                    # highest run-dir usage reached while writing (for tests)
        self.resumed_from: Path | None = None
        self.resume_missing: list[str] = []    # registry parts the resumed checkpoint had no state for

    def _full_estimate(self, optimizer: str) -> int:
        part = self.registry.get("model")
        weights = part.state_dict() if part is not None else self.model.state_dict()
        tensors, _, _ = split_tensors(weights, "model")
        nbytes, _ = tensor_stats(tensors)
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        return full_checkpoint_estimate(nbytes, trainable, optimizer)

    # ------------------------------------------------------------------ when
    def should_save(self, step: int) -> bool:
        if step <= 0 or (self._last_saved is not None and self._last_saved[0] == step):
            return False
        if self.save_every and step % self.save_every == 0:
            return True
        return bool(self.save_every_s) and self.clock() - self._last_save_t >= self.save_every_s

    # ------------------------------------------------------------------ save
    def save(self, step: int, full: bool = True, *, kind: str | None = None) -> Path | None:
        """Write step-<N> atomically; None (logged) if it cannot fit the disk budget or the disk fails.

        kind: 'full' | 'light' overrides the policy (full=True means "full unless
        --save-optimizer-state light")."""
        t0 = time.perf_counter()
        kind = kind or ("full" if full and self.mode != "light" else "light")
        final = self.ckdir / f"step-{step}"
        if self._last_saved is not None and self._last_saved[0] == step and final.exists() and \
                (self._last_saved[1] == "full" or kind == "light"):
            return final       # already saved at this step (periodic save, then the stop's save)

        state = self.registry.state_dict()
        extra = self.model_files()
        model_state = state.pop("model", None)
        if model_state is None:
            model_state = self.model.state_dict()
        other = state if kind == "full" else None
        need = self._predict(kind, model_state, other)
        if not self._make_room(need, f"checkpoint step-{step} ({kind})"):
            self._last_save_t = self.clock()     # do not retry at every step
            self.no_room = self.room_text(need)
            return None

        tmp = self.ckdir / f".tmp-step-{step}-{os.getpid()}"
        rmtree(tmp)
        self._kill.count += 1
        budget = self._budget_guard(f"checkpoint step-{step}", kind)
        try:
            manifest = write_checkpoint_dir(tmp, step=step, kind=kind, model_state=model_state,
                                            other_state=other, budget=budget, kill=self._kill,
                                            max_shard_bytes=self.max_shard_bytes, extra_files=extra)
            _, problems = verify_checkpoint(tmp, hashes=self.verify_hashes)
            if problems:
                raise CheckpointError(f"verification after writing failed: {'; '.join(problems)}")
        except (BudgetExceeded, OSError, CheckpointError) as e:
            rmtree(tmp)
            self._last_save_t = self.clock()
            if isinstance(e, BudgetExceeded) or getattr(e, "errno", None) == errno.ENOSPC:
                self.no_room = self.room_text(need)
                self.log(f"checkpoint: step-{step} not saved ({e}); {self.no_room}")
            else:
                self.log(f"checkpoint: step-{step} not saved ({e}); keeping the last good checkpoint, "
                         "training continues")
            return None
        except BaseException:
            rmtree(tmp)
            raise
        swap_in(tmp, final, durable=False)       # write_checkpoint_dir fsynced every file
        try:
            write_latest(self.ckdir, final.name)     # informational: resume scans step-<N> itself
        except OSError as e:
            self.log(f"checkpoint: could not update {self.ckdir / 'latest'} ({e})")

        self._last_saved = (step, kind)
        self._last_save_t = self.clock()
        self.no_room = None
        self._sizes[kind] = dir_bytes(final)
        for p in set_aside_dirs(self.ckdir):      # a good save makes the set-aside future obsolete
            m = ASIDE_RE.match(p.name)
            if m and m.group(1) == "corrupt" and int(m.group(2)) > step:
                continue      # a damaged checkpoint stays until a good one of its step or later exists
            self.log(f"checkpoint: deleting {p.name} (superseded by step-{step})")
            remove_dir(p)
        rotate(self.ckdir, self.keep_last, self.mode, self._busy, self.log,
               midway=lambda p: self._kill.midway_delete(step, p))
        if self.mirror is not None:
            self.mirror.submit(final)
        self.last_save_seconds = time.perf_counter() - t0
        self.last_save_bytes = manifest["total_bytes"]
        self.log(f"checkpoint: saved {final.name} ({kind}, {fmt_bytes(manifest['total_bytes'])}, "
                 f"{self.last_save_seconds:.2f}s)")
        return final

    # ------------------------------------------------------------------ best / early stopping
    def update_best(self, step: int, metrics: dict) -> bool:
        value = self._metric_value(metrics)
        if value is None:
            if not self._warned_metric:
                self.log(f"checkpoint: --metric-for-best {self.metric} is not among the evaluation metrics "
                         f"({', '.join(metrics) or 'none'}); best/ is not tracked")
                self._warned_metric = True
            return False
        t = self.tracker
        better = t.value is None or (value > t.value if self.greater else value < t.value)
        if math.isnan(value) or not better:
            t.bad_evals += 1
            return False
        t.value, t.step, t.bad_evals = value, step, 0
        self._write_best(step, value, metrics)
        return True

    def should_stop_early(self) -> bool:
        return bool(self.patience) and self.tracker.bad_evals >= self.patience

    def _metric_value(self, metrics: dict) -> float | None:
        m = self.metric
        for key in (m, f"eval_{m}", m.removeprefix("val_"), f"val_{m}"):
            if key in metrics:
                try:
                    return float(metrics[key])
                except (TypeError, ValueError):
                    return None
        return None

    def _write_best(self, step: int, value: float, metrics: dict) -> None:
        part = self.registry.get("model")
        weights = part.state_dict() if part is not None else self.model.state_dict()
        info = {"step": step, "metric": self.metric, "value": value, "greater_is_better": self.greater,
                "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float, str))}}
        files = {"metrics.json": json.dumps(info, indent=1, default=float).encode(), **self.model_files()}
        need = self._predict("best", weights, None) + sum(len(v) for v in files.values())
        if not self._make_room(need, "best/"):
            self.log(f"checkpoint: best/ not updated for step {step} ({self.metric}={value:.4g}): no room")
            return
        record(self.run_dir, "best")
        tmp = self.run_dir / f".tmp-best-{os.getpid()}"
        rmtree(tmp)
        try:
            write_checkpoint_dir(tmp, step=step, kind="light", model_state=weights, other_state=None,
                                 budget=self._budget_guard("best/", "best"),
                                 max_shard_bytes=self.max_shard_bytes,
                                 extra_files=files, extra_manifest={"best": info})
        except (BudgetExceeded, OSError) as e:
            rmtree(tmp)
            self.log(f"checkpoint: best/ not updated ({e})")
            return
        except BaseException:
            rmtree(tmp)
            raise
        if self.mirror is not None and self.mirror.is_busy(self.best_dir):
            self.mirror.wait()                      # it is reading the best/ we are about to replace
        swap_in(tmp, self.best_dir, durable=False)
        self._sizes["best"] = dir_bytes(self.best_dir)
        self.log(f"checkpoint: best/ <- step {step} ({self.metric}={value:.4g})")
        if self.mirror is not None:
            self.mirror.submit(self.best_dir, "best")

    def model_files(self) -> dict[str, bytes]:
        """What makes a weights folder a usable model (small files, in every checkpoint and best/):
        config.json (stock from_pretrained) or a LoRA part's adapter files, plus the tokenizer files."""
        part = self.registry.get("model")
        files: dict[str, bytes] = {}
        if hasattr(part, "checkpoint_files"):
            files.update(part.checkpoint_files())     # e.g. a LoRA part: a stock peft adapter folder
        else:
            config = getattr(self.model, "config", None)
            if config is not None and hasattr(config, "to_json_string"):
                import copy
                config = copy.deepcopy(config)
                config.architectures = [type(self.model).__name__]   # as save_pretrained writes it
                files["config.json"] = config.to_json_string().encode()
        if self._side_files is None:
            self._side_files = _tokenizer_files(self.tokenizer)
        return {**files, **self._side_files}

    def finish(self) -> None:
        """The run is complete (final_model/ written): with --keep-last 0 only best/ stays."""
        if not self.best_only:
            return
        self.wait()
        for e in list_checkpoints(self.ckdir):
            if not self._busy(e.path):
                remove_dir(e.path)
        (self.ckdir / "latest").unlink(missing_ok=True)
        self.log("checkpoint: --keep-last 0: removed the checkpoints (best/ and final_model/ stay)")

    def _clean_best_leftovers(self) -> None:
        for p in self.run_dir.glob(".tmp-best-*"):
            rmtree(p)
        # memfit.export writes final_model.tmp-<pid>/ and swaps it in (memfit.atomic.swap_in)
        for p in self.run_dir.glob("final_model.tmp-*"):
            self.log(f"checkpoint: removing unfinished export {p.name}")
            rmtree(p)
        for p in self.run_dir.glob(f"{DELETING}*"):
            rmtree(p)               # a swap's old folder whose removal a kill interrupted
        recover(self.run_dir / "final_model")      # killed between the two renames of a swap
        recover(self.best_dir)

    # ------------------------------------------------------------------ disk budget
    def allowed_bytes(self) -> int:
        """What the run directory may occupy now: --disk-budget, and never more than the disk holds
        (free space minus a margin)."""
        usage = dir_bytes(self.run_dir)
        hard = usage + shutil.disk_usage(self.run_dir).free - self.fs_margin
        return min(self.disk_budget, hard) if self.disk_budget else hard

    def _predict(self, kind: str, model_state: dict, other: dict | None) -> int:
        """Bytes the next checkpoint of `kind` will take: the tensors' bytes (a lower bound) plus format
        overhead, or the last one's size when that is larger. An underestimate is still caught while
        writing (BudgetExceeded), and the bytes written so far then inform the next prediction."""
        tensors, _, _ = split_tensors(model_state, "model")
        nbytes, count = tensor_stats(tensors)
        raw, overhead = nbytes + 128 * count, 8192           # safetensors header, manifest
        if kind == "full":
            ob, oc = tensor_stats(other or {})
            raw, overhead = raw + ob + 512 * oc, overhead + 16384   # zip entries, pickled RNG and counters
        if self._sizes.get(kind):
            return max(raw, int(self._sizes[kind] * 1.01) + 4096)
        return raw + overhead

    def _budget_guard(self, what: str, kind: str) -> Callable[[int], None]:
        usage0, allowed = dir_bytes(self.run_dir), self.allowed_bytes()
        written = 0

        def guard(n: int) -> None:
            nonlocal written
            if usage0 + written + n > allowed:
                self._sizes[kind] = max(self._sizes.get(kind, 0), written + n)   # predict better next time
                raise BudgetExceeded(f"{what} would take the run directory past its disk budget "
                                     f"({fmt_bytes(usage0 + written + n)} > {fmt_bytes(allowed)})")
            written += n
            self.peak_bytes = max(self.peak_bytes, usage0 + written)
        return guard

    def _make_room(self, need: int, what: str) -> bool:
        """Delete set-aside, then old rotation members (oldest first; never the newest full one)."""
        allowed = self.allowed_bytes()
        usage = dir_bytes(self.run_dir)
        if usage + need <= allowed:
            return True
        entries = list_checkpoints(self.ckdir)
        fulls = [e for e in entries if e.kind == "full"]
        keep = (fulls or entries)[-1] if entries else None
        candidates = set_aside_dirs(self.ckdir) + [e.path for e in entries if e != keep]
        if self.mirror is None and usage - sum(dir_bytes(p) for p in candidates) + need > allowed:
            candidates = []   # deleting them all would still not make room: keep them (nothing is gained)
        for waited in (False, True):
            for p in candidates:
                if not p.exists():
                    continue
                if self._busy(p):
                    continue
                remove_dir(p)
                self.log(f"checkpoint: deleted {p.name} to keep the run directory within its disk budget")
                usage = dir_bytes(self.run_dir)
                if usage + need <= allowed:
                    return True
            if waited or self.mirror is None or not any(p.exists() for p in candidates):
                break
            self.mirror.wait()          # members the mirror is still copying become deletable
        self.log(f"checkpoint: {what} needs ~{fmt_bytes(need)} but the run directory already uses "
                 f"{fmt_bytes(usage)} of the {fmt_bytes(allowed)} it may use"
                 + (f"; keeping {keep.path.name} and the older checkpoints" if keep else ""))
        return False

    def room_text(self, need: int) -> str:
        """Why `need` more bytes do not fit: the disk (named, with its free space) or the budget."""
        usage = dir_bytes(self.run_dir)
        hard = usage + shutil.disk_usage(self.run_dir).free - self.fs_margin
        if self.disk_budget and self.disk_budget <= hard:
            return (f"no room: ~{fmt_bytes(need)} more would take the run directory ({fmt_bytes(usage)}) past "
                    f"--disk-budget {fmt_bytes(self.disk_budget)}")
        return (f"no room on {disk_text(self.run_dir)}: ~{fmt_bytes(need)} more is needed and "
                f"{fmt_bytes(self.fs_margin)} stays free")

    def newest(self) -> Path | None:
        """The newest installed checkpoint (what --resume auto would continue), or None."""
        entries = list_checkpoints(self.ckdir)
        return entries[-1].path if entries else None

    def export_bytes(self) -> int:
        """Predicted size of final_model/: the model's weights plus the tokenizer files."""
        part = self.registry.get("model")
        weights = part.state_dict() if part is not None else self.model.state_dict()
        tensors, _, _ = split_tensors(weights, "model")
        nbytes, count = tensor_stats(tensors)
        tok = self.run_dir / "tokenizer"
        return nbytes + 128 * count + (dir_bytes(tok) if tok.is_dir() else 0) + 65536

    def make_room(self, need: int, what: str) -> bool:
        """Free rotation members (never the newest full one, never best/) until `need` more bytes fit
        the disk budget; False (logged) if they cannot."""
        return self._make_room(need, what)

    def _busy(self, path: Path) -> bool:
        return self.mirror is not None and self.mirror.is_busy(path)

    # ------------------------------------------------------------------ resume
    def resume(self, spec: str | None) -> int | None:
        """Load the newest good checkpoint ('auto': run dir + mirror; or PATH) into the registry and
        return its step; None means start fresh. A corrupt or incomplete one is named and skipped."""
        t_resume = time.perf_counter()
        if spec is not None and spec.startswith(WEIGHTS_PREFIX):
            return self._resume_weights(spec)
        if spec is None:
            existing = list_checkpoints(self.ckdir)
            if existing:
                for e in existing:
                    set_aside(e, "abandoned")
                self.log(f"checkpoint: starting fresh; {len(existing)} existing checkpoint(s) in {self.ckdir} "
                         "set aside as abandoned-* (deleted after the first new save; use --resume auto to "
                         "continue them instead)")
            return None
        own_dirs = [self.ckdir]
        if spec == "auto":
            cands = [(e, None) for e in list_checkpoints(self.ckdir)]
            if self.mirror is not None:
                cands += [(e, self.mirror) for e in self.mirror.entries()]
                if isinstance(self.mirror.target.root, Path):
                    own_dirs.append(self.mirror.target.ckdir)
            where = str(self.ckdir) + (f" or {self.mirror.where}" if self.mirror else "")
        else:
            cands, where = self._explicit(Path(spec).expanduser())
        # newest first; on a tie the local copy before the mirror's
        cands.sort(key=lambda c: (-c[0].step, c[1] is not None))

        chosen = light = None
        bad: list[Entry] = []
        damage: list[tuple[Path, str]] = []
        for entry, source in cands:
            try:
                path = entry.path if source is None else source.target.local_copy(
                    entry, self.ckdir / f".tmp-fetch-{entry.path.name}-{os.getpid()}")
            except Exception as e:
                self.log(f"checkpoint: cannot fetch {entry.path} ({e}); trying the previous one")
                continue
            manifest, problems = verify_checkpoint(path)
            state = None
            if not problems and manifest.get("kind") == "full":
                try:
                    state = read_state(path)     # a file the safe loader refuses is damage too
                except CheckpointError as e:
                    problems = [str(e)]
            if problems:
                self.log(f"checkpoint: {path} is unusable: {'; '.join(problems)}; falling back to the "
                         "previous checkpoint")
                bad.append(entry)
                damage.append((path, "; ".join(problems)))
                continue
            if manifest.get("kind") != "full":
                light = light or (entry, path, manifest)
                continue
            chosen = (entry, path, manifest, state)
            break
        if chosen is None and light is not None:
            chosen = (*light, {})
            self.log(f"checkpoint: no full checkpoint; {light[1]} has weights only, so the optimizer, data "
                     "position and counters start fresh")
        if chosen is None and damage:
            # Starting fresh would go on to replace (and delete) them: the user decides instead.
            raise CheckpointError(damaged_message(damage, where))
        if chosen is None:
            if spec != "auto":
                raise CheckpointError(f"--resume {spec}: no usable checkpoint there")
            self._tidy(own_dirs, -1, bad)
            self.log(f"checkpoint: nothing to resume in {where}; starting fresh")
            return None

        entry, path, manifest, state = chosen
        step = int(manifest["step"])
        self._load(path, manifest, state)
        if path.name.startswith(".tmp-fetch-"):     # fetched from a remote mirror: keep a local copy
            local = self.ckdir / entry.path.name
            if not local.exists():
                os.rename(path, local)
                path = local
        self._tidy(own_dirs, step, bad, keep=path)
        self._last_saved = (step, manifest["kind"])
        self._last_save_t = self.clock()
        self.resumed_from = path
        self.log(f"checkpoint: resumed from {path} (step {step}, {manifest['kind']}, "
                 f"verified and loaded in {time.perf_counter() - t_resume:.2f}s)")
        return step

    def _explicit(self, p: Path) -> tuple[list, str]:
        if not p.exists():
            raise CheckpointError(f"--resume {p}: no such file or directory")
        if p.is_file():
            p = p.parent
        if (p / MANIFEST).exists() or (p / MODEL_FILE).exists() or (p / STATE_FILE).exists():
            manifest, problems = verify_checkpoint(p)
            if problems:
                raise CheckpointError(f"--resume {p}: {'; '.join(problems)}")
            return [(Entry(int(manifest["step"]), p), None)], str(p)
        ckdir = p / "checkpoints" if (p / "checkpoints").is_dir() else p
        entries = list_checkpoints(ckdir)
        if not entries:
            raise CheckpointError(f"--resume {p}: no checkpoints (step-<N>/ directories) there")
        return [(e, None) for e in entries], str(ckdir)

    def _resume_weights(self, spec: str) -> None:
        """--resume weights:PATH: a new run from those weights only, at step 0. Checkpoints already in
        this run directory are set aside (abandoned-*), not deleted."""
        path, step, model_state = load_weights(spec)
        if self.registry.get("model") is not None:
            self.registry.load_state_dict({"model": model_state}, strict=False)
        else:
            self.model.load_state_dict(model_state)
        self.resume(None)
        self.log(f"checkpoint: NEW RUN from the weights of {path} (its step {step}): optimizer, schedule, "
                 "data position and counters start fresh at step 0")
        return None

    def _load(self, path: Path, manifest: dict, state: dict | None = None) -> None:
        if state is None:
            state = read_state(path) if manifest["kind"] == "full" else {}
        model_state = load_model_state(path, manifest)
        if self.registry.get("model") is not None:
            state["model"] = model_state
        else:
            self.model.load_state_dict(model_state)
        unused = [k for k in state if k not in self.registry.names()]
        try:
            self.resume_missing = self.registry.load_state_dict(state, strict=False)
        except (ValueError, RuntimeError) as e:   # another model's weights, another data stream
            lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
            raise CheckpointError(f"{path} does not belong to this run: {'; '.join(lines[:3])}"
                                  f"{' ...' if len(lines) > 3 else ''}") from None
        if self.resume_missing and manifest["kind"] == "full":
            self.log(f"checkpoint: {path.name} has no state for {', '.join(self.resume_missing)} "
                     "(left as initialised)")
        if unused:
            self.log(f"checkpoint: {path.name} holds state this run does not use: {', '.join(unused)}")

    def _tidy(self, own_dirs: list[Path], step: int, bad: list[Entry], keep: Path | None = None) -> None:
        """In our own directories, set aside the corrupt checkpoints and any past the resumed step (a
        future this resume abandons) so a later --resume auto cannot pick them. Nothing is deleted
        until the next good save."""
        bad_paths = {e.path for e in bad}
        for d in own_dirs:
            for e in list_checkpoints(d):
                if e.path == keep or not (e.path in bad_paths or e.step > step):
                    continue
                dst = set_aside(e, "corrupt" if e.path in bad_paths else "abandoned")
                self.log(f"checkpoint: set {e.path} aside as {dst.name}")
        for p in self.ckdir.glob(".tmp-fetch-*"):
            rmtree(p)

    def wait(self, timeout: float | None = None) -> None:
        """Block until background mirror copies are done."""
        if self.mirror is not None and not self.mirror.wait(timeout):
            self.log(f"checkpoint: the mirror to {self.mirror.where} is still copying")

