"""The module map holds: no import cycles, no import the layer table does not allow, no file over 400 lines.

Every import in src/memfit counts — module level, inside functions, under TYPE_CHECKING, relative ones and
`importlib.import_module("memfit...")` with a literal name — because a function-level import that climbs a
layer is the same dependency as a top-level one, only hidden. The table is written once here and shown in
docs/ARCHITECTURE.md; a test checks the two agree.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
DOC = ROOT / "docs" / "ARCHITECTURE.md"
MAX_LINES = 400

# Layers, lowest first. A component is a top-level module or a package of src/memfit; ckpt.state (the
# checkpoint contract: StateRegistry, RNG, seeding) sits at layer 1 although it lives in ckpt/, because the
# loop, the jobs and memfit.fit register their parts with it without needing the Checkpointer.
LAYERS: dict[int, tuple[str, ...]] = {
    0: ("atomic",),   # file-system primitives (fsync, atomic writes, the one folder swap): import no memfit
    1: ("config", "device", "memtrack", "hardware", "precision", "runfiles", "run_length", "ckpt.state",
        "console"),
    2: ("data", "models", "ckpt", "metrics", "plots", "dist"),
    3: ("train", "plan"),
    4: ("jobs", "api", "export"),
    5: ("cli", "memfit"),   # memfit: the package's __init__ (`memfit.fit`, imported on first use)
}
# A module may import its own component and any lower layer. Between two components of the same layer only
# these edges are allowed (train and plan never import each other: only jobs/ wires plan -> train).
SAME_LAYER: dict[tuple[str, str], str] = {
    ("precision", "device"): "the precision policy asks the device whether bf16 is native",
    ("metrics", "plots"): "the history writer redraws plots/training.png",
    ("jobs", "export"): "a finished job writes final_model/ through the one exporter",
    ("api", "jobs"): "memfit.fit starts its run with the jobs' run start (one run start)",
    ("api", "export"): "memfit.fit writes final_model/ through the one exporter",
}

# ---------------------------------------------------------------------------------------------- the parser
def module_name(path: Path, src: Path) -> str:
    parts = list(path.relative_to(src).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def import_edges(src: Path, top: str = "memfit") -> dict[str, dict[str, int]]:
    """{module: {imported module: first line}} for every module under src/top. `from pkg import name` is an
    edge to pkg.name when that is a module, else to pkg (its __init__); an import of a name that is not a
    module resolves to the nearest enclosing module."""
    files = {module_name(p, src): p for p in sorted((src / top).rglob("*.py"))}
    edges: dict[str, dict[str, int]] = {}
    for mod, path in files.items():
        package = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
        found: dict[str, int] = {}
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package[: len(package) - (node.level - 1)]
                    frm = ".".join(base + ([node.module] if node.module else []))
                else:
                    frm = node.module or ""
                targets = [f"{frm}.{a.name}" if f"{frm}.{a.name}" in files else frm for a in node.names]
            elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None))
                  == "import_module" and node.args and isinstance(node.args[0], ast.Constant)
                  and isinstance(node.args[0].value, str)):
                targets = [node.args[0].value]
            for t in targets:
                if t != top and not t.startswith(top + "."):
                    continue
                while t not in files:
                    t = t.rsplit(".", 1)[0]
                if t != mod:
                    found.setdefault(t, node.lineno)
        edges[mod] = found
    return edges


def find_cycles(edges: dict[str, dict[str, int]]) -> list[str]:
    """The strongly connected components with more than one module (Tarjan), each as one cycle through it."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    comps: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return [_one_cycle(c, edges) for c in sorted(comps)]


def _one_cycle(comp: list[str], edges: dict[str, dict[str, int]]) -> str:
    """A shortest cycle from the component's first module back to itself (breadth-first inside it), with
    the rest of the component named when it is larger than that cycle."""
    start, inside = comp[0], set(comp)
    prev: dict[str, str] = {start: ""}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in edges[v]:
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(prev[path[-1]])
                    cycle = path[::-1] + [start]
                    rest = sorted(inside - set(cycle))
                    return " -> ".join(cycle) + (f"  (same circle: {', '.join(rest)})" if rest else "")
                if w in inside and w not in prev:
                    prev[w] = v
                    nxt.append(w)
        frontier = nxt
    return ", ".join(comp)


def component(mod: str, layers: dict[int, tuple[str, ...]], top: str = "memfit") -> str:
    """The longest table entry that `mod` is or lies inside (memfit.ckpt.state -> ckpt.state)."""
    rel = mod[len(top) + 1:] if mod != top else top
    names = {n for group in layers.values() for n in group}
    parts = rel.split(".")
    for k in range(len(parts), 0, -1):
        if ".".join(parts[:k]) in names:
            return ".".join(parts[:k])
    raise KeyError(f"{mod} is in no layer of the table: add it to LAYERS and docs/ARCHITECTURE.md")


def layer_violations(edges, layers=LAYERS, same_layer=SAME_LAYER, top="memfit") -> list[str]:
    layer_of = {n: k for k, group in layers.items() for n in group}
    out = []
    for mod, targets in sorted(edges.items()):
        a = component(mod, layers, top)
        for t, line in sorted(targets.items()):
            b = component(t, layers, top)
            if a == b or layer_of[b] < layer_of[a] or (a, b) in same_layer:
                continue
            how = "up a layer" if layer_of[b] > layer_of[a] else "across layer"
            out.append(f"{mod}:{line} -> {t}  ({a} L{layer_of[a]} -> {b} L{layer_of[b]}, {how})")
    return out


