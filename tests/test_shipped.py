"""The shipped adapter: registered as the first champion of an empty registry when its manifest fits
the configured base model and seed data (verified by sha256), skipped with the reason otherwise;
and, on the real SmolLM2 through a real server, the adapter the repository ships."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import pytest

from gateway.adapters import shipped
from gateway.app import create_app
from gateway.calibration.calibrator import fit
from tests.conftest import (
    ROOT,
    make_adapter,
    ready_client,
    seed_knowledge,
    start_server,
)
from tests.test_calibration import synthetic

ADMIN = {"Authorization": "Bearer k-admin"}
KEYS = [{"name": "app", "role": "client", "key": "k-client"}, {"name": "boss", "role": "admin", "key": "k-admin"}]


async def _ship(make_settings, tiny_model_dir, tmp_path: Path) -> Path:
    """A random LoRA on the tiny model, exported the way bench/bootstrap.py --ship exports v0001."""
    trainer = make_settings(tiny_model_dir, storage={"data_dir": str(tmp_path / "trainer")})
    version = await make_adapter(trainer, tiny_model_dir, "candidate", seed=3)
    cal = fit(synthetic(200), c=1.0, rule="bad_recall", target=0.8)
    out = tmp_path / "shipped"
    shipped.export(trainer, trainer.storage.data_dir / "adapters" / version, out, training={"lora_r": 4},
                   dataset={"hash": "d" * 64, "train_examples": 12}, metrics={"gate": {"passed": True}},
                   gate_reason="passed (test)", calibrator={"params": cal.calibrator.params(), "metrics": cal.metrics,
                                                            "labels": 200, "good": 100})
    return out


async def test_a_fitting_shipped_adapter_is_the_first_champion(make_settings, tiny_model_dir, tmp_path):
    folder = await _ship(make_settings, tiny_model_dir, tmp_path)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert set(manifest["files"]) == {"adapter_config.json", "adapter_model.safetensors"}
    settings = make_settings(tiny_model_dir, auth={"keys": KEYS}, rag={"enabled_by_default": False},
                             retraining={"shipped_adapter": str(folder)})
    async with ready_client(create_app(settings), settings) as c:
        adapters = (await c.get("/v1/adapters", headers=ADMIN)).json()["data"]
        assert [(a["version"], a["state"]) for a in adapters] == [("v0001", "champion")]
        detail = (await c.get("/v1/adapters/v0001", headers=ADMIN)).json()
        assert detail["config"]["shipped"] is True and "shipped with tellerloop" in detail["reason"]
        assert detail["metrics"]["shipped"]["base_model"]["sha256"] == manifest["base_model"]["sha256"]
        body = (await c.post("/v1/chat/completions", headers={"Authorization": "Bearer k-client"},
                             json={"model": "tellerloop", "messages": [{"role": "user", "content": "hi"}],
                                   "max_tokens": 4})).json()
        assert body["variant"] == "v0001"  # the very first answer is the shipped adapter's
        calibrators = (await c.get("/v1/calibrators", headers=ADMIN)).json()["data"]
        assert [(x["variant"], x["source"], x["active"]) for x in calibrators] == [("v0001", "shipped", True)]
    # a restart does not register it again
    async with ready_client(create_app(settings), settings) as c:
        assert len((await c.get("/v1/adapters", headers=ADMIN)).json()["data"]) == 1


@pytest.mark.parametrize("breakage", ["seed_data", "tampered", "other_base"])
async def test_a_shipped_adapter_that_does_not_fit_is_skipped(make_settings, tiny_model_dir, real_model_dir, tmp_path,
                                                              breakage):
    folder = await _ship(make_settings, tiny_model_dir, tmp_path)
    sections = {"retraining": {"shipped_adapter": str(folder)}}
    model_dir = tiny_model_dir
    if breakage == "seed_data":
        other = tmp_path / "other.csv"
        other.write_text("question,answer\nWhat?,That.\n")
        sections["retraining"]["seed_data"] = str(other)
    elif breakage == "tampered":
        weights = folder / "adapter_model.safetensors"
        data = bytearray(weights.read_bytes())
        data[-1] ^= 0xFF
        weights.write_bytes(bytes(data))
    else:
        model_dir = real_model_dir
    settings = make_settings(model_dir, auth={"keys": KEYS}, rag={"enabled_by_default": False}, **sections)
    reason = shipped.why_not(settings, folder)
    assert reason is not None and {"seed_data": "seed data", "tampered": "sha256",
                                   "other_base": "the configured base model"}[breakage] in reason
    async with ready_client(create_app(settings), settings) as c:
        assert (await c.get("/v1/adapters", headers=ADMIN)).json()["data"] == []  # the base model serves


SHIPPED = ROOT / "data" / "adapters" / "bootstrap"


@pytest.mark.skipif(not (SHIPPED / "manifest.json").is_file(), reason="no shipped adapter in data/adapters/bootstrap")
def test_first_start_answers_with_the_shipped_fine_tuned_adapter(tmp_path, real_model_dir, faq_chroma_dir):
    """A fresh data dir on the real SmolLM2 (our conversion of the embedded model): the shipped
    v0001 is the champion before the first request, and it answers the way the fine-tuned bot does."""
    seed_knowledge(tmp_path / "var", faq_chroma_dir)
    server = start_server(tmp_path, f'[model]\nbase = "{real_model_dir}"\n[retraining]\nenabled = false\n',
                          extra_env={"TELLERLOOP_RETRAINING__SHIPPED_ADAPTER": str(SHIPPED)})
    try:
        admin = {"Authorization": "Bearer dev-admin-key"}
        adapters = httpx.get(f"{server.base_url}/v1/adapters", headers=admin).json()["data"]
        assert [(a["version"], a["state"]) for a in adapters] == [("v0001", "champion")]
        r = httpx.post(f"{server.base_url}/v1/chat/completions", headers={"Authorization": "Bearer dev-client-key"},
                       json={"model": "tellerloop", "max_tokens": 64,
                             "messages": [{"role": "user", "content": "How do I block my lost card?"}]}, timeout=120)
        body = r.json()
        assert r.status_code == 200 and body["variant"] == "v0001"
        record = httpx.get(f"{server.base_url}/v1/exchanges/{body['exchange_id']}", headers=admin).json()
        assert record["confidence_parts"]["calibrator"] is not None  # scored by the shipped calibrator
        calibrators = httpx.get(f"{server.base_url}/v1/calibrators", headers=admin).json()["data"]
        assert calibrators[0]["variant"] == "v0001" and calibrators[0]["source"] == "shipped"
    finally:
        server.stop()
        shutil.rmtree(tmp_path / "var", ignore_errors=True)
