"""The package map holds: lower layers never import upper ones, the elector never imports
the store, only the store talks SQL, the stand-in provider imports nothing of the service,
and there is no import cycle. Read from the source with ``ast``; nothing is imported."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
APP = ROOT / "app"

# package → packages of app/ it must never import (directly or through app.<module>)
FORBIDDEN: dict[str, set[str]] = {
    "domain": {
        "store",
        "leadership",
        "dispatch",
        "failover",
        "web",
        "obs",
        "ops",
        "stack",
        "replica",
    },
    "store": {"leadership", "dispatch", "failover", "web", "obs", "ops", "stack", "replica"},
    "leadership": {"store", "dispatch", "failover", "web", "obs", "ops", "stack", "replica"},
    "dispatch": {"failover", "web", "ops", "stack", "replica"},
    # Crash detection: leadership (etcd, the observer) and store (the liveness lock); the
    # dispatch side runs its beacon only through DispatchLeader's companions.
    "failover": {"dispatch", "web", "obs", "ops", "stack", "replica"},
    "obs": {"web", "ops", "stack", "replica"},
    "web": {"ops", "stack", "replica"},
    "ops": {"stack", "store", "leadership", "dispatch", "web", "replica"},
    "stack": {"store", "leadership", "dispatch", "web", "replica"},
}
SQL_MODULES = ("sqlalchemy", "asyncpg")
SQL_OWNERS = ("store", "stack")  # the stack creates the database it starts


def app_module(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


SOURCES = sorted(APP.rglob("*.py"))
MODULES = {app_module(path) for path in SOURCES}


def imports_of(path: Path) -> set[str]:
    """Every module ``path`` imports, at any depth in the file (lazy imports included).
    ``from package import submodule`` counts as importing the submodule, not the package."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            submodules = {f"{node.module}.{alias.name}" for alias in node.names}
            found.update(submodules & MODULES or {node.module})
    return found


GRAPH = {app_module(path): imports_of(path) for path in SOURCES}


def package_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_package_imports_a_layer_above_it(package: str) -> None:
    offending = {
        f"{module} imports {target}"
        for module, targets in GRAPH.items()
        if package_of(module) == package
        for target in targets
        if target.startswith("app.") and package_of(target) in FORBIDDEN[package]
    }
    assert offending == set()


def test_the_stand_in_provider_imports_nothing_else_from_app() -> None:
    offending = {
        f"{module} imports {target}"
        for module, targets in GRAPH.items()
        if package_of(module) == "sandbox"
        for target in targets
        if target.startswith("app.") and package_of(target) != "sandbox"
    }
    assert offending == set()


def test_only_the_store_talks_sql() -> None:
    offending = {
        f"{module} imports {target}"
        for module, targets in GRAPH.items()
        if package_of(module) not in SQL_OWNERS
        for target in targets
        if target.split(".")[0] in SQL_MODULES
    }
    assert offending == set()


def top_level_imports(path: Path) -> set[str]:
    """The modules ``path`` imports at its top level (not inside functions, nor under
    ``if TYPE_CHECKING``): what importing it costs."""
    names: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            names.add(node.module or "")
    return names


def test_app_never_imports_the_load_tooling_or_the_tests_at_module_level() -> None:
    offending = {
        f"{app_module(path)} imports {name}"
        for path in SOURCES
        for name in top_level_imports(path)  # the CLI may import lazily
        if name.split(".")[0] in ("load", "tests")
    }
    assert offending == set()


def test_app_imports_opentelemetry_only_once_tracing_is_on() -> None:
    """Traces off cost no memory: OpenTelemetry is imported inside the functions that run
    once tracing is on (app.obs.tracing), never at a module's top level."""
    offending = {
        f"{app_module(path)} imports {name}"
        for path in SOURCES
        for name in top_level_imports(path)
        if name.split(".")[0] == "opentelemetry"
    }
    assert offending == set()


def test_there_is_no_import_cycle_between_app_modules() -> None:
    modules = set(GRAPH)
    edges = {
        module: {target for target in targets if target in modules and target != module}
        for module, targets in GRAPH.items()
    }
    # A package's __init__ is imported by its modules implicitly; only explicit edges count.
    visiting: list[str] = []
    done: set[str] = set()
    cycles: list[list[str]] = []

    def visit(module: str) -> None:
        if module in done:
            return
        if module in visiting:
            cycles.append([*visiting[visiting.index(module) :], module])
            return
        visiting.append(module)
        for target in sorted(edges[module]):
            visit(target)
        visiting.pop()
        done.add(module)

    for module in sorted(modules):
        visit(module)
    assert cycles == []


def test_the_graph_covers_every_package_of_the_map() -> None:
    packages = {package_of(module) for module in GRAPH}
    assert set(FORBIDDEN) | {"sandbox"} <= packages
