"""examples/kaggle_t4.ipynb runs top to bottom in a real Jupyter kernel (nbclient + ipykernel) and shows what a
user needs to see: the plan, the time-limit stop, the resume from the checkpointed step, generated text, a
LoRA adapter merged into a folder stock transformers loads. examples/kaggle_t4.py is its plain-script twin:
the same memfit commands in the same order (checked without running it; running both would double ~3 min).
"""

import ast
import json
import re
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
NOTEBOOK, SCRIPT = EXAMPLES / "kaggle_t4.ipynb", EXAMPLES / "kaggle_t4.py"


def notebook_commands() -> list[str]:
    nb = json.loads(NOTEBOOK.read_text())
    return [line[1:].strip() for c in nb["cells"] if c["cell_type"] == "code"
            for line in "".join(c["source"]).splitlines() if line.startswith("!")]


def script_commands() -> list[str]:
    """The sh(...) calls of the twin, with f-string fields written as IPython's {expr} expansion."""
    out = []
    for node in ast.walk(ast.parse(SCRIPT.read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "sh":
            arg = node.args[0]
            parts = arg.values if isinstance(arg, ast.JoinedStr) else [arg]
            out.append((node.lineno, "".join(p.value if isinstance(p, ast.Constant) else "{" + ast.unparse(p.value) + "}"
                                               for p in parts)))
    return [cmd for _, cmd in sorted(out)]


def test_script_twin_runs_the_same_commands():
    nb, py = notebook_commands(), script_commands()
    assert nb and [c.split()[:2] for c in nb] == [c.split()[:2] for c in py]
    assert nb == py


def cell_text(cell) -> str:
    return "".join(o.get("text", "") + "".join(o.get("data", {}).get("text/plain", ""))
                   for o in cell.get("outputs", []))


@pytest.mark.slow
def test_notebook_runs_top_to_bottom(tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager
    from transformers import AutoModelForCausalLM

    # A kernel spec for this very Python (the venv setup.sh made), whatever kernels the user has installed.
    spec = tmp_path / "kernels" / "memfit-test"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "memfit test", "language": "python"}))
    km = KernelManager(kernel_name="memfit-test",
                       kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(tmp_path / "kernels")]))
    work = tmp_path / "work"
    work.mkdir()
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(nb, km=km, timeout=900, resources={"metadata": {"path": str(work)}}).execute()
    out = {i: cell_text(c) for i, c in enumerate(nb.cells) if c.cell_type == "code"}
    by_cmd = {}
    for i, text in out.items():
        src = nb.cells[i].source
        key = re.search(r"!memfit (\w+)", src)
        by_cmd.setdefault(key.group(1) if key else f"py{i}", []).append(text)

    assert "platform" in by_cmd["doctor"][0] and "precision" in by_cmd["doctor"][0]
    plan_cli = by_cmd["plan"][0]
    assert "memfit plan — from scratch: gpt2" in plan_cli and "FITS:" in plan_cli
    assert any("fits: True | nvidia-smi on the T4:" in t for t in out.values())         # the Python API cell

    first, resumed = by_cmd["train"]
    assert re.search(r"^plan \(this machine's CPU.*\): FITS", first, re.MULTILINE)              # the run's plan block
    assert "sessions:" in first
    stop = re.search(r"stopped at step (\d+)/2000: the time limit is near", first)
    assert stop, first[-2000:]
    n = int(stop.group(1))
    assert "--time-limit 45s --output-dir runs/tiny --resume auto" in first            # the resume command
    assert f"checkpointed at step {n}" in resumed
    assert f"resumed at step {n} " in resumed and f"checkpoints/step-{n}" in resumed
    assert f"training stops at step {n + 40}" in resumed and "final model: runs/tiny/final_model" in resumed

    gen = by_cmd["generate"][0]
    text = re.search(r"^ROMEO:(.*)", gen, re.MULTILINE | re.DOTALL)
    assert text and text.group(1).strip(), gen                                             # generated text
    assert any("fit: finished step 16" in t for t in out.values())
    assert "adapter: runs/sft/final_model" in by_cmd["finetune"][0]
    assert "merged model written to runs/sft/merged" in by_cmd["merge"][0]
    assert re.search(r"runs/tiny\s+pretrain\s+finished", by_cmd["runs"][0])

    merged = AutoModelForCausalLM.from_pretrained(work / "runs" / "sft" / "merged")   # stock transformers
    assert type(merged).__name__ == "LlamaForCausalLM"
    assert sum(p.numel() for p in merged.parameters()) == 134_515_008
