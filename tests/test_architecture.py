"""The package's shape (docs/ARCHITECTURE.md, "The rooms"): no import circles, lazy imports only where they keep the
read-only commands free of torch, transformers and pandas (each saying so), and no module too long to read."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "loratrace"
MAX_LINES = 400


def _modules() -> dict[str, Path]:
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


MODULES = _modules()


def _target(module: str, node: ast.ImportFrom | ast.Import) -> list[str]:
    """The loratrace modules an import statement loads (a name imported from a package counts when it is a module)."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:
            package = module.split(".")[: -node.level] if not MODULES[module].name == "__init__.py" else \
                module.split(".")[: len(module.split(".")) - node.level + 1]
            base = ".".join(package + ([node.module] if node.module else []))
        names = [f"{base}.{alias.name}" for alias in node.names] + [base]
    found = []
    for name in names:
        while name and name not in MODULES:
            name = name.rpartition(".")[0]
        if name and name != module and not module.startswith(name + "."):  # a module's own packages load first
            found.append(name)
    return found


def _imports() -> tuple[dict[str, set[str]], list[tuple[str, int, str]]]:
    """Every module's loratrace imports, and the function-local ones as (module, line, source line)."""
    edges: dict[str, set[str]] = {name: set() for name in MODULES}
    local = []
    for module, path in MODULES.items():
        source = path.read_text()
        lines = source.splitlines()
        tree = ast.parse(source)
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                edges[module].update(_target(module, node))
        for function in ast.walk(tree):
            if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(function):
                    if isinstance(node, (ast.Import, ast.ImportFrom)) and _target(module, node):
                        local.append((module, node.lineno, lines[node.lineno - 1]))
    return edges, local


def _circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, circles = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in edges[node]:
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                other = stack.pop()
                on_stack.discard(other)
                component.append(other)
                if other == node:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for node in edges:
        if node not in index:
            visit(node)
    return circles


def test_no_module_imports_one_that_imports_it():
    edges, _ = _imports()
    assert _circles(edges) == []


def test_the_detector_finds_a_circle():
    """The circle test can fail: two modules importing each other are one circle."""
    assert _circles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]


def _explained(module: str, line: int) -> bool:
    """A comment on the import's line, or on the line above it (above a run of imports, for all of them)."""
    lines = MODULES[module].read_text().splitlines()
    index = line - 1
    if "#" in lines[index]:
        return True
    while index > 0 and lines[index - 1].strip().startswith(("from ", "import ")):
        index -= 1
    return index > 0 and lines[index - 1].strip().startswith("#")


def test_function_local_imports_say_why():
    """A loratrace import inside a function is there only to keep a command from loading a heavy library, and its
    line says which one."""
    _, local = _imports()
    unexplained = [f"{module}:{line}: {text.strip()}" for module, line, text in local if not _explained(module, line)]
    assert unexplained == []


@pytest.mark.parametrize("module", sorted(MODULES))
def test_module_fits_on_a_few_screens(module):
    lines = len(MODULES[module].read_text().splitlines())
    assert lines <= MAX_LINES, f"{module} has {lines} lines"


def test_read_only_commands_load_no_torch_pandas_or_transformers():
    code = ("import sys, loratrace, loratrace.cli, loratrace.query.store, loratrace.query.formats; "
            "print(sorted(m for m in ('torch', 'pandas', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_every_room_is_a_folder_with_a_docstring():
    rooms = [path for path in PACKAGE.iterdir() if path.is_dir() and (path / "__init__.py").is_file()]
    assert {room.name for room in rooms} >= {"runs", "data", "track", "training", "query", "attribution", "report",
                                              "sweeps", "legacy", "cli"}
    for room in rooms:
        assert ast.get_docstring(ast.parse((room / "__init__.py").read_text())), room.name


def test_tests_mirror_the_rooms():
    """Each room's tests sit in tests/<room>/, and every such folder is on pytest's pythonpath (pyproject.toml), so a
    room's tests can use another's helpers; the repository's root too, for bench/'s synthetic runs."""
    import tomllib

    tests = Path(__file__).resolve().parent
    rooms = {path.name for path in PACKAGE.iterdir() if (path / "__init__.py").is_file()} - {"sample"}
    folders = {path.name for path in tests.iterdir() if path.is_dir() and any(path.glob("test_*.py"))} - {"hostile"}
    assert rooms == folders
    settings = tomllib.loads((tests.parent / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    assert set(settings["pythonpath"]) == {".", "tests"} | {f"tests/{room}" for room in rooms}


def test_functions_fit_on_a_screen():
    """No function passes 60 lines unless its first line says why (a comment with "long:")."""
    long = []
    for module, path in MODULES.items():
        source = path.read_text()
        lines = source.splitlines()
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60 \
                    and "long:" not in lines[node.lineno - 1]:
                long.append(f"{module}.{node.name}: {node.end_lineno - node.lineno + 1} lines")
    assert long == []
