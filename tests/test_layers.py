"""Layers point one way: controllers → services → repositories / engine, and the offline side
(retraining/) never imports the HTTP layer, the app factory or a service. Walks every import
statement (module level and inside functions, where lazy imports hide) with the standard library's
AST, so a new violation fails `make test` with the file and line.

The gateway is cut in domain slices (`gateway/<slice>/`: controller, console pages, service,
repository, schemas) on a shared core (`gateway/core`, `gateway/store`, `gateway/engine`). What a
module may import is decided by its kind, which its name says."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
GATEWAY = ROOT / "gateway"
SLICES = ("chat", "exchanges", "review", "knowledge", "adapters", "experiments", "runs", "calibration")
CONTROLLERS = tuple(f"gateway.{s}.controller" for s in SLICES) + tuple(f"gateway.{s}.console" for s in SLICES)
SERVICES = tuple(f"gateway.{s}.service" for s in SLICES) + ("gateway.runs.control", "gateway.runs.scheduler")
HTTP = ("gateway.app", "gateway.api", "gateway.console", "gateway.cli") + CONTROLLERS
WEB_FRAMEWORK = ("litestar",)


def imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.append((node.lineno, node.module))
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
    return found


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts)


def files(*places: str) -> list[Path]:
    out = []
    for place in places:
        path = ROOT / place
        out += sorted(path.rglob("*.py")) if path.is_dir() else [path]
    return [p for p in out if "migrations" not in p.parts]


def violations(paths: list[Path], forbidden: tuple[str, ...]) -> list[str]:
    return [f"{p.relative_to(ROOT) if p.is_relative_to(ROOT) else p.name}:{line} imports {name}"
            for p in paths for line, name in imports(p)
            if any(name == f or name.startswith(f + ".") for f in forbidden)]


def kind(path: Path) -> str:
    name = module_name(path)
    if name in SERVICES:
        return "service"
    if name in CONTROLLERS or name.split(".")[:2] in (["gateway", "api"], ["gateway", "console"]):
        return "http"
    if name in ("gateway.app", "gateway.cli"):
        return "entry"
    return "lower"  # repositories, schemas, models, statistics, engine, knowledge store, core, store


def test_the_check_catches_lazy_and_from_imports(tmp_path):
    sample = tmp_path / "m.py"
    sample.write_text("import gateway.core.pii\nfrom gateway.review import service\n\n"
                      "def f():\n    from gateway.app import create_app\n")
    assert violations([sample], HTTP + SERVICES) == [
        "m.py:2 imports gateway.review.service", "m.py:5 imports gateway.app", "m.py:5 imports gateway.app.create_app"]


def test_every_gateway_module_has_a_known_kind():
    """A new module under a slice must be a controller, console, service, repository, schemas,
    models or a named helper; the slices' list above must match the folders."""
    assert {p.name for p in GATEWAY.iterdir() if p.is_dir() and (p / "__init__.py").is_file()} == {
        *SLICES, "api", "console", "core", "engine", "store"}


@pytest.mark.parametrize("place", ["retraining"])
def test_offline_side_never_imports_the_app_controllers_or_services(place):
    assert violations(files(place), HTTP + SERVICES) == []


def test_services_never_import_the_http_layer_or_the_web_framework():
    services = [p for p in files("gateway") if kind(p) == "service"]
    assert len(services) >= 7
    assert violations(services, HTTP + WEB_FRAMEWORK) == []


def test_lower_layers_never_import_services_controllers_or_retraining_internals():
    """Repositories, schemas, the engine, the knowledge store and the core import no service, no
    HTTP module and nothing of the trainer (retraining.dataset is a pure helper the run control uses)."""
    lower = [p for p in files("gateway") if kind(p) == "lower"]
    assert violations(lower, HTTP + SERVICES + WEB_FRAMEWORK + ("retraining",)) == []


def test_the_gateway_starts_the_trainer_only_by_module_name():
    """Nothing in the gateway imports the trainer process or the fine-tuning code."""
    assert violations(files("gateway"), ("retraining.train", "retraining.finetune", "retraining.gate")) == []
