"""The package map holds: lower layers never import upper ones, the elector never imports
the store, only the store talks SQL, the stand-in provider imports nothing of the service,
a running replica never loads SQLAlchemy or Alembic, and there is no import cycle. Read from
the source with ``ast``; nothing is imported."""

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


# Only `paydispatch migrate` (and the tests) may load these: they cost a replica some 20 MB of
# memory, and a replica's RSS is held under 80 MB. The migrate command imports
# app.store.migrate lazily; nothing a replica imports may reach them.
MIGRATION_ONLY = ("sqlalchemy", "alembic", "migrations")


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _names(node: ast.Import | ast.ImportFrom) -> set[str]:
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names}
    if node.level != 0 or not node.module:
        return set()
    return {f"{node.module}.{alias.name}" for alias in node.names} & MODULES or {node.module}


def imports_on_load(nodes: list[ast.stmt]) -> set[str]:
    """The imports that run when these statements run: nested blocks (if, try, with, class
    bodies) included; function bodies (lazy imports) and ``if TYPE_CHECKING:`` not."""
    found: set[str] = set()
    pending: list[ast.AST] = list(nodes)
    while pending:
        node = pending.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            pending.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found |= _names(node)
        pending.extend(ast.iter_child_nodes(node))
    return found


LOADED = {app_module(path): imports_on_load(ast.parse(path.read_text()).body) for path in SOURCES}


def loaded_by(roots: set[str]) -> set[str]:
    """Every module importing ``roots`` loads: app modules followed through their module-level
    imports (and their packages' ``__init__``), the others as named."""
    seen: set[str] = set()
    pending = list(roots)
    while pending:
        module = pending.pop()
        if module in seen:
            continue
        seen.add(module)
        parts = module.split(".")
        pending.extend(".".join(parts[:i]) for i in range(1, len(parts)))  # the packages
        pending.extend(LOADED.get(module, ()))
    return seen


def serve_command_roots() -> set[str]:
    """What ``paydispatch serve`` imports: the CLI module, then its command's lazy imports."""
    cli = ast.parse((APP / "cli.py").read_text())
    (serve,) = [
        node for node in cli.body if isinstance(node, ast.FunctionDef) and node.name == "serve"
    ]
    lazy = {
        name
        for node in ast.walk(serve)
        if isinstance(node, (ast.Import, ast.ImportFrom))
        for name in _names(node)
    }
    return {"app.cli", *lazy}


def _migration_only(modules: set[str]) -> set[str]:
    return {module for module in modules if module.split(".")[0] in MIGRATION_ONLY}


@pytest.mark.parametrize(
    "roots", [{"app.replica"}, serve_command_roots()], ids=["replica", "serve"]
)
def test_a_running_replica_never_loads_sqlalchemy_or_alembic(roots: set[str]) -> None:
    loaded = loaded_by(roots)
    offending = {
        f"{module} imports {target}"
        for module in loaded
        for target in _migration_only(LOADED.get(module, set()))
    }

    assert "app.replica" in loaded
    assert offending == set()


def test_the_migrate_command_is_what_loads_them() -> None:
    # The check above sees imports at all: the migration path does reach SQLAlchemy.
    assert {"sqlalchemy", "alembic"} <= {
        module.split(".")[0] for module in _migration_only(loaded_by({"app.store.migrate"}))
    }


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
