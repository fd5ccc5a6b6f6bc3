"""The layers of lineguard, checked on the source: who may import whom, and no cycles.

- ``lineguard.engines`` (the model and how it executes) imports neither ``offline`` nor
  ``stream``; its benchmarks (``engines.bench``) are imported by nothing in the model package.
- ``lineguard.offline`` (training, once per product) never imports ``stream``.
- The line — ``lineguard.stream`` without ``tools`` and ``cli`` — imports no tool, no CLI, no
  training code and no benchmark: a worker on a plant PC runs without any of them.
- The tools (``stream.tools``) and the CLI sit on top and may import everything below.

Every import counts, including those inside functions (which the code uses to keep start-up
light): a lazy import is still a dependency. A runtime check confirms that starting a worker
loads none of the forbidden modules.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("engines", "offline", "stream")


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return "lineguard." + ".".join(parts)


def _typing_only(tree: ast.Module) -> set[ast.AST]:
    """Import statements under ``if TYPE_CHECKING:``: annotations only, never executed."""
    nodes: set[ast.AST] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            nodes.update(n for stmt in node.body for n in ast.walk(stmt))
    return nodes


def _imports(path: Path, *, typing: bool = True) -> set[str]:
    """Every ``lineguard`` module that ``path`` imports, at any depth of its code (with or
    without the imports that only type annotations use)."""
    found: set[str] = set()
    tree = ast.parse(path.read_text(), str(path))
    skip = set() if typing else _typing_only(tree)
    for node in ast.walk(tree):
        if node in skip:
            continue
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("lineguard."))
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.level:
                raise AssertionError(f"{path}: relative import; use lineguard.… names")
            if node.module.startswith("lineguard."):
                # ``from package import submodule`` depends on the submodule (the package is
                # already loading when its own __init__ does this), a name on the module
                subs = {f"{node.module}.{a.name}" for a in node.names} & MODULES
                found.update(subs or {node.module})
    return found


MODULES = {_module_name(p) for folder in FOLDERS for p in (ROOT / folder).rglob("*.py")}


def _graph(*, typing: bool = True) -> dict[str, set[str]]:
    return {
        _module_name(p): _imports(p, typing=typing)
        for folder in FOLDERS
        for p in sorted((ROOT / folder).rglob("*.py"))
    }


GRAPH = _graph()
RUNTIME_GRAPH = _graph(typing=False)  # what executes: a TYPE_CHECKING import cannot cycle


def _inside(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def _layer(module: str) -> str:
    for name in ("engines.bench", "stream.tools", "stream.cli", "engines", "offline", "stream"):
        if _inside(module, "lineguard." + name):
            return name
    raise AssertionError(f"{module} is in no layer")


# what each layer may not import (by package prefix)
FORBIDDEN = {
    "engines": ("offline", "stream", "engines.bench"),
    "engines.bench": ("offline", "stream"),
    "offline": ("stream", "engines.bench"),
    "stream": ("offline", "stream.tools", "stream.cli", "engines.bench"),
    "stream.tools": ("stream.cli",),
    "stream.cli": (),
}


def test_the_graph_covers_the_packages() -> None:
    assert "lineguard.stream.infer" in GRAPH and "lineguard.engines.model" in GRAPH
    assert "lineguard.stream.tools.demo" in GRAPH and "lineguard.stream.cli" in GRAPH
    # imports point at modules that exist (a stale name after a move fails here, not in a user's
    # terminal); ``from pkg import module`` names the package, which is in the graph too
    missing = {dep for deps in GRAPH.values() for dep in deps if dep not in GRAPH}
    assert not missing, f"imports of modules that do not exist: {sorted(missing)}"


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layer_imports_only_what_it_may(layer: str) -> None:
    bad = sorted(
        f"{module} imports {dep}"
        for module, deps in GRAPH.items()
        if _layer(module) == layer
        for dep in deps
        if any(_inside(dep, "lineguard." + f) for f in FORBIDDEN[layer])
    )
    assert not bad, "layer rule broken:\n" + "\n".join(bad)


def test_no_import_cycles() -> None:
    """Depth-first search over the whole graph; a cycle is reported as its modules in order.

    ``from lineguard.stream.protocol import X`` depends on the package ``__init__``, which in
    turn imports its submodules; a submodule importing its own package facade is the classic
    way to make a cycle, and it is caught here too. Imports under ``TYPE_CHECKING`` are left out:
    they never execute.
    """
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(RUNTIME_GRAPH.get(node, ())):
            if state.get(dep) == 1:
                cycle = [*stack[stack.index(dep) :], dep]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep)
        stack.pop()
        state[node] = 2

    for module in sorted(RUNTIME_GRAPH):
        if module not in state:
            visit(module)


def test_starting_the_line_loads_no_tool_training_or_benchmark_code() -> None:
    """What a worker process really loads (the static rules above also cover lazy imports)."""
    code = (
        "import sys\n"
        "import lineguard.stream.infer, lineguard.stream.decide, lineguard.stream.ingest\n"
        "import lineguard.stream.run, lineguard.stream.dashboard\n"
        "bad = sorted(m for m in sys.modules if m.startswith(('lineguard.offline',\n"
        "    'lineguard.stream.tools', 'lineguard.stream.cli', 'lineguard.engines.bench',\n"
        "    'lightning', 'pytorch_lightning', 'tensorboard', 'sklearn')))\n"
        "print(','.join(bad)); sys.exit(1 if bad else 0)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd="/", capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, f"the line loaded {proc.stdout} {proc.stderr}"
