"""Knowledge base on real Chroma (embedded and a real `chroma run` server) with the real MiniLM embedder."""

import shutil
import time

import pytest

from gateway.core.settings import load_settings
from gateway.knowledge.documents import DocumentError, parse
from gateway.knowledge.embeddings import Embedder
from gateway.knowledge.store import KnowledgeBase

from .conftest import ROOT, ChromaServer

FAQ = (ROOT / "data" / "bank_faq" / "faq.csv").read_bytes()


@pytest.fixture(scope="module")
def embedder():
    return Embedder()


@pytest.fixture
def faq_kb(tmp_path, faq_chroma_dir, embedder):
    shutil.copytree(faq_chroma_dir, tmp_path / "chroma")
    return KnowledgeBase(load_settings().rag, tmp_path, embedder)


# ---- parsing ---------------------------------------------------------------------------------
def test_markdown_is_chunked_by_heading_with_size_cap():
    body = "Card fees apply. " * 80
    md = f"# Cards\n\nIntro.\n\n## Fees\n\n{body}\n\n# Loans\n\nLoan text.\n".encode()
    chunks = parse("guide.md", md, chunk_chars=300, chunk_overlap=50)
    titles = [c.metadata["title"] for c in chunks]
    assert titles[0] == "Cards" and titles[-1] == "Loans"
    assert "Cards > Fees" in titles and titles.count("Cards > Fees") >= 4
    assert all(len(c.text) <= 300 for c in chunks)
    assert parse("guide.md", md, chunk_chars=300, chunk_overlap=50)[1].id == chunks[1].id  # stable ids


def test_csv_and_jsonl_qa():
    chunks = parse("faq.csv", b"Question,Answer,category\nHow?,Like this.,cards\nWhy?,Because.,\n")
    assert [c.metadata["question"] for c in chunks] == ["How?", "Why?"]
    assert chunks[0].metadata["answer"] == "Like this." and chunks[0].metadata["category"] == "cards"
    jl = b'{"question": "Fee?", "answer": "None."}\n\n{"text": "Branches open at 9.", "title": "Hours"}\n'
    chunks = parse("kb.jsonl", jl)
    assert {c.metadata["kind"] for c in chunks} == {"qa", "text"}


@pytest.mark.parametrize(
    ("name", "data", "message"),
    [
        ("notes.pdf", b"%PDF", "unsupported file type"),
        ("empty.md", b"  \n\n", "empty"),
        ("latin1.txt", "caf\xe9".encode("latin-1"), "not valid UTF-8"),
        ("big.txt", b"x" * 2000, "over the 1000-byte limit"),
        ("faq.csv", b"q,a\nx,y\n", "'question' and 'answer' columns"),
        ("faq.csv", b"question,answer\nx,\n", "empty question or answer"),
        ("kb.jsonl", b'{"question": "x", "answer": "y"}\nnot json\n', "line 2 is not valid JSON"),
        ("kb.jsonl", b'{"foo": 1}\n', "needs 'question' and 'answer', or 'text'"),
    ],
)
def test_bad_documents_are_refused_clearly(name, data, message):
    with pytest.raises(DocumentError, match=message):
        parse(name, data, max_bytes=1000)


# ---- the knowledge base --------------------------------------------------------------------------
def test_reingest_is_idempotent_and_changes_replace(faq_kb):
    assert faq_kb.count() == 1039
    assert faq_kb.ingest_bytes("faq.csv", FAQ).unchanged
    lines = FAQ.decode().splitlines()
    changed = "\n".join([lines[0], lines[1].replace("recorded message", "RECORDED MESSAGE")] + lines[3:]).encode()
    result = faq_kb.ingest_bytes("faq.csv", changed)
    assert not result.unchanged and result.removed == 1 and result.added == 0
    assert result.embedded == 1  # only the edited entry: the others' stored vectors are reused
    edited = changed.replace(b"RECORDED MESSAGE", b"RECORDED VOICE MESSAGE")
    assert faq_kb.ingest_bytes("faq.csv", edited).embedded == 1
    assert faq_kb.count() == 1038
    top = faq_kb.search("Do I need to enter # after keying in my card number", 1)[0]
    assert "RECORDED VOICE MESSAGE" in top.metadata["answer"]


def test_delete_by_source(faq_kb):
    faq_kb.ingest_bytes("hours.md", b"# Opening hours\n\nBranches open at 9 am on weekdays.\n")
    assert faq_kb.stats()["sources"] == {"faq.csv": 1039, "hours.md": 1}
    assert faq_kb.delete_source("hours.md") == 1
    assert faq_kb.delete_source("hours.md") == 0
    assert faq_kb.count() == 1039


def test_failed_ingest_leaves_nothing_behind(faq_kb):
    with pytest.raises(DocumentError):
        faq_kb.ingest_bytes("bad.csv", b"question,answer\nok,fine\nbroken,\n")
    assert "bad.csv" not in faq_kb.stats()["sources"]


@pytest.mark.parametrize(
    ("paraphrase", "entry_starts"),
    [
        ("my card was stolen, who do I call?", "Who should I contact if my card is lost or stolen"),
        ("how do add-on card holders get an IVR password", "How should I get the IVR Password"),
        ("is there a fee for closing a fixed deposit early", "Do I need to pay any penalty on premature closure"),
        ("can I see my account statement on the internet", None),
    ],
)
def test_paraphrased_questions_find_their_entry(faq_kb, paraphrase, entry_starts):
    hits = faq_kb.search(paraphrase, 3)
    assert hits and all(-1 <= h.score <= 1 for h in hits)  # fused rank order, each score its cosine
    if entry_starts:
        assert any(h.metadata["question"].startswith(entry_starts) for h in hits), [h.metadata["question"] for h in hits]


