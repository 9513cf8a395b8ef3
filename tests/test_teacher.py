"""The teacher's drafts on review items (gateway/review/teacher.py, docs/review.md): in-process on the
tiny model with a real SQLite database, the real embedded Chroma holding the demo FAQ and the real
MiniLM; the OpenAI-compatible teacher is a second real tellerloop gateway process."""

from __future__ import annotations

import asyncio
import re
import uuid
from datetime import datetime, timezone

import httpx
import pytest
import structlog.testing
from pydantic import SecretStr, ValidationError

from gateway.app import create_app
from gateway.core.settings import TeacherSettings
from gateway.exchanges.models import Exchange
from gateway.review.teacher import OpenAITeacher
from tests.conftest import free_port, ready_client, seed_knowledge, start_server
from tests.test_review import KEYS, H, label

GUARANTOR_Q = "Do I need a guarantor for Loan against Car"  # a FAQ question, verbatim
GUARANTOR_A = "No. The car itself acts as a security."  # ...and its answer


def csrf(html: str) -> str:
    return re.search(r'name="_csrf_token" value="([^"]+)"', html).group(1)


async def sign_in(client, key: str) -> None:
    page = await client.get("/console/login?next=/console")
    r = await client.post("/console/login", data={"key": key, "next": "/console", "_csrf_token": csrf(page.text)})
    assert r.status_code == 200, r.text


@pytest.fixture
async def kb_client(make_settings, tiny_model_dir, faq_chroma_dir):
    """The app with the demo FAQ in its knowledge base and the default (retrieval) teacher."""
    settings = make_settings(tiny_model_dir, model={"max_context_tokens": 512, "max_tokens_limit": 64},
                             rag={"enabled_by_default": False}, auth={"keys": KEYS})
    seed_knowledge(settings.storage.data_dir, faq_chroma_dir)
    async with ready_client(create_app(settings), settings) as c:
        yield c


async def queue_question(client, question: str, answer: str = "Please visit a branch.", confidence: float = 0.1) -> int:
    """A low-confidence exchange asking `question`, queued the way the chat service queues one; its item id."""
    from gateway.core.runtime import open_database
    from gateway.exchanges.repository import ExchangeRepository
    from gateway.review.repository import ReviewRepository

    now = datetime.now(timezone.utc)
    row = Exchange(
        id=uuid.uuid4().hex, created_at=now, completed_at=now, api_key_name="app", user=None,
        model_requested="tellerloop", variant="base",
        messages=[{"role": "system", "content": "You are a helpful customer support assistant for a retail bank."},
                  {"role": "user", "content": question}],
        answer=answer, finish_reason="stop", stream=False, rag=False, sources=[], params={}, prompt_tokens=5,
        completion_tokens=5, ttft_ms=1.0, latency_ms=2.0, confidence=confidence, confidence_parts={}, flagged=True)
    async with open_database(client.settings, migrate_schema=False) as sessions:
        reviews = ReviewRepository(sessions, client.settings.review)
        await ExchangeRepository(sessions).add(row, lambda s, e: reviews.enqueue_in(s, e, now=now))
    r = await client.get(f"/v1/exchanges/{row.id}", headers=H["r1"])
    return r.json()["review_item"]["id"]


async def item(client, item_id: int, who: str = "r1") -> dict:
    r = await client.get(f"/v1/review/items/{item_id}", headers=H[who])
    assert r.status_code == 200, r.text
    return r.json()


# ---- the retrieval teacher ----------------------------------------------------------------------
async def test_retrieval_draft_for_a_matching_question_and_none_below_the_threshold(kb_client):
    threshold = kb_client.settings.review.teacher.min_similarity
    matching = await queue_question(kb_client, GUARANTOR_Q)
    unrelated = await queue_question(kb_client, "zebra astrophysics poetry")
    listed = await kb_client.get("/v1/review/queue", headers=H["r1"])  # ...starts the background fill
    assert {i["id"] for i in listed.json()["data"]} == {matching, unrelated}
    for _ in range(100):  # the fill drafts the listed items without anyone opening them
        rows = (await kb_client.get("/v1/review/queue", headers=H["r2"])).json()["data"]
        if all(i["draft_source"] for i in rows):
            break
        await asyncio.sleep(0.1)
    by_id = {i["id"]: i for i in rows}
    assert by_id[matching]["draft"] == GUARANTOR_A and by_id[matching]["draft_source"] == "retrieval"
    detail = await item(kb_client, matching)
    assert detail["draft"] == GUARANTOR_A and detail["draft_source"] == "retrieval"
    assert threshold <= detail["draft_score"] <= 1.0
    assert detail["answer"] == "Please visit a branch." and detail["proposed_answer"]["text"] == "Please visit a branch."
    none = await item(kb_client, unrelated)
    assert none["draft"] is None and none["draft_source"] == "retrieval" and none["draft_score"] < threshold


