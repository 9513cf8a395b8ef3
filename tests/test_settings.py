"""Settings layering and the start-up safety checks."""

import subprocess
import sys

import pytest
from pydantic import ValidationError

from gateway.core.security import UnsafeBindError, check_bind_safety
from gateway.core.settings import load_settings

from .conftest import ROOT


def test_defaults_are_the_embedded_single_machine_setup():
    s = load_settings()
    assert s.server.host == "127.0.0.1" and s.server.port == 8000
    assert s.model.base == ""
    assert s.storage.resolved_database_url.startswith("sqlite+aiosqlite:///")
    assert {k.role for k in s.auth.keys} == {"client", "reviewer", "admin"}
    assert all(k.is_dev_key for k in s.auth.keys)


def test_config_file_then_env_then_explicit(tmp_path, monkeypatch):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[server]\nport = 9000\n[review]\nconfidence_threshold = 0.2\n')
    s = load_settings(cfg)
    assert s.server.port == 9000 and s.review.confidence_threshold == 0.2
    assert s.review.required_reviews == 2  # untouched keys keep their defaults
    monkeypatch.setenv("TELLERLOOP_SERVER__PORT", "8100")
    monkeypatch.setenv("TELLERLOOP_STORAGE__DATA_DIR", "/tmp/x")
    s = load_settings(cfg)
    assert s.server.port == 8100 and str(s.storage.data_dir) == "/tmp/x"
    assert load_settings(cfg, server={"port": 7}).server.port == 7


def test_unknown_keys_and_bad_values_are_refused(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text("[server]\nprot = 1\n")
    with pytest.raises(ValidationError, match="prot"):
        load_settings(cfg)
    cfg.write_text('[[auth.keys]]\nname = "x"\nrole = "god"\nkey = "k"\n')
    with pytest.raises(ValidationError):
        load_settings(cfg)
    with pytest.raises(FileNotFoundError):
        load_settings(tmp_path / "missing.toml")


def test_dev_keys_refused_on_public_bind():
    check_bind_safety(load_settings())
    with pytest.raises(UnsafeBindError, match="dev keys"):
        check_bind_safety(load_settings(server={"host": "0.0.0.0"}))
    prod = load_settings(server={"host": "0.0.0.0"})
    prod.auth.keys = [k.model_copy(update={"key": None, "sha256": "ab" * 32}) for k in prod.auth.keys]
    check_bind_safety(prod)


def test_cli_refuses_dev_keys_on_public_bind():
    proc = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "serve", "--host", "0.0.0.0", "--port", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2
    assert "dev keys" in proc.stderr and "Traceback" not in proc.stderr


def test_cli_reports_missing_config_clearly():
    proc = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "serve", "--config", "/nonexistent.toml"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2 and "config file not found" in proc.stderr
