"""HTTP API plumbing on the tiny model, in-process (Litestar test client, real SQLite)."""

import json

import pytest

from gateway.app import create_app
from tests.conftest import ready_client

CLIENT = {"Authorization": "Bearer dev-client-key"}
REVIEWER = {"Authorization": "Bearer dev-reviewer-key"}
ADMIN = {"Authorization": "Bearer dev-admin-key"}


def chat(content="How do I block my card?", **extra):
    return {"model": "tellerloop", "messages": [{"role": "user", "content": content}], "max_tokens": 12, **extra}


@pytest.fixture
async def client(make_settings, tiny_model_dir):
    settings = make_settings(tiny_model_dir, model={"max_context_tokens": 512, "max_tokens_limit": 64})
    app = create_app(settings)
    async with ready_client(app, settings) as c:
        yield c


async def test_completion_shape_and_log_row(client):
    r = await client.post("/v1/chat/completions", json=chat(user="cust-42"), headers=CLIENT)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["model"] == "tellerloop"
    assert r.headers["x-exchange-id"] == body["exchange_id"]
    assert 0.0 <= body["confidence"] <= 1.0
    assert body["variant"] == "base" and body["sources"] == []
    assert body["flagged"] == (body["confidence"] < client.settings.review.confidence_threshold)
    assert body["usage"]["completion_tokens"] <= 12
    row = (await client.get(f"/v1/exchanges/{body['exchange_id']}", headers=REVIEWER)).json()
    assert row["answer"] == body["choices"][0]["message"]["content"]
    assert row["user"].startswith("u_") and "cust-42" not in row["user"] and row["api_key_name"] == "dev-client"
    assert row["messages"][0]["role"] == "system" and row["messages"][-1]["content"] == "How do I block my card?"
    assert row["confidence"] == body["confidence"]
    assert set(row["confidence_parts"]) >= {"token_prob", "mean_logprob", "truncated", "looping"}
    assert row["latency_ms"] > 0 and row["ttft_ms"] is not None
    assert row["usage"]["prompt_tokens"] == body["usage"]["prompt_tokens"]


async def test_stream_text_equals_logged_answer(client):
    async with client.stream("POST", "/v1/chat/completions", json=chat(stream=True, logprobs=True), headers=CLIENT) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["cache-control"] == "no-cache" and r.headers["x-accel-buffering"] == "no"
        exchange_id = r.headers["x-exchange-id"]
        raw = b"".join([chunk async for chunk in r.aiter_raw()]).decode()
    events = raw.split("\r\n\r\n")  # SSE framing: one `data:` line per event, a blank line after each
    assert events[-1] == "" and all(e.startswith("data: ") and "\n" not in e for e in events[:-1])
    payloads = [e[len("data: "):] for e in events[:-1]]
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    last = chunks[-1]
    assert last["exchange_id"] == exchange_id and last["choices"][0]["finish_reason"] in {"stop", "length"}
    assert {"confidence", "flagged", "variant", "sources"} <= set(last)
    row = (await client.get(f"/v1/exchanges/{exchange_id}", headers=REVIEWER)).json()
    assert row["answer"] == text and row["stream"] is True


async def test_pii_never_reaches_the_log(client):
    body = chat("my card 4111 1111 1111 1111 and mail jo@example.com", user="jo@example.com")
    r = await client.post("/v1/chat/completions", json=body, headers=CLIENT)
    row = (await client.get(f"/v1/exchanges/{r.json()['exchange_id']}", headers=REVIEWER)).json()
    stored = json.dumps(row)
    assert "4111" not in stored and "jo@example.com" not in stored
    assert "[CARD]" in row["messages"][-1]["content"] and row["user"].startswith("u_")


async def test_a_card_number_split_across_turns_is_scrubbed_and_the_conversation_kept(client):
    body = chat()
    body["messages"] = [{"role": "user", "content": "my card is 4111 1111"},
                        {"role": "user", "content": "1111 1111, is it blocked?"}]
    r = await client.post("/v1/chat/completions", json=body, headers=CLIENT)
    row = (await client.get(f"/v1/exchanges/{r.json()['exchange_id']}", headers=REVIEWER)).json()
    assert "4111" not in json.dumps(row)
    assert row["conversation"] == [{"role": "user", "content": "my card is [CARD], is it blocked?"}]


async def test_customer_ids_are_keyed_hashes_that_never_collide(client):
    """Two customers with e-mail ids used to collide as "[EMAIL]"; keyed hashes keep them apart and
    the same customer always gets the same id (feedback ownership, sticky routing)."""
    ids = []
    for user in ("ann@example.com", "bob@example.com", "ann@example.com"):
        r = await client.post("/v1/chat/completions", json=chat(user=user), headers=CLIENT)
        ids.append((await client.get(f"/v1/exchanges/{r.json()['exchange_id']}", headers=REVIEWER)).json()["user"])
    assert ids[0] == ids[2] != ids[1] and all("@" not in i for i in ids)