@pytest.mark.parametrize("search", ["hybrid", "dense"])
def test_search_reports_how_clear_cut_the_first_entry_is(tmp_path, faq_chroma_dir, embedder, search):
    """The calibrator's retrieval signals: the best rival candidate's similarity (even at k = 1) and
    how well the first-ranked entry's own question matches the query."""
    shutil.copytree(faq_chroma_dir, tmp_path / "chroma")
    kb = KnowledgeBase(load_settings(rag={"search": search}).rag, tmp_path, embedder)
    question = "How can I cancel my Regalia ForexPlus Card"
    exact = kb.search_detailed(question, 1, -1.0)
    [first] = exact.hits
    assert first.metadata["question"] == question and exact.hits == kb.search(question, 1, -1.0)
    assert exact.question_match > 0.99  # asked verbatim: the entry's own question
    assert exact.rival is not None and exact.rival < first.score  # a rival exists at k = 1, and is worse
    vague = kb.search_detailed("hmm what about the other thing", 1, -1.0)
    assert vague.question_match < 0.5 and vague.hits[0].score - vague.rival < first.score - exact.rival
    assert KnowledgeBase(load_settings().rag, tmp_path / "empty", embedder).search_detailed(question, 1) == ([], None, None)


def test_min_score_filters(faq_kb):
    assert faq_kb.search("zebra astrophysics poetry", 3, min_score=0.9) == []


# ---- hybrid search: BM25 beside the embeddings, in step with every write ---------------------------
def _ids(kb, query, k=3):
    return [h.id for h in kb.search(query, k, -1.0)]


def test_hybrid_finds_rare_words_and_follows_ingest_reingest_and_delete(faq_kb, embedder):
    import numpy as np

    kb = faq_kb
    assert kb.cfg.search == "hybrid"  # the default
    # BM25 outweighs the embeddings here, so a word only BM25 knows decides the first hit: what is
    # tested is that the BM25 index follows every write
    kb.cfg = kb.cfg.model_copy(update={"lexical_weight": 2.0})
    doc = b"question,answer\nWhat is the Zorblax plan,The Zorblax plan is a savings plan with monthly interest.\n"
    kb.ingest_bytes("extra.csv", doc)
    zorblax = kb.search("zorblax", 1, -1.0)[0]
    assert zorblax.metadata["source"] == "extra.csv"
    q, d = embedder.embed(["zorblax", zorblax.text])
    assert zorblax.score == pytest.approx(float(q @ d / np.linalg.norm(q) / np.linalg.norm(d)), abs=1e-3)
    # a re-ingest that changes the words: the old word is gone at once, the new one is found
    kb.ingest_bytes("extra.csv", doc.replace(b"Zorblax", b"Quaffle"))
    assert not any("Zorblax" in h.text for h in kb.search("zorblax", 5, -1.0))
    assert kb.search("quaffle", 1, -1.0)[0].metadata["source"] == "extra.csv"
    kb.delete_source("extra.csv")
    assert all(h.metadata.get("source") == "faq.csv" for h in kb.search("quaffle plan", 5, -1.0))


def test_rrf_fuses_ranks():
    from gateway.knowledge.lexical import rrf

    fused = rrf([["a", "b", "c"], ["c", "d"]], k=60)
    assert [i for i, _ in fused] == ["c", "a", "b", "d"]  # c is in both lists
    assert rrf([["a"], ["b"]], k=60, weights=[1.0, 0.0])[0][0] == "a"


# ---- a real Chroma server -------------------------------------------------------------------------
@pytest.fixture
def chroma_server(tmp_path):
    server = ChromaServer(tmp_path / "srv")
    server.start()
    yield server.url
    server.stop()


def test_chroma_server_backend(tmp_path, chroma_server, embedder):
    cfg = load_settings(rag={"chroma_url": chroma_server}).rag
    kb = KnowledgeBase(cfg, tmp_path, embedder)
    doc = b"# Lost card\n\nCall us at once to block a lost card.\n\n# Fees\n\nWire transfers cost 5 EUR.\n"
    assert kb.ingest_bytes("help.md", doc).added == 2
    assert kb.stats()["backend"] == "http"
    assert kb.search("how much is a wire transfer", 1)[0].metadata["title"] == "Fees"
    assert kb.ingest_bytes("help.md", doc).unchanged
    # a second gateway on the same server rebuilds its BM25 index (in the background) once the
    # version stamp moves; BM25 outweighs the embeddings here so the rare word decides
    reader = KnowledgeBase(cfg.model_copy(update={"lexical_refresh_s": 0, "lexical_weight": 2.0}), tmp_path, embedder)
    assert reader.search("wire", 1)[0].metadata["title"] == "Fees"

    def eventually(check) -> bool:
        for _ in range(100):
            if check():
                return True
            time.sleep(0.05)
        return False

    kb.ingest_bytes("vault.md", b"# Vault\n\nThe Grimbly vault opens at nine.\n")
    assert eventually(lambda: reader.search("grimbly", 1)[0].metadata["title"] == "Vault")
    kb.delete_source("vault.md")
    assert eventually(lambda: "Vault" not in [h.metadata["title"] for h in reader.search("grimbly", 3, -1.0)])
    assert kb.delete_source("help.md") == 2 and kb.count() == 0
    assert not (tmp_path / "chroma").exists()  # nothing was written locally
