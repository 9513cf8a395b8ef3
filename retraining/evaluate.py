"""Answer-quality evaluation: the library function behind `tellerloop eval` (and, later, the
retraining gate).

For each Q&A row it asks the question exactly as serving would (same prompt building, retrieval,
sampling defaults and confidence), then scores the answer against the reference:
  * similarity: cosine of all-MiniLM-L6-v2 embeddings of answer and reference ("good" ≥ 0.75,
    the FINDINGS.md convention);
  * ROUGE-L F1 over lower-cased word tokens;
  * retrieval hit: the reference entry (same normalised question) first among the sources (hit@1)
    and among them at all (hit@k);
  * fallback: the bot answered `rag.fallback_answer` because nothing relevant was retrieved — the
    right answer to an out-of-coverage question (its reference is the fallback text), a wrong
    refusal for a covered one;
  * cap hit (finish_reason "length") and looping (a word 4-gram ×3);
  * AUROC of the confidence score (and each of its parts) for separating good from bad answers.
"""

from __future__ import annotations

import asyncio
import csv
import json
import random
import re
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from gateway.calibration.calibrator import Calibrator, brier, reliability
from gateway.chat.confidence import is_looping
from gateway.chat.confidence import score as score_confidence
from gateway.chat.prompting import (
    CannedAnswer,
    build_messages,
    is_no_match,
    retrieval_query,
    retrieve,
    sampling_params,
)
from gateway.core.settings import Settings
from gateway.engine.base import Engine, Finished, GenerationRequest, TokenEvent
from gateway.knowledge.documents import normalise_question

if TYPE_CHECKING:
    from gateway.knowledge.embeddings import Embedder
    from gateway.knowledge.store import KnowledgeBase

GOOD_SIMILARITY = 0.75
_TOKEN = re.compile(r"\w+")


@dataclass(frozen=True)
class QA:
    """One evaluation question. `history`: earlier turns of its conversation (a follow-up);
    `target`: the knowledge-base question whose entry answers it ("" = `question` itself);
    `covered`: False when the knowledge base has no answer (the reference is then the fallback)."""

    question: str
    answer: str
    category: str = ""
    history: tuple[tuple[str, str], ...] = ()
    target: str = ""
    covered: bool = True


EVAL_SETS = ("verbatim", "reworded", "conversations", "out_of_coverage")


def load_eval_set(name_or_path: str | Path, settings: Settings, root: Path) -> list[QA]:
    """One of the evaluation sets in `data/eval` (EVAL_SETS; "verbatim" is the frozen questions the
    rewordings were written from) or a JSONL file of the same shape:
    {"question", "original"?, "answer"} | {"messages", "standalone", "answer"} | {"question"} (not covered)."""
    name = str(name_or_path)
    path = root / "data" / "eval" / ("reworded.jsonl" if name == "verbatim" else f"{name}.jsonl") \
        if name in EVAL_SETS else Path(name)
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    out: list[QA] = []
    seen: set[str] = set()
    for n, row in enumerate(rows, start=1):
        if not isinstance(row, dict):
            raise ValueError(f"{path}: line {n} is not a JSON object")
        if name == "verbatim":
            if row["original"] not in seen:
                seen.add(row["original"])
                out.append(QA(row["original"], row["answer"], "verbatim"))
        elif "messages" in row:
            turns = [(m["role"], m["content"]) for m in row["messages"]]
            if not turns or turns[-1][0] != "user":
                raise ValueError(f"{path}: line {n}: a conversation must end with a user message")
            out.append(QA(turns[-1][1], row["answer"], "conversation", tuple(turns[:-1]), row.get("standalone", "")))
        elif "answer" in row:
            out.append(QA(row["question"], row["answer"], "reworded", target=row.get("original", "")))
        else:
            out.append(QA(row["question"], settings.rag.fallback_answer, row.get("source", ""), covered=False))
    return out


def load_qa(path: str | Path, limit: int | None = None, seed: int = 0) -> list[QA]:
    """Rows of a question/answer CSV; with `limit`, a seeded random sample (a fixed sample per seed)."""
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        if not {"question", "answer"} <= set(reader.fieldnames or []):
            raise ValueError(f"{path}: needs 'question' and 'answer' columns (found: {reader.fieldnames})")
        rows = [QA(r["question"].strip(), r["answer"].strip(), (r.get("category") or "").strip())
                for r in reader if r.get("question") and r.get("answer")]
    if limit is not None and limit < len(rows):
        rows = random.Random(seed).sample(rows, limit)
    return rows


