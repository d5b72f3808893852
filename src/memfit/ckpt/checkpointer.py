"""The checkpointer: when to save, where, what to keep, and how to come back.

    run_dir/checkpoints/step-<N>/   model.safetensors (or shards + index), state.pt (full only),
                                    manifest.json
    run_dir/checkpoints/latest      name of the newest finished checkpoint (updated last)
    run_dir/best/                   the best evaluation's model (weights, config, tokenizer) + metrics.json
                                    (never rotated)
Every checkpoint also holds config.json and the tokenizer files, so each loads with from_pretrained.

A save writes into `.tmp-step-<N>-<pid>/` tensor by tensor (sha256 and byte count taken on the way out),
fsyncs, verifies the files against the manifest, renames the directory into place, then moves `latest`.
A kill at any moment leaves the previous checkpoints untouched; the next start removes the leftovers.

`state.pt` holds every registry part except `model` (optimizer, scheduler, scaler, rng, data, loop, oom,
deadline, history, this checkpointer's best/patience counters) as plain types and tensors, so it loads
with `torch.load(weights_only=True)` and no code is ever unpickled.

Keep-K (memfit.ckpt.policy): the `keep_last` newest members stay (0: best/ only once the run finishes);
with --save-optimizer-state auto only the two newest keep their state.pt (a corrupt newest still leaves
an exact resume), older ones become weights-only. The disk budget: memfit.ckpt.room; choosing and
loading the checkpoint to resume from: memfit.ckpt.resume; best/ and early stopping: memfit.ckpt.best.
"""

from __future__ import annotations

import errno
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from memfit.atomic import DELETING, recover, remove_dir, rmtree, swap_in
from memfit.ckpt import resume
from memfit.ckpt.best import BestTracker
from memfit.ckpt.formats import BudgetExceeded, CheckpointError, split_tensors, tensor_stats
from memfit.ckpt.io import KillSwitch, dir_bytes, verify_checkpoint, write_checkpoint_dir
from memfit.ckpt.mirror import Mirror
from memfit.ckpt.policy import (
    ASIDE_RE,
    clean_stale,
    list_checkpoints,
    rotate,
    set_aside,
    set_aside_dirs,
    write_latest,
)
from memfit.ckpt.room import Room
from memfit.ckpt.salvage import WEIGHTS_PREFIX, damaged_message, load_weights
from memfit.ckpt.space import fmt_bytes, full_checkpoint_estimate
from memfit.ckpt.state import StateRegistry
from memfit.config import Config, ConfigError
from memfit.runfiles import record

__all__ = ["DEFAULT_SAVE_EVERY_MINUTES", "Checkpointer"]

DEFAULT_SAVE_EVERY_MINUTES = 30.0    # when neither --save-every nor --save-every-minutes is given


