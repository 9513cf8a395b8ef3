"""End to end on the real SmolLM2 in a real `tellerloop serve` process: every message of the PII
corpus (data/pii/corpus.jsonl) is sent as a customer would — in the prompt, as the `user` id, in a
stop string, a thumbs-down comment, a staff flag reason, a reviewer's correction and note — and then
the database (every column of every table), `tellerloop export`, the training dataset built from the
reviews and the server's log are searched for any of it."""

from __future__ import annotations

import asyncio
import json
import re
import sqlite3
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from gateway.core.pii import digits_of
from tests.conftest import ROOT
from tests.test_pii import corpus, leaks

pytestmark = pytest.mark.e2e

CLIENT = {"Authorization": "Bearer dev-client-key"}
REVIEWER = {"Authorization": "Bearer dev-reviewer-key"}
ADMIN = {"Authorization": "Bearer dev-admin-key"}
LONG = {"CARD", "IBAN", "EMAIL", "PHONE", "ACCOUNT", "NINO", "PAN", "SSN"}  # identifiers worth a global search


def everywhere(blob: str, rows: list[dict]) -> list[str]:
    """Identifiers of the corpus found anywhere in `blob`: verbatim, compacted (any case, no
    separators) or, for numbers, as the digits of one digit run."""
    compact = re.sub(r"[\W_]", "", blob.upper())
    runs = {digits_of(r) for r in re.findall(r"\d(?:[\s.\-/_()]*\d)*", blob)}
    found = []
    for row in rows:
        for pii in row["pii"]:
            if pii["kind"] not in LONG:
                continue
            value, digits = pii["value"], digits_of(pii["value"])
            if value in blob or re.sub(r"[\W_]", "", value.upper()) in compact or (
                    len(digits) >= 8 and any(digits in run for run in runs)):
                found.append(f"{pii['kind']} {value!r}")
    return found


def test_no_customer_data_reaches_the_database_export_training_data_or_log(real_server, tmp_path):
    base = real_server.base_url
    rows = corpus("corpus.jsonl")
    emails = [p["value"] for r in rows for p in r["pii"] if p["kind"] == "EMAIL"]

    def ask(i_row):
        i, row = i_row
        user = emails[i % len(emails)] if i % 2 else f"+44 7911 {123000 + i}"  # ids that are themselves PII
        stop = [p["value"] for p in row["pii"] if p["kind"] in LONG][:4] or None
        messages = [{"role": "user", "content": row["text"]}]
        if i % 3 == 0:  # the message as the earlier turn of a conversation (stored in `conversation` too)
            messages += [{"role": "assistant", "content": "Thank you."}, {"role": "user", "content": "what now?"}]
        r = httpx.post(f"{base}/v1/chat/completions", headers=CLIENT, timeout=300, json={
            "model": "tellerloop", "messages": messages, "max_tokens": 2,
            "rag": False, "user": user, "stop": stop})
        assert r.status_code == 200, r.text
        return r.json()["exchange_id"], user, row

    with ThreadPoolExecutor(8) as pool:
        sent = list(pool.map(ask, enumerate(rows)))
    for exchange_id, user, row in sent[:20]:  # thumbs-down with the message again as the comment
        r = httpx.post(f"{base}/v1/exchanges/{exchange_id}/feedback", headers=CLIENT, timeout=30,
                       json={"rating": "down", "user": user, "comment": row["text"][:2000]})
        assert r.status_code == 200, r.text  # the keyed id matches: ownership still works
    for exchange_id, _, row in sent[20:26]:  # staff flag, correction and note quote it
        r = httpx.post(f"{base}/v1/exchanges/{exchange_id}/flags", headers=REVIEWER, timeout=30,
                       json={"reason": f"customer wrote: {row['text']}"})
        assert r.status_code == 201, r.text
        item = r.json()["review_item_id"]
        fix = f"We have noted it ({row['text']}); please never share these details in chat."
        r = httpx.post(f"{base}/v1/review/items/{item}/labels", headers=REVIEWER, timeout=60,
                       json={"verdict": "correct", "corrected_answer": fix, "note": row["text"]})
        assert r.status_code == 201, r.text
        proposal = r.json()["item"]["proposed_answer"]["id"]
        r = httpx.post(f"{base}/v1/review/items/{item}/labels", headers=ADMIN, timeout=60,
                       json={"verdict": "approve", "proposed_answer_id": proposal})
        assert r.status_code == 201 and r.json()["item"]["status"] == "resolved", r.text

    # 1. the database: each exchange's own stored text loses all of its message's data...
    db = sqlite3.connect(f"file:{real_server.data_dir / 'tellerloop.db'}?mode=ro", uri=True)
    stored = {eid: (msgs, conv, answer, params, user) for eid, msgs, conv, answer, params, user in
              db.execute("SELECT id, messages, conversation, answer, params, user FROM exchanges")}
    per_row = []
    for exchange_id, user, row in sent:
        messages, conversation, answer, params, stored_user = stored[exchange_id]
        per_row += leaks(row, f"{messages}\n{conversation}\n{answer}\n{params}")
        assert re.fullmatch(r"u_[0-9a-f]{40}", stored_user), stored_user  # a keyed hash, nothing of the id
    assert per_row == []
    assert sum(conv is not None for _, conv, *_ in stored.values()) >= len(sent) // 3  # conversations were stored
    # ...and no identifier of the corpus is anywhere in any column of any table
    tables = [t for (t,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
    dump = "\n".join(str(value) for table in tables for record in db.execute(f'SELECT * FROM "{table}"')
                     for value in record)
    db.close()
    assert everywhere(dump, rows) == []
    assert not any(email in dump for email in emails)

    # 2. the export
    out = tmp_path / "reviewed.jsonl"
    run = subprocess.run([sys.executable, "-m", "gateway.cli", "export", "--data-dir", str(real_server.data_dir),
                          "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    exported = out.read_text()
    assert exported.count("never share these details") >= 6 and everywhere(exported, rows) == []

    # 3. the training dataset the next run would train on, built by the run's own code from these reviews
    train_text = asyncio.run(_dataset_from(real_server.data_dir, tmp_path / "ds"))
    assert "never share these details" in train_text and everywhere(train_text, rows) == []

    # 4. the log
    assert everywhere(real_server.log(), rows) == [] and not any(email in real_server.log() for email in emails)


async def _dataset_from(server_data_dir, work_dir) -> str:
    from gateway.core.runtime import open_database
    from gateway.core.settings import load_settings
    from gateway.review.repository import ReviewRepository
    from gateway.runs.control import resolved_rows
    from retraining import dataset

    settings = load_settings(storage={"data_dir": str(work_dir),
                                      "database_url": f"sqlite+aiosqlite:///{server_data_dir / 'tellerloop.db'}"},
                             retraining={"seed_data": "", "context_in_prompts": False, "min_examples": 1,
                                         "eval_share": 0.0})
    async with open_database(settings, migrate_schema=False) as sessions:
        resolved = await resolved_rows(ReviewRepository(sessions, settings.review))
    snapshot = await asyncio.to_thread(dataset.build, settings, resolved, None, bootstrap=True)
    return "".join(json.dumps(e.messages) for e in snapshot.train) + (snapshot.path / "eval.jsonl").read_text()