def rouge_l(candidate: str, reference: str) -> float:
    a, b = _TOKEN.findall(candidate.lower()), _TOKEN.findall(reference.lower())
    if not a or not b:
        return 0.0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    p, r = lcs / len(a), lcs / len(b)
    return 2 * p * r / (p + r)


def auroc(scores: list[float], labels: list[bool]) -> float | None:
    """Probability that a random good answer scores above a random bad one (ties count half)."""
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    if not pos or not neg:
        return None
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return round(wins / (len(pos) * len(neg)), 4)


async def _answer(settings: Settings, engine: Engine, kb: KnowledgeBase | None, qa: QA, rag: bool,
                  adapter: str | None, max_tokens: int, calibrator: Calibrator | None = None) -> dict:
    """Ask as serving would: the same retrieval query, fallback rule, prompt and sampling."""
    history = [{"role": role, "content": content} for role, content in qa.history]
    conversation = history + [{"role": "user", "content": qa.question}]
    hits, top, fallback, signals = None, None, False, {}
    if rag:
        got = await retrieve(settings, kb, retrieval_query(conversation, settings.rag.query_turns), settings.rag.top_k)
        hits, top = got.hits, got.top
        signals = got.signals()
        fallback = is_no_match(settings, got.first)
    messages = build_messages(settings, conversation, hits)
    stream = CannedAnswer(settings.rag.fallback_answer) if fallback else await engine.submit(
        GenerationRequest("eval", messages, sampling_params(settings, max_tokens), adapter=adapter))
    text, logprobs, entropies, fin = "", [], [], None
    async for ev in stream:
        text += ev.text
        if isinstance(ev, TokenEvent) and ev.logprob is not None:  # an upstream may send none
            logprobs.append(ev.logprob)
            entropies.append(ev.entropy)
        elif isinstance(ev, Finished):
            fin = ev
    conf = score_confidence(logprobs, text, fin.finish_reason, settings.confidence, top_similarity=top,
                            sources=None if hits is None else [h.as_source() for h in hits], entropies=entropies,
                            calibrator=calibrator, **signals)  # a fallback scores 0 either way (no tokens), as served
    target = normalise_question(qa.target or qa.question)
    found = [] if hits is None else [normalise_question(h.metadata.get("question", "")) for h in hits]
    hit = None if hits is None or not qa.covered else target in found
    return {"question": qa.question, "target": qa.target or qa.question, "history": [list(t) for t in qa.history],
            "covered": qa.covered,
            "reference": qa.answer, "answer": text, "finish_reason": fin.finish_reason,
            "completion_tokens": fin.completion_tokens, "confidence": conf.parts(), "retrieval_hit": hit,
            "retrieval_hit_at_1": None if hit is None else bool(found) and found[0] == target,
            "fallback": fallback, "top_similarity": top,
            "sources": [] if hits is None else [h.metadata.get("question", h.id) for h in hits]}


async def evaluate(settings: Settings, engine: Engine, embedder: Embedder, rows: list[QA], *,
                   kb: KnowledgeBase | None = None, rag: bool = True, adapter: str | None = None,
                   max_tokens: int | None = None, concurrency: int = 8,
                   progress: Callable[[int, int], None] | None = None, calibrator: Calibrator | None = None) -> dict:
    """Run the questions through the engine (`concurrency` at a time) and score the answers; the
    confidence is the `calibrator`'s where one is given (the served variant's), else the formula."""
    if rag and kb is None:
        raise ValueError("rag=True needs a knowledge base")
    max_tokens = max_tokens or settings.model.default_max_tokens
    semaphore = asyncio.Semaphore(concurrency)
    done = 0
    started = time.perf_counter()

    async def one(qa: QA) -> dict:
        nonlocal done
        async with semaphore:
            result = await _answer(settings, engine, kb, qa, rag, adapter, max_tokens, calibrator)
        done += 1
        if progress:
            progress(done, len(rows))
        return result

    items = await asyncio.gather(*[one(qa) for qa in rows])
    sims = await asyncio.to_thread(embedder.similarity, [i["answer"] or " " for i in items], [i["reference"] for i in items])
    for item, sim in zip(items, sims):
        item["similarity"] = round(float(sim), 4)
        item["rouge_l"] = round(rouge_l(item["answer"], item["reference"]), 4)
        # an out-of-coverage question is answered well by the fallback, or by words close to it
        item["good"] = item["similarity"] >= GOOD_SIMILARITY or (item["fallback"] and not item["covered"])
        item["looping"] = is_looping(item["answer"])
    return {"config": {"rag": rag, "adapter": adapter or "base", "calibrator": calibrator.id if calibrator else None, "max_tokens": max_tokens, "n": len(items),
                       "layout": settings.rag.layout, "top_k": settings.rag.top_k,
                       "repetition_penalty": settings.model.repetition_penalty,
                       "no_repeat_ngram_size": settings.model.no_repeat_ngram_size},
            "summary": summarise(items), "seconds": round(time.perf_counter() - started, 1), "items": items}


