"""The package's layout: no module imports, directly or through others, a module that imports it back, and every
third-party package the code imports is a declared dependency."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).parents[1]
PACKAGE = ROOT / "mst_clipiqa"

DISTRIBUTIONS = {"PIL": "pillow", "yaml": "pyyaml", "sklearn": "scikit-learn"}
"""Distribution names of the import names that differ from theirs (beyond case, "-" and "_")."""


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imports(path: Path) -> list[tuple[str, list[str]]]:
    """Every import statement of the file, at the top level or inside functions: (module, names it takes)."""
    found = []
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:  # relative: from its package, or the package above
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join([*base, module] if module else base)
            found.append((module, [alias.name for alias in node.names]))
    return found


def import_graph() -> dict[str, set[str]]:
    """Each module of the package and the package's modules it imports: ``from mst_clipiqa.x import y`` counts as
    x, and as x.y where that is a module."""
    modules = package_modules()
    graph = {}
    for name, path in modules.items():
        targets = set()
        for module, names in imports(path):
            candidates = (module, *(f"{module}.{name}" for name in names))
            targets.update(candidate for candidate in candidates if candidate in modules)
        graph[name] = targets - {name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import loops of `graph`, one per edge that closes a loop in a depth-first walk, each as a path that ends
    where it starts."""
    found: list[list[str]] = []
    done: set[str] = set()
    path: list[str] = []

    def visit(node: str) -> None:
        path.append(node)
        for target in sorted(graph[node]):
            if target in path:
                found.append(path[path.index(target) :] + [target])
            elif target not in done:
                visit(target)
        path.pop()
        done.add(node)

    for node in sorted(graph):
        if node not in done:
            visit(node)
    return found


def test_the_graph_sees_imports_inside_functions():
    graph = import_graph()
    assert "mst_clipiqa.cli.benchmark" in graph["mst_clipiqa.cli.commands"]  # imported in the function `benchmark`
    assert "mst_clipiqa.errors" in graph["mst_clipiqa.cli.commands"]  # at the top level
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]


def test_no_import_loops():
    loops = cycles(import_graph())
    assert not loops, "modules that import themselves through others:\n" + "\n".join(" -> ".join(c) for c in loops)


def canonical(distribution: str) -> str:
    return re.sub(r"[-_.]+", "-", distribution).lower()


def requirement(text: str) -> tuple[str, list[str]]:
    """A requirement's distribution and the extras it asks for: ``jsonargparse[signatures]>=4`` ->
    ("jsonargparse", ["signatures"])."""
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[([^\]]*)\])?", text)
    return canonical(match[1]), [extra.strip() for extra in (match[2] or "").split(",") if extra.strip()]


def declared_distributions() -> set[str]:
    """pyproject.toml's dependencies, and the requirements of the extras they ask for (``jsonargparse[signatures]``
    asks for docstring-parser, which the command line's parsers read docstrings with): an extra is declared as
    surely as a package, and what it brings is in its package's metadata. The serve extra's packages count too:
    only `mst-clipiqa serve` imports them."""
    declared = set()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    for text in [*project["dependencies"], *project["optional-dependencies"]["serve"]]:
        distribution, extras = requirement(text)
        declared.add(distribution)
        brought = (importlib.metadata.requires(distribution) or []) if extras else []
        for line in brought:
            marker = re.search(r"""extra\s*==\s*["']([^"']+)["']""", line)
            if marker and marker[1] in extras:
                declared.add(requirement(line)[0])
    return declared


def test_every_imported_package_is_declared():
    imported: dict[str, set[str]] = {}
    for name, path in package_modules().items():
        for module, _ in imports(path):
            top = module.split(".")[0]
            if top and top != "mst_clipiqa" and top not in sys.stdlib_module_names:
                imported.setdefault(canonical(DISTRIBUTIONS.get(top, top)), set()).add(name)
    undeclared = {distribution: sorted(users) for distribution, users in imported.items()}
    for distribution in declared_distributions():
        undeclared.pop(distribution, None)
    assert not undeclared, f"imported but not in pyproject.toml's dependencies: {undeclared}"