async def test_draft_is_pii_scrubbed_and_the_first_stored_draft_stays(kb_client):
    doc = {"source": "contact.csv", "content": "question,answer\nHow do I reach the complaints team,"
           "Write to complaints.team@example.com and we answer within five working days.\n"}
    assert (await kb_client.post("/v1/knowledge/documents", json=doc, headers=H["boss"])).status_code == 201
    item_id = await queue_question(kb_client, "How do I reach the complaints team")
    seen = await asyncio.gather(*(item(kb_client, item_id, who) for who in ("r1", "r2", "r3")))  # at once
    assert {d["draft"] for d in seen} == {"Write to [EMAIL] and we answer within five working days."}
    await kb_client.delete("/v1/knowledge/documents?source=contact.csv", headers=H["boss"])
    assert (await item(kb_client, item_id))["draft"].startswith("Write to [EMAIL]")  # stored: not re-asked


async def test_outcomes_accepted_edited_rejected_and_stats(kb_client):
    accepted = await queue_question(kb_client, GUARANTOR_Q)
    edited = await queue_question(kb_client, GUARANTOR_Q, answer="You need two guarantors.")
    undrafted = await queue_question(kb_client, "zebra astrophysics poetry")
    draft = (await item(kb_client, accepted))["draft"]
    assert (await item(kb_client, edited))["draft"] == draft == GUARANTOR_A
    assert (await item(kb_client, undrafted))["draft"] is None

    # accepting: a correction with the draft (whitespace aside), then an approval of that proposal → resolved
    r = await label(kb_client, accepted, "r1", "correct", "No.  The car itself\nacts as a security. ")
    assert r.status_code == 201 and r.json()["label"]["draft_outcome"] == "accepted"
    r = await label(kb_client, accepted, "r2", "approve", proposed_answer_id=r.json()["label"]["id"])
    body = r.json()
    assert body["label"]["draft_outcome"] == "accepted", body["label"]
    assert body["item"]["status"] == "resolved" and body["item"]["resolution"] == "correct"
    assert " ".join(body["item"]["resolved_answer"].split()) == GUARANTOR_A
    assert body["item"]["events"][-2]["detail"]["draft_outcome"] == "accepted"

    # an edit close to the draft; then a reject
    r = await label(kb_client, edited, "r1", "correct", "No, the car itself serves as the security.")
    assert r.json()["label"]["draft_outcome"] == "edited", r.text
    r = await label(kb_client, edited, "r2", "reject")
    assert r.json()["label"]["draft_outcome"] == "rejected"
    # approving the model's answer over a different draft rejects the draft; no draft → null
    r = await label(kb_client, edited, "r3", "approve", proposed_answer_id=(await item(kb_client, edited, "r3"))[
        "proposed_answer"]["id"])
    assert r.status_code == 201 and r.json()["label"]["draft_outcome"] == "edited"  # the proposal is r1's edit
    r = await label(kb_client, undrafted, "r1", "approve")
    assert r.json()["label"]["draft_outcome"] is None
    exchange = (await kb_client.get(f"/v1/exchanges/{body['item']['exchange_id']}", headers=H["r1"])).json()
    assert [x["draft_outcome"] for x in exchange["reviews"]] == ["accepted", "accepted"]

    stats = (await kb_client.get("/v1/review/stats", headers=H["r1"])).json()["teacher"]
    assert stats["kind"] == "retrieval" and stats["source"] == "retrieval"
    assert stats["sources"] == [{
        "source": "retrieval", "asked": 3, "drafted": 2, "shown": 2, "labels": 5,
        "accepted": 2, "edited": 2, "rejected": 1, "accepted_rate": 0.4, "edited_rate": 0.4, "rejected_rate": 0.2}]
    await sign_in(kb_client, "k-r1")
    page = await kb_client.get("/console/stats")
    assert page.status_code == 200 and "Teacher drafts" in page.text
    row = re.search(r"<td>retrieval</td>(.*?)</tr>", page.text, re.S).group(1)
    assert re.findall(r'class="num">([^<]+)<', row) == ["3", "2", "2", "5", "2 (40%)", "2 (40%)", "1 (20%)"]


