"""Layers point one way: the offline side (retraining/) and the gateway's lower layers never import
the HTTP layer, the app factory or the services. Walks every import statement (module level and
inside functions, where lazy imports hide) with the standard library's AST, so a new violation
fails `make test` with the file and line."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
UPPER = ("gateway.app", "gateway.api", "gateway.console", "gateway.cli", "gateway.chat", "gateway.review",
         "gateway.adapters")
LOWER = ["gateway/engine", "gateway/rag", "gateway/store", "gateway/prompting.py", "gateway/pii.py",
         "gateway/settings.py", "gateway/confidence.py", "gateway/routing.py", "gateway/runtime.py",
         "gateway/agreement.py", "gateway/metrics.py"]


def imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.append((node.lineno, node.module))
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
    return found


def files(*places: str) -> list[Path]:
    out = []
    for place in places:
        path = ROOT / place
        out += sorted(path.rglob("*.py")) if path.is_dir() else [path]
    return [p for p in out if "migrations" not in p.parts]


def violations(paths: list[Path], forbidden: tuple[str, ...]) -> list[str]:
    return [f"{p.name}:{line} imports {name}" for p in paths for line, name in imports(p)
            if any(name == f or name.startswith(f + ".") for f in forbidden)]


def test_the_check_catches_lazy_and_from_imports(tmp_path):
    sample = tmp_path / "m.py"
    sample.write_text("import gateway.pii\nfrom gateway import chat\n\ndef f():\n    from gateway.app import create_app\n")
    assert violations([sample], UPPER) == ["m.py:2 imports gateway.chat", "m.py:5 imports gateway.app",
                                           "m.py:5 imports gateway.app.create_app"]


@pytest.mark.parametrize("place", ["retraining"])
def test_offline_side_never_imports_the_app_controllers_or_services(place):
    assert violations(files(place), UPPER) == []


def test_lower_layers_never_import_upper_layers_or_retraining():
    assert violations(files(*LOWER), UPPER + ("retraining",)) == []
