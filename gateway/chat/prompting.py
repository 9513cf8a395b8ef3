"""How the model is asked: retrieval, the prompt (system prompt and retrieved entries) and the
sampling defaults.

Shared by serving, `tellerloop eval` and the retraining gate, so what is evaluated is exactly what
is served. Layouts (chosen by measurement, docs/benchmarks.md):
  * "system": entries appended to the system prompt;
  * "user":   entries placed in the last user turn, before the question.
Entries are numbered, Q&A entries shown as question/answer, each cut to `max_entry_chars`.
"""

from __future__ import annotations

import asyncio
import time

from gateway.core.settings import Settings
from gateway.engine.base import SamplingParams
from gateway.knowledge.store import Hit, KnowledgeBase

NO_CONTEXT = "No information in the bank's records matches this question."


def format_entries(hits: list[Hit], max_chars: int, entry_format: str = "qa") -> str:
    if not hits:
        return NO_CONTEXT
    parts = []
    for n, hit in enumerate(hits, start=1):
        meta = hit.metadata
        if meta.get("kind") == "qa" and meta.get("question"):
            body = (f"Question: {meta['question']}\nAnswer: {meta['answer']}" if entry_format == "qa"
                    else meta["answer"])
        else:
            title = meta.get("title") or ""
            body = f"{title}\n{hit.text}" if title else hit.text
        if len(body) > max_chars:
            body = body[:max_chars].rsplit(" ", 1)[0] + " ..."
        parts.append(f"[{n}]\n{body}")
    return "\n\n".join(parts)


def build_messages(settings: Settings, messages: list[dict[str, str]], hits: list[Hit] | None) -> list[dict[str, str]]:
    """`messages` are the client's (roles already normalised); `hits` is None when retrieval is off."""
    messages = [dict(m) for m in messages]
    system = settings.model.system_prompt
    if messages and messages[0]["role"] == "system":
        system = messages.pop(0)["content"]
    if hits is not None:
        context = f"{settings.rag.instruction}\n\n{format_entries(hits, settings.rag.max_entry_chars, settings.rag.entry_format)}"
        if settings.rag.layout == "system":
            system = f"{system}\n\n{context}" if system else context
        else:
            last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
            question = messages[last_user]["content"]
            messages[last_user]["content"] = f"{context}\n\nCustomer question: {question}"
    return ([{"role": "system", "content": system}] if system else []) + messages


def last_user_message(messages: list[dict[str, str]]) -> str:
    return next(m["content"] for m in reversed(messages) if m["role"] == "user")


def sampling_params(settings: Settings, max_tokens: int, **request: object) -> SamplingParams:
    """Serving defaults from settings, overridden by what a request (or `tellerloop eval`) sets."""
    cfg = settings.model
    given = {k: v for k, v in request.items() if v is not None}
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=given.get("temperature", cfg.default_temperature),
        top_p=given.get("top_p", 1.0),
        stop=given.get("stop", ()),
        seed=given.get("seed"),
        top_logprobs=given.get("top_logprobs", 0),
        repetition_penalty=cfg.repetition_penalty,
        no_repeat_ngram_size=cfg.no_repeat_ngram_size,
    )


async def retrieve(settings: Settings, kb: KnowledgeBase, question: str, k: int) -> tuple[list[Hit], float, float]:
    """Top-k hits above `rag.min_score`, the best similarity seen (even if under the floor), and ms taken."""
    started = time.perf_counter()
    hits = await asyncio.to_thread(kb.search, question, k, -1.0)
    top = hits[0].score if hits else 0.0
    kept = [h for h in hits if h.score >= settings.rag.min_score]
    return kept, top, (time.perf_counter() - started) * 1000
