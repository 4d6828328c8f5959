"""The pure core depends on no transport or store library (src/quotagate/core/__init__.py, DESIGN.md)."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

CORE = Path(__file__).resolve().parents[1] / "src" / "quotagate" / "core"
FORBIDDEN = ("grpc", "google.protobuf", "envoy", "asyncpg", "redis", "aiohttp")
CORE_FILES = sorted(CORE.glob("*.py"))


def is_forbidden(module: str) -> bool:
    return any(module == name or module.startswith(name + ".") for name in FORBIDDEN)


def imported_modules(path: Path) -> list[str]:
    """Every module an import statement in the file names, with relative imports resolved."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = "quotagate.core"
    found: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - (node.level - 1)])
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            found.append(module)
            # `from google import protobuf` names google.protobuf
            found.extend(f"{module}.{alias.name}" for alias in node.names if alias.name != "*")
    return found


def test_the_core_has_its_modules() -> None:
    names = {p.stem for p in CORE_FILES}
    assert {"clock", "cycles", "model", "charge", "weights", "estimate", "decide", "messages", "errors"} <= names


def test_the_checker_sees_forbidden_imports() -> None:
    # guard against a checker that accepts everything
    assert is_forbidden("grpc") and is_forbidden("grpc.aio") and is_forbidden("google.protobuf.struct_pb2")
    assert is_forbidden("redis.asyncio") and is_forbidden("envoy.service.auth.v3")
    assert not is_forbidden("redistribute") and not is_forbidden("google.rpc")


def test_import_finder_on_a_sample(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text(
        textwrap.dedent(
            """
            import os, grpc.aio as aio
            from google import protobuf
            from .model import Balance
            def f():
                import asyncpg
            """
        )
    )
    found = imported_modules(sample)
    assert {"os", "grpc.aio", "google.protobuf", "quotagate.core.model", "asyncpg"} <= set(found)


@pytest.mark.parametrize("path", CORE_FILES, ids=lambda p: p.name)
def test_core_module_imports_nothing_forbidden(path: Path) -> None:
    bad = [m for m in imported_modules(path) if is_forbidden(m)]
    assert bad == [], f"{path.name} imports {bad}"


@pytest.mark.parametrize("path", CORE_FILES, ids=lambda p: p.name)
def test_core_imports_only_the_core_from_quotagate(path: Path) -> None:
    # Importing another quotagate package (adapters, store, config) would bring grpc or redis in indirectly.
    outside = [
        m
        for m in imported_modules(path)
        if (m == "quotagate" or m.startswith("quotagate.")) and not m.startswith("quotagate.core")
    ]
    assert outside == [], f"{path.name} imports {outside}"


def test_importing_the_core_loads_no_forbidden_module() -> None:
    modules = ", ".join(f"quotagate.core.{p.stem}" for p in CORE_FILES if p.stem != "__init__")
    code = textwrap.dedent(
        f"""
        import sys
        import {modules}
        forbidden = {FORBIDDEN!r}
        loaded = sorted(m for m in sys.modules if any(m == f or m.startswith(f + ".") for f in forbidden))
        print(",".join(loaded))
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == ""
