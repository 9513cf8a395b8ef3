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
from typing import TYPE_CHECKING, NamedTuple

from gateway.core.settings import Settings
from gateway.engine.base import Finished, SamplingParams

if TYPE_CHECKING:
    from gateway.knowledge.store import Hit, KnowledgeBase

NO_CONTEXT = "No information in the bank's records matches this question."
CONVERSATION_HEADER = "The conversation so far:"  # rag.history = "system": earlier turns quoted under it


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
        history = settings.rag.history
        follow_up = len(messages) > 1 and messages[-1]["role"] == "user"
        if follow_up and history == "query":  # the retrieval query itself (the last user turns joined)
            messages = [{"role": "user", "content": retrieval_query(messages, settings.rag.query_turns)}]
        elif follow_up and history == "last":  # earlier turns steer retrieval only
            messages = messages[-1:]
        elif follow_up and history == "system":
            # earlier turns quoted above the entries: the model answers one customer turn, the shape
            # of every prompt it was fine-tuned on (as chat turns it echoes the last assistant turn)
            speaker = {"user": "Customer", "assistant": "Assistant"}
            quoted = "\n".join(f"{speaker.get(m['role'], 'Note')}: {m['content']}" for m in messages[:-1])
            context = f"{CONVERSATION_HEADER}\n{quoted}\n\n{context}"
            messages = messages[-1:]
        if settings.rag.layout == "system":
            system = f"{system}\n\n{context}" if system else context
        else:
            last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
            question = messages[last_user]["content"]
            messages[last_user]["content"] = f"{context}\n\nCustomer question: {question}"
    return ([{"role": "system", "content": system}] if system else []) + messages


def retrieval_query(messages: list[dict[str, str]], turns: int) -> str:
    """What the knowledge base is searched with: the last `turns` user messages, oldest first, so a
    follow-up ("and how long does that take?") carries the question it follows."""
    users = [m["content"] for m in messages if m["role"] == "user"]
    return "\n".join(users[-turns:])


class CannedAnswer:
    """A token stream that answers a fixed text without the model (the fallback when nothing
    relevant was retrieved): one `Finished` event carrying the text, no tokens generated."""

    def __init__(self, text: str) -> None:
        self._events = [Finished("stop", 0, 0, text=text)]

    def __aiter__(self) -> "CannedAnswer":
        return self

    async def __anext__(self) -> Finished:
        if not self._events:
            raise StopAsyncIteration
        return self._events.pop()

    async def aclose(self) -> None:
        self._events.clear()


def is_no_match(settings: Settings, first_similarity: float | None) -> bool:
    """Nothing retrieved is relevant enough to answer from: the first-ranked entry's similarity is
    under `rag.fallback_min_similarity`. An empty knowledge base (None) is not a miss: nothing has
    been ingested yet, so the model answers, told that no record matches, as it always did."""
    return (settings.rag.fallback and first_similarity is not None
            and first_similarity < settings.rag.fallback_min_similarity)


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
        repetition_penalty=given.get("repetition_penalty", cfg.repetition_penalty),
        no_repeat_ngram_size=cfg.no_repeat_ngram_size,
    )


class Retrieved(NamedTuple):
    hits: list[Hit]  # top-k above rag.min_score, in retrieval order (fused rank in hybrid mode)
    top: float  # the best similarity among the k (even under the floor); 0.0 when nothing was found
    first: float | None  # the first-ranked entry's similarity (the fallback rule's); None: empty knowledge base
    ms: float
    rival: float | None = None  # the best similarity of any other candidate (confidence: how clear-cut the pick was)
    question_match: float | None = None  # the query vs the first-ranked entry's own question

    def signals(self) -> dict:
        """The retrieval's confidence signals, as `confidence.score` takes them."""
        return {"rival": self.rival, "question_match": self.question_match}


async def retrieve(settings: Settings, kb: KnowledgeBase, question: str, k: int) -> Retrieved:
    """Top-k hits for the question. The fallback looks at the first-ranked entry alone, so asking for
    more entries (`rag_top_k`) never turns a fallback into an answer."""
    started = time.perf_counter()
    hits, rival, question_match = await asyncio.to_thread(kb.search_detailed, question, k, -1.0)
    kept = [h for h in hits if h.score >= settings.rag.min_score]
    return Retrieved(kept, max((h.score for h in hits), default=0.0), hits[0].score if hits else None,
                     (time.perf_counter() - started) * 1000, rival, question_match)
