"""Per-key limits: requests per minute and generations in flight per API key (429 + Retry-After, the
other keys unaffected), checked before any work; console sign-in attempts limited per address and key."""

from __future__ import annotations

import asyncio
import json

from gateway.app import create_app
from tests.conftest import ready_client, served_client

CLIENT = {"Authorization": "Bearer dev-client-key"}
REVIEWER = {"Authorization": "Bearer dev-reviewer-key"}


def chat(**extra):
    return {"model": "tellerloop", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 3,
            "rag": False, **extra}


async def test_requests_per_minute_per_key(make_settings, tiny_model_dir):
    settings = make_settings(tiny_model_dir, limits={"requests_per_minute": 5})
    async with ready_client(create_app(settings), settings) as c:
        codes = [(await c.get("/v1/models", headers=CLIENT)).status_code for _ in range(5)]
        assert codes == [200] * 5
        refused = await c.post("/v1/chat/completions", json=chat(), headers=CLIENT)
        assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1
        error = refused.json()["error"]
        assert error["type"] == "rate_limit_error" and "requests_per_minute" in error["message"]
        assert (await c.get("/v1/models", headers=REVIEWER)).status_code == 200  # another key: its own budget
        assert (await c.get("/health")).status_code == 200  # probes are never limited


async def test_generations_in_flight_per_key(make_settings, tiny_model_dir):
    """Behind a real HTTP server, so the first stream is provably still running."""
    settings = make_settings(tiny_model_dir, limits={"concurrent_generations": 1})
    async with served_client(create_app(settings), settings) as c:
        decoding = asyncio.Event()

        async def long_stream():
            async with c.stream("POST", "/v1/chat/completions", headers=CLIENT,
                                json=chat(max_tokens=200, stream=True)) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
                        decoding.set()
            return r.status_code

        task = asyncio.create_task(long_stream())
        await asyncio.wait_for(decoding.wait(), 60)
        refused = await c.post("/v1/chat/completions", json=chat(), headers=CLIENT)
        assert refused.status_code == 429 and refused.headers["retry-after"], refused.text
        assert refused.json()["error"]["code"] == "too_many_generations"
        assert (await c.post("/v1/chat/completions", json=chat(), headers=REVIEWER)).status_code == 200
        assert await task == 200
        assert (await c.post("/v1/chat/completions", json=chat(), headers=CLIENT)).status_code == 200  # slot back
        for _ in range(3):  # refused and failed requests give their slot back too
            assert (await c.post("/v1/chat/completions", json=chat(model="nope"), headers=CLIENT)).status_code == 404
        assert (await c.post("/v1/chat/completions", json=chat(), headers=CLIENT)).status_code == 200


async def test_console_sign_in_attempts_are_limited(make_settings, tiny_model_dir):
    from tests.test_roles_console import csrf

    settings = make_settings(tiny_model_dir, console={"login_max_failures": 3, "login_window_s": 60})
    async with ready_client(create_app(settings), settings) as c:
        async def attempt(key: str):
            page = await c.get("/console/login")
            return await c.post("/console/login", data={"key": key, "next": "/console", "_csrf_token": csrf(page.text)},
                                follow_redirects=False)

        assert [(await attempt(f"guess-{i}")).status_code for i in range(3)] == [401, 401, 401]
        throttled = await attempt("dev-reviewer-key")  # even the right key waits: the address is throttled
        assert throttled.status_code == 429 and 1 <= int(throttled.headers["retry-after"]) <= 60
        assert "Too many failed sign-ins" in throttled.text
