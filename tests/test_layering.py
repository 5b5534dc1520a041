"""Data flows one way: no module imports a layer above its own, and core / kernels never need transformers.

Layers, lowest first: core (0), kernels (1), data (2), hf (3), then training, hyperbolic,
evaluation and serving (4, which do not import each other), then the package entry points ``hf_rbe/__init__``
and the CLI (5).
Every import counts, including the lazy ones inside functions.
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "hf_rbe"
LAYER = {"core": 0, "kernels": 1, "data": 2, "hf": 3, "training": 4, "hyperbolic": 4, "evaluation": 4, "serving": 4,
         "cli": 5, "": 5}
NO_TRANSFORMERS = {"core", "kernels"}


def _modules() -> dict[str, Path]:
    """Dotted name -> file for every module of the package."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).with_suffix("")
        parts = [p for p in rel.parts if p != "__init__"]
        out[".".join(["hf_rbe", *parts])] = path
    return out


def _imports(name: str, path: Path, top_level_only: bool = False) -> set[str]:
    """Absolute names this module imports (``from x import y`` yields x and x.y)."""
    tree = ast.parse(path.read_text())
    is_pkg = path.name == "__init__.py"
    base = name.split(".") if is_pkg else name.split(".")[:-1]
    nodes = tree.body if top_level_only else ast.walk(tree)
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = base[: len(base) - node.level + 1]
                module = ".".join(anchor + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{a.name}" for a in node.names)
    return found


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYER else ""


MODULES = _modules()


def test_the_tree_has_every_layer():
    assert {_layer(m) for m in MODULES} == set(LAYER)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_module_imports_a_higher_layer_or_a_sibling(module):
    own = _layer(module)
    for target in _imports(module, MODULES[module]):
        if target not in MODULES or _layer(target) == own:
            continue
        other = _layer(target)
        assert LAYER[other] < LAYER[own], f"{module} (layer '{own}') imports {target} (layer '{other}')"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if _layer(m) in NO_TRANSFORMERS))
def test_core_and_kernels_do_not_import_transformers(module):
    bad = {t for t in _imports(module, MODULES[module]) if t.split(".")[0] in ("transformers", "peft", "datasets")}
    assert not bad, f"{module} imports {sorted(bad)}"


def test_no_import_cycle():
    graph = {m: {t for t in _imports(m, p, top_level_only=True) if t in MODULES and t != m} for m, p in MODULES.items()}
    # a package's __init__ importing its own submodules is how packages work, not a cycle
    graph = {m: {t for t in ts if not t.startswith(m + ".")} for m, ts in graph.items()}
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for t in graph[m]:
            assert state.get(t) != 1, "import cycle: " + " -> ".join(path[path.index(t):] + [t] if t in path else path + [t])
            if t not in state:
                visit(t, path + [t])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [m])


def test_importing_core_and_kernels_leaves_transformers_out():
    code = ("import sys; import hf_rbe.core, hf_rbe.kernels.dispatch, hf_rbe.kernels.triton_v1;"
            "import torch; torch.nn.Linear(8, 8);"
            "bad = [m for m in ('transformers', 'peft', 'datasets') if m in sys.modules];"
            "assert not bad, bad; print('clean')")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "clean" in res.stdout, res.stderr[-2000:]