async def test_console_shows_the_draft_and_uses_it_with_one_key(kb_client):
    item_id = await queue_question(kb_client, GUARANTOR_Q)
    await sign_in(kb_client, "k-r1")
    page = await kb_client.get(f"/console/items/{item_id}")
    assert page.status_code == 200
    assert f'<pre id="draft-answer">{GUARANTOR_A}</pre>' in page.text and 'id="draft-source">retrieval<' in page.text
    assert 'id="btn-draft" aria-keyshortcuts="d"' in page.text and "<kbd>d</kbd> use the teacher" in page.text
    js = await kb_client.get("/console/static/console.js")
    assert 'click("btn-draft")' in js.text  # the console's one keyboard-shortcut script knows "d"
    assert "script-src 'self'" in page.headers["content-security-policy"]  # no inline script needed
    editing = await kb_client.get(f"/console/items/{item_id}?start=draft")  # "edit the draft" prefills the box
    assert f'name="corrected_answer" rows="6">{GUARANTOR_A}</textarea>' in editing.text
    assert (await kb_client.get(f"/console/items/{item_id}?start=bogus")).status_code == 400

    no_csrf = await kb_client.post(f"/console/items/{item_id}/label", data={"verdict": "draft"})
    assert no_csrf.status_code == 403
    form = {"_csrf_token": csrf(page.text), "verdict": "draft", "proposed_answer_id": "0", "corrected_answer": "x"}
    r = await kb_client.post(f"/console/items/{item_id}/label", data=form)
    assert r.status_code == 200 and f"Saved your label on item {item_id}: it is now open." in r.text
    first = (await item(kb_client, item_id))["labels"][0]
    assert first["verdict"] == "correct" and first["corrected_answer"] == GUARANTOR_A
    assert first["draft_outcome"] == "accepted"

    kb_client.cookies.clear()
    await sign_in(kb_client, "k-r2")
    page = await kb_client.get(f"/console/items/{item_id}")
    assert "approves it (it is the proposed answer)" in page.text
    pid = re.search(r'name="proposed_answer_id" value="(\d+)"', page.text).group(1)
    r = await kb_client.post(f"/console/items/{item_id}/label",
                             data={"_csrf_token": csrf(page.text), "verdict": "draft", "proposed_answer_id": pid})
    assert f"item {item_id}: it is now resolved" in r.text
    done = await item(kb_client, item_id)
    assert done["labels"][1]["verdict"] == "approve" and done["labels"][1]["draft_outcome"] == "accepted"
    assert done["resolved_answer"] == GUARANTOR_A

    # no draft: no button, and a forged "draft" verdict is a 400 page, not an error
    bare = await queue_question(kb_client, "zebra astrophysics poetry")
    page = await kb_client.get(f"/console/items/{bare}")
    assert 'id="btn-draft"' not in page.text and 'id="no-draft"' in page.text
    r = await kb_client.post(f"/console/items/{bare}/label", data={"_csrf_token": csrf(page.text), "verdict": "draft"})
    assert r.status_code == 400 and "no teacher draft" in r.text
    r = await kb_client.post("/console/items/987654/label", data={"_csrf_token": csrf(page.text), "verdict": "draft"})
    assert r.status_code == 404


async def test_no_knowledge_base_means_no_draft(make_settings, tiny_model_dir):
    settings = make_settings(tiny_model_dir, model={"max_context_tokens": 512, "max_tokens_limit": 64},
                             rag={"enabled_by_default": False}, auth={"keys": KEYS})
    async with ready_client(create_app(settings), settings) as c:
        kb = c.app.state.kb
        c.app.state.kb = None  # still loading (or failed to start)
        item_id = await queue_question(c, GUARANTOR_Q)
        detail = await item(c, item_id)
        assert detail["draft"] is None and detail["draft_source"] is None  # not stored: asked again later
        kb.collection = None  # a broken knowledge base: search raises
        c.app.state.kb = kb
        detail = await item(c, item_id)
        assert detail["draft"] is None and detail["draft_source"] is None
        assert (await label(c, item_id, "r1", "approve")).json()["label"]["draft_outcome"] is None


def test_teacher_settings_are_checked():
    with pytest.raises(ValidationError, match="url"):
        TeacherSettings(kind="openai", model="m")
    with pytest.raises(ValidationError, match="model"):
        TeacherSettings(kind="openai", url="http://teacher/v1")
    with pytest.raises(ValidationError):
        TeacherSettings(kind="gpt")
    cfg = TeacherSettings(kind="openai", url="http://teacher/v1", model="m", api_key="s3cret")
    assert "s3cret" not in repr(cfg) and "s3cret" not in cfg.model_dump_json()


