"""Retraining: dataset rules, the registry's state machine and checksums, real LoRA and QLoRA runs
on SmolLM2, faults (killed trainer, corrupted adapter), the admin API and the scheduler."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest

from gateway.adapters.registry import AdapterCorrupt, AdapterRegistry, RegistryError
from gateway.app import create_app
from gateway.exchanges.models import Exchange
from gateway.review.models import ReviewItem
from gateway.runs.control import Retrainer, RunRefused
from gateway.runs.repository import RunActive, RunStore
from gateway.runs.scheduler import ScheduledJobs, make_scheduler, retrain_anchor
from gateway.store.base import as_utc
from gateway.store.db import create_engine, migrate, session_factory
from retraining import dataset as ds
from retraining.gate import decide, paired
from retraining.train import FrozenRetrieval
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
    return make_settings(model_dir, retraining={"seed_data": str(seed_csv), "eval_seed_size": 5,
                                                "calibration_seed_size": 5, "min_examples": 4,
                                                "eval_max_tokens": 12, "eval_limit": 3, "forgetting_probe_size": 3,
                                                **retraining},
                         training={"max_steps": 2, "batch_size": 2, "grad_accum": 1, "nice": 0})


def resolved(item_id: int, question: str, answer: str, when: str = "2026-11-01T00:00:00",
             history: list[dict] | None = None) -> ds.Resolved:
    messages = [{"role": "system", "content": "sys"}, *(history or []), {"role": "user", "content": question}]
    return ds.Resolved(item_id, when, messages, answer)


def seed_kb(settings, seed_csv):
    """A real (embedded Chroma) knowledge base holding the seed Q&A."""
    from gateway.knowledge.embeddings import Embedder
    from gateway.knowledge.store import KnowledgeBase

    kb = KnowledgeBase(settings.rag, settings.storage.data_dir, Embedder())
    kb.ingest_bytes("seed.csv", Path(seed_csv).read_bytes())
    return kb


# ---- dataset ------------------------------------------------------------------------------------
def test_dataset_split_leakage_dedupe_and_pii(make_settings, tiny_model_dir, seed_csv):
    settings = settings_for(make_settings, tiny_model_dir, seed_csv, eval_share=0.0, context_in_prompts=False,
                            mode="cumulative")
    settings.pii.keep_numbers = ["1800 202 6161"]
    split = ds.FrozenSplit.load_or_create(settings)
    assert len(split.rows) == 5
    eval_q = split.rows[0]["question"]
    rows = [
        resolved(1, eval_q.upper() + " ?!", "leaks if kept"),  # same question after normalisation
        resolved(2, "How do I close my account?", "old answer", "2026-11-01T00:00:00"),
        resolved(3, "how do i CLOSE my account", "Visit a branch with ID.", "2026-11-02T00:00:00"),
        resolved(4, "My card 4111 1111 1111 1111 was stolen", "Call us on 1800-202-6161; mail help@bank.example"),
        resolved(5, "Can I get a loan?", "Yes, apply in the app."),
    ]
    snap = ds.build(settings, rows, kb=None)
    assert not any(split.covers(e.question) for e in snap.train)  # leakage guard
    reviewed = [e for e in snap.train if e.source == "review"]
    assert len(reviewed) == 3 and snap.label_count == 3
    close = next(e for e in reviewed if "close" in e.question.lower())
    assert close.messages[-1]["content"] == "Visit a branch with ID."  # the latest resolution wins
    assert snap.seed_count == 30  # cumulative: every seed row outside the frozen and calibration splits
    assert len(snap.calibration) == 5 and not any(ds.FrozenSplit.calibration(settings, split).covers(e.question)
                                                  for e in snap.train)  # the calibration split is held out too
    text = (snap.path / "train.jsonl").read_text()
    assert "4111 1111 1111 1111" not in text and "help@bank.example" not in text  # PII scrubbed
    assert "1800-202-6161" in text  # ...but the bank's own number (pii.keep_numbers) stays
    manifest = json.loads((snap.path / "manifest.json").read_text())
    assert manifest["hash"] == snap.hash and manifest["dropped_near_duplicates"]["review"] == 1
    # Frozen: a rebuild keeps the split, and the same inputs hash the same.
    again = ds.build(settings, rows, kb=None)
    assert again.hash == snap.hash and [r["question"] for r in ds.FrozenSplit.load_or_create(settings).rows] == [
        r["question"] for r in split.rows]


def write_rewordings(settings, path: Path, n: int) -> list[dict]:
    """Customer-style rewordings of the first `n` calibration-split questions, plus one of a question
    outside the split (ignored)."""
    calibration = ds.FrozenSplit.calibration(settings, ds.FrozenSplit.load_or_create(settings)).rows
    rows = [{"question": f"pls help: {r['question'].lower()}", "original": r["question"].upper() + " ?"}
            for r in calibration[:n]] + [{"question": "is my card blocked", "original": "Not a seed question at all"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return calibration[:n]


def test_calibration_rewordings_join_the_calibration_split(make_settings, tiny_model_dir, seed_csv, tmp_path):
    file = tmp_path / "calibration_reworded.jsonl"
    settings = settings_for(make_settings, tiny_model_dir, seed_csv, eval_share=0.0, context_in_prompts=False,
                            mode="cumulative", calibration_rewordings=str(file))
    originals = write_rewordings(settings, file, 2)
    snap = ds.build(settings, [resolved(1, "How do I close my account?", "Visit a branch.")], kb=None)
    # matched on the normalised split question; each carries the split's reference answer
    assert [(qa.question, qa.answer) for qa in snap.calibration_reworded] == [
        (f"pls help: {r['question'].lower()}", r["answer"]) for r in originals]
    written = [json.loads(x) for x in (snap.path / "calibration_reworded.jsonl").read_text().splitlines()]
    assert [r["question"] for r in written] == [qa.question for qa in snap.calibration_reworded]
    assert json.loads((snap.path / "manifest.json").read_text())["calibration_reworded_rows"] == 2
    assert not {qa.question for qa in snap.calibration_reworded} & {e.question for e in snap.train}
    file.unlink()  # a configured file that is gone fails the dataset with the setting's name, not silently
    with pytest.raises(ds.DatasetError, match="retraining.calibration_rewordings"):
        ds.build(settings, [resolved(1, "How do I close my account?", "Visit a branch.")], kb=None)


def test_warm_dataset_is_the_new_reviews_plus_replay(make_settings, tiny_model_dir, seed_csv):
    settings = settings_for(make_settings, tiny_model_dir, seed_csv, eval_share=0.0, context_in_prompts=False,
                            mode="warm", replay_ratio=2.0, min_replay=4)
    first = [resolved(i, f"How do I pay bill number {i}?", f"Use online banking for bill {i}.") for i in range(1, 5)]
    parent = ds.build(settings, first, kb=None)  # what the champion was trained on (cumulative: no parent)
    assert parent.manifest["mode"] == "cumulative" and parent.seed_count == 30
    later = first + [resolved(i, f"Can I open account type {i} online?", f"Yes, type {i} opens online.",
                              "2026-11-05T00:00:00") for i in range(5, 10)]
    snap = ds.build(settings, later, kb=None, parent_manifest=parent.manifest)
    m = snap.manifest
    assert m["mode"] == "warm" and m["new_reviewed_examples"] == 5
    replayed = m["replayed_reviewed_examples"] + m["seed_examples"]
    assert replayed == 10  # replay_ratio 2 × 5 new (≥ min_replay 4): earlier reviews first, then seed Q&A
    assert 1 <= m["replayed_reviewed_examples"] <= 5 and set(m["known_reviews"]) >= set(parent.manifest["known_reviews"])
    new_questions = {e.question for e in snap.train if e.source == "review"}
    assert {f"Can I open account type {i} online?" for i in range(5, 10)} <= new_questions
    # Bootstrapping (or no parent) always takes everything.
    assert ds.build(settings, later, kb=None, bootstrap=True).manifest["mode"] == "bootstrap"


def test_keys_follow_ups_and_non_latin_questions(make_settings, tiny_model_dir, seed_csv):
    assert ds.question_key("Fees & Charges") == ds.question_key("fees and charges!")
    assert ds.question_key("Как заблокировать карту?") == "как заблокировать карту"
    assert ds.question_key("Как заблокировать карту?") != ds.question_key("Как открыть счёт?")
    assert ds.question_key("???") and ds.question_key("???") != ds.question_key("!!!")
    settings = settings_for(make_settings, tiny_model_dir, seed_csv, eval_share=0.0, context_in_prompts=False,
                            mode="cumulative")
    conv_a = [{"role": "user", "content": "Can I order a new card?"}, {"role": "assistant", "content": "Yes."}]
    conv_b = [{"role": "user", "content": "Can I raise my limit?"}, {"role": "assistant", "content": "Yes."}]
    rows = [resolved(1, "yes please", "Your card is on its way.", history=conv_a),
            resolved(2, "yes please", "Your new limit applies tomorrow.", history=conv_b),
            resolved(3, "Как заблокировать карту?", "В приложении."), resolved(4, "Как открыть счёт?", "Онлайн.")]
    # rag.history = "system": the earlier turns are quoted in the system prompt, one user turn follows
    quoted = [ds.Resolved(5 + i, "2026-11-01T00:00:00", [
        {"role": "system", "content": f"sys\n\nThe conversation so far:\nCustomer: {q}\nAssistant: Yes.\n\nentries"},
        {"role": "user", "content": "yes please"}], a)
        for i, (q, a) in enumerate([("Can I get a cheque book?", "It is posted in a week."),
                                    ("Can I close my FD early?", "Yes, with a penalty.")])]
    # rag.history = "query" (the default): the prompt holds the turns joined as one question; the
    # exchange's `conversation` says it is a follow-up
    joined = [ds.Resolved(7 + i, "2026-11-01T00:00:00", [
        {"role": "system", "content": "sys\n\nentries"}, {"role": "user", "content": f"{q}\nyes please"}], a,
        conversation=[{"role": "user", "content": q}, {"role": "assistant", "content": "Yes."}])
        for i, (q, a) in enumerate([("Can I pay by cheque?", "Yes, at a branch."),
                                    ("Can I stop a cheque?", "Yes, in NetBanking.")])]
    snap = ds.build(settings, rows + quoted + joined, kb=None)
    answers = {e.messages[-1]["content"] for e in snap.train if e.source == "review"}
    assert answers == {"Your card is on its way.", "Your new limit applies tomorrow.", "В приложении.", "Онлайн.",
                       "It is posted in a week.", "Yes, with a penalty.", "Yes, at a branch.", "Yes, in NetBanking."}
    # every reviewed single question would join the frozen split at eval_share 1; follow-ups never do
    everything = settings.model_copy(update={"retraining": settings.retraining.model_copy(update={"eval_share": 1.0})})
    snap = ds.build(everything, rows + quoted + joined, kb=None, bootstrap=True)
    frozen = {r.answer for r in snap.eval_rows}
    assert {"В приложении.", "Онлайн."} <= frozen and not frozen & {a for r in quoted + joined for a in [r.answer]}
    assert ds.conversation_key(quoted[0].messages).startswith("conversation:")  # never put in the frozen split
    assert ds.conversation_key(joined[0].messages, joined[0].conversation).startswith("conversation:")
    assert not ds.conversation_key(joined[0].messages).startswith("conversation:")  # without it: a single question


def test_seed_prompts_with_several_shuffled_entries_and_an_earlier_turn(make_settings, tiny_model_dir, seed_csv):
    """Issue 16's training prompts: `train_top_k` entries, the right one not always [1], and a share of
    seed examples asked after an earlier, unrelated turn (quoted as serving quotes it)."""
    from gateway.chat.prompting import CONVERSATION_HEADER

    settings = settings_for(make_settings, tiny_model_dir, seed_csv, eval_share=0.0, mode="cumulative",
                            train_top_k=3, shuffle_entries=True, conversation_share=1.0)
    settings = settings.model_copy(update={"rag": settings.rag.model_copy(update={"history": "system"})})
    kb = seed_kb(settings, seed_csv)
    from retraining.evaluate import load_qa

    rows = load_qa(seed_csv)
    positions = set()
    for qa in rows[:12]:
        system = ds.seed_messages(settings, qa.question, qa.answer, kb)[0]["content"]
        assert "[3]" in system and "[4]" not in system  # three entries, as train_top_k says
        blocks = system.split("\n[")[1:]
        positions |= {n for n, block in enumerate(blocks, start=1) if f"Question: {qa.question}" in block}
        assert ds.seed_messages(settings, qa.question, qa.answer, kb)[0]["content"] == system  # stable order
    assert len(positions) > 1  # the right entry is not always first
    snap = ds.build(settings, [], kb, bootstrap=True)
    seeds = [e for e in snap.train if e.source == "seed"]
    assert seeds and all(CONVERSATION_HEADER in e.messages[0]["content"] for e in seeds)
    assert all([m["role"] for m in e.messages] == ["system", "user", "assistant"] for e in seeds)
    assert all(ds.conversation_key(e.messages[:-1]).startswith("conversation:") for e in seeds)


def test_near_duplicates_never_cross_the_frozen_split(make_settings, tiny_model_dir, seed_csv):
    settings = settings_for(make_settings, tiny_model_dir, seed_csv, eval_share=0.0, context_in_prompts=False,
                            mode="cumulative")
    split = ds.FrozenSplit.load_or_create(settings)
    frozen = split.rows[0]["question"]
    near = frozen.replace(" ", "  ").rstrip("?") + "??"  # "What is X?" → "What  is  X??": same after normalising
    typo = frozen[:-3] + frozen[-2:] if len(frozen) > 30 else frozen + " please"
    rows = [resolved(1, near, "a"), resolved(2, typo, "b"), resolved(3, "Something unrelated entirely?", "c")]
    snap = ds.build(settings, rows, kb=None)
    questions = {e.question for e in snap.train}
    assert near not in questions and typo not in questions and "Something unrelated entirely?" in questions
    assert snap.manifest["dropped_near_duplicates"]["review"] == 2
    # The backstop: a leaked example that got past the filters is refused, never trained on.
    leaked = ds.Example("seed", typo, [{"role": "user", "content": typo}, {"role": "assistant", "content": "x"}])
    with pytest.raises(ds.LeakageError, match="repeat frozen evaluation questions"):
        ds.check_leakage(snap.train + [leaked], split)


def test_context_training_without_a_knowledge_base_is_refused(make_settings, tiny_model_dir, seed_csv):
    settings = settings_for(make_settings, tiny_model_dir, seed_csv, context_in_prompts=True)
    with pytest.raises(ds.DatasetError, match="knowledge base is unavailable"):
        ds.build(settings, [], kb=None, bootstrap=True)


def test_answer_only_logits_give_the_models_own_loss_and_gradients(tiny_model_dir, tmp_path):
    """`training.answer_only_logits` runs the head only at answer positions: the loss and every LoRA
    gradient must equal what the model's own forward (head on every position) gives, with the
    Trainer's gradient-accumulation normaliser and without it."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, TrainingArguments

    from retraining.finetune import AnswerLossTrainer, encode

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32),
                           LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                                      init_lora_weights=False))  # non-zero B: the LoRA path matters
    rows = [[{"role": "system", "content": "Context: cards are blocked in the app." * k},
             {"role": "user", "content": q}, {"role": "assistant", "content": a}]
            for k, (q, a) in enumerate([("How do I block my card?", "Open the app and tap Block card."),
                                        ("Fees?", "None."), ("Where is my branch?", "See the branch finder online.")], 1)]
    batch = DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100)([encode(tok, r, 512) for r in rows])
    trainer = AnswerLossTrainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True,
                                                                    report_to="none"))
    lora = [p for p in model.parameters() if p.requires_grad]

    def loss_and_grads(fn):  # noqa: ANN001
        model.zero_grad()
        loss = fn()
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in lora]

    n = int((batch["labels"][:, 1:] != -100).sum())
    for items in (None, n + 5):  # the per-batch mean, and a sum over an accumulated batch's tokens
        ours, ours_grads = loss_and_grads(lambda: trainer.compute_loss(model, dict(batch), num_items_in_batch=items))
        extra = {} if items is None else {"num_items_in_batch": items}
        theirs, their_grads = loss_and_grads(lambda: model(**batch, **extra).loss)
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
        for a, b in zip(ours_grads, their_grads):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
        assert any(g.abs().sum() > 0 for g in ours_grads)
    # `training.bf16` autocasts this loss as it does the model's own forward (accelerate wraps only that)
    seen = []
    hook = model.get_base_model().model.layers[0].mlp.down_proj.register_forward_hook(
        lambda module, args, out: seen.append(out.dtype))
    bf16 = AnswerLossTrainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True, bf16=True,
                                                                 report_to="none"))
    with bf16.compute_loss_context_manager():
        bf16.compute_loss(model, dict(batch))
    hook.remove()
    assert seen == [torch.bfloat16]


