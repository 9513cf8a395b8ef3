"""Knowledge endpoints, retrieval in chat (tiny model, in-process), and the `kb` CLI."""

import json
import subprocess
import sys

import pytest

from gateway.app import create_app

from .conftest import ROOT, ready_client, seed_knowledge
from .test_roles_console import sign_in

CLIENT = {"Authorization": "Bearer dev-client-key"}
REVIEWER = {"Authorization": "Bearer dev-reviewer-key"}
ADMIN = {"Authorization": "Bearer dev-admin-key"}
FAQ_Q = "How should I get the IVR Password if I hold an add-on card"


@pytest.fixture
async def client(make_settings, tiny_model_dir, faq_chroma_dir, tmp_path):
    settings = make_settings(tiny_model_dir, model={"max_context_tokens": 2048})
    seed_knowledge(settings.storage.data_dir, faq_chroma_dir)
    async with ready_client(create_app(settings), settings) as c:
        yield c


async def test_rag_chat_returns_and_logs_sources(client):
    body = {"model": "tellerloop", "messages": [{"role": "user", "content": FAQ_Q}], "max_tokens": 8}
    r = (await client.post("/v1/chat/completions", json=body, headers=CLIENT)).json()
    assert len(r["sources"]) == 1  # rag.top_k
    top = r["sources"][0]
    assert top["question"].startswith("How should I get the IVR Password") and top["score"] > 0.8
    assert {"id", "text", "score", "source", "category"} <= set(top)
    row = (await client.get(f"/v1/exchanges/{r['exchange_id']}", headers=REVIEWER)).json()
    assert row["rag"] is True and row["sources"] == r["sources"] and row["retrieval_ms"] > 0
    assert "IVR password can be requested" in row["messages"][0]["content"]  # the context reached the prompt
    assert row["confidence_parts"]["top_similarity"] == pytest.approx(top["score"], abs=1e-3)

    r = (await client.post("/v1/chat/completions", json={**body, "rag": False}, headers=CLIENT)).json()
    assert r["sources"] == []
    row = (await client.get(f"/v1/exchanges/{r['exchange_id']}", headers=REVIEWER)).json()
    assert row["rag"] is False and row["confidence_parts"]["retrieval"] is None

    r = (await client.post("/v1/chat/completions", json={**body, "rag_top_k": 3}, headers=CLIENT)).json()
    assert len(r["sources"]) == 3 and r["sources"][0]["question"] == top["question"]  # fused rank order
    r = await client.post("/v1/chat/completions", json={**body, "rag_top_k": 99}, headers=CLIENT)
    assert r.status_code == 400 and r.json()["error"]["param"] == "rag_top_k"


async def test_a_follow_up_is_searched_with_the_question_it_follows(client):
    convo = [{"role": "user", "content": FAQ_Q}, {"role": "assistant", "content": "You can ask for it by SMS."},
             {"role": "user", "content": "and what if that does not work?"}]
    r = (await client.post("/v1/chat/completions", json={"model": "tellerloop", "messages": convo, "max_tokens": 4},
                           headers=CLIENT)).json()
    assert r["sources"][0]["question"].startswith("How should I get the IVR Password")
    row = (await client.get(f"/v1/exchanges/{r['exchange_id']}", headers=REVIEWER)).json()
    assert row["retrieval_query"] == f"{FAQ_Q}\nand what if that does not work?"  # rag.query_turns = 2
    # rag.history = "query": the model is asked the retrieval query as one customer question...
    assert [m["role"] for m in row["messages"]] == ["system", "user"]
    assert row["messages"][1]["content"] == row["retrieval_query"]
    # ...and the conversation as the customer had it is kept for reviewers
    assert row["conversation"] == convo[:2]
    r = await client.post(f"/v1/exchanges/{r['exchange_id']}/flags", json={"reason": "check"}, headers=REVIEWER)
    assert r.status_code == 201
    await sign_in(client, "dev-reviewer-key")
    queue = (await client.get("/v1/review/queue", headers=REVIEWER)).json()["data"]
    page = (await client.get(f"/console/items/{queue[0]['id']}")).text
    assert 'id="earlier-turns"' in page and "You can ask for it by SMS." in page
    single = (await client.post("/v1/chat/completions", headers=CLIENT, json={
        "model": "tellerloop", "messages": convo[:1], "max_tokens": 4})).json()
    assert (await client.get(f"/v1/exchanges/{single['exchange_id']}", headers=REVIEWER)).json()["conversation"] is None


@pytest.mark.parametrize("stream", [False, True])
async def test_a_question_the_bank_cannot_answer_gets_the_fallback_and_is_queued(client, stream):
    body = {"model": "tellerloop", "messages": [{"role": "user", "content": "Will it rain in Paris tomorrow?"}],
            "max_tokens": 8, "stream": stream}
    fallback = client.settings.rag.fallback_answer
    if stream:
        async with client.stream("POST", "/v1/chat/completions", json=body, headers=CLIENT) as resp:
            chunks = [json.loads(line[6:]) for line in [x async for x in resp.aiter_lines()]
                      if line.startswith("data: {")]
        assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]) == fallback
        r = chunks[-1]
    else:
        r = (await client.post("/v1/chat/completions", json=body, headers=CLIENT)).json()
        assert r["choices"][0]["message"]["content"] == fallback and r["usage"]["completion_tokens"] == 0
    assert r["fallback"] is True and r["retrieval"] == "no_match" and r["flagged"] is True
    row = (await client.get(f"/v1/exchanges/{r['exchange_id']}", headers=REVIEWER)).json()
    assert row["retrieval"] == "no_match" and row["answer"] == fallback
    queue = (await client.get("/v1/review/queue?limit=50", headers=REVIEWER)).json()
    assert r["exchange_id"] in [i["exchange_id"] for i in queue["data"]]
    metrics = (await client.get("/metrics", headers=REVIEWER)).text
    assert "tellerloop_fallback_answers_total" in metrics
    # a request is valid or not whatever retrieval finds: too long for the model is a 400, fallback or not
    r = await client.post("/v1/chat/completions", headers=CLIENT, json={**body, "stream": False, "messages": [
        {"role": "user", "content": "rain " * 3000}]})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"