@pytest.mark.parametrize(
    ("payload", "status", "param"),
    [
        ({"model": "tellerloop", "messages": []}, 400, "messages"),
        ({"model": "tellerloop", "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages.0.role"),
        ({"model": "tellerloop", "messages": [{"role": "user"}]}, 400, "messages.0.content"),
        ({"model": "tellerloop", "messages": [{"role": "system", "content": "x"}]}, 400, None),
        ({"messages": [{"role": "user", "content": "x"}]}, 400, "model"),
        (chat(max_token=5), 400, "max_token"),
        (chat(max_tokens=0), 400, "max_tokens"),
        (chat(max_tokens=65), 400, "max_tokens"),
        (chat(temperature=3), 400, "temperature"),
        (chat(n=2), 400, "n"),
        (chat(tools=[{"type": "function"}]), 400, "tools"),
        (chat(tool_choice="auto"), 400, "tool_choice"),
        (chat(response_format={"type": "json_object"}), 400, "response_format.type"),
        ({"model": "tellerloop", "messages": [{"role": "user", "content": [
            {"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]},
         400, "messages.0.content"),
        ({"model": "tellerloop", "messages": [{"role": "user", "content": [{"type": "text"}]}]}, 400, "messages.0.content"),
        (chat("word " * 700), 400, "messages"),
        ({**chat(), "model": "gpt-4o"}, 404, "model"),
    ],
)
async def test_bad_requests_get_openai_errors(client, payload, status, param):
    r = await client.post("/v1/chat/completions", json=payload, headers=CLIENT)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"] in {"invalid_request_error", "not_found_error"}
    if param:
        assert err["param"] == param


async def test_what_clients_send_by_default_is_accepted(client):
    """Content as text parts (joined), and fields that mean nothing here (many SDKs and UIs send them)."""
    r = await client.post("/v1/chat/completions", headers=CLIENT, json={
        "model": "tellerloop", "max_tokens": 3, "rag": False,
        "messages": [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
                     {"role": "user", "content": [{"type": "text", "text": "How do I"}, {"type": "text", "text": "block my card?"}]}],
        "response_format": {"type": "text"}, "metadata": {"ticket": "42"}, "store": False, "service_tier": "auto",
        "parallel_tool_calls": False, "tools": [], "tool_choice": "none"})
    assert r.status_code == 200, r.text
    row = (await client.get(f"/v1/exchanges/{r.json()['exchange_id']}", headers=REVIEWER)).json()
    assert row["messages"][-1]["content"] == "How do I\nblock my card?" and row["messages"][0]["content"] == "Be brief."
    image = await client.post("/v1/chat/completions", headers=CLIENT, json={**chat(), "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]})
    assert image.status_code == 400 and "only text content parts" in image.json()["error"]["message"]
    json_mode = await client.post("/v1/chat/completions", headers=CLIENT, json=chat(response_format={"type": "json_object"}))
    assert "cannot guarantee JSON" in json_mode.json()["error"]["message"]


async def test_too_long_prompt_says_context_length(client):
    r = await client.post("/v1/chat/completions", json=chat("word " * 700), headers=CLIENT)
    assert r.json()["error"]["code"] == "context_length_exceeded"
    assert "maximum context length" in r.json()["error"]["message"]


async def test_malformed_and_oversized_bodies(client):
    r = await client.post("/v1/chat/completions", content=b"{not json", headers={**CLIENT, "Content-Type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = await client.post("/v1/chat/completions", content=b"[1,2]", headers={**CLIENT, "Content-Type": "application/json"})
    assert r.status_code == 400 and "error" in r.json()
    big = json.dumps(chat("x" * (client.settings.server.max_body_bytes + 10)))
    r = await client.post("/v1/chat/completions", content=big, headers={**CLIENT, "Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["type"] == "invalid_request_error"


HOSTILE = {
    "nested 1000 deep": json.dumps(chat())[:-1] + ', "metadata": ' + '{"x":' * 1000 + "1" + "}" * 1000 + "}",
    "invalid UTF-8": b'{"model": "tellerloop", "messages": [{"role": "user", "content": "\xff\xfe"}]}',
    "seed beyond 64 bits": json.dumps(chat(seed=2**70, temperature=0.7)),
    "a 5000-digit integer": json.dumps(chat())[:-1] + ', "max_tokens": ' + "9" * 5000 + "}",
    "a stop string longer than any answer": json.dumps(chat(stop=["x" * 5000])),
    "five stop strings": json.dumps(chat(stop=["a", "b", "c", "d", "e"])),
    "NUL in a message": json.dumps(chat("a\u0000b")),
    "NUL in a stop string": json.dumps(chat(stop=["a\u0000"])),
    "NaN temperature": json.dumps(chat())[:-1] + ', "temperature": NaN}',
    "a string for top_p": json.dumps(chat(top_p="high")),
    "an object for user": json.dumps(chat(user={"a": 1})),
}


@pytest.mark.parametrize("name", list(HOSTILE))
async def test_hostile_bodies_get_a_400_never_a_500(client, name):
    body = HOSTILE[name]
    r = await client.post("/v1/chat/completions", content=body if isinstance(body, bytes) else body.encode(),
                          headers={**CLIENT, "Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["type"] == "invalid_request_error" and r.json()["error"]["message"]


async def test_seeds_across_the_whole_64_bit_range_work(client):
    for seed in (-(2**63), 0, 2**63, 2**64 - 1):
        r = await client.post("/v1/chat/completions", json=chat(seed=seed, temperature=0.7), headers=CLIENT)
        assert r.status_code == 200, r.text


async def test_auth_and_roles(client):
    r = await client.post("/v1/chat/completions", json=chat())
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert r.headers["www-authenticate"] == "Bearer"
    r = await client.post("/v1/chat/completions", json=chat(), headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and "Incorrect API key" in r.json()["error"]["message"]
    r = await client.post("/v1/chat/completions", json=chat(), headers={"Authorization": "Basic abc"})
    assert r.status_code == 401
    r = await client.get("/v1/exchanges/abc", headers=CLIENT)
    assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error"
    assert (await client.get("/v1/exchanges/abc", headers=REVIEWER)).status_code == 404
    assert (await client.get("/v1/exchanges/abc", headers=ADMIN)).status_code == 404
    assert (await client.get("/v1/models", headers=ADMIN)).status_code == 200
    assert (await client.get("/v1/models")).status_code == 401


async def test_models_health_ready_metrics_schema(client):
    models = (await client.get("/v1/models", headers=CLIENT)).json()
    assert [m["id"] for m in models["data"]] == ["tellerloop", "base"]
    assert (await client.get("/health")).json() == {"status": "ok"}
    ready = (await client.get("/ready")).json()
    assert ready["checks"] == {"model": True, "database": True, "knowledge_base": True, "adapters": True,
                               "scheduler_leader": True}  # a single gateway leads its own scheduler
    await client.post("/v1/chat/completions", json=chat(), headers=CLIENT)
    text = (await client.get("/metrics")).text
    for name in ("tellerloop_time_to_first_token_seconds_bucket", "tellerloop_generated_tokens_total",
                 "tellerloop_inflight_requests", "tellerloop_http_requests_total",
                 "tellerloop_http_request_duration_seconds_bucket", "tellerloop_engine_queued"):
        assert name in text, name
    from gateway.engine.precision import (
        resolve_dtype,  # the default "auto", resolved for this CPU
    )

    assert f'tellerloop_engine_dtype{{dtype="{resolve_dtype("auto")}"}} 1.0' in text
    schema = (await client.get("/schema/openapi.json")).json()
    assert "/v1/chat/completions" in schema["paths"]


async def test_unknown_route_and_method(client):
    r = await client.get("/v1/nothing", headers=CLIENT)
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    r = await client.delete("/health")
    assert r.status_code == 405 and "error" in r.json()


async def test_request_id_is_echoed(client):
    r = await client.get("/health", headers={"X-Request-Id": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    assert len((await client.get("/health")).headers["x-request-id"]) == 32


async def test_every_v1_response_has_a_schema(client):
    """Each /v1 operation documents its success body as a named component (no bare `object`), so a
    client generator gets types; errors are documented by the OpenAI-style error model."""
    schema = (await client.get("/schema/openapi.json")).json()
    components = schema["components"]["schemas"]
    missing = []
    for path, operations in schema["paths"].items():
        if not path.startswith("/v1/") or path == "/v1/review/export":  # export streams JSONL lines
            continue
        if path in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter"):  # plain text, as vLLM answers
            continue
        for method, op in operations.items():
            ok = [r for code, r in op["responses"].items() if code.startswith("2") and r.get("content")]
            refs = [c.get("schema", {}).get("$ref", "") for r in ok for c in r["content"].values()]
            if not any(ref.split("/")[-1] in components for ref in refs):
                missing.append(f"{method.upper()} {path}")
    assert missing == []
    for name in ("ChatCompletion", "ModelList", "ExchangeRecord", "ReviewItemDetail", "AdapterList",
                 "ExperimentsOverview", "Run", "SearchResult"):
        assert components[name]["properties"], name
    assert {"exchange_id", "confidence", "flagged", "variant", "sources"} <= set(components["ChatCompletion"]["properties"])


async def test_sources_keep_only_the_metadata_an_entry_has(client):
    """Responses leave out fields a model was not given (a source without a title has no `title`)."""
    body = (await client.post("/v1/chat/completions", json=chat(), headers=CLIENT)).json()
    assert "error" not in body
    for source in body["sources"]:
        assert None not in source.values()