def test_encode_keeps_the_answer_end_and_the_system_turn(tiny_model_dir):
    from transformers import AutoTokenizer

    from retraining.finetune import encode

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    end = tok.convert_tokens_to_ids("<|im_end|>")
    system = {"role": "system", "content": "Bank context: cards are blocked in the app."}
    history = [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "ok " * 200}]
    messages = [system, *history, {"role": "user", "content": "How do I block my card?"},
                {"role": "assistant", "content": "Open the app and tap Block card."}]
    full = encode(tok, messages, 2000)
    short = encode(tok, messages, 120)  # too long with the history: the history goes, system and question stay
    assert short is not None and len(short["input_ids"]) < len(full["input_ids"])
    text = tok.decode(short["input_ids"])
    assert "Bank context" in text and "How do I block my card?" in text and "word word" not in text
    answer = [t for t, label in zip(short["input_ids"], short["labels"]) if label != -100]
    assert end in answer and "Block card." in tok.decode(answer)  # the whole answer, with its end-of-turn token
    assert short["labels"][:len(short["labels"]) - len(answer)] == [-100] * (len(short["labels"]) - len(answer))
    # An answer that cannot fit whole is skipped, never cut.
    long_answer = messages[:-1] + [{"role": "assistant", "content": "Step. " * 200}]
    assert encode(tok, long_answer, 120) is None