# ---- the OpenAI-compatible teacher: a second gateway ---------------------------------------------
@pytest.fixture
async def teacher_server(tmp_path, tiny_model_dir):
    config = (f'[model]\nbase = "{tiny_model_dir}"\nmax_context_tokens = 512\nmax_tokens_limit = 64\n'
              '[retraining]\nenabled = false\n[rag]\ndemo_data = ""\nenabled_by_default = false\n'
              '[[auth.keys]]\nname = "teacher"\nrole = "client"\nkey = "k-teacher-secret"\n')
    (tmp_path / "teacher").mkdir()
    server = await asyncio.to_thread(start_server, tmp_path / "teacher", config)
    yield server
    server.stop()


async def test_openai_teacher_against_a_second_gateway(make_settings, tiny_model_dir, teacher_server):
    base = teacher_server.base_url
    cfg = TeacherSettings(kind="openai", url=f"{base}/v1", model="tellerloop", api_key="k-teacher-secret",
                          max_tokens=32)  # the tiny model opens with ~25 newlines, then words
    messages = [{"role": "system", "content": "You are a helpful customer support assistant for a retail bank."},
                {"role": "user", "content": GUARANTOR_Q}]
    with structlog.testing.capture_logs() as logs:
        for bad in (cfg.model_copy(update={"url": f"{base}/nowhere/v1"}),  # 404
                    cfg.model_copy(update={"api_key": SecretStr("wrong-secret")})):  # 401
            assert await OpenAITeacher(bad).draft(messages, GUARANTOR_Q) is None
        failing = OpenAITeacher(cfg.model_copy(update={"api_key": SecretStr("wrong-secret"), "retry_after_s": 600}))
        assert await failing.draft(messages, GUARANTOR_Q) is None
        failing.cfg = cfg  # fixed, but inside its back-off: not asked again yet
        assert await failing.draft(messages, GUARANTOR_Q) is None
    assert [(x["event"], x["error"]) for x in logs] == [("review.teacher_failed", "HTTP 404")] + [
        ("review.teacher_failed", "HTTP 401")] * 2  # the back-off call asked nobody
    assert "secret" not in repr(logs) and GUARANTOR_Q not in repr(logs)  # no key, no conversation

    settings = make_settings(tiny_model_dir, model={"max_context_tokens": 512, "max_tokens_limit": 64},
                             rag={"enabled_by_default": False}, auth={"keys": KEYS},
                             review={"teacher": cfg.model_dump() | {"api_key": "k-teacher-secret", "timeout_s": 60}})
    async with ready_client(create_app(settings), settings) as c:
        item_id = await queue_question(c, GUARANTOR_Q)
        detail = await item(c, item_id)
        assert detail["draft_source"] == "openai:tellerloop" and detail["draft_score"] is None
        # the teacher answered the stored conversation (system prompt included) greedily: the same again
        async with httpx.AsyncClient(timeout=60) as h:
            r = await h.post(f"{base}/v1/chat/completions", headers={"Authorization": "Bearer k-teacher-secret"},
                             json={"model": "tellerloop", "messages": detail["exchange"]["messages"],
                                   "temperature": 0, "max_tokens": 32})
        expected = settings.pii.scrubber().scrub(r.json()["choices"][0]["message"]["content"].strip())
        assert detail["draft"] == (expected or None) and detail["draft"], detail["draft"]
        stats = (await c.get("/v1/review/stats", headers=H["r1"])).json()["teacher"]
        assert stats["kind"] == "openai" and stats["source"] == "openai:tellerloop"

        # the teacher goes down: no draft, no error, the item still works
        teacher_server.stop()
        other = await queue_question(c, "How can I stop a cheque payment")
        detail = await item(c, other)
        assert detail["draft"] is None and detail["draft_source"] is None
        assert (await c.get("/v1/review/queue", headers=H["r2"])).status_code == 200
        r = await label(c, other, "r1", "reject")
        assert r.status_code == 201 and r.json()["label"]["draft_outcome"] is None


async def test_openai_teacher_timeout_is_no_draft():
    """A teacher that accepts the connection but never answers: no draft within timeout_s."""
    port = free_port()
    done = asyncio.Event()

    async def never_answer(reader, writer):
        await reader.read(100_000)
        await done.wait()
        writer.close()

    server = await asyncio.start_server(never_answer, "127.0.0.1", port)
    try:
        teacher = OpenAITeacher(TeacherSettings(kind="openai", url=f"http://127.0.0.1:{port}/v1", model="m",
                                                timeout_s=0.5))
        assert await asyncio.wait_for(teacher.draft([{"role": "user", "content": "hi"}], "hi"), 10) is None
    finally:
        done.set()
        server.close()
        await server.wait_closed()
