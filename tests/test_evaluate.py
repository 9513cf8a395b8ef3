"""The evaluation library: metrics by hand-checkable examples, and a tiny end-to-end run."""

import asyncio
import subprocess
import sys

import pytest

from retraining.evaluate import auroc, load_qa, rouge_l

from .conftest import ROOT


def test_rouge_l():
    assert rouge_l("the cat sat on the mat", "the cat sat on the mat") == 1.0
    assert rouge_l("", "x") == 0.0
    # LCS("a b c d", "a c d e") = 3 → P = 3/4, R = 3/4
    assert rouge_l("a b c d", "a c d e") == pytest.approx(0.75)


def test_auroc():
    assert auroc([0.9, 0.8, 0.1, 0.2], [True, True, False, False]) == 1.0
    assert auroc([0.1, 0.2, 0.9, 0.8], [True, True, False, False]) == 0.0
    assert auroc([0.5, 0.5], [True, False]) == 0.5
    assert auroc([0.5], [True]) is None


def test_load_qa_sample_is_seeded():
    path = ROOT / "data" / "bank_faq" / "faq.csv"
    a, b = load_qa(path, 10, seed=1), load_qa(path, 10, seed=1)
    assert a == b and len(a) == 10 and a != load_qa(path, 10, seed=2)
    assert len(load_qa(path)) == 1039


def test_the_evaluation_sets_are_about_the_frozen_split():
    from gateway.core.settings import load_settings
    from retraining.dataset import SPLIT_SEED
    from retraining.evaluate import load_eval_set

    settings = load_settings()
    frozen = load_qa(ROOT / "data" / "bank_faq" / "faq.csv", 100, SPLIT_SEED)  # what a fresh install freezes
    sets = {n: load_eval_set(n, settings, ROOT) for n in ("verbatim", "reworded", "conversations", "out_of_coverage")}
    assert sorted(q.question for q in sets["verbatim"]) == sorted(q.question for q in frozen)
    frozen_questions = {q.question for q in frozen}
    assert len(sets["reworded"]) >= 100 and all(q.target in frozen_questions for q in sets["reworded"])
    assert all(q.question.lower() != q.target.lower() for q in sets["reworded"])
    convos = sets["conversations"]
    assert len(convos) >= 50 and all(q.target in frozen_questions and len(q.history) == 2 for q in convos)
    ooc = sets["out_of_coverage"]
    assert len(ooc) >= 100 and not any(q.covered for q in ooc)
    assert all(q.answer == settings.rag.fallback_answer for q in ooc)  # the right answer is the fallback


def test_evaluate_on_tiny_model(make_settings, tiny_model_dir, faq_chroma_dir):
    from gateway.core.runtime import build_engine
    from gateway.knowledge.embeddings import Embedder
    from gateway.knowledge.store import KnowledgeBase
    from retraining.evaluate import QA, evaluate

    from .conftest import seed_knowledge

    settings = make_settings(tiny_model_dir)
    seed_knowledge(settings.storage.data_dir, faq_chroma_dir)
    rows = load_qa(ROOT / "data" / "bank_faq" / "faq.csv", 4, seed=3)
    ivr = "How should I get the IVR Password if I hold an add-on card"
    follow_up = QA("and how long does it take?", "x", history=(("user", ivr), ("assistant", "By SMS.")), target=ivr)
    outside = QA("Will it rain in Paris tomorrow?", settings.rag.fallback_answer, covered=False)

    async def run():
        engine = build_engine(settings)
        await engine.start()
        embedder = Embedder()
        kb = KnowledgeBase(settings.rag, settings.storage.data_dir, embedder)
        try:
            with_rag = await evaluate(settings, engine, embedder, rows, kb=kb, rag=True, max_tokens=8)
            without = await evaluate(settings, engine, embedder, rows, rag=False, max_tokens=8)
            sets = await evaluate(settings, engine, embedder, [follow_up, outside], kb=kb, rag=True, max_tokens=8)
        finally:
            await engine.stop()
        return with_rag, without, sets

    with_rag, without, sets = asyncio.run(run())
    convo, ooc = sets["items"]
    assert convo["retrieval_hit_at_1"] is True and convo["fallback"] is False  # searched with the question it follows
    assert ooc["fallback"] is True and ooc["answer"] == settings.rag.fallback_answer and ooc["good"] is True
    assert ooc["retrieval_hit"] is None and sets["summary"]["fallback_rate"] == 0.5
    s = with_rag["summary"]
    assert with_rag["config"]["n"] == 4 and len(with_rag["items"]) == 4
    assert s["retrieval_hit_rate"] == s["retrieval_hit_at_1"] == 1.0  # exact FAQ questions find their own entry
    assert s["fallback_rate"] == 0.0
    assert 0 <= s["cap_hit_rate"] <= 1 and -1 <= s["similarity_mean"] <= 1
    assert set(s["auroc"]) == {"confidence", "formula", "token_prob", "top_similarity"}
    assert set(s["brier"]) == {"confidence", "formula"} and sum(b["n"] for b in s["reliability"]) == 4
    parts = with_rag["items"][0]["confidence"]  # the raw signals a calibrator learns from are kept
    assert parts["mean_entropy"] > 0 and parts["tokens"] == with_rag["items"][0]["completion_tokens"]
    assert 0 <= parts["entry_overlap"] <= 1
    # the retrieval's own signals, even at rag.top_k 1: the best rival candidate, and the first entry's
    # own question against the query (these are the FAQ's questions asked verbatim)
    assert parts["second_similarity"] is not None and parts["question_match"] > 0.99
    assert parts["formula"] == parts["score"] and parts["calibrator"] is None  # no calibrator given
    assert without["items"][0]["confidence"]["entry_overlap"] is None
    assert without["summary"]["retrieval_hit_rate"] is None
    assert all(i["sources"] == [] for i in without["items"])


def test_eval_cli_errors(tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "gateway.cli", "eval", *args], cwd=ROOT, capture_output=True,
                              text=True, timeout=120)

    proc = run("--data", str(tmp_path / "nope.csv"), "--out", str(tmp_path / "r.json"))
    assert proc.returncode == 2 and "no such file" in proc.stderr
    bad = tmp_path / "bad.csv"
    bad.write_text("q,a\n1,2\n")
    proc = run("--data", str(bad), "--out", str(tmp_path / "r.json"))
    assert proc.returncode == 2 and "'question' and 'answer'" in proc.stderr and "Traceback" not in proc.stderr
    proc = run("--set", "nonsense", "--out", str(tmp_path / "r.json"))
    assert proc.returncode == 2 and "verbatim, reworded, conversations, out_of_coverage" in proc.stderr
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"messages": [{"role": "assistant", "content": "hi"}], "answer": "x"}\n')
    proc = run("--set", str(broken), "--out", str(tmp_path / "r.json"))
    assert proc.returncode == 2 and "must end with a user message" in proc.stderr and "Traceback" not in proc.stderr
    proc = run("--out", str(tmp_path / "r.json"))
    assert proc.returncode == 2 and "--set" in proc.stderr


def test_eval_cli_unknown_adapter(tmp_path, tiny_model_dir):
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[model]\nbase = "{tiny_model_dir}"\n[rag]\ndemo_data = ""\n')
    proc = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "eval", "--config", str(cfg), "--data-dir", str(tmp_path / "var"),
         "--data", str(ROOT / "data" / "bank_faq" / "faq.csv"), "--limit", "1", "--no-rag", "--adapter", "v9999",
         "--out", str(tmp_path / "r.json")],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2 and "no adapter version 'v9999'" in proc.stderr and "Traceback" not in proc.stderr
