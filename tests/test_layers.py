"""The packages' layering, checked on the source: who may import whom, and where Flower is.

Every non-test module (not ``test_*.py``, ``*_test.py`` or ``conftest.py``) of each package
is parsed with :mod:`ast` and each of its ``import`` statements (at any depth, inside
functions and ``TYPE_CHECKING`` blocks too) is checked against :data:`ALLOWED`, and every
import of ``flwr`` against :data:`FLOWER_ADAPTERS`. See ``docs/design.md``, "How the code
is laid out".
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

ALLOWED: dict[str, frozenset[str]] = {
    "unicon_model": frozenset(),
    "client": frozenset({"unicon_model"}),
    "server": frozenset({"unicon_model"}),
    "simulations": frozenset({"unicon_model", "client", "server"}),
    "unicon_cli": frozenset({"unicon_model", "client", "server", "simulations"}),
}
"""Project packages each package's modules may import (besides its own)."""

PROJECT = frozenset(ALLOWED) | {"tests", "deploy"}
"""Top-level names that are this project's; ``tests`` and ``deploy`` no package may import."""

FLOWER_ADAPTERS = frozenset(
    {
        "client.client_app",
        "client.secure_aggregation",
        "server.server_app",
        "server.secure_aggregation",
        "simulations.inprocess",
        "simulations.simulate_setup",
    }
)
"""The only modules that may import ``flwr``: the thin adapters around Flower."""

NEVER_FLOWER = ("client.trainer", "unicon_model.model")
"""Modules that must not reach ``flwr`` even through the project modules they import."""


def is_test_file(path: Path) -> bool:
    """Whether ``path`` is a test module (not subject to the layering)."""
    name = path.name
    return name.startswith("test_") or name.endswith("_test.py") or name == "conftest.py"


def module_name(path: Path) -> str:
    """Dotted module name of a file under :data:`ROOT` (``pkg/__init__.py`` -> ``pkg``)."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def source_modules(package: str) -> Iterator[Path]:
    """The non-test modules of ``package``."""
    for path in sorted((ROOT / package).rglob("*.py")):
        if not is_test_file(path):
            yield path


def imported_names(source: str, module: str, *, is_package: bool = False) -> set[str]:
    """Every module name that ``source`` (module ``module``) imports, absolute.

    ``from X import Y`` gives ``X`` and ``X.Y`` (``Y`` may be a submodule); relative imports
    are resolved against the module's package (``module`` itself when ``is_package``).
    """
    package = module.split(".") if is_package else module.split(".")[:-1]
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1])
                found = f"{base}.{node.module}" if node.module else base
            else:
                found = node.module or ""
            names.add(found)
            names.update(f"{found}.{alias.name}" for alias in node.names)
    return names


def file_imports(path: Path) -> set[str]:
    """:func:`imported_names` of a file under :data:`ROOT`."""
    return imported_names(
        path.read_text(), module_name(path), is_package=path.name == "__init__.py"
    )


def forbidden(package: str, module: str, names: set[str]) -> list[str]:
    """The imports among ``names`` that module ``module`` of ``package`` may not make."""
    problems: list[str] = []
    for name in sorted(names):
        top = name.split(".")[0]
        if top in PROJECT and top != package and top not in ALLOWED[package]:
            problems.append(f"{module}: imports {name}")
        if top == "flwr" and module not in FLOWER_ADAPTERS:
            problems.append(f"{module}: imports {name} (flwr only in the adapters)")
    return problems


def layer_violations(package: str) -> list[str]:
    """Every forbidden import of the non-test modules of ``package``."""
    problems: list[str] = []
    for path in source_modules(package):
        problems += forbidden(package, module_name(path), file_imports(path))
    return problems


def _project_graph() -> dict[str, set[str]]:
    """Project module -> the project modules it imports, and ``flwr`` if it imports Flower."""
    files = {module_name(p): p for package in ALLOWED for p in source_modules(package)}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        edges: set[str] = set()
        for imported in file_imports(path):
            if imported.split(".")[0] == "flwr":
                edges.add("flwr")
            elif imported in files:
                edges.add(imported)
        graph[name] = edges
    return graph


def flower_path(start: str, graph: dict[str, set[str]] | None = None) -> list[str] | None:
    """A chain of project imports from ``start`` to ``flwr``, or ``None`` if there is none."""
    graph = _project_graph() if graph is None else graph
    parents: dict[str, str | None] = {start: None}
    queue = [start]
    while queue:
        current = queue.pop(0)
        for nxt in sorted(graph.get(current, ())):
            if nxt in parents:
                continue
            parents[nxt] = current
            if nxt == "flwr":
                chain: list[str] = []
                node: str | None = nxt
                while node is not None:
                    chain.append(node)
                    node = parents[node]
                return chain[::-1]
            queue.append(nxt)
    return None


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_each_package_imports_only_the_layers_below_it(package: str) -> None:
    assert list(source_modules(package)), f"{package} has no modules: wrong ROOT?"
    assert layer_violations(package) == []


@pytest.mark.parametrize("module", NEVER_FLOWER)
def test_the_trainer_and_the_model_never_reach_flower(module: str) -> None:
    assert flower_path(module) is None


def test_the_flower_adapters_exist_and_import_flower() -> None:
    # a stale entry would let a module that is no adapter any more import Flower again
    for name in sorted(FLOWER_ADAPTERS):
        path = ROOT / Path(*name.split(".")).with_suffix(".py")
        assert path.is_file(), name
        assert any(n.split(".")[0] == "flwr" for n in file_imports(path)), name


def test_the_checker_sees_every_form_of_a_forbidden_import() -> None:
    source = (
        "import flwr.app\n"
        "from server import registry\n"
        "def late() -> None:\n"
        "    from simulations.synthetic import make_sites\n"
        "from . import trainer\n"
        "import unicon_cli.main as cli\n"
    )
    names = imported_names(source, "client.probe")
    assert names >= {"flwr.app", "server", "server.registry", "simulations.synthetic"}
    assert {"client.trainer", "unicon_cli.main"} <= names
    assert forbidden("client", "client.probe", names) == [
        "client.probe: imports flwr.app (flwr only in the adapters)",
        "client.probe: imports server",
        "client.probe: imports server.registry",
        "client.probe: imports simulations.synthetic",
        "client.probe: imports simulations.synthetic.make_sites",
        "client.probe: imports unicon_cli.main",
    ]
    assert forbidden("client", "client.client_app", {"flwr.app", "unicon_model.wire"}) == []
    # an import of Flower two modules away is found too
    graph = {"client.trainer": {"client.losses"}, "client.losses": {"flwr"}}
    assert flower_path("client.trainer", graph) == ["client.trainer", "client.losses", "flwr"]