def test_dataset_grows_the_split_and_guards_size(make_settings, tiny_model_dir, seed_csv):
    settings = settings_for(make_settings, tiny_model_dir, seed_csv, eval_share=0.5, min_examples=500,
                            context_in_prompts=False)
    words = [hashlib.sha256(str(i).encode()).hexdigest()[:16] for i in range(1, 41)]  # unlike each other
    rows = [resolved(i, f"{w} about fees?", f"Answer {i}") for i, w in enumerate(words, 1)]
    with pytest.raises(ds.DatasetTooSmall):
        ds.build(settings, rows, kb=None)
    split = ds.FrozenSplit.load_or_create(settings)
    held = [r for r in split.rows if r["source"] == "review"]
    assert 8 <= len(held) <= 32  # about half of 40, by question hash
    assert all(ds.in_eval_share(r["question"], 0.5) for r in held)


def test_corrections_are_published_to_the_knowledge_base_and_trained_as_served(make_settings, tiny_model_dir,
                                                                              seed_csv):
    """A correction fills the knowledge-base gap it points at: from this run on the answer is
    retrieved, and its training example carries that entry, not the wrong one the model saw."""
    settings = settings_for(make_settings, tiny_model_dir, seed_csv, eval_share=0.0, mode="cumulative")
    kb = seed_kb(settings, seed_csv)
    question, fix = "Can I order a chequebook from the mobile app?", "Yes: Cards & Accounts > Chequebook > Order."
    wrong = [{"role": "system", "content": "Answer from this entry: [1] Fixed deposits earn 7 %."}]
    rows = [ds.Resolved(1, "2026-11-01T00:00:00", [*wrong, {"role": "user", "content": question}], fix),
            ds.Resolved(2, "2026-11-01T00:00:00", [*wrong, {"role": "user", "content": "What is a sweep-in?"}],
                        "A sweep-in links your savings to a deposit.", resolution="approve"),  # the model's own
            resolved(3, "and for my wife?", "She can apply too.",  # a follow-up: not a standalone question
                     history=[{"role": "user", "content": "Can I get a credit card?"},
                              {"role": "assistant", "content": "Yes."}])]
    snap = ds.build(settings, rows, kb)
    assert snap.manifest["reviewed_answers_published"] == 1
    [top] = kb.search(question, 1)
    assert top.metadata["source"] == ds.REVIEWED_SOURCE and top.metadata["answer"] == fix
    example = next(e for e in snap.train if e.question == question)
    assert fix in example.messages[0]["content"] and "Fixed deposits" not in example.messages[0]["content"]
    assert example.messages[-1] == {"role": "assistant", "content": fix}
    assert not [h for h in kb.search("What is a sweep-in?", 3, -1.0) if h.metadata["source"] == ds.REVIEWED_SOURCE
                and h.metadata["question"] == "What is a sweep-in?"]
    follow_up = next(e for e in snap.train if e.question == "and for my wife?")
    assert follow_up.messages[0] == rows[2].messages[0]  # the prompt it had
    # a later resolution replaces the entry (one entry per question), and publishing can be turned off
    again = ds.build(settings, [ds.Resolved(1, "2026-11-02T00:00:00", rows[0].messages, "Order it in NetBanking.")], kb)
    published = [h for h in kb.search(question, 5, -1.0) if h.metadata["source"] == ds.REVIEWED_SOURCE]
    assert [h.metadata["answer"] for h in published] == ["Order it in NetBanking."]
    assert again.manifest["reviewed_answers_published"] == 1
    # about one customer (a placeholder survived scrubbing): trained on, never shown to everyone
    mine = ds.build(settings, [resolved(5, "Why was my card blocked?", "We sent details to jane@example.com.")], kb)
    assert mine.manifest["reviewed_answers_published"] == 0
    assert "[EMAIL]" in next(e for e in mine.train if e.source == "review").messages[-1]["content"]
    # held out for evaluation: neither trained on nor published
    settings.retraining.eval_share = 1.0
    with pytest.raises(ds.DatasetTooSmall):  # nothing left to train on either
        ds.build(settings, [resolved(6, "Do you charge for SMS alerts?", "No, SMS alerts are free."),
                            resolved(7, "Can I order a chequebook by SMS?", "Yes: send CHQBK to 5676712.")], kb)
    assert not [h for h in kb.search("Do you charge for SMS alerts?", 5, -1.0) if h.metadata["source"] == ds.REVIEWED_SOURCE]
    settings.retraining.eval_share = 0.0
    settings.retraining.reviewed_answers_to_kb = False
    off = ds.build(settings, [resolved(4, "Is there a fee for SMS alerts?", "No.")], kb)
    assert off.manifest["reviewed_answers_published"] == 0
    assert not [h for h in kb.search("Is there a fee for SMS alerts?", 3, -1.0) if h.metadata["answer"] == "No."]


