"""Retraining: dataset rules, the registry's state machine and checksums, real LoRA and QLoRA runs
on SmolLM2, faults (killed trainer, corrupted adapter), the admin API and the scheduler."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

import pytest

from gateway.app import create_app
from gateway.store.db import create_engine, migrate, session_factory
from gateway.store.models import Exchange, ReviewItem
from retraining import dataset as ds
from retraining.jobs import FrozenRetrieval, Retrainer, RunRefused, gate, make_scheduler, scheduled_run
from retraining.registry import AdapterCorrupt, AdapterRegistry, RegistryError
from tests.conftest import ROOT, ready_client

SEED = ROOT / "data" / "bank_faq" / "faq.csv"
ADMIN = {"Authorization": "Bearer dev-admin-key"}
CLIENT = {"Authorization": "Bearer dev-client-key"}


@pytest.fixture
def seed_csv(tmp_path) -> Path:
    lines = SEED.read_text(encoding="utf-8-sig").splitlines()
    path = tmp_path / "seed.csv"
    path.write_text("\n".join(lines[:41]) + "\n", encoding="utf-8")  # header + 40 Q&A
    return path


def settings_for(make_settings, model_dir, seed_csv, **retraining):
    return make_settings(model_dir, retraining={"seed_data": str(seed_csv), "eval_seed_size": 5, "min_examples": 4,
                                                "eval_max_tokens": 12, "eval_limit": 3, **retraining},
                         training={"max_steps": 2, "batch_size": 2, "grad_accum": 1, "nice": 0})


def resolved(item_id: int, question: str, answer: str, when: str = "2026-11-01T00:00:00") -> tuple:
    messages = [{"role": "system", "content": "sys"}, {"role": "user", "content": question}]
    return (item_id, when, messages, answer)


# ---- dataset ------------------------------------------------------------------------------------
def test_dataset_split_leakage_replay_dedupe_and_pii(make_settings, tiny_model_dir, seed_csv):
    settings = settings_for(make_settings, tiny_model_dir, seed_csv, replay_ratio=2.0, eval_share=0.0)
    split = ds.FrozenSplit.load_or_create(settings)
    assert len(split.rows) == 5
    eval_q = split.rows[0]["question"]
    rows = [
        resolved(1, eval_q.upper() + " ?!", "leaks if kept"),  # same question after normalisation
        resolved(2, "How do I close my account?", "old answer", "2026-11-01T00:00:00"),
        resolved(3, "how do i CLOSE my account", "Visit a branch with ID.", "2026-11-02T00:00:00"),
        resolved(4, "My card 4111 1111 1111 1111 was stolen", "Call us; mail help@bank.example"),
        resolved(5, "Can I get a loan?", "Yes, apply in the app."),
    ]
    snap = ds.build(settings, rows, kb=None)
    keys = {ds.question_key(e.question) for e in snap.train}
    assert not keys & split.keys and ds.question_key(eval_q) not in keys  # leakage guard
    reviewed = [e for e in snap.train if e.source == "review"]
    assert len(reviewed) == 3 and snap.label_count == 3
    close = next(e for e in reviewed if "close" in e.question.lower())
    assert close.messages[-1]["content"] == "Visit a branch with ID."  # the latest resolution wins
    assert snap.seed_count == 6  # replay_ratio 2.0 × 3 reviewed
    text = (snap.path / "train.jsonl").read_text()
    assert "4111 1111 1111 1111" not in text and "help@bank.example" not in text  # PII scrubbed
    assert json.loads((snap.path / "manifest.json").read_text())["hash"] == snap.hash
    # Frozen: a rebuild keeps the split, and the same inputs hash the same.
    again = ds.build(settings, rows, kb=None)
    assert again.hash == snap.hash and [r["question"] for r in ds.FrozenSplit.load_or_create(settings).rows] == [
        r["question"] for r in split.rows]


def test_dataset_grows_the_split_and_guards_size(make_settings, tiny_model_dir, seed_csv):
    settings = settings_for(make_settings, tiny_model_dir, seed_csv, eval_share=0.5, min_examples=500)
    rows = [resolved(i, f"Question number {i} about fees?", f"Answer {i}") for i in range(1, 41)]
    with pytest.raises(ds.DatasetTooSmall):
        ds.build(settings, rows, kb=None)
    split = ds.FrozenSplit.load_or_create(settings)
    held = [r for r in split.rows if r["source"] == "review"]
    assert 8 <= len(held) <= 32  # about half of 40, by question hash
    assert all(ds.in_eval_share(r["question"], 0.5) for r in held)


def test_seed_prompts_carry_retrieved_context_when_configured(make_settings, tiny_model_dir, seed_csv):
    settings = settings_for(make_settings, tiny_model_dir, seed_csv)
    hit = {"id": "x", "text": "t", "score": 0.9, "metadata": {"kind": "qa", "question": "Q?", "answer": "Fee is 5."}}
    retrieval = FrozenRetrieval({"What is the fee?": [hit]})
    with_ctx = ds.seed_messages(settings, "What is the fee?", "5.", retrieval)
    assert "Fee is 5." in with_ctx[0]["content"] and with_ctx[-1] == {"role": "assistant", "content": "5."}
    settings.retraining.context_in_prompts = False
    without = ds.seed_messages(settings, "What is the fee?", "5.", retrieval)
    assert "Fee is 5." not in without[0]["content"]


def test_gate_rule():
    ev = {"baseline_version": "base", "candidate": {"rag": {"similarity_mean": 0.80}, "no_rag": {"similarity_mean": 0.50}},
          "baseline": {"rag": {"similarity_mean": 0.70}, "no_rag": {"similarity_mean": 0.55}}}

    class S:
        class retraining:  # noqa: N801
            gate_margin = 0.0
    assert gate(S, ev)["passed"] is False and "not better than base" in gate(S, ev)["reason"]
    S.retraining.gate_margin = 0.05
    assert gate(S, ev)["passed"] is True


# ---- registry -----------------------------------------------------------------------------------
async def test_registry_states_and_checksums(tmp_path):
    db = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'r.db'}")
    await migrate(db)
    reg = AdapterRegistry(session_factory(db), tmp_path)
    a = await reg.create(run_id=1, base_model="m", parent=None, config={})
    b = await reg.create(run_id=2, base_model="m", parent=None, config={})
    assert (a.version, b.version) == ("v0001", "v0002")
    with pytest.raises(RegistryError):
        await reg.transition("v0001", "champion")  # training → champion is not a legal move
    with pytest.raises(AdapterCorrupt):
        await reg.verify("v0001")  # no files recorded yet
    for v in ("v0001", "v0002"):
        reg.path(v).mkdir(parents=True)
        (reg.path(v) / "adapter_model.safetensors").write_bytes(b"weights-" + v.encode())
        await reg.seal(v)
        await reg.transition(v, "candidate")
    await reg.transition("v0001", "champion")
    await reg.transition("v0002", "champion")
    assert (await reg.get("v0001")).state == "retired" and (await reg.champion()).version == "v0002"
    assert await reg.verify("v0002") == reg.path("v0002")
    (reg.path("v0002") / "adapter_model.safetensors").write_bytes(b"tampered")
    with pytest.raises(AdapterCorrupt, match="checksum mismatch"):
        await reg.verify("v0002")
    await db.dispose()


# ---- real training on SmolLM2 -------------------------------------------------------------------
async def _run_cycle(settings, quantization: str):
    settings.training.quantization = quantization
    settings.training.learning_rate = 5e-3  # a few steps must visibly move the model
    settings.training.max_steps = 3
    settings.storage.data_dir.mkdir(parents=True, exist_ok=True)
    db = create_engine(settings.storage.resolved_database_url)
    await migrate(db)
    retrainer = Retrainer(settings, session_factory(db), kb=lambda: None)
    run = await retrainer.start("cli", "test", force=True)
    assert run.status == "queued" and run.adapter_version == "v0001", run.error
    await retrainer.wait()
    run = await retrainer.runs.get(run.id)
    adapter = await retrainer.registry.get("v0001")
    await db.dispose()
    return run, adapter, retrainer


@pytest.mark.parametrize("quantization", ["none", "4bit"])
async def test_real_lora_and_qlora_runs_produce_loadable_adapters(make_settings, real_model_dir, seed_csv, quantization):
    from gateway.app import build_engine
    from gateway.engine.base import Finished, GenerationRequest
    from gateway.chat import sampling_params

    settings = settings_for(make_settings, real_model_dir, seed_csv)
    run, adapter, retrainer = await _run_cycle(settings, quantization)
    assert run.status == "succeeded", (run.error, Path(run.log_path).read_text()[-3000:])
    training = run.metrics["training"]
    assert training["steps"] == 3 and training["quantization"] == quantization and training["eval_loss"] > 0
    evaluation = run.metrics["evaluation"]
    assert evaluation["baseline_version"] == "base" and evaluation["rows"] == 3
    assert set(evaluation["candidate"]) == {"rag", "no_rag"}
    passed = run.metrics["gate"]["passed"]
    assert adapter.state == ("challenger" if passed else "candidate")  # passed: live traffic decides (A/B)
    assert adapter.dataset_hash == run.dataset_hash and adapter.train_examples > 0 and adapter.files
    assert adapter.metrics["gate"] == run.metrics["gate"]
    assert run.progress["phase"] == "done" and Path(run.log_path).read_text().count('"step"') >= 3

    engine = build_engine(settings)
    await engine.start()
    try:
        await engine.load_adapter("v0001", str(retrainer.registry.path("v0001")))
        assert engine.variants() == ["base", "v0001"]

        async def answer(adapter_name):
            msgs = [{"role": "user", "content": "How do I block my card?"}]
            stream = await engine.submit(GenerationRequest(uuid.uuid4().hex, msgs, sampling_params(settings, 16),
                                                           adapter=adapter_name))
            return [e.token_id for e in [x async for x in stream] if not isinstance(e, Finished)]

        base, tuned = await asyncio.gather(answer(None), answer("v0001"))
        assert base != tuned  # the adapter changes the model's output
    finally:
        await engine.stop()


# ---- gateway: API, faults, scheduler ------------------------------------------------------------
@pytest.fixture
async def gateway(make_settings, tiny_model_dir, seed_csv):
    settings = settings_for(make_settings, tiny_model_dir, seed_csv, min_new_labels=2, bootstrap=False)
    app = create_app(settings)
    async with ready_client(app, settings) as c:
        yield c


async def _wait_run(client, run_id, statuses, timeout=240):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = (await client.get(f"/v1/retraining/runs/{run_id}", headers=ADMIN)).json()
        if run["status"] in statuses:
            return run
        await asyncio.sleep(0.5)
    raise AssertionError(f"run {run_id} still {run['status']}")


async def test_api_run_then_promote_and_corrupt_adapter_refused(gateway):
    c = gateway
    r = await c.post("/v1/retraining/runs", json={}, headers=ADMIN)
    assert r.status_code == 409 and r.json()["error"]["code"] == "not_due"  # 0 new labels, bootstrap off
    assert (await c.post("/v1/retraining/runs", json={"force": True}, headers={"Authorization": "Bearer dev-reviewer-key"})).status_code == 403
    assert (await c.post("/v1/retraining/runs", json={"force": True, "max_steps": 0}, headers=ADMIN)).status_code == 400
    assert (await c.post("/v1/retraining/runs", json={"force": True, "bogus": 1}, headers=ADMIN)).status_code == 400
    r = await c.post("/v1/retraining/runs", json={"force": True}, headers=ADMIN)
    assert r.status_code == 409 and r.json()["error"]["code"] == "dataset_failed"  # no labels, no bootstrap: nothing to learn
    await _resolve_items(c.settings, 3)
    r = await c.post("/v1/retraining/runs", json={"max_steps": 1}, headers=ADMIN)  # 3 new labels ≥ 2: due
    assert r.status_code == 202 and r.json()["status"] == "queued", r.text
    busy = await c.post("/v1/retraining/runs", json={"force": True}, headers=ADMIN)
    assert busy.status_code == 409 and busy.json()["error"]["code"] == "busy"  # one run at a time
    run = await _wait_run(c, r.json()["id"], ("succeeded", "failed"))
    assert run["status"] == "succeeded", run
    assert run["log_tail"] and run["metrics"]["gate"]["checks"]
    listing = (await c.get("/v1/adapters", headers={"Authorization": "Bearer dev-reviewer-key"})).json()
    [v1] = listing["data"]
    # Passing the gate makes a challenger (A/B against the base model); failing it leaves a candidate.
    passed = run["metrics"]["gate"]["passed"]
    assert v1["version"] == "v0001" and v1["state"] == ("challenger" if passed else "candidate")
    assert (await c.get("/v1/adapters/v0009", headers=ADMIN)).status_code == 404
    assert (await c.post("/v1/adapters/v0001/promote", headers={"Authorization": "Bearer dev-reviewer-key"})).status_code == 403
    r = await c.post("/v1/adapters/v0001/promote", headers=ADMIN)  # the admin's manual override
    assert r.status_code == 200 and r.json()["state"] == "champion" and r.json()["default"] is True
    chat = await c.post("/v1/chat/completions", headers=CLIENT, json={
        "model": "tellerloop", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "rag": False})
    assert chat.json()["variant"] == "v0001"  # the logical name now routes to the champion (hot, no restart)
    pinned = await c.post("/v1/chat/completions", headers={"Authorization": "Bearer dev-reviewer-key"}, json={
        "model": "base", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "rag": False})
    assert pinned.json()["variant"] == "base"
    again = await c.post("/v1/adapters/v0001/promote", headers=ADMIN)
    assert again.status_code == 409 and again.json()["error"]["code"] == "illegal_transition"

    folder = c.settings.storage.data_dir / "adapters" / "v0001"
    weights = next(folder.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-8] + b"corrupt!")
    db = create_engine(c.settings.storage.resolved_database_url)
    try:
        with pytest.raises(AdapterCorrupt, match="checksum mismatch"):
            await AdapterRegistry(session_factory(db), c.settings.storage.data_dir).verify("v0001")
    finally:
        await db.dispose()


async def test_killed_trainer_fails_the_run_and_serving_continues(gateway):
    c = gateway
    await _resolve_items(c.settings, 3)
    r = await c.post("/v1/retraining/runs", json={"force": True, "max_steps": 5000}, headers=ADMIN)
    run_id = r.json()["id"]
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        run = (await c.get(f"/v1/retraining/runs/{run_id}", headers=ADMIN)).json()
        if run["status"] == "running" and (run["progress"] or {}).get("step"):
            break
        await asyncio.sleep(0.5)
    db = create_engine(c.settings.storage.resolved_database_url)
    try:
        from retraining.registry import RunStore
        pid = (await RunStore(session_factory(db)).get(run_id)).pid
    finally:
        await db.dispose()
    os.kill(pid, signal.SIGKILL)
    run = await _wait_run(c, run_id, ("failed", "succeeded"), timeout=60)
    assert run["status"] == "failed" and "signal 9" in run["error"]
    adapters = (await c.get("/v1/adapters", headers=ADMIN)).json()["data"]
    assert adapters[0]["state"] == "failed"
    chat = await c.post("/v1/chat/completions", headers=CLIENT, json={
        "model": "tellerloop", "messages": [{"role": "user", "content": "still there?"}], "max_tokens": 3, "rag": False})
    assert chat.status_code == 200 and chat.json()["variant"] == "base"


async def _resolve_items(settings, n: int) -> None:
    db = create_engine(settings.storage.resolved_database_url)
    now = datetime.now(timezone.utc)
    try:
        async with session_factory(db)() as session, session.begin():
            for i in range(n):
                ex = Exchange(id=uuid.uuid4().hex, created_at=now, completed_at=now, api_key_name="k", user=None,
                              model_requested="tellerloop", variant="base",
                              messages=[{"role": "user", "content": f"How do I pay bill number {i}?"}],
                              answer="a", finish_reason="stop", stream=False, rag=False, sources=[], params={},
                              prompt_tokens=1, completion_tokens=1, ttft_ms=1, latency_ms=1, confidence=0.1,
                              confidence_parts={}, flagged=True)
                session.add(ex)
                await session.flush()
                session.add(ReviewItem(exchange_id=ex.id, status="resolved", confidence=0.1, low_confidence=True,
                                       thumbs_down=False, flag_count=0, required_labels=2, created_at=now,
                                       created_epoch=now.timestamp(), updated_at=now, resolution="correct",
                                       resolved_answer=f"Use online banking for bill {i}.", resolved_at=now,
                                       version=1))
    finally:
        await db.dispose()


async def test_scheduler_job_runs_only_when_enough_new_labels(make_settings, tiny_model_dir, seed_csv):
    settings = settings_for(make_settings, tiny_model_dir, seed_csv, min_new_labels=2, bootstrap=False, enabled=True)
    settings.storage.data_dir.mkdir(parents=True)
    db = create_engine(settings.storage.resolved_database_url)
    await migrate(db)
    retrainer = Retrainer(settings, session_factory(db), kb=lambda: None)
    scheduler = make_scheduler(settings, retrainer)
    scheduler.start()
    try:
        assert scheduler.get_job("retrain") is not None  # persisted in the database job store
        await scheduled_run()
        assert await retrainer.runs.list() == []  # due, but 0 new labels: nothing happens
        await _resolve_items(settings, 2)
        await scheduled_run()
        runs = await retrainer.runs.list()
        assert len(runs) == 1 and runs[0].trigger == "schedule"
        await scheduled_run()  # already running: still one
        assert len(await retrainer.runs.list()) == 1
        await retrainer.wait()
        assert (await retrainer.runs.get(runs[0].id)).status == "succeeded"
        with pytest.raises(RunRefused):
            await retrainer.start("schedule", "scheduler")  # its labels are used up
    finally:
        scheduler.shutdown(wait=False)
        await db.dispose()


def test_retrain_cli(make_settings, tiny_model_dir, seed_csv, tmp_path):
    cfg = tmp_path / "cli.toml"
    cfg.write_text(f'[model]\nbase = "{tiny_model_dir}"\n[storage]\ndata_dir = "{tmp_path / "var"}"\n'
                   f'[rag]\nenabled_by_default = false\n[retraining]\nseed_data = "{seed_csv}"\ncontext_in_prompts = false\n'
                   'eval_seed_size = 5\neval_limit = 2\neval_max_tokens = 8\nmin_examples = 4\n'
                   '[training]\nbatch_size = 2\ngrad_accum = 1\nnice = 0\n')
    base = [sys.executable, "-m", "gateway.cli", "retrain", "--config", str(cfg)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    status = subprocess.run(base, cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert status.returncode == 0 and json.loads(status.stdout)["bootstrap"] is True
    bad = subprocess.run(base + ["--now", "--max-steps", "0"], cwd=ROOT, capture_output=True, text=True, timeout=60, env=env)
    assert bad.returncode == 2 and "at least 1" in bad.stderr
    done = subprocess.run(base + ["--now", "--max-steps", "1"], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout)
    assert out["status"] == "succeeded" and out["adapter"] == "v0001" and out["state"] in ("challenger", "candidate")