def long_files(src: Path, top: str = "memfit", limit: int = MAX_LINES) -> list[str]:
    counts = {p: len(p.read_text().splitlines()) for p in sorted((src / top).rglob("*.py"))}
    return [f"{p.relative_to(src)}: {n} lines" for p, n in counts.items() if n > limit]


def _check(problems: list[str], what: str) -> None:
    assert not problems, f"{len(problems)} {what}:\n  " + "\n  ".join(problems)


# ------------------------------------------------------------------------------------------ the real tree
def test_no_import_cycles():
    cycles = find_cycles(import_edges(SRC))
    _check(cycles, "import cycles")


def test_imports_follow_the_layer_table():
    _check(layer_violations(import_edges(SRC)), "imports the layer table does not allow")


def test_no_file_over_400_lines():
    _check(long_files(SRC), f"files over {MAX_LINES} lines")


def test_every_module_is_in_the_table():
    for mod in import_edges(SRC):
        component(mod, LAYERS)          # raises for a module no layer names


def test_table_has_no_cycle_and_keeps_plan_and_train_apart():
    layer_of = {n: k for k, group in LAYERS.items() for n in group}
    assert len(layer_of) == sum(len(g) for g in LAYERS.values()), "a component is in two layers"
    for a, b in SAME_LAYER:
        assert layer_of[a] == layer_of[b], f"{a} -> {b} is not a same-layer edge"
    assert find_cycles({a: {b: 0 for (x, b) in SAME_LAYER if x == a} for a in layer_of}) == []
    assert ("train", "plan") not in SAME_LAYER and ("plan", "train") not in SAME_LAYER


def _doc_tables(text: str) -> tuple[dict[int, tuple[str, ...]], set[tuple[str, str]]]:
    """The '## Layers' section's two tables: `| N | a, b, c |` rows and `| a -> b | why |` rows."""
    section = text.split("\n## Layers", 1)[1].split("\n## ", 1)[0]
    layers, same = {}, set()
    for row in re.findall(r"^\|(.+)\|\s*$", section, re.MULTILINE):
        cells = [c.strip().strip("`") for c in row.split("|")]
        if cells[0].isdigit():
            layers[int(cells[0])] = tuple(n.strip().strip("`") for n in cells[1].split(","))
        elif m := re.fullmatch(r"`?([\w.]+)`?\s*->\s*`?([\w.]+)`?", cells[0]):
            same.add((m[1], m[2]))
    return layers, same


def test_docs_show_the_same_table():
    layers, same = _doc_tables(DOC.read_text())
    assert layers == LAYERS, "docs/ARCHITECTURE.md '## Layers' differs from LAYERS in this test"
    assert same == set(SAME_LAYER), "docs/ARCHITECTURE.md's same-layer edges differ from SAME_LAYER"


def test_docs_module_map_names_every_module():
    """docs/ARCHITECTURE.md's '## Module map' has one line per module of src/memfit (packages' __init__ aside)."""
    section = DOC.read_text().split("\n## Module map", 1)[1].split("\n## ", 1)[0]
    listed = re.findall(r"^([\w/]+\.py)\s", section, re.MULTILINE)
    modules = sorted(str(p.relative_to(SRC / "memfit")) for p in (SRC / "memfit").rglob("*.py")
                     if p.name != "__init__.py")
    assert len(listed) == len(set(listed)), "a module is listed twice"
    assert sorted(listed) == modules, (f"not in the map: {sorted(set(modules) - set(listed))}; "
                                       f"in the map but gone: {sorted(set(listed) - set(modules))}")


# ------------------------------------------------------------------ the checker finds what it must find
def _write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        p = root / "src" / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return root / "src"


def test_checker_sees_function_level_relative_and_cycles(tmp_path):
    src = _write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/low.py": "def f():\n    from pkg.high import g\n",          # up a layer, inside a function
        "pkg/high.py": "from . import low\nfrom .mid import x\n",           # relative imports
        "pkg/mid/__init__.py": "from .. import high\n",                    # ..: a cycle high -> mid -> high
        "pkg/side.py": "import importlib\nimportlib.import_module('pkg.low')\n",
        "pkg/other.py": "import pkg.side\n",
    })
    edges = import_edges(src, "pkg")
    assert edges["pkg.low"] == {"pkg.high": 2}
    assert set(edges["pkg.high"]) == {"pkg.low", "pkg.mid"}
    assert edges["pkg.mid"] == {"pkg.high": 1}
    assert edges["pkg.side"] == {"pkg.low": 2}
    assert find_cycles(edges) == ["pkg.high -> pkg.low -> pkg.high  (same circle: pkg.mid)"]
    layers = {1: ("low", "mid"), 2: ("high", "side"), 3: ("other", "pkg")}
    bad = layer_violations(edges, layers, {("other", "pkg")}, "pkg")
    assert bad == ["pkg.low:2 -> pkg.high  (low L1 -> high L2, up a layer)",
                   "pkg.mid:1 -> pkg.high  (mid L1 -> high L2, up a layer)"]
    assert layer_violations(edges, {1: ("low", "mid", "high"), 2: ("side", "other", "pkg")}, {}, "pkg") \
        == ["pkg.high:1 -> pkg.low  (high L1 -> low L1, across layer)",
            "pkg.high:2 -> pkg.mid  (high L1 -> mid L1, across layer)",
            "pkg.low:2 -> pkg.high  (low L1 -> high L1, across layer)",
            "pkg.mid:1 -> pkg.high  (mid L1 -> high L1, across layer)",
            "pkg.other:1 -> pkg.side  (other L2 -> side L2, across layer)"]
    (src / "pkg" / "big.py").write_text("x = 1\n" * 401)
    assert long_files(src, "pkg") == ["pkg/big.py: 401 lines"]