def _tokenizer_files(tokenizer: Any) -> dict[str, bytes]:
    """The files tokenizer.save_pretrained writes, as bytes (written once, copied into each checkpoint)."""
    if tokenizer is None or not hasattr(tokenizer, "save_pretrained"):
        return {}
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        tokenizer.save_pretrained(d)
        return {p.name: p.read_bytes() for p in sorted(Path(d).iterdir()) if p.is_file()}


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
        self.max_shard_bytes = 2 << 30        # model files above this are split (HF index format)
        self.verify_hashes = True             # re-read and hash every file before the rename

        record(self.run_dir, "checkpoints")
        self.ckdir.mkdir(parents=True, exist_ok=True)
        clean_stale(self.ckdir, log)
        self._clean_best_leftovers()

        self.tracker = BestTracker(c.metric_for_best, c.greater_is_better, c.early_stopping_patience)
        if registry.get("checkpointer") is None:
            registry.register("checkpointer", self.tracker)
        self._kill = KillSwitch(self.run_dir)
        self.mirror = Mirror(c.mirror_to, self.keep_last, c.save_optimizer_state, log) if c.mirror_to else None

        self._last_saved: tuple[int, str] | None = None
        self._last_save_t = self.clock()
        self.room = Room(self.run_dir, self.ckdir, cfg.budget.disk_budget,
                         lambda: self._full_estimate(cfg.optim.optimizer), self.mirror, log)
        self.no_room: str | None = None        # why the last save found no room (the loop stops on it)
        problem = self.room.capacity_problem()
        if problem:     # exit 2 before training: a run that can never save would lose all its work
            raise ConfigError([problem])
        self.last_save_seconds: float | None = None
        self.last_save_bytes: int | None = None
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
        need = self.room.predict(kind, model_state, other)
        if not self.room.make_room(need, f"checkpoint step-{step} ({kind})"):
            self._last_save_t = self.clock()     # do not retry at every step
            self.no_room = self.room.text(need)
            return None

        tmp = self.ckdir / f".tmp-step-{step}-{os.getpid()}"
        rmtree(tmp)
        self._kill.count += 1
        budget = self.room.guard(f"checkpoint step-{step}", kind)
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
                self.no_room = self.room.text(need)
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
        self.room.sizes[kind] = dir_bytes(final)
        for p in set_aside_dirs(self.ckdir):      # a good save makes the set-aside future obsolete
            m = ASIDE_RE.match(p.name)
            if m and m.group(1) == "corrupt" and int(m.group(2)) > step:
                continue      # a damaged checkpoint stays until a good one of its step or later exists
            self.log(f"checkpoint: deleting {p.name} (superseded by step-{step})")
            remove_dir(p)
        rotate(self.ckdir, self.keep_last, self.mode, self.room.busy, self.log,
               midway=lambda p: self._kill.midway_delete(step, p))
        if self.mirror is not None:
            self.mirror.submit(final)
        self.last_save_seconds = time.perf_counter() - t0
        self.last_save_bytes = manifest["total_bytes"]
        self.log(f"checkpoint: saved {final.name} ({kind}, {fmt_bytes(manifest['total_bytes'])}, "
                 f"{self.last_save_seconds:.2f}s)")
        self._kill.maybe_kill("saved", step, final)
        return final

    # ------------------------------------------------------------------ best / early stopping
    def update_best(self, step: int, metrics: dict) -> bool:
        value = self.tracker.judge(step, metrics, self.log)
        if value is None:
            return False
        self._write_best(step, value, metrics)
        return True

    def should_stop_early(self) -> bool:
        return self.tracker.should_stop()

    def _write_best(self, step: int, value: float, metrics: dict) -> None:
        part = self.registry.get("model")
        weights = part.state_dict() if part is not None else self.model.state_dict()
        info = {"step": step, "metric": self.metric, "value": value, "greater_is_better": self.tracker.greater,
                "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float, str))}}
        files = {"metrics.json": json.dumps(info, indent=1, default=float).encode(), **self.model_files()}
        need = self.room.predict("best", weights, None) + sum(len(v) for v in files.values())
        if not self.room.make_room(need, "best/"):
            self.log(f"checkpoint: best/ not updated for step {step} ({self.metric}={value:.4g}): no room")
            return
        record(self.run_dir, "best")
        tmp = self.run_dir / f".tmp-best-{os.getpid()}"
        rmtree(tmp)
        try:
            write_checkpoint_dir(tmp, step=step, kind="light", model_state=weights, other_state=None,
                                 budget=self.room.guard("best/", "best"),
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
        self.room.sizes["best"] = dir_bytes(self.best_dir)
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
            if not self.room.busy(e.path):
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

    # ------------------------------------------------------------------ disk budget (memfit.ckpt.room)
    def room_text(self, need: int) -> str:
        """Why `need` more bytes do not fit: the disk (named, with its free space) or the budget."""
        return self.room.text(need)

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
        return self.room.make_room(need, what)

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
        cands, own_dirs, where = resume.candidates(self.ckdir, self.mirror, spec)
        chosen, bad, damage = resume.choose(cands, self.ckdir, self.log)
        if chosen is None and damage:
            # Starting fresh would go on to replace (and delete) them: the user decides instead.
            raise CheckpointError(damaged_message(damage, where))
        if chosen is None:
            if spec != "auto":
                raise CheckpointError(f"--resume {spec}: no usable checkpoint there")
            resume.tidy(own_dirs, self.ckdir, -1, bad, self.log)
            self.log(f"checkpoint: nothing to resume in {where}; starting fresh")
            return None

        entry, path, manifest, state = chosen
        step = int(manifest["step"])
        self.resume_missing = resume.load_into(self.registry, self.model, path, manifest, state, self.log)
        if path.name.startswith(".tmp-fetch-"):     # fetched from a remote mirror: keep a local copy
            local = self.ckdir / entry.path.name
            if not local.exists():
                os.rename(path, local)
                path = local
        resume.tidy(own_dirs, self.ckdir, step, bad, self.log, keep=path)
        self._last_saved = (step, manifest["kind"])
        self._last_save_t = self.clock()
        self.resumed_from = path
        self.log(f"checkpoint: resumed from {path} (step {step}, {manifest['kind']}, "
                 f"verified and loaded in {time.perf_counter() - t_resume:.2f}s)")
        return step

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

    def wait(self, timeout: float | None = None) -> None:
        """Block until background mirror copies are done."""
        if self.mirror is not None and not self.mirror.wait(timeout):
            self.log(f"checkpoint: the mirror to {self.mirror.where} is still copying")

