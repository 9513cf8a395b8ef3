"""Durable streams, with real `tellerloop serve` processes (the tiny model: fast and deterministic
enough): a stream's row exists before its first token and is finalised at the end; `kill -9` in the
middle of a run loses nothing the client saw complete and marks what was unfinished when the gateway
comes back; SIGTERM drains in-flight streams and exits 0."""

from __future__ import annotations

import json
import signal
import sqlite3
import threading
import time

import httpx

from tests.conftest import start_server

CLIENT = {"Authorization": "Bearer dev-client-key"}


def config(model_dir) -> str:
    return (f'[model]\nbase = "{model_dir}"\nmax_tokens_limit = 1024\n[rag]\nenabled_by_default = false\ndemo_data = ""\n'
            "[retraining]\nenabled = false\n")


class Stream(threading.Thread):
    """One streamed chat, recording what the client saw: its id, its text, whether [DONE] came."""

    def __init__(self, base: str, max_tokens: int) -> None:
        super().__init__(daemon=True)
        self.base, self.max_tokens = base, max_tokens
        self.exchange_id, self.text, self.done, self.first_token = None, "", False, threading.Event()

    def run(self) -> None:
        try:
            with httpx.stream("POST", f"{self.base}/v1/chat/completions", headers=CLIENT, timeout=120, json={
                    "model": "tellerloop", "messages": [{"role": "user", "content": "tell me a long story"}],
                    "max_tokens": self.max_tokens, "stream": True}) as r:
                self.exchange_id = r.headers["x-exchange-id"]
                for line in r.iter_lines():
                    if line == "data: [DONE]":
                        self.done = True
                    elif line.startswith("data: {"):
                        event = json.loads(line[6:])
                        for choice in event.get("choices", []):
                            self.text += choice["delta"].get("content") or ""
                            if self.text:
                                self.first_token.set()
        except httpx.HTTPError:
            pass  # the server was killed under us: what we saw is what we record


def rows(data_dir) -> dict[str, tuple]:
    db = sqlite3.connect(f"file:{data_dir / 'tellerloop.db'}?mode=ro", uri=True)
    try:
        return {r[0]: r[1:] for r in db.execute("SELECT id, finish_reason, answer, error FROM exchanges")}
    finally:
        db.close()


def test_kill_9_mid_run_loses_no_exchange(tmp_path, tiny_model_dir):
    server = start_server(tmp_path, config(tiny_model_dir))
    port = int(server.base_url.rsplit(":", 1)[1])
    try:
        short = [Stream(server.base_url, 4) for _ in range(4)]
        long = [Stream(server.base_url, 1000) for _ in range(4)]
        for s in short + long:
            s.start()
        for s in long:
            assert s.first_token.wait(60)
        for s in short:
            s.join(60)
        assert all(s.done for s in short) and not any(s.done for s in long)
        mid_run = rows(server.data_dir)
        assert all(mid_run[s.exchange_id][0] == "streaming" for s in long)  # the rows exist already
        server.proc.send_signal(signal.SIGKILL)
        server.proc.wait(30)
        for s in long:
            s.join(30)
    finally:
        server.stop()
    restarted = start_server(tmp_path, config(tiny_model_dir), port=port)  # the same slot comes back
    try:
        from gateway.core.settings import load_settings

        scrub = load_settings().pii.scrubber().scrub
        after = rows(restarted.data_dir)
        for s in short:  # every stream the client saw complete is there, with what the client saw
            finish, answer, error = after[s.exchange_id]
            assert finish in ("stop", "length") and answer == scrub(s.text) and error is None
        for s in long:  # every unfinished one is there and marked
            finish, answer, error = after[s.exchange_id]
            assert finish == "error" and error.startswith("interrupted"), (finish, error)
        assert "exchange.interrupted_streams" in restarted.log()
        r = httpx.post(f"{restarted.base_url}/v1/chat/completions", headers=CLIENT, timeout=60, json={
            "model": "tellerloop", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        assert r.status_code == 200  # and it serves again
    finally:
        restarted.stop()


def test_sigterm_drains_in_flight_streams_and_exits_0(tmp_path, tiny_model_dir):
    server = start_server(tmp_path, config(tiny_model_dir))
    try:
        stream = Stream(server.base_url, 400)
        stream.start()
        assert stream.first_token.wait(60)
        started = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        try:  # no new work is admitted while draining
            refused = httpx.post(f"{server.base_url}/v1/chat/completions", headers=CLIENT, timeout=5, json={
                "model": "tellerloop", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
            assert refused.status_code >= 500 or not stream.is_alive()
        except httpx.HTTPError:
            pass
        stream.join(60)
        assert stream.done, "the in-flight stream was cut instead of drained"
        assert server.proc.wait(60) == 0 and time.monotonic() - started < 60
        finish, answer, _ = rows(server.data_dir)[stream.exchange_id]
        assert finish in ("stop", "length") and answer
    finally:
        server.stop()


class FailingStream:
    """The engine's stream, failing after two tokens (a worker crash, an out-of-memory step)."""

    def __init__(self, inner) -> None:  # noqa: ANN001
        self.inner, self.seen = inner, 0

    def __aiter__(self):  # noqa: ANN204
        return self

    async def __anext__(self):  # noqa: ANN204
        from gateway.engine.base import EngineFailure, TokenEvent

        event = await self.inner.__anext__()
        if isinstance(event, TokenEvent):
            self.seen += 1
            if self.seen > 2:
                await self.inner.aclose()
                raise EngineFailure("the engine worker stopped (simulated)")
        return event

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_an_engine_failure_leaves_an_error_row_stream_or_not(make_settings, tiny_model_dir):
    from gateway.app import create_app
    from gateway.core.runtime import build_engine
    from tests.conftest import ready_client

    settings = make_settings(tiny_model_dir, rag={"enabled_by_default": False})
    engine = build_engine(settings)
    submit = engine.submit

    async def failing_submit(request):  # noqa: ANN001, ANN202
        return FailingStream(await submit(request))

    engine.submit = failing_submit
    async with ready_client(create_app(settings, engine=engine), settings) as c:
        body = {"model": "tellerloop", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 20}
        r = await c.post("/v1/chat/completions", json=body, headers=CLIENT)
        assert r.status_code == 500 and r.json()["error"]["code"] == "generation_failed"
        r = await c.post("/v1/chat/completions", json={**body, "stream": True}, headers=CLIENT)
        events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
        assert events[-1]["error"]["code"] == "generation_failed" and "data: [DONE]" not in r.text
        exchange_id = r.headers["x-exchange-id"]
        row = (await c.get(f"/v1/exchanges/{exchange_id}", headers={"Authorization": "Bearer dev-admin-key"})).json()
        assert row["finish_reason"] == "error" and "simulated" in row["error"]
        assert row["usage"]["completion_tokens"] == 2 and row["answer"]  # the partial answer is kept (scrubbed)
    db = sqlite3.connect(settings.storage.data_dir / "tellerloop.db")
    assert db.execute("SELECT count(*) FROM exchanges WHERE finish_reason = 'error'").fetchone()[0] == 2
    assert db.execute("SELECT count(*) FROM review_items").fetchone()[0] == 0  # a failure is not queued for review
    db.close()
