"""The layout of ``core/``: shared machinery below, one folder per research system above it, entry points on top.

Every import inside the package counts, also those inside functions: no module imports one of a higher layer, and
no modules import one another in a circle. A registry discovering its built-in entries by module name
(``importlib.import_module`` of a module named in ``registry.BUILTIN_MODULES``, stages included) is the one way a lower
layer reaches a higher one, and it is not an import statement.
"""

from __future__ import annotations

import ast
import importlib

from tests.conftest import REPO

CORE = REPO / "core"

# Layers from the bottom up; a module's layer is that of the longest prefix listed. Modules of one layer may import
# one another (without a circle); imports go down, never up.
LAYERS = [
    ("errors", "dist", "files", "seeds"),
    ("registry", "config", "loggers", "dataset_info"),  # dataset_info: what a dataset provides, the models' input
    ("data", "models", "run", "plots"),  # plots: the figure primitives every stage draws with
    ("steps", "train"),
    ("stages",),
    ("compare", "subnetworks", "align"),
    ("guidance", "stitching"),
    ("api", "cli", "sweep", "reproduce", "report", "layers", "migrate"),
]
SYSTEMS = ("subnetworks", "guidance", "compare", "stitching", "align")


def _modules() -> dict[str, ast.Module]:
    found = {}
    for path in sorted(CORE.rglob("*.py")):
        parts = list(path.relative_to(CORE).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = ast.parse(path.read_text())
    return found


def _is_package(module: str) -> bool:
    return (CORE / module.replace(".", "/") / "__init__.py").exists() if module else True


def _imports(module: str, tree: ast.Module, known: set[str]) -> set[str]:
    """Modules of the package that ``module`` imports anywhere in its code (relative or as ``instill.X``)."""
    package = module.split(".") if _is_package(module) else module.split(".")[:-1]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - (node.level - 1)] if node.level > 1 else package
                target = ".".join(base + ([node.module] if node.module else []))
            elif node.module and (node.module == "instill" or node.module.startswith("instill.")):
                target = node.module.removeprefix("instill").lstrip(".")
            else:
                continue
            for alias in node.names:  # `from . import dist` imports the module dist
                sub = f"{target}.{alias.name}".strip(".")
                out.add(sub if sub in known else target)
        elif isinstance(node, ast.Import):
            out |= {a.name.removeprefix("instill.") for a in node.names if a.name.startswith("instill.")}
    return {m for m in out if m in known and m != module and m != ""}


def _layer(module: str) -> int:
    best = None
    for rank, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if module == prefix or module.startswith(prefix + "."):
                if best is None or len(prefix) > best[1]:
                    best = (rank, len(prefix))
    assert best is not None, f"core/{module.replace('.', '/')}.py belongs to no layer of tests/test_layout.py"
    return best[0]


def _graph() -> dict[str, set[str]]:
    trees = _modules()
    known = set(trees)
    return {m: _imports(m, t, known) for m, t in trees.items() if m}


def test_no_module_imports_from_a_layer_above_it():
    upward = sorted(f"{m} -> {d}" for m, deps in _graph().items() for d in deps if _layer(d) > _layer(m))
    assert upward == []


def test_no_modules_import_one_another_in_a_circle():
    graph = _graph()
    index, low, stack, on_stack, circles, counter = {}, {}, [], set(), [], [0]

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert circles == []


def test_each_system_keeps_its_stage_and_its_api_in_its_own_folder():
    from instill.registry import BUILTIN_MODULES

    owners = {module.split(".")[0] for stage, module in BUILTIN_MODULES["stage"].items() if stage != "base"}
    assert owners == set(SYSTEMS)
    api = importlib.import_module("instill.api")
    for system in SYSTEMS:
        part = importlib.import_module(f"instill.{system}.api")
        for name in part.__all__:  # the facade re-exports each system's names as they are
            assert getattr(api, name) is getattr(part, name), (system, name)


def test_no_two_modules_share_a_file_name_across_folders_except_the_per_system_ones():
    names: dict[str, list[str]] = {}
    for path in CORE.rglob("*.py"):
        names.setdefault(path.name, []).append(str(path.relative_to(CORE)))
    shared = {n: sorted(p) for n, p in names.items() if len(p) > 1 and n not in ("__init__.py", "api.py", "stage.py")}
    assert shared == {}
