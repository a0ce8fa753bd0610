"""The package's modules import each other without a circle.

Every import counts, the ones at the top of a module and the ones deferred into functions alike: a circle that
only closes at call time still means two modules that cannot be understood (or moved) one without the other.
Only imports under `if TYPE_CHECKING:` are left out: they never run, they name types for annotations.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "medtransfer"
SOURCE_ROOT = Path(__file__).resolve().parents[1] / "src"


def module_files() -> dict[str, Path]:
    """Every module of the package by its dotted name (a package by its own name, not `.__init__`)."""
    modules = {}
    for path in sorted((SOURCE_ROOT / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(SOURCE_ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def imported_modules(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that module `name` imports anywhere in its body."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()

    def add(candidate: str) -> None:
        # `import a.b.c` also runs a and a.b; only the named module itself is an edge of interest, so walk up to
        # the longest name that is a module of ours.
        while candidate and candidate not in modules:
            candidate = candidate.rpartition(".")[0]
        if candidate and candidate != name:
            found.add(candidate)

    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            node.body = []  # the walk below no longer enters the block
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == PACKAGE:
                    add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = name.split(".") if is_package else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if base.split(".")[0] != PACKAGE:
                continue
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                # `from medtransfer.x import y` imports the module medtransfer.x.y where y is one.
                add(submodule if submodule in modules else base)
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def import_graph() -> dict[str, set[str]]:
    modules = module_files()
    return {name: imported_modules(name, path, modules) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One circle of the graph as the list of its modules (the first repeated at the end), or None."""
    visiting: list[str] = []
    state: dict[str, int] = {}  # 1 on the current path, 2 finished

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        visiting.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return visiting[visiting.index(target):] + [target]
            if target not in state:
                cycle = visit(target)
                if cycle:
                    return cycle
        visiting.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_the_graph_sees_deferred_relative_and_submodule_imports(tmp_path):
    package = tmp_path / PACKAGE
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("")
    (package / "sub" / "leaf.py").write_text("def f():\n    from .. import top\n")
    (package / "top.py").write_text("from typing import TYPE_CHECKING\nfrom medtransfer.sub import leaf\n"
                                    "if TYPE_CHECKING:\n    from medtransfer import sub\n")
    modules = {"medtransfer": package / "__init__.py", "medtransfer.sub": package / "sub" / "__init__.py",
               "medtransfer.sub.leaf": package / "sub" / "leaf.py", "medtransfer.top": package / "top.py"}
    graph = {name: imported_modules(name, path, modules) for name, path in modules.items()}
    assert graph["medtransfer.top"] == {"medtransfer.sub.leaf"}
    assert graph["medtransfer.sub.leaf"] == {"medtransfer.top"}
    assert find_cycle(graph) == ["medtransfer.sub.leaf", "medtransfer.top", "medtransfer.sub.leaf"]


def test_no_module_imports_itself_through_others():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)
