"""Dependency faults: the gateway degrades instead of failing. A real `chroma run` server stopped
under a running gateway: chats that asked for retrieval are answered without it, marked in the
response and the row; when Chroma is back, retrieval is back."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from gateway.app import create_app
from tests.conftest import ChromaServer, free_port, ready_client

CLIENT = {"Authorization": "Bearer dev-client-key"}
REVIEWER = {"Authorization": "Bearer dev-reviewer-key"}
ADMIN = {"Authorization": "Bearer dev-admin-key"}


@pytest.fixture
def chroma(tmp_path):
    server = ChromaServer(tmp_path / "chroma-srv")
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


class TcpProxy:
    """A TCP relay in front of PostgreSQL that the test can cut (the database "goes down") and restore."""

    def __init__(self, target_port: int) -> None:
        import socket
        import threading

        self.target_port, self.port = target_port, free_port()
        self._socket, self._threading = socket, threading
        self._conns: list = []
        self._listener = None

    def start(self) -> None:
        s = self._socket.socket()
        s.setsockopt(self._socket.SOL_SOCKET, self._socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", self.port))
        s.listen(64)
        self._listener = s
        self._threading.Thread(target=self._accept, args=(s,), daemon=True).start()

    def _accept(self, listener) -> None:  # noqa: ANN001
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            upstream = self._socket.create_connection(("127.0.0.1", self.target_port))
            self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                self._threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a, b) -> None:  # noqa: ANN001
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                try:
                    s.close()
                except OSError:
                    pass

    def cut(self) -> None:
        try:
            self._listener.shutdown(self._socket.SHUT_RDWR)  # wakes the accepting thread (close alone does not)
        except OSError:
            pass
        self._listener.close()
        for s in self._conns:
            try:
                s.shutdown(self._socket.SHUT_RDWR)
                s.close()
            except OSError:
                pass
        self._conns.clear()


async def test_database_down_fails_ready_and_refuses_chats_quickly(tmp_path, tiny_model_dir):
    """PostgreSQL behind a relay the test cuts: /ready fails, chats get 503 with Retry-After within
    seconds (stream or not: never an answer that is not recorded), nothing is half-written; when the
    database is back, the gateway recovers by itself, and it still stops cleanly on SIGTERM (closing
    the pool is bounded by storage.connect_timeout_s: it hung on the broken connections before)."""
    import sqlalchemy
    from sqlalchemy.ext.asyncio import create_async_engine

    from tests.conftest import PG_URL, fresh_postgres_database, start_server

    if not PG_URL:
        pytest.skip("POSTGRES: set TELLERLOOP_TEST_POSTGRES_URL to run the PostgreSQL tests")
    async with fresh_postgres_database("tellerloop_fault") as url:
        pg_port = int(url.split("@", 1)[1].split("/", 1)[0].rsplit(":", 1)[1])
        proxy = TcpProxy(pg_port)
        proxy.start()
        via_proxy = url.replace(f":{pg_port}/", f":{proxy.port}/")
        server = start_server(tmp_path, (
            f'[model]\nbase = "{tiny_model_dir}"\n[rag]\nenabled_by_default = false\ndemo_data = ""\n'
            f'[retraining]\nenabled = false\n[storage]\ndatabase_url = "{via_proxy}"\nconnect_timeout_s = 3\n'))
        ask = {"model": "tellerloop", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
        try:
            async with httpx.AsyncClient(base_url=server.base_url, timeout=60) as c:
                assert (await c.post("/v1/chat/completions", json=ask, headers=CLIENT)).status_code == 200
                proxy.cut()
                started = time.monotonic()
                ready = await c.get("/ready")
                assert ready.status_code == 503 and ready.json()["checks"]["database"] is False
                for body in (ask, {**ask, "stream": True}, ask):
                    r = await c.post("/v1/chat/completions", json=body, headers=CLIENT)
                    assert r.status_code == 503 and r.headers["retry-after"], r.text
                    assert r.json()["error"]["code"] == "storage_unavailable"
                assert time.monotonic() - started < 20
                proxy = TcpProxy(pg_port)  # the database comes back (same address)
                proxy.port = int(via_proxy.split("@", 1)[1].split("/", 1)[0].rsplit(":", 1)[1])
                proxy.start()
                for _ in range(60):
                    if (await c.get("/ready")).status_code == 200:
                        break
                    await asyncio.sleep(0.5)
                back = await c.post("/v1/chat/completions", json=ask, headers=CLIENT)
                assert back.status_code == 200, back.text
            # the pool still holds the connections the cut broke: SIGTERM must exit anyway, not hang on them
            server.proc.terminate()
            assert server.proc.wait(timeout=20) == 0
        finally:
            server.stop()
            proxy.cut()
        db = create_async_engine(url)
        try:
            async with db.connect() as conn:
                rows = (await conn.execute(sqlalchemy.text("SELECT finish_reason FROM exchanges"))).scalars().all()
        finally:
            await db.dispose()
        assert len(rows) == 2 and set(rows) <= {"stop", "length"}  # the two answered chats; nothing half-written
