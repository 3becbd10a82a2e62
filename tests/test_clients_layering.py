"""DESIGN.md: ``fedveil/clients`` may import only secagg, dp and protocol (plus the shared task
definitions), never ``fedveil.server``: the client library must run at a hospital without the
coordinator's code. Simulations, which run both sides, live in ``fedveil.simulation``, which the
clients may not import either (import-linter checks the same contract in ``make lint``)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

import fedveil.clients

CLIENTS_DIR = Path(fedveil.clients.__file__).parent
ALLOWED = ("fedveil.clients", "fedveil.secagg", "fedveil.dp", "fedveil.protocol", "fedveil.task", "fedveil.tasks",
           "fedveil.model_spec", "fedveil.model_file",
           "fedveil.metrics", "fedveil.errors", "fedveil.settings_table", "fedveil.lazy_exports")


def module_name(path: Path) -> str:
    parts = path.relative_to(CLIENTS_DIR.parent.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    return imports_of(path.read_text(), package, str(path))


def imports_of(source: str, package: str, filename: str = "<source>") -> set[str]:
    """Every module ``source`` (a module of ``package``) imports, at any depth (function-level
    imports included), with relative imports resolved, plus the string arguments of
    ``importlib.import_module`` / ``__import__``."""
    tree = ast.parse(source, filename=filename)
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
            if name in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                found.add(node.args[0].value)
    return found


def is_forbidden(module: str) -> bool:
    if module == "fedveil.server" or module.startswith("fedveil.server."):
        return True
    if not module.startswith("fedveil.") or module == "fedveil.__version__":
        return False
    return not any(module == a or module.startswith(a + ".") for a in ALLOWED)


def client_sources() -> list[Path]:
    return sorted(CLIENTS_DIR.rglob("*.py"))


def test_the_scan_sees_the_client_modules_and_their_imports() -> None:
    names = {p.name for p in client_sources()}
    assert {"__init__.py", "api.py", "session.py", "admission.py", "participation.py"} <= names
    assert "fedveil.protocol.transport" in imported_modules(CLIENTS_DIR / "session.py")
    assert "fedveil.clients.local_dp" in imported_modules(CLIENTS_DIR / "session.py")  # a function-level import


def test_the_check_catches_function_level_relative_and_dynamic_server_imports() -> None:
    package = "fedveil.clients"
    cases = {
        "def f() -> None:\n    from fedveil.server.store import RunStore\n": "fedveil.server.store",
        "from ..server import coordinator\n": "fedveil.server",
        "import fedveil.server.coordinator as c\n": "fedveil.server.coordinator",
        "import importlib\nimportlib.import_module('fedveil.server.config')\n": "fedveil.server.config",
        "from fedveil import server\n": "fedveil.server",
    }
    for source, module in cases.items():
        found = imports_of(source, package)
        assert module in found, source
        assert any(is_forbidden(m) for m in found), source
    assert not any(is_forbidden(m) for m in imports_of("from fedveil.dp.ledger import X\nimport fedveil\n", package))
    assert is_forbidden("fedveil.commands.common") and is_forbidden("fedveil.demo")


def test_no_client_module_imports_the_server_or_any_package_outside_its_layer() -> None:
    offenders: dict[str, list[str]] = {}
    for path in client_sources():
        bad = sorted(m for m in imported_modules(path) if is_forbidden(m))
        if bad:
            offenders[module_name(path)] = bad
    assert offenders == {}


@pytest.mark.slow
def test_importing_every_client_module_loads_no_server_module() -> None:
    modules = [module_name(p) for p in client_sources()]
    code = (
        "import importlib, json, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith(('fedveil.server', 'fedveil.commands')))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
