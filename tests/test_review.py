"""Feedback, flags, the review queue, claims, consensus, agreement stats and export, in-process on
the tiny model with a real SQLite database and the real MiniLM embedder (for corrections)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import uuid
from datetime import datetime, timedelta, timezone

import pytest

from gateway.app import create_app
from gateway.exchanges.models import Exchange
from gateway.review.agreement import cohen_kappa, consensus_group, percent_agreement
from tests.conftest import ROOT, fresh_postgres_database, ready_client

KEYS = [
    {"name": "app", "role": "client", "key": "k-client"},
    {"name": "app2", "role": "client", "key": "k-client2"},
    {"name": "r1", "role": "reviewer", "key": "k-r1"},
    {"name": "r2", "role": "reviewer", "key": "k-r2"},
    {"name": "r3", "role": "reviewer", "key": "k-r3"},
    {"name": "boss", "role": "admin", "key": "k-admin"},
]
H = {k["name"]: {"Authorization": f"Bearer {k['key']}"} for k in KEYS}


def chat(content="How do I block my card?", **extra):
    return {"model": "tellerloop", "messages": [{"role": "user", "content": content}], "max_tokens": 6, **extra}


@pytest.fixture
async def client(make_settings, tiny_model_dir):
    async for c in _client(make_settings, tiny_model_dir):
        yield c


@pytest.fixture(params=["sqlite", "postgres"])
async def db_client(request, make_settings, tiny_model_dir):
    """The app on SQLite, then on a fresh PostgreSQL database: the race-prone paths must hold on both."""
    if request.param == "sqlite":
        async for c in _client(make_settings, tiny_model_dir):
            yield c
        return
    async with fresh_postgres_database("tellerloop_review") as url:
        async for c in _client(make_settings, tiny_model_dir, url):
            yield c


async def _client(make_settings, tiny_model_dir, database_url: str = ""):
    settings = make_settings(tiny_model_dir, model={"max_context_tokens": 512, "max_tokens_limit": 64},
                             rag={"enabled_by_default": False}, auth={"keys": KEYS},
                             storage={"database_url": database_url})
    app = create_app(settings)
    async with ready_client(app, settings) as c:
        yield c


async def add_exchange(client, confidence: float, *, age_h: float = 0.0, user: str | None = None,
                       key: str = "app", answer: str = "Use the app to block it.") -> str:
    """An exchange row as the chat service would log it, with a chosen confidence (the tiny model's
    own confidence is always ~0, which would make ordering tests meaningless)."""
    from gateway.core.security import CustomerIds

    when = datetime.now(timezone.utc) - timedelta(hours=age_h)
    row = Exchange(  # `user` stored as the gateway stores it: the keyed hash
        id=uuid.uuid4().hex, created_at=when, completed_at=when, api_key_name=key,
        user=CustomerIds.from_settings(client.settings).key(user),
        model_requested="tellerloop", variant="base",
        messages=[{"role": "system", "content": "sys"}, {"role": "user", "content": f"question {confidence}"}],
        answer=answer, finish_reason="stop", stream=False, rag=False, sources=[], params={}, prompt_tokens=5,
        completion_tokens=5, ttft_ms=1.0, latency_ms=2.0, confidence=confidence, confidence_parts={},
        flagged=confidence < client.settings.review.confidence_threshold,
    )
    # Our own engine in the test's event loop (the app's runs in the test client's loop; asyncpg
    # connections cannot cross loops).
    from gateway.core.runtime import open_database
    from gateway.exchanges.repository import ExchangeRepository
    from gateway.review.repository import ReviewRepository

    async with open_database(client.settings, migrate_schema=False) as sessions:
        reviews = ReviewRepository(sessions, client.settings.review)
        queue_it = (lambda s, e: reviews.enqueue_in(s, e, now=when)) if row.flagged else None
        await ExchangeRepository(sessions).add(row, queue_it)
    return row.id


async def queue(client, who="r1", limit=50):
    r = await client.get(f"/v1/review/queue?limit={limit}", headers=H[who])
    assert r.status_code == 200, r.text
    return r.json()["data"]


async def item_of(client, exchange_id):
    r = await client.get(f"/v1/exchanges/{exchange_id}", headers=H["r1"])
    return r.json()["review_item"]["id"]


async def label(client, item_id, who, verdict, answer=None, **extra):
    body = {"verdict": verdict, **({"corrected_answer": answer} if answer is not None else {}), **extra}
    return await client.post(f"/v1/review/items/{item_id}/labels", json=body, headers=H[who])


# ---- pure functions --------------------------------------------------------------------------
def test_cohen_kappa_known_example():
    # The textbook 2x2 example: 20 yes/yes, 5 yes/no, 10 no/yes, 15 no/no → p_o 0.7, p_e 0.5, κ 0.4.
    obs = [("yes", "yes")] * 20 + [("yes", "no")] * 5 + [("no", "yes")] * 10 + [("no", "no")] * 15
    assert cohen_kappa(obs) == pytest.approx(0.4)
    assert cohen_kappa([("a", "a")] * 5) is None  # p_e = 1: undefined, not a fake 1.0
    assert cohen_kappa([]) is None
    assert cohen_kappa([("a", "b"), ("b", "a")]) == pytest.approx(-1.0)
    assert percent_agreement([True, False, True, True]) == 0.75


def test_consensus_group_needs_pairwise_agreement():
    agrees = {frozenset((1, 2)): False, frozenset((1, 3)): True, frozenset((2, 3)): False}
    assert consensus_group([1, 2], agrees, 2) is None
    assert consensus_group([1, 2, 3], agrees, 2) == (1, 3)
    assert consensus_group([1, 2, 3], agrees, 3) is None
    assert consensus_group([7], {}, 1) == (7,)


# ---- signals -----------------------------------------------------------------------------------
async def test_served_low_confidence_exchange_is_queued(client):
    r = await client.post("/v1/chat/completions", json=chat(), headers=H["app"])
    body = r.json()
    assert body["flagged"] is True  # the random tiny model is never confident
    items = await queue(client)
    assert [i["exchange_id"] for i in items] == [body["exchange_id"]]
    assert items[0]["reasons"][0]["code"] == "low_confidence"
    detail = (await client.get(f"/v1/exchanges/{body['exchange_id']}", headers=H["r1"])).json()
    assert detail["review_item"]["status"] == "open" and detail["feedback"] == [] and detail["reviews"] == []


async def test_feedback_only_for_own_exchanges_and_changeable(db_client):
    eid = await add_exchange(db_client, 0.9, user="cust-1")  # confident: not queued on its own
    assert await queue(db_client) == []
    url = f"/v1/exchanges/{eid}/feedback"
    assert (await db_client.post(url, json={"rating": "down"}, headers=H["app"])).status_code == 404  # user missing
    assert (await db_client.post(url, json={"rating": "down", "user": "cust-2"}, headers=H["app"])).status_code == 404
    assert (await db_client.post(url, json={"rating": "down", "user": "cust-1"}, headers=H["app2"])).status_code == 404
    assert (await db_client.post(url, json={"rating": "down", "user": "cust-1"}, headers=H["r1"])).status_code == 404
    bad = await db_client.post(url, json={"rating": "meh", "user": "cust-1"}, headers=H["app"])
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "rating"
    extra = await db_client.post(url, json={"rating": "up", "user": "cust-1", "stars": 5}, headers=H["app"])
    assert extra.status_code == 400 and "stars" in extra.json()["error"]["message"]
    r = await db_client.post(url, json={"rating": "down", "user": "cust-1", "comment": "mail me at jo@example.com"},
                          headers=H["app"])
    assert r.status_code == 200, r.text
    assert r.json()["review_item_id"] and "jo@example.com" not in r.text
    items = await queue(db_client)
    assert [i["exchange_id"] for i in items] == [eid] and items[0]["reasons"][0]["code"] == "thumbs_down"
    # Changing the rating: one rating per exchange, and the item leaves the queue again.
    r = await db_client.post(url, json={"rating": "up", "user": "cust-1"}, headers=H["app"])
    assert r.status_code == 200 and r.json()["review_item_id"] is None
    assert await queue(db_client) == []
    detail = (await db_client.get(f"/v1/exchanges/{eid}", headers=H["r1"])).json()
    assert [f["rating"] for f in detail["feedback"]] == ["up"]
    assert detail["review_item"]["status"] == "withdrawn"
    assert (await db_client.post("/v1/exchanges/nope/feedback", json={"rating": "up"}, headers=H["app"])).status_code == 404


async def test_staff_flags(client):
    eid = await add_exchange(client, 0.95)
    r = await client.post(f"/v1/exchanges/{eid}/flags", json={"reason": "quotes a wrong fee"}, headers=H["r1"])
    assert r.status_code == 201, r.text
    again = await client.post(f"/v1/exchanges/{eid}/flags", json={"reason": "again"}, headers=H["r1"])
    assert again.status_code == 409 and again.json()["error"]["code"] == "already_flagged"
    assert (await client.post(f"/v1/exchanges/{eid}/flags", json={"reason": "x"}, headers=H["r2"])).status_code == 201
    assert (await client.post(f"/v1/exchanges/{eid}/flags", json={"reason": " "}, headers=H["r3"])).status_code == 400
    assert (await client.post(f"/v1/exchanges/{eid}/flags", json={}, headers=H["r3"])).status_code == 400
    assert (await client.post("/v1/exchanges/missing/flags", json={"reason": "x"}, headers=H["r3"])).status_code == 404
    [item] = await queue(client)
    assert item["reasons"][0]["text"] == "Flagged by 2 staff member(s)"


# ---- queue ---------------------------------------------------------------------------------------
async def test_queue_order_follows_the_documented_formula(db_client):
    cfg = db_client.settings.review
    low = await add_exchange(db_client, 0.10)                    # doubt
    old_low = await add_exchange(db_client, 0.30, age_h=30)      # less doubt, but waiting 30 h
    flagged = await add_exchange(db_client, 0.90)
    await db_client.post(f"/v1/exchanges/{flagged}/flags", json={"reason": "wrong"}, headers=H["r1"])
    downed = await add_exchange(db_client, 0.80, user="u")
    await db_client.post(f"/v1/exchanges/{downed}/feedback", json={"rating": "down", "user": "u"}, headers=H["app"])
    items = await queue(db_client, "r2")
    expected = {
        low: cfg.weight_confidence * 0.9 + cfg.weight_low_confidence,
        old_low: cfg.weight_confidence * 0.7 + cfg.weight_low_confidence + cfg.weight_age_per_hour * 30,
        flagged: cfg.weight_confidence * 0.1 + cfg.weight_flag,
        downed: cfg.weight_confidence * 0.2 + cfg.weight_thumbs_down,
    }
    assert [i["exchange_id"] for i in items] == sorted(expected, key=expected.get, reverse=True)
    for i in items:
        assert i["priority"] == pytest.approx(expected[i["exchange_id"]], abs=0.01)
        detail = (await db_client.get(f"/v1/review/items/{i['id']}", headers=H["r2"])).json()
        assert sum(detail["priority_parts"].values()) == pytest.approx(i["priority"], abs=0.01)
    assert len(await queue(db_client, "r2", limit=2)) == 2
    r = await db_client.get("/v1/review/queue?limit=100000", headers=H["r2"])
    assert r.status_code == 400 and r.json()["error"]["param"] == "limit"
    assert (await db_client.get("/v1/review/queue?limit=0", headers=H["r2"])).status_code == 400
    assert (await db_client.get("/v1/review/queue?limit=abc", headers=H["r2"])).status_code == 400


async def test_claims_under_concurrency(db_client):
    ids = [await item_of(db_client, await add_exchange(db_client, c)) for c in (0.1, 0.2, 0.3)]
    results = await asyncio.gather(*(db_client.post(f"/v1/review/items/{ids[0]}/claim", headers=H[w])
                                     for w in ("r1", "r2", "r3", "boss")))
    codes = sorted(r.status_code for r in results)
    assert codes == [200, 409, 409, 409], [r.text for r in results]
    winner = next(r.json()["claimed_by"] for r in results if r.status_code == 200)
    loser = next(w for w in ("r1", "r2", "r3") if w != winner)
    r = await label(db_client, ids[0], loser, "approve")
    assert r.status_code == 409 and r.json()["error"]["code"] == "claimed"
    assert (await db_client.delete(f"/v1/review/items/{ids[0]}/claim", headers=H[loser])).status_code == 409
    assert (await db_client.delete(f"/v1/review/items/{ids[0]}/claim", headers=H[winner])).status_code == 200
    # "next" hands every concurrent reviewer a different item.
    nexts = await asyncio.gather(*(db_client.post("/v1/review/next", headers=H[w]) for w in ("r1", "r2", "r3")))
    got = [r.json()["id"] for r in nexts]
    assert sorted(got) == sorted(ids), got
    again = await db_client.post("/v1/review/next", headers=H["r1"])  # idempotent: your current claim
    assert again.json()["id"] == got[0]
    assert (await db_client.post("/v1/review/next", headers=H["boss"])).status_code == 204  # all claimed
    assert (await db_client.post("/v1/review/items/999/claim", headers=H["r1"])).status_code == 404
    assert (await db_client.post(f"/v1/review/items/{10**30}/claim", headers=H["r1"])).status_code == 404


async def test_expired_claim_can_be_taken(client, monkeypatch):
    item = await item_of(client, await add_exchange(client, 0.1))
    assert (await client.post(f"/v1/review/items/{item}/claim", headers=H["r1"])).status_code == 200
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + client.settings.review.claim_ttl_s + 1)
    assert (await client.post(f"/v1/review/items/{item}/claim", headers=H["r2"])).status_code == 200


# ---- labels and consensus ---------------------------------------------------------------------
async def test_agreeing_corrections_resolve_with_the_latest_wording(client):
    item = await item_of(client, await add_exchange(client, 0.1))
    first = "You can block your card at any time in the mobile app under Cards, then Block card."
    second = "You can block your card at any time in the mobile app: go to Cards and choose Block card."
    r = await label(client, item, "r1", "correct", first)
    assert r.status_code == 201 and r.json()["item"]["status"] == "open"
    assert (await queue(client, "r1")) == []  # r1 does not see what they labelled
    r = await label(client, item, "r2", "correct", second)
    body = r.json()["item"]
    assert body["status"] == "resolved" and body["resolution"] == "correct", body
    assert body["resolved_answer"] == second and body["decided_by"] == "consensus:r1,r2"
    assert [e["action"] for e in body["events"]][-3:] == ["label", "label", "resolved"]
    r = await label(client, item, "r3", "approve")
    assert r.status_code == 409 and r.json()["error"]["code"] == "already_resolved"


async def test_disagreement_escalates_then_third_reviewer_or_admin_decides(db_client):
    a = await item_of(db_client, await add_exchange(db_client, 0.1))
    assert (await label(db_client, a, "r1", "approve")).status_code == 201
    r = await label(db_client, a, "r2", "reject")
    assert r.json()["item"]["status"] == "escalated" and r.json()["item"]["required_labels"] == 3
    assert (await queue(db_client, "r3"))[0]["reasons"][0]["code"] == "escalated"
    r = await label(db_client, a, "r3", "reject", note="gives a wrong fee")
    assert r.json()["item"]["status"] == "resolved" and r.json()["item"]["resolution"] == "reject"

    b = await item_of(db_client, await add_exchange(db_client, 0.1))
    await label(db_client, b, "r1", "approve")
    r = await label(db_client, b, "r2", "correct", "Please call the fraud line on the back of your card right away.")
    assert r.json()["item"]["status"] == "escalated"
    r = await label(db_client, b, "boss", "approve", proposed_answer_id=r.json()["label"]["id"])
    item = r.json()["item"]
    assert item["status"] == "resolved" and item["decided_by"] == "admin:boss"
    assert item["resolved_answer"].startswith("Please call the fraud line")


async def test_label_rules_and_bad_input(client):
    item = await item_of(client, await add_exchange(client, 0.1))
    cases = [
        ({"verdict": "correct"}, 400, "corrected_answer"),
        ({"verdict": "correct", "corrected_answer": "   "}, 400, "corrected_answer"),
        ({"verdict": "approve", "corrected_answer": "x"}, 400, "corrected_answer"),
        ({"verdict": "maybe"}, 400, "verdict"),
        ({"verdict": "approve", "extra": 1}, 400, "extra"),
        ({"verdict": "correct", "corrected_answer": "x" * 9000}, 400, "corrected_answer"),
        ({"verdict": "approve", "proposed_answer_id": -1}, 400, "proposed_answer_id"),
    ]
    for body, status, param in cases:
        r = await client.post(f"/v1/review/items/{item}/labels", json=body, headers=H["r1"])
        assert r.status_code == status and r.json()["error"]["param"] == param, (body, r.text)
    r = await client.post(f"/v1/review/items/{item}/labels", content=b"{", headers={**H["r1"], "content-type": "application/json"})
    assert r.status_code == 400
    assert (await label(client, 987654, "r1", "approve")).status_code == 404
    assert (await label(client, 10**30, "r1", "approve")).status_code == 404
    assert (await client.get("/v1/review/items/abc", headers=H["r1"])).status_code == 404
    r = await label(client, item, "r1", "correct", "Call us on 0800 123 456, or write to help@bank.example.")
    assert r.status_code == 201 and "help@bank.example" not in r.text  # PII scrubbed from corrections
    twice = await label(client, item, "r1", "reject")
    assert twice.status_code == 409 and twice.json()["error"]["code"] == "already_labelled"
    stale = await label(client, item, "r2", "approve", proposed_answer_id=0)  # r2 saw the model's answer
    assert stale.status_code == 409 and stale.json()["error"]["code"] == "proposal_changed"
    assert (await client.get(f"/v1/review/items/{item}", headers=H["r1"])).json()["labels"][0]["verdict"] == "correct"


async def test_concurrent_labels_on_one_item_are_consistent(db_client):
    item = await item_of(db_client, await add_exchange(db_client, 0.1))
    rs = await asyncio.gather(*(label(db_client, item, w, "reject") for w in ("r1", "r2", "r3")))
    assert all(r.status_code in (201, 409) for r in rs), [r.text for r in rs]
    detail = (await db_client.get(f"/v1/review/items/{item}", headers=H["r1"])).json()
    assert detail["status"] == "resolved" and detail["resolution"] == "reject"
    assert 2 <= len(detail["labels"]) <= 3 and len({x["reviewer"] for x in detail["labels"]}) == len(detail["labels"])


# ---- stats and export -------------------------------------------------------------------------
async def test_stats_report_agreement_and_histogram(client):
    for verdicts in (("approve", "approve"), ("reject", "reject"), ("approve", "reject")):
        item = await item_of(client, await add_exchange(client, 0.2))
        for who, verdict in zip(("r1", "r2"), verdicts):
            assert (await label(client, item, who, verdict)).status_code == 201
    await add_exchange(client, 0.95)
    stats = (await client.get("/v1/review/stats", headers=H["r1"])).json()
    pair = stats["pairs"][0]
    assert pair["reviewers"] == ["r1", "r2"] and pair["items"] == 3
    assert pair["percent_agreement"] == pytest.approx(2 / 3)
    # categories r1: keep, reject, keep; r2: keep, reject, reject → p_o 2/3, p_e = (2·1 + 1·2)/9 = 4/9 → κ = 0.4
    assert pair["cohen_kappa"] == pytest.approx(0.4)
    assert stats["overall"]["items"] == 3
    assert stats["items"] == {"resolved": 2, "escalated": 1}
    assert stats["labels_by_reviewer"]["r2"] == {"approve": 1, "reject": 2}
    hist = stats["confidence_histogram"]
    assert hist["exchanges"] == 4 and hist["bins"][2]["count"] == 3 and hist["bins"][9]["count"] == 1
    assert hist["bins"][2]["flagged"] == 3 and hist["bins"][9]["flagged"] == 0
    metrics = (await client.get("/metrics")).text
    assert 'tellerloop_review_items{status="escalated"} 1.0' in metrics
    assert 'tellerloop_review_labels_total{verdict="reject"}' in metrics


async def test_export_api_and_cli(client, tmp_path):
    resolved = await item_of(client, await add_exchange(client, 0.1))
    await label(client, resolved, "r1", "correct", "Cards can be frozen in the app. Questions: ops@bank.example")
    r = await label(client, resolved, "r2", "approve", proposed_answer_id=(await client.get(
        f"/v1/review/items/{resolved}", headers=H["r2"])).json()["proposed_answer"]["id"])
    assert r.json()["item"]["status"] == "resolved"
    rejected = await item_of(client, await add_exchange(client, 0.1))
    await label(client, rejected, "r1", "reject")
    await label(client, rejected, "r2", "reject")
    await item_of(client, await add_exchange(client, 0.1))  # still open: not exported

    assert (await client.get("/v1/review/export", headers=H["r1"])).status_code == 403
    r = await client.get("/v1/review/export", headers=H["boss"])
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/x-ndjson")
    lines = [json.loads(x) for x in r.text.splitlines()]
    assert len(lines) == 1 and lines[0]["item_id"] == resolved and lines[0]["resolution"] == "correct"
    assert lines[0]["messages"][-1] == {"role": "assistant", "content": lines[0]["messages"][-1]["content"]}
    assert lines[0]["messages"][-1]["content"].startswith("Cards can be frozen in the app.")
    assert "ops@bank.example" not in r.text and [m["role"] for m in lines[0]["messages"]] == ["system", "user", "assistant"]

    out = tmp_path / "reviewed.jsonl"
    cfg = tmp_path / "cli.toml"
    cfg.write_text(f'[storage]\ndata_dir = "{client.settings.storage.data_dir}"\n')
    run = subprocess.run([sys.executable, "-m", "gateway.cli", "export", "--config", str(cfg), "--out", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout) == {"out": str(out), "items": 1}
    assert [json.loads(x) for x in out.read_text().splitlines()] == lines
    bad = subprocess.run([sys.executable, "-m", "gateway.cli", "export", "--config", str(cfg), "--out",
                          str(tmp_path / "missing" / "x.jsonl")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "no such directory" in bad.stderr and "Traceback" not in bad.stderr
    bad = subprocess.run([sys.executable, "-m", "gateway.cli", "export", "--config", str(cfg)],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--out" in bad.stderr
