"""Dependency faults: the gateway degrades instead of failing. A real `chroma run` server stopped
under a running gateway: chats that asked for retrieval are answered without it, marked in the
response and the row; when Chroma is back, retrieval is back."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from gateway.app import create_app
from tests.conftest import free_port, ready_client

CLIENT = {"Authorization": "Bearer dev-client-key"}
REVIEWER = {"Authorization": "Bearer dev-reviewer-key"}
ADMIN = {"Authorization": "Bearer dev-admin-key"}


class Chroma:
    def __init__(self, path: Path) -> None:
        self.path, self.port, self.proc = path, free_port(), None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        chroma = Path(sys.executable).parent / "chroma"
        self.proc = subprocess.Popen([str(chroma), "run", "--path", str(self.path), "--host", "127.0.0.1",
                                      "--port", str(self.port)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/api/v2/heartbeat", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.3)
        raise RuntimeError("chroma server did not start")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(20)


@pytest.fixture
def chroma(tmp_path):
    server = Chroma(tmp_path / "chroma-srv")
    server.start()
    yield server
    server.stop()


async def test_chroma_down_answers_without_retrieval_and_says_so(make_settings, tiny_model_dir, chroma):
    settings = make_settings(tiny_model_dir, rag={"chroma_url": chroma.url, "enabled_by_default": True})
    async with ready_client(create_app(settings), settings) as c:
        doc = {"source": "cards.md", "content": "# Lost card\n\nCall us at once to block a lost card.\n"}
        assert (await c.post("/v1/knowledge/documents", json=doc, headers=ADMIN)).status_code == 201
        ask = {"model": "tellerloop", "messages": [{"role": "user", "content": "I lost my card"}], "max_tokens": 4}
        grounded = (await c.post("/v1/chat/completions", json=ask, headers=CLIENT)).json()
        assert grounded["retrieval"] == "ok" and grounded["sources"]

        chroma.stop()
        r = await c.post("/v1/chat/completions", json=ask, headers=CLIENT)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["retrieval"] == "unavailable" and body["sources"] == []
        row = (await c.get(f"/v1/exchanges/{body['exchange_id']}", headers=REVIEWER)).json()
        assert row["retrieval"] == "unavailable" and row["rag"] is True and row["sources"] == []
        streamed = await c.post("/v1/chat/completions", json={**ask, "stream": True}, headers=CLIENT)
        assert '"retrieval":"unavailable"' in streamed.text.replace(" ", "") and "data: [DONE]" in streamed.text
        assert "tellerloop_retrieval_failures_total 2.0" in (await c.get("/metrics")).text

        chroma.start()  # back on the same port and data: retrieval is back, no restart of the gateway
        for _ in range(20):
            again = (await c.post("/v1/chat/completions", json=ask, headers=CLIENT)).json()
            if again["retrieval"] == "ok":
                break
            await asyncio.sleep(0.5)
        assert again["retrieval"] == "ok" and again["sources"]