def test_seed_prompts_carry_retrieved_context_when_configured(make_settings, tiny_model_dir, seed_csv):
    settings = settings_for(make_settings, tiny_model_dir, seed_csv)
    hit = {"id": "x", "text": "t", "score": 0.9, "metadata": {"kind": "qa", "question": "Q?", "answer": "Fee is 5."}}
    retrieval = FrozenRetrieval({"What is the fee?": [hit]})
    with_ctx = ds.seed_messages(settings, "What is the fee?", "5.", retrieval)
    assert "Fee is 5." in with_ctx[0]["content"] and with_ctx[-1] == {"role": "assistant", "content": "5."}
    settings.retraining.context_in_prompts = False
    without = ds.seed_messages(settings, "What is the fee?", "5.", retrieval)
    assert "Fee is 5." not in without[0]["content"]


def test_paired_gate(make_settings, tiny_model_dir, seed_csv):
    cfg = settings_for(make_settings, tiny_model_dir, seed_csv, gate_margin=0.01, gate_min_improvement=0.0,
                       gate_no_rag_margin=0.03, forgetting_margin=0.02).retraining
    rng = np.random.default_rng(0)
    base = list(rng.uniform(0.5, 0.95, 100))

    def compare(shift, noise=0.02):
        return paired([b + shift + rng.normal(0, noise) for b in base], base, 0.95, 2000)

    better = compare(0.03)
    assert better["interval"][0] > 0 and better["wins"] > better["losses"] and better["sign_test_p"] < 0.01
    ok = decide(cfg, {"rag": better, "no_rag": compare(0.0, 0.005), "forgetting": compare(0.0, 0.005)}, "v0001")
    assert ok["passed"] and "passed the offline gate against v0001" in ok["reason"]
    assert ok["checks"]["rag"]["interval"] == better["interval"]  # the decision record stores the interval
    # Clearly worse with retrieval: the interval's lower bound is below −margin.
    worse = decide(cfg, {"rag": compare(-0.03), "no_rag": compare(0.0, 0.005)}, "v0001")
    assert not worse["passed"] and "FAILED" in worse["reason"] and not worse["checks"]["rag"]["passed"]
    # Better on the frozen split but forgetting the seed questions: refused.
    forgot = decide(cfg, {"rag": better, "no_rag": compare(0.0, 0.005), "forgetting": compare(-0.06)}, "v0001")
    assert not forgot["passed"] and not forgot["checks"]["forgetting"]["passed"]
    # Without retrieval the tolerance is `gate_no_rag_margin`: an interval reaching −0.02 (what equal
    # candidates' no-retrieval intervals look like) passes, a regression like stop 18's cycle 3 does not.
    noisy = {"rag": better, "no_rag": {**better, "mean_difference": 0.006, "interval": [-0.02, 0.024]}}
    assert decide(cfg, noisy, "v0001")["checks"]["no_rag"]["passed"]
    assert not decide(cfg.model_copy(update={"gate_no_rag_margin": 0.01}), noisy, "v0001")["passed"]
    regressed = {"rag": better, "no_rag": {**better, "mean_difference": -0.029, "interval": [-0.047, -0.01]}}
    refused = decide(cfg, regressed, "v0001")
    assert not refused["passed"] and "≥ −0.03" in refused["checks"]["no_rag"]["rule"]
    # A tie (identical answers) is non-inferior with min_improvement 0, not with a required improvement.
    tie = paired(base, base, 0.95, 500)
    assert tie["interval"] == [0.0, 0.0] and tie["ties"] == 100 and tie["sign_test_p"] == 1.0
    assert decide(cfg, {"rag": tie}, "v0001")["passed"]
    assert not decide(cfg.model_copy(update={"gate_min_improvement": 0.01}), {"rag": tie}, "v0001")["passed"]


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
    kb = seed_kb(settings, settings.retraining.seed_data)
    retrainer = Retrainer(settings, session_factory(db), kb=lambda: kb)
    run = await retrainer.start("cli", "test", force=True)
    assert run.status == "queued" and run.adapter_version == "v0001", run.error
    await retrainer.wait()
    run = await retrainer.runs.get(run.id)
    adapter = await retrainer.registry.get("v0001")
    await db.dispose()
    return run, adapter, retrainer


