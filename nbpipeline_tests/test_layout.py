"""The package's layout rules, read from its source: no library module imports the CLI, no
private name is imported from another module, and no two modules import each other in a cycle."""

from __future__ import annotations

import ast
from pathlib import Path

from nbpipeline.settings import PROJECT_ROOT

PACKAGE = PROJECT_ROOT / "nbpipeline"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PROJECT_ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> list[tuple[str, str | None]]:
    """(module imported, name imported from it or None) for every nbpipeline import in `path`,
    wherever it stands (a function's import is a dependency too)."""
    name = _module_name(path)
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found: list[tuple[str, str | None]] = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(a.name, None) for a in node.names if a.name.startswith("nbpipeline")]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package[: len(package) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            if not base.startswith("nbpipeline"):
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.append((sub, None) if sub in modules else (base, alias.name))
    return found


def _graph() -> dict[str, list[tuple[str, str | None]]]:
    paths = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: _imports(path, set(paths)) for name, path in paths.items()}


def test_no_library_module_imports_the_cli() -> None:
    wrong = [
        f"{module} imports {target}"
        for module, imports in _graph().items()
        if not module.startswith("nbpipeline.cli")
        for target, _ in imports
        if target == "nbpipeline.cli" or target.startswith("nbpipeline.cli.")
    ]
    assert not wrong, wrong


def test_no_private_name_is_imported_from_another_module() -> None:
    wrong = [
        f"{module} imports {target}.{name}"
        for module, imports in _graph().items()
        for target, name in imports
        if name and name.startswith("_") and target != module
    ]
    assert not wrong, wrong


def test_no_import_cycle() -> None:
    graph = {m: {t for t, _ in imports if t != m} for m, imports in _graph().items()}
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            raise AssertionError(" -> ".join([*path[path.index(module) :], module]))
        if module in done or module not in graph:
            return
        for target in sorted(graph[module]):
            visit(target, [*path, module])
        done.add(module)

    for module in sorted(graph):
        visit(module, [])
