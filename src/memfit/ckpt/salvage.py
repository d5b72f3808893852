"""Damaged checkpoints: reading state.pt safely, telling intact weights from damaged state, and the
weights-only restart (`--resume weights:PATH`).

A state.pt that the safe loader (`torch.load(weights_only=True)`) refuses is damage like a wrong
sha256: the checkpoint is unusable and the resume falls back to the previous one. torch's own message
for that case recommends `weights_only=False`, which would run whatever code the file carries, so it is
never passed on: memfit's message names the file and the kind of failure only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from memfit.ckpt.formats import CheckpointError, load_state_file, sha256_file
from memfit.ckpt.io import MANIFEST, MODEL_FILE, STATE_FILE, load_model_state, read_manifest

WEIGHTS_PREFIX = "weights:"


def read_state(path: Path) -> dict[str, Any]:
    """state.pt through the safe loader; any failure is a CheckpointError that suggests nothing unsafe."""
    try:
        return load_state_file(path / STATE_FILE)
    except Exception as e:  # noqa: BLE001  (pickle, zip and torch errors alike: the file is unusable)
        raise CheckpointError(f"{STATE_FILE} cannot be read by the safe loader ({type(e).__name__}: it is "
                              "damaged or holds objects other than tensors and plain values; it is not "
                              "loaded)") from None


def weight_problems(path: Path) -> tuple[dict | None, list[str]]:
    """(manifest, problems) of the model files only: size and sha256 against the manifest."""
    try:
        m = read_manifest(path)
    except CheckpointError as e:
        return None, [str(e)]
    problems = []
    for name in m.get("model_files", [MODEL_FILE]):
        info = m["files"].get(name)
        p = path / name
        if info is None or not p.exists():
            problems.append(f"{name} is missing")
            continue
        size, digest = sha256_file(p)
        if size != info["bytes"] or digest != info["sha256"]:
            problems.append(f"{name} does not match the manifest")
    return m, problems


def damaged_message(bad: list[tuple[Path, str]], where: str) -> str:
    """Exit-2 text when no checkpoint in `where` can be resumed but some were there: what is damaged,
    and the weights-only restart for those whose weights are intact."""
    lines = [f"no checkpoint in {where} can be resumed, and memfit will not silently start over (that "
             "would replace them): " + "; ".join(f"{p} is unusable ({why})" for p, why in bad)]
    intact = [p for p, _ in bad if not weight_problems(p)[1]]      # `bad` is newest first
    if intact:
        lines.append(f"the weights of {intact[0]} are intact: start a new run from them (fresh optimizer, "
                     f"schedule and data position, step 0) with --resume {WEIGHTS_PREFIX}{intact[0]}")
    else:
        lines.append("no intact weights either: restore the checkpoints from a copy (e.g. --mirror-to), or "
                     "start a new run in another --output-dir")
    return "; ".join(lines)


def weights_path_problem(spec: str) -> str | None:
    """Pre-flight check of --resume weights:PATH (exit 2 before anything is written)."""
    p = Path(spec[len(WEIGHTS_PREFIX):]).expanduser()
    if not (p / MANIFEST).exists():
        return (f"--resume {spec}: {p} is not a checkpoint directory (a checkpoints/step-<N> or best/ "
                "folder with manifest.json)")
    _, problems = weight_problems(p)
    if problems:
        return f"--resume {spec}: the weights there are damaged ({'; '.join(problems)})"
    return None


def verified_weights(path: Path) -> tuple[int, dict[str, Any]]:
    """(step, model state) of the checkpoint at `path` (step-<N>/ or best/; one file or shards), every
    model file checked against the manifest first; CheckpointError naming the damaged files."""
    m, problems = weight_problems(path)
    if problems or m is None:
        raise CheckpointError("; ".join(problems))
    return int(m.get("step", 0)), load_model_state(path, m)


def load_weights(spec: str) -> tuple[Path, int, dict[str, Any]]:
    """(path, its step, the model state) of --resume weights:PATH, its weights verified first."""
    p = Path(spec[len(WEIGHTS_PREFIX):]).expanduser()
    try:
        step, state = verified_weights(p)
    except CheckpointError as e:
        raise CheckpointError(f"--resume {spec}: {e}") from None
    return p, step, state