@pytest.mark.parametrize("quantization", ["none", "4bit"])
async def test_real_lora_and_qlora_runs_produce_loadable_adapters(make_settings, real_model_dir, tiny_model_dir,
                                                                  seed_csv, quantization):
    """QLoRA on the real SmolLM2; plain LoRA on the tiny model here, as the real model's LoRA run is
    the end-to-end retraining cycle through the real server (tests/test_e2e_real.py)."""
    from gateway.chat.prompting import sampling_params
    from gateway.core.runtime import build_engine
    from gateway.engine.base import Finished, GenerationRequest

    rewordings = seed_csv.parent / "calibration_reworded.jsonl"
    settings = settings_for(make_settings, real_model_dir if quantization == "4bit" else tiny_model_dir, seed_csv,
                            calibration_rewordings=str(rewordings),
                            # the real model's answers are slow on CPU: the shortest evaluation, no calibrator
                            **({"eval_max_tokens": 8, "calibration_seed_size": 0} if quantization == "4bit" else {}))
    write_rewordings(settings, rewordings, 2)
    run, adapter, retrainer = await _run_cycle(settings, quantization)
    assert run.status == "succeeded", (run.error, Path(run.log_path).read_text()[-3000:])
    training = run.metrics["training"]
    assert training["steps"] == 3 and training["quantization"] == quantization and training["eval_loss"] > 0
    evaluation = run.metrics["evaluation"]
    assert evaluation["baseline_version"] == "base" and evaluation["rows"] == 3 and evaluation["probe_rows"] == 3
    assert set(evaluation["candidate"]) == {"rag", "no_rag", "forgetting"}
    # the calibrator's answers: the split both ways and its rewordings with retrieval
    assert evaluation["calibration_answers"] == ({} if quantization == "4bit" else {
        "calibration_rag": 5, "calibration_no_rag": 5, "calibration_reworded_rag": 2})
    assert set(run.metrics["gate"]["checks"]) == {"rag", "no_rag", "forgetting"}
    assert all(len(c["interval"]) == 2 for c in run.metrics["gate"]["checks"].values())
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
            return [(e.token_id, round(e.logprob, 3)) for e in [x async for x in stream] if not isinstance(e, Finished)]

        base, tuned = await asyncio.gather(answer(None), answer("v0001"))
        assert base != tuned  # the adapter changes the model's output (its tokens or their probabilities)
    finally:
        await engine.stop()
    if quantization == "none":  # `tellerloop eval` compares the base model and the new version, set by set
        cfg = Path(settings.storage.data_dir).parent / "eval.toml"
        cfg.write_text(f'[model]\nbase = "{tiny_model_dir}"\n[rag]\ndemo_data = ""\n')
        out = Path(settings.storage.data_dir).parent / "eval.json"
        proc = subprocess.run(
            [sys.executable, "-m", "gateway.cli", "eval", "--config", str(cfg), "--data-dir", str(settings.storage.data_dir),
             "--set", "verbatim", "--set", "conversations", "--limit", "2", "--no-rag", "--max-tokens", "4",
             "--adapter", "base", "--adapter", "v0001", "--out", str(out)],
            cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "| conversations | v0001 | 2 |" in proc.stdout and "| verbatim | base | 2 |" in proc.stdout
        report = json.loads(out.read_text())["variants"]
        assert set(report) == {"base", "v0001"} and set(report["v0001"]) == {"verbatim", "conversations"}
        assert report["v0001"]["conversations"]["config"]["adapter"] == "v0001"


async def test_warm_start_continues_the_champion(make_settings, tiny_model_dir, seed_csv):
    """Mode "warm": the second run loads the champion's adapter weights and trains on top of them;
    lineage says so, and the new weights start where the champion's ended."""
    from safetensors.torch import load_file

    from gateway.experiments.repository import Experiments

    settings = settings_for(make_settings, tiny_model_dir, seed_csv, mode="warm", min_replay=4, eval_share=0.0)
    settings.training.learning_rate = 5e-2  # the bootstrap must move the LoRA weights visibly
    settings.retraining.warm_learning_rate = 1e-5  # ...and the warm run barely
    settings.storage.data_dir.mkdir(parents=True, exist_ok=True)
    db = create_engine(settings.storage.resolved_database_url)
    await migrate(db)
    kb = seed_kb(settings, seed_csv)
    retrainer = Retrainer(settings, session_factory(db), kb=lambda: kb)
    try:
        first = await retrainer.start("cli", "test", force=True)
        await retrainer.wait()
        first = await retrainer.runs.get(first.id)
        assert first.status == "succeeded", first.error
        assert first.metrics["training"]["initialised_from"] == "base"
        await Experiments(settings, retrainer.sessions, retrainer.registry).promote("v0001", "test")
        await _resolve_items(settings, 3)
        second = await retrainer.start("cli", "test", force=True)
        await retrainer.wait()
        second = await retrainer.runs.get(second.id)
        assert second.status == "succeeded", second.error
        assert second.metrics["dataset"]["mode"] == "warm" and second.metrics["dataset"]["new_reviewed_examples"] == 3
        assert second.metrics["training"]["initialised_from"] == "v0001"
        assert second.metrics["training"]["learning_rate"] == 1e-5
        v2 = await retrainer.registry.get("v0002")
        assert v2.parent == "v0001" and v2.config["initialised_from"] == "v0001" and v2.config["mode"] == "warm"
        assert second.metrics["gate"]["baseline_version"] == "v0001"
        w1 = load_file(str(retrainer.registry.path("v0001") / "adapter_model.safetensors"))
        w2 = load_file(str(retrainer.registry.path("v0002") / "adapter_model.safetensors"))
        lora_b = [k for k in w1 if "lora_B" in k]
        assert lora_b and all(w1[k].abs().sum() > 0 for k in lora_b)  # a fresh adapter's B is zero
        assert all((w2[k] - w1[k]).norm() < 0.1 * w1[k].norm() for k in lora_b)  # v0002 started from v0001
        assert not list(retrainer.registry.root.glob(".v0002*"))  # no checkpoints or temp folders left
    finally:
        await db.dispose()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
async def test_one_active_run_is_enforced_by_the_database(tmp_path, backend):
    """Two processes (two engines) racing to start runs: the database admits exactly one active run."""
    from tests.conftest import fresh_postgres_database

    async def check(url):
        engines = [create_engine(url) for _ in range(2)]
        await migrate(engines[0])
        stores = [RunStore(session_factory(e)) for e in engines]
        try:
            first = await stores[0].create("cli", "a", {}, 0)
            with pytest.raises(RunActive, match=f"run {first.id} is already queued"):
                await stores[1].create("schedule", "b", {}, 0)
            await stores[0].update(first.id, status="failed", error="test")
            results = await asyncio.gather(*[stores[i % 2].create("cli", f"r{i}", {}, 0) for i in range(6)],
                                           return_exceptions=True)
            won = [r for r in results if not isinstance(r, BaseException)]
            assert len(won) == 1 and all(isinstance(r, RunActive) for r in results if r not in won), results
            assert [r.id for r in await stores[1].active()] == [won[0].id]
            await stores[1].update(won[0].id, status="succeeded")
            assert await stores[0].create("cli", "next", {}, 0)  # a terminal run frees the slot
        finally:
            for e in engines:
                await e.dispose()

    if backend == "sqlite":
        await check(f"sqlite+aiosqlite:///{tmp_path / 'lock.db'}")
    else:
        async with fresh_postgres_database("tl_runlock") as url:
            await check(url)


async def test_runs_always_end_in_a_terminal_state(make_settings, tiny_model_dir, seed_csv, monkeypatch):
    settings = settings_for(make_settings, tiny_model_dir, seed_csv, adopt_poll_s=0.1)
    settings.storage.data_dir.mkdir(parents=True, exist_ok=True)
    db = create_engine(settings.storage.resolved_database_url)
    await migrate(db)
    sessions = session_factory(db)
    try:
        # No knowledge base: the run fails with the reason (never trains without the context).
        run = await Retrainer(settings, sessions, kb=lambda: None).start("cli", "test", force=True)
        assert run.status == "failed" and "knowledge base is unavailable" in run.error
        # An exception after the dataset is built: failed, not left queued.
        kb = seed_kb(settings, seed_csv)
        retrainer = Retrainer(settings, sessions, kb=lambda: kb)

        async def broken(**kw):
            raise OSError("disk full")
        monkeypatch.setattr(retrainer.registry, "create", broken)
        run = await retrainer.start("cli", "test", force=True)
        assert run.status == "failed" and "disk full" in run.error
        monkeypatch.undo()

        # A run whose pid is alive but is not its trainer (a reused pid): failed by the next start-up check.
        runs = RunStore(sessions)
        other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
        stale = await runs.create("cli", "test", {}, 0)
        await runs.update(stale.id, status="running", pid=other.pid)
        assert await Retrainer(settings, sessions, kb=lambda: kb).mark_interrupted() == 1
        assert (await runs.get(stale.id)).status == "failed"
        other.kill()
        other.wait()

        # A trainer left running by a stopped gateway is adopted, watched to its end and completed.
        orphan = await runs.create("cli", "test", {}, 0)
        trainer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(2)", "retraining.train",
                                    str(orphan.id)])
        await runs.update(orphan.id, status="running", pid=trainer.pid)
        adopter = Retrainer(settings, sessions, kb=lambda: kb)
        assert await adopter.mark_interrupted() == 0 and (await runs.get(orphan.id)).status == "running"
        with pytest.raises(RunRefused, match="already running"):
            await adopter.start("cli", "test", force=True)  # the adopted run still holds the slot
        await runs.update(orphan.id, status="trained")  # what the trainer writes when it is done
        await adopter.wait()
        trainer.wait()
        assert (await runs.get(orphan.id)).status == "succeeded"

        # A trainer that finished ("trained") while nobody watched: completed at the next check.
        done = await runs.create("cli", "test", {}, 0)
        await runs.update(done.id, status="trained", pid=trainer.pid)
        fresh = Retrainer(settings, sessions, kb=lambda: kb)
        await fresh.mark_interrupted()
        await fresh.wait()
        assert (await runs.get(done.id)).status == "succeeded"
    finally:
        await db.dispose()


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
    refusals = metric(await c.get("/metrics"), "tellerloop_adapter_refusals_total")
    refused = await c.post("/v1/adapters/v0001/load", headers=ADMIN)  # asked to load it again: refused, visibly
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "adapter_corrupt"
    assert metric(await c.get("/metrics"), "tellerloop_adapter_refusals_total") == refusals + 1
    assert metric(await c.get("/metrics"), 'tellerloop_retraining_runs_total{status="succeeded"}') >= 1
    chat = await c.post("/v1/chat/completions", headers=CLIENT, json={  # and serving goes on
        "model": "tellerloop", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "rag": False})
    assert chat.status_code == 200


