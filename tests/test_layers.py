"""The package's layers point one way: engine <- methods <- tasks / train <- app (docs/design.md#layers)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "kvexp"

# Lower layers first; a module may import its own layer and those before it. `files` (atomic writes) and `data` (the
# shipped data and the readers every layer uses) import nothing of kvexp; `tracking` (results files, the W&B run)
# only `files`.
RANK = {"files": 0, "data": 0, "tracking": 0.5, "engine": 1, "budgets": 1, "models": 1, "methods": 2}


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        found[name.removesuffix(".__init__")] = path
    return found


def _runtime_imports(path: Path, top_level_only: bool) -> set[str]:
    """The kvexp modules `path` imports when it runs (`if TYPE_CHECKING:` blocks left out), at module level only
    or anywhere (function-local imports too)."""
    tree = ast.parse(path.read_text())
    nodes, found = list(tree.body), set()
    while nodes:
        node = nodes.pop()
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        if not top_level_only or isinstance(node, ast.If | ast.Try):
            nodes += [n for n in ast.iter_child_nodes(node) if isinstance(n, ast.stmt)]
    modules = _modules()
    resolved = set()
    for name in found:
        while name.startswith("kvexp") and name not in modules:
            name = name.rsplit(".", 1)[0]
        if name in modules:
            resolved.add(name)
    return resolved


def _layer(module: str) -> str:
    return module.split(".")[1] if "." in module else "kvexp"


def test_importing_the_engine_loads_nothing_else_of_kvexp():
    probe = "import sys, kvexp.engine; print(sorted(m for m in sys.modules if m.startswith('kvexp')))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert eval(out) == ["kvexp", "kvexp.engine", "kvexp.engine.attention", "kvexp.engine.cache"]


def test_lower_layers_import_nothing_above_them():
    """files, data <- tracking <- engine, budgets, models <- methods: no import (function-local ones included) reaches up
    to a later layer or into tasks, train or the app."""
    wrong = []
    for module, path in _modules().items():
        layer = _layer(module)
        if layer not in RANK:
            continue
        for imported in _runtime_imports(path, top_level_only=False):
            target = _layer(imported)  # "kvexp": the package itself, which loads its exports lazily
            if target != "kvexp" and RANK.get(target, 99) > RANK[layer]:
                wrong.append(f"{module} -> {imported}")
    assert wrong == []


def test_module_level_imports_have_no_cycles():
    modules = _modules()
    graph = {m: _runtime_imports(p, top_level_only=True) - {m} for m, p in modules.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> list[str] | None:
        state[module] = 1
        for nxt in sorted(graph[module]):
            if state.get(nxt) == 1:
                return [*path, module, nxt]
            if nxt not in state and (cycle := visit(nxt, [*path, module])):
                return cycle
        state[module] = 2
        return None

    cycles = [c for m in sorted(modules) if m not in state and (c := visit(m, []))]
    assert cycles == []


# The app's modules: what runs a config (and the config code itself), above every task and trainer.
APP = (
    "kvexp.app",
    "kvexp.run_dir",
    "kvexp.config",
    "kvexp.callbacks",
    "kvexp.report",
    "kvexp.bench",
    "kvexp.export",
    "kvexp.__main__",
)


def test_tasks_and_trainers_never_import_the_app():
    """A task or a trainer gets what it needs from the config it is given: no import of the app's modules
    (function-local ones included), so the app's registries and helpers never loop back through them."""
    wrong = [
        f"{module} -> {imported}"
        for module, path in _modules().items()
        if _layer(module) in ("tasks", "train")
        for imported in _runtime_imports(path, top_level_only=False)
        if imported in APP
    ]
    assert wrong == []


def test_no_method_imports_another_methods_private_names():
    """Shared machinery lives in support modules (base, scoring, merging, clustering, storage), not behind a
    method's private names (zack used razor_attention's `_fingerprint`)."""
    private = []
    for module, path in _modules().items():
        if _layer(module) != "methods":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("kvexp."):
                private += [f"{module}: {node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
    assert private == []


def test_only_the_engine_changes_budgets_and_compresses():
    """Budgets change through the cache (`KVCache.admit`, `KVCache.reallocate` of a method's `allocate`): no code
    outside the engine writes `layer.budget` or calls a layer's `compress()`."""
    import re

    found = [
        f"{module}:{number}: {line.strip()}"
        for module, path in _modules().items()
        if _layer(module) != "engine"
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if re.search(r"\.budget *[+-]?= |\.compress\(\)", line)
    ]
    assert found == []