def summarise(items: list[dict]) -> dict:
    sims = [i["similarity"] for i in items]
    labels = [i["good"] for i in items]
    n = len(items)
    hits = [i["retrieval_hit"] for i in items if i["retrieval_hit"] is not None]
    hits_at_1 = [i["retrieval_hit_at_1"] for i in items if i.get("retrieval_hit_at_1") is not None]
    # the confidence is the model's about its own answers: fallback answers (not generated, score 0
    # by construction) are left out of its AUROC, Brier score and reliability
    generated = [i for i in items if not i.get("fallback")]
    conf, scored = [i["confidence"] for i in generated], [i["good"] for i in generated]
    parts = {"confidence": [c["score"] for c in conf], "formula": [c.get("formula", c["score"]) for c in conf],
             "token_prob": [c["token_prob"] for c in conf]}
    if all(c["top_similarity"] is not None for c in conf):
        parts["top_similarity"] = [c["top_similarity"] for c in conf]
    return {
        "similarity_mean": round(statistics.fmean(sims), 4),
        "similarity_median": round(statistics.median(sims), 4),
        "rouge_l_mean": round(statistics.fmean(i["rouge_l"] for i in items), 4),
        "good_rate": round(sum(labels) / n, 4),
        "share_similarity_ge": {str(t): round(sum(s >= t for s in sims) / n, 4) for t in (0.5, 0.75, 0.9)},
        "cap_hit_rate": round(sum(i["finish_reason"] == "length" for i in items) / n, 4),
        "loop_rate": round(sum(i["looping"] for i in items) / n, 4),
        "retrieval_hit_rate": round(sum(hits) / len(hits), 4) if hits else None,
        "retrieval_hit_at_1": round(sum(hits_at_1) / len(hits_at_1), 4) if hits_at_1 else None,
        "fallback_rate": round(sum(bool(i.get("fallback")) for i in items) / n, 4),
        "mean_completion_tokens": round(statistics.fmean(i["completion_tokens"] for i in items), 1),
        "mean_confidence": round(statistics.fmean(parts["confidence"]), 4) if conf else None,
        "auroc": {name: auroc(values, scored) for name, values in parts.items()},
        "brier": {name: brier(parts[name], scored) if conf else None for name in ("confidence", "formula")},
        "reliability": reliability(parts["confidence"], scored),
    }


def sets_table(reports: dict[str, dict[str, dict]]) -> str:
    """Every variant on every set, side by side (`tellerloop eval`, bench/eval_sets.py, the docs)."""
    def cell(value: float | None) -> str:
        return "–" if value is None else f"{value:.3f}"

    lines = ["| set | variant | n | similarity | good | hit@1 | hit@k | fallback | cap hit | AUROC |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name in next(iter(reports.values())):
        for variant, by_set in reports.items():
            s, n = by_set[name]["summary"], by_set[name]["config"]["n"]
            lines.append(f"| {name} | {variant} | {n} | {cell(s['similarity_mean'])} | {cell(s['good_rate'])} | "
                         f"{cell(s['retrieval_hit_at_1'])} | {cell(s['retrieval_hit_rate'])} | "
                         f"{cell(s['fallback_rate'])} | {cell(s['cap_hit_rate'])} | {cell(s['auroc']['confidence'])} |")
    return "\n".join(lines)