def metric(response, name: str) -> float:
    line = next((x for x in response.text.splitlines() if x.startswith(name + " ")), None)
    return float(line.split()[-1]) if line else 0.0


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
        from gateway.runs.repository import RunStore
        pid = (await RunStore(session_factory(db)).get(run_id)).pid
    finally:
        await db.dispose()
    failed_before = metric(await c.get("/metrics"), 'tellerloop_retraining_runs_total{status="failed"}')
    os.kill(pid, signal.SIGKILL)
    run = await _wait_run(c, run_id, ("failed", "succeeded"), timeout=60)
    assert run["status"] == "failed" and "signal 9" in run["error"]
    adapters = (await c.get("/v1/adapters", headers=ADMIN)).json()["data"]
    assert adapters[0]["state"] == "failed"
    chat = await c.post("/v1/chat/completions", headers=CLIENT, json={
        "model": "tellerloop", "messages": [{"role": "user", "content": "still there?"}], "max_tokens": 3, "rag": False})
    assert chat.status_code == 200 and chat.json()["variant"] == "base"
    assert metric(await c.get("/metrics"), 'tellerloop_retraining_runs_total{status="failed"}') == failed_before + 1


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
    kb = seed_kb(settings, seed_csv)
    retrainer = Retrainer(settings, session_factory(db), kb=lambda: kb)
    jobs = ScheduledJobs(retrainer)
    scheduler = make_scheduler(settings, jobs, anchor=await retrain_anchor(retrainer))
    scheduler.start()
    try:
        job = scheduler.get_job("retrain")
        assert job is not None and scheduler.get_job("experiment") is None  # no serving: no experiment job
        await jobs.retrain()
        assert await retrainer.runs.list() == []  # due, but 0 new labels: nothing happens
        await _resolve_items(settings, 2)
        await jobs.retrain()
        runs = await retrainer.runs.list()
        assert len(runs) == 1 and runs[0].trigger == "schedule"
        await jobs.retrain()  # already running: still one
        assert len(await retrainer.runs.list()) == 1
        await retrainer.wait()
        assert (await retrainer.runs.get(runs[0].id)).status == "succeeded"
        with pytest.raises(RunRefused):
            await retrainer.start("schedule", "scheduler")  # its labels are used up
        # a restart keeps the slot: the interval's grid starts at the newest run, not at the restart
        anchor = await retrain_anchor(retrainer)
        assert anchor == as_utc(runs[0].created_at)
        restarted = make_scheduler(settings, jobs, anchor=anchor)
        restarted.start(paused=True)
        try:
            slot = restarted.get_job("retrain").next_run_time
            assert slot - anchor == timedelta(hours=settings.retraining.interval_hours)
        finally:
            restarted.shutdown(wait=False)
    finally:
        scheduler.shutdown(wait=False)
        await db.dispose()


