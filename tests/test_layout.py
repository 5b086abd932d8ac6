"""The shape of DESIGN.md section 2: imports run one way, app -> router_index, adapters."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", ["adapters", "router_index"])
def test_libraries_import_nothing_from_the_service(package: str) -> None:
    offenders = [str(p.relative_to(ROOT)) for p in (ROOT / package).rglob("*.py")
                 if "app" in _imports(p)]
    assert offenders == []


def test_the_adapters_import_nothing_from_the_router() -> None:
    # router_index names adapters' errors; the reverse would make the two libraries a cycle.
    offenders = [str(p.relative_to(ROOT)) for p in (ROOT / "adapters").rglob("*.py")
                 if "router_index" in _imports(p)]
    assert offenders == []


def test_the_engine_knows_no_http() -> None:
    offenders = [str(p.relative_to(ROOT)) for p in (ROOT / "app" / "engine").rglob("*.py")
                 if _imports(p) & {"fastapi", "starlette", "uvicorn", "httpx"}]
    assert offenders == []


def test_the_cache_folder_has_one_default_and_one_env_reader() -> None:
    # Settings owns `cache_dir` (DYNAMERGE_CACHE_DIR); the libraries take it as a parameter.
    default = re.compile(r"""["']\.cache["']|environ[^\n]*DYNAMERGE_CACHE_DIR""")
    owners = [str(p.relative_to(ROOT)) for package in ("app", "adapters", "router_index")
              for p in sorted((ROOT / package).rglob("*.py"))
              if default.search(p.read_text(encoding="utf-8"))]
    assert owners == ["app/settings.py"]
