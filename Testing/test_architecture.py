"""The package's import graph: no cycles, no import of a higher layer (docs/ARCHITECTURE.md), and the
model package built the segment_anything way.

Every module of ``RefSAM3DLib`` is parsed with ``ast`` (nothing is imported), and each of its
imports of the package -- at module level and inside functions alike -- becomes an edge:
``from .x import y`` / ``from RefSAM3DLib.x import y`` (to ``x.y`` when that is a module, else
to ``x``) and ``import RefSAM3DLib.x``.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = "RefSAM3DLib"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE


def _module_files(root: Path = ROOT) -> dict[str, Path]:
    files = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        files[".".join(parts)] = path
    return files


def _targets(node: ast.AST, module: str, path: Path, files: dict[str, Path]) -> list[str]:
    """The package modules one import statement of ``module`` (file ``path``) imports."""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    if isinstance(node, ast.ImportFrom):
        if node.level:
            source = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
        else:
            source = node.module or ""
        if source != PACKAGE and not source.startswith(PACKAGE + "."):
            return []
        # from . import weights: the module itself; from .model import X: the package's __init__
        return [f"{source}.{a.name}" if f"{source}.{a.name}" in files else source for a in node.names]
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name in files]
    return []


def _imports(module: str, path: Path, files: dict[str, Path]) -> dict[str, int]:
    """The package modules ``module`` imports anywhere in its file -> the first line doing so."""
    found: dict[str, int] = {}
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        for target in _targets(node, module, path, files):
            if target != module and target in files:
                found.setdefault(target, node.lineno)
    return found


def import_graph(root: Path = ROOT) -> dict[str, dict[str, int]]:
    """module -> {imported package module: line}, for every module of the package under ``root``."""
    files = _module_files(root)
    return {module: _imports(module, path, files) for module, path in files.items()}


def find_cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """One cycle (``a -> b -> ... -> a``) through each strongly connected group of modules."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[list[str]] = []

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in graph.get(node, {}):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    cycles = []
    for group in groups:  # walk inside the group from its first module back to it
        members, path = set(group), [group[0]]
        while True:
            target = next(t for t in sorted(graph[path[-1]]) if t in members and (t == group[0] or t not in path))
            if target == group[0]:
                cycles.append(path + [target])
                break
            path.append(target)
    return cycles


def _describe(cycle: list[str], graph: dict[str, dict[str, int]]) -> str:
    return " -> ".join(f"{a} (line {graph[a][b]})" for a, b in zip(cycle, cycle[1:])) + f" -> {cycle[-1]}"


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    assert f"{PACKAGE}.model.build" in graph and len(graph) > 30  # the walk saw the package
    cycles = find_cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join(_describe(cycle, graph) for cycle in cycles)


def _documented_layers() -> dict[str, int]:
    """module (``model``/``training`` for their packages) -> layer, from docs/ARCHITECTURE.md."""
    text = (ROOT.parent / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8")
    layers = {}
    for match in re.finditer(r"^\| (\d) \| [^|]+ \| (.+) \|$", text, flags=re.MULTILINE):
        for name in re.findall(r"`([a-z_]+)/?`", match.group(2)):
            layers[name] = int(match.group(1))
    return layers


def _unit(module: str) -> str:
    """The layer table's name for a module: its first name below the package."""
    return module.split(".")[1] if "." in module else module


def test_every_import_goes_to_the_same_or_a_lower_documented_layer():
    layers = _documented_layers()
    graph = import_graph()
    units = {_unit(module) for module in graph if module != PACKAGE}
    assert units == set(layers), f"docs/ARCHITECTURE.md's layer table differs from the package: {units ^ set(layers)}"
    layers[PACKAGE] = 0  # the package's __init__ holds only __version__
    upward = [f"{module} (layer {layers[_unit(module)]}) line {line} imports {target} (layer {layers[_unit(target)]})"
              for module, targets in graph.items() if module != PACKAGE
              for target, line in targets.items() if layers[_unit(target)] > layers[_unit(module)]]
    assert not upward, "\n".join(upward)


def test_only_the_model_package_itself_imports_the_builder():
    """model/* modules are parts or the assembled network; only ``__init__`` (its public API) and
    ``build`` itself may import ``model/build.py`` -- directly, or through ``model/__init__``."""
    graph = import_graph()
    builder, package = f"{PACKAGE}.model.build", f"{PACKAGE}.model"
    offenders = {
        module: {target: line for target, line in targets.items() if target in (builder, package)}
        for module, targets in graph.items()
        if module.startswith(package + ".") and module != builder
    }
    assert not {module: found for module, found in offenders.items() if found}


def test_model_training_checkpoint_and_weights_import_our_modules_at_module_level():
    """A function-level import of our own modules is kept only where it defers a dependency:
    training/cache.py reads volumes (SimpleITK) only when it builds the cache."""
    allowed = {("training/cache.py", f"{PACKAGE}.volume_reader"), ("training/cache.py", f"{PACKAGE}.preprocess")}
    files = _module_files()
    deferred = set()
    for module, path in files.items():
        relative = path.relative_to(ROOT).as_posix()
        if not relative.startswith(("model/", "training/")) and relative not in ("checkpoint.py", "weights.py"):
            continue
        for function in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(function):
                    deferred |= {(relative, target) for target in _targets(node, module, path, files)}
    assert deferred == allowed