def test_retrain_cli(make_settings, tiny_model_dir, seed_csv, tmp_path):
    cfg = tmp_path / "cli.toml"
    cfg.write_text(f'[model]\nbase = "{tiny_model_dir}"\n[storage]\ndata_dir = "{tmp_path / "var"}"\n'
                   f'[rag]\nenabled_by_default = false\ndemo_data = ""\n[retraining]\nseed_data = "{seed_csv}"\n'
                   'context_in_prompts = false\n'
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


async def test_a_full_disk_while_saving_the_adapter_fails_the_run_and_serving_continues(gateway):
    """The adapters folder is a 16 KB tmpfs (root only: skipped loudly elsewhere): the save hits
    ENOSPC, the run and its adapter fail with the OS error, no half-written version folder is left,
    the failure is counted, and the gateway keeps answering on what it served before."""
    c = gateway
    adapters = c.settings.storage.data_dir / "adapters"
    adapters.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(adapters)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"FULL DISK test SKIPPED: cannot mount a tmpfs here ({mounted.stderr.strip()[:80]})")
    try:
        await _resolve_items(c.settings, 3)
        failed_before = metric(await c.get("/metrics"), 'tellerloop_retraining_runs_total{status="failed"}')
        r = await c.post("/v1/retraining/runs", json={"force": True, "max_steps": 1}, headers=ADMIN)
        assert r.status_code == 202, r.text
        run = await _wait_run(c, r.json()["id"], ("failed", "succeeded"))
        assert run["status"] == "failed" and "No space left on device" in run["error"], run["error"]
        adapter = (await c.get(f"/v1/adapters/{run['adapter_version']}", headers=ADMIN)).json()
        assert adapter["state"] == "failed" and not adapter["loaded"]
        assert [p.name for p in adapters.iterdir()] == []  # no half-written version, no temp folder
        for _ in range(50):  # counted when the gateway sees its trainer exit (the row says failed first)
            if metric(await c.get("/metrics"), 'tellerloop_retraining_runs_total{status="failed"}') > failed_before:
                break
            await asyncio.sleep(0.2)
        assert metric(await c.get("/metrics"), 'tellerloop_retraining_runs_total{status="failed"}') == failed_before + 1
        chat = await c.post("/v1/chat/completions", headers=CLIENT, json={
            "model": "tellerloop", "messages": [{"role": "user", "content": "still there?"}], "max_tokens": 3,
            "rag": False})
        assert chat.status_code == 200 and chat.json()["variant"] == "base"
    finally:
        subprocess.run(["umount", "-l", str(adapters)], capture_output=True)