async def test_streamed_last_chunk_carries_sources(client):
    body = {"model": "tellerloop", "messages": [{"role": "user", "content": FAQ_Q}], "max_tokens": 6, "stream": True}
    async with client.stream("POST", "/v1/chat/completions", json=body, headers=CLIENT) as r:
        payloads = [l[6:] async for l in r.aiter_lines() if l.startswith("data: ")]
    last = json.loads(payloads[-2])
    assert last["sources"] and last["sources"][0]["question"].startswith("How should I get the IVR Password")


async def test_ingest_search_stats_delete(client):
    doc = {"source": "hours.md", "content": "# Opening hours\n\nBranches open at 9 am on weekdays and 10 am on Saturdays.\n"}
    r = await client.post("/v1/knowledge/documents", json=doc, headers=ADMIN)
    assert r.status_code == 201 and r.json()["added"] == 1
    assert (await client.post("/v1/knowledge/documents", json=doc, headers=ADMIN)).json()["unchanged"] is True
    r = await client.get("/v1/knowledge/search", params={"q": "when do branches open on saturday", "k": 2}, headers=REVIEWER)
    assert r.status_code == 200 and r.json()["results"][0]["source"] == "hours.md"
    stats = (await client.get("/v1/knowledge/stats", headers=REVIEWER)).json()
    assert stats["sources"] == {"faq.csv": 1039, "hours.md": 1}
    r = await client.delete("/v1/knowledge/documents", params={"source": "hours.md"}, headers=ADMIN)
    assert r.json() == {"source": "hours.md", "deleted": 1}
    r = await client.delete("/v1/knowledge/documents", params={"source": "hours.md"}, headers=ADMIN)
    assert r.status_code == 404


@pytest.mark.parametrize(
    ("payload", "status", "fragment"),
    [
        ({"source": "a.pdf", "content": "x"}, 400, "unsupported file type"),
        ({"source": "a.md", "content": "   \n"}, 400, "empty"),
        ({"source": "a.csv", "content": "q,a\n1,2\n"}, 400, "'question' and 'answer' columns"),
        ({"source": "a.md", "content": "x", "format": "pdf"}, 400, "format"),
        ({"source": "a.md"}, 400, "content"),
        ({"source": "a.md", "content": "x", "extra": 1}, 400, "extra"),
        ({"source": "reviewed-answers.jsonl", "content": '{"question": "q", "answer": "a"}'}, 400, "reserved"),
    ],
)
async def test_bad_ingest_requests(client, payload, status, fragment):
    r = await client.post("/v1/knowledge/documents", json=payload, headers=ADMIN)
    assert r.status_code == status and fragment in json.dumps(r.json())
    stats = (await client.get("/v1/knowledge/stats", headers=REVIEWER)).json()
    assert set(stats["sources"]) == {"faq.csv"}  # nothing half-ingested


async def test_knowledge_roles(client):
    doc = {"source": "x.md", "content": "hello"}
    assert (await client.post("/v1/knowledge/documents", json=doc, headers=REVIEWER)).status_code == 403
    assert (await client.post("/v1/knowledge/documents", json=doc)).status_code == 401
    assert (await client.get("/v1/knowledge/search", params={"q": "x"}, headers=CLIENT)).status_code == 403
    assert (await client.get("/v1/knowledge/search", params={"q": "x"})).status_code == 401
    assert (await client.delete("/v1/knowledge/documents", params={"source": "x"}, headers=REVIEWER)).status_code == 403
    r = await client.get("/v1/knowledge/search", headers=REVIEWER)
    assert r.status_code == 400 and "q" in json.dumps(r.json())
    r = await client.get("/v1/knowledge/search", params={"q": "x", "k": 500}, headers=REVIEWER)
    assert r.status_code == 400


def run_cli(*args, data_dir):
    return subprocess.run([sys.executable, "-m", "gateway.cli", *args, "--data-dir", str(data_dir)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, env={"HF_HUB_OFFLINE": "1", "PATH": ""})


def test_kb_cli(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "fees.md").write_text("# Fees\n\nA wire transfer costs 5 EUR.\n\n# Cards\n\nBlock lost cards in the app.\n")
    (docs / "bad.txt").write_bytes("caf\xe9".encode("latin-1"))
    data = tmp_path / "var"
    proc = run_cli("kb", "ingest", str(docs), data_dir=data)
    assert proc.returncode == 2 and "bad.txt: not valid UTF-8" in proc.stderr and "Traceback" not in proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert lines[0]["source"] == "fees.md" and lines[0]["added"] == 2 and lines[-1]["chunks"] == 2
    stats = json.loads(run_cli("kb", "stats", data_dir=data).stdout)
    assert stats["sources"] == {"fees.md": 2}
    assert json.loads(run_cli("kb", "delete", "fees.md", data_dir=data).stdout)["deleted"] == 2
    proc = run_cli("kb", "delete", "fees.md", data_dir=data)
    assert proc.returncode == 2 and "no documents" in proc.stderr
    proc = run_cli("kb", "ingest", str(tmp_path / "missing.md"), data_dir=data)
    assert proc.returncode == 2 and "no such file" in proc.stderr
