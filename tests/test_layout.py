"""The layout shows the architecture: what sits at the top of serve_app, what depends on what."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import ROOT

PACKAGE = ROOT / "serve_app"
SHARED_MODULES = {
    "__init__.py",
    "schemas.py",
    "settings.py",
    "service.py",
    "faults.py",
    "telemetry.py",
}
CONCERNS = {"api", "client", "generation", "models", "storage"}


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_only_the_shared_modules_sit_at_the_top() -> None:
    modules = {path.name for path in PACKAGE.glob("*.py")}
    packages = {path.name for path in PACKAGE.iterdir() if (path / "__init__.py").is_file()}
    assert modules == SHARED_MODULES
    # New concerns get packages of their own (serve_app/jobs/, ...); these are always there.
    assert packages >= CONCERNS


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda path: str(path.name))
def test_the_application_does_not_import_ray(path: Path) -> None:
    """Ray lives in deployments/: serve_app runs as plain Python in the tests and tools."""
    assert not {name for name in imported_modules(path) if name.split(".")[0] == "ray"}


def test_the_client_loads_without_torch_or_ray() -> None:
    """A client machine installs httpx and pydantic, not a model runtime."""
    probe = "import sys, serve_app.client; print(sorted({'torch', 'ray'} & set(sys.modules)))"
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert result.stdout.strip() == "[]"
