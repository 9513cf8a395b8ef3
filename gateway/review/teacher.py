"""Teachers: who drafts an answer for a review item, shown to reviewers beside the model's answer.

A teacher gets the item's stored conversation (PII-scrubbed, system prompt included) and its last
customer question, and returns one of:

* a `Draft` with `text` — the proposed answer (the service scrubs it again and stores it on the item);
* a `Draft` with `text=None` — the teacher ran and has nothing good enough (stored too, so the item
  is not asked again; `score` says how close it came);
* `None` — the teacher is unavailable right now (no knowledge base yet, the endpoint is down): nothing
  is stored, and a later view asks again.

A teacher never raises: failures are logged as warnings (without the conversation or any secret)
and mean "no draft"; a reviewer never sees an error because of a teacher.

* `RetrievalTeacher`: the knowledge base's top hit for the question, if its similarity is at least
  `review.teacher.min_similarity`; the draft is the entry's *answer* (a Q&A entry's answer, without the
  question). A plain text passage is no answer, so it gives no draft.
* `OpenAITeacher`: any OpenAI-compatible chat endpoint (`POST {url}/chat/completions`, temperature 0),
  e.g. a bigger model, or a second tellerloop gateway. After a failure it is not called again for
  `retry_after_s`, so a dead endpoint costs one timeout, not one per page view.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Callable, Protocol

import httpx
import structlog

from gateway.core.security import safe_url
from gateway.core.settings import TeacherSettings
from gateway.knowledge.store import Hit, KnowledgeBase

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class Draft:
    text: str | None  # None: the teacher ran and had nothing good enough
    source: str  # "retrieval", "openai:<model>"
    score: float | None = None  # retrieval: the entry's similarity to the question


class Teacher(Protocol):
    source: str

    async def draft(self, messages: list[dict], question: str) -> Draft | None: ...


def answer_of(hit: Hit) -> str | None:
    """The answer part of a knowledge-base hit: a Q&A entry's answer (metadata, else the text after
    'A: '); None for a plain text passage."""
    answer = (hit.metadata.get("answer") or "").strip()
    if answer:
        return answer
    if hit.metadata.get("kind") == "qa" and "\nA: " in hit.text:
        return hit.text.split("\nA: ", 1)[1].strip() or None
    return None


class RetrievalTeacher:
    source = "retrieval"

    def __init__(self, kb: Callable[[], KnowledgeBase | None], min_similarity: float) -> None:
        self._kb = kb
        self.min_similarity = min_similarity

    async def draft(self, messages: list[dict], question: str) -> Draft | None:
        if not question.strip():
            return Draft(None, self.source)
        kb = self._kb()
        if kb is None:
            return None  # still loading (or failed to start): ask again later
        try:
            hits = await asyncio.to_thread(kb.search, question, 1, -1.0)
        except Exception as exc:  # noqa: BLE001 - any knowledge-base failure is "no draft now"
            log.warning("review.teacher_failed", teacher=self.source, error=type(exc).__name__)
            return None
        if not hits:
            return Draft(None, self.source)
        top = hits[0]
        score = round(float(top.score), 4)
        answer = answer_of(top)
        if answer is None or top.score < self.min_similarity:
            return Draft(None, self.source, score)
        return Draft(answer, self.source, score)


class OpenAITeacher:
    def __init__(self, cfg: TeacherSettings) -> None:
        self.cfg = cfg
        self.source = f"openai:{cfg.model}"
        self.endpoint = cfg.url.rstrip("/") + "/chat/completions"
        self._down_until = 0.0

    async def draft(self, messages: list[dict], question: str) -> Draft | None:
        if time.monotonic() < self._down_until:
            return None
        body = {"model": self.cfg.model, "temperature": 0, "max_tokens": self.cfg.max_tokens, "stream": False,
                "messages": [{"role": m["role"], "content": m["content"]} for m in messages]}
        headers = {"Authorization": f"Bearer {self.cfg.api_key.get_secret_value()}"} if self.cfg.api_key else {}
        try:
            async with httpx.AsyncClient(timeout=self.cfg.timeout_s) as client:
                r = await client.post(self.endpoint, json=body, headers=headers)
            if r.status_code != 200:
                raise TeacherError(f"HTTP {r.status_code}")
            text = r.json()["choices"][0]["message"]["content"]
            if not isinstance(text, str):
                raise TeacherError("no text content in the answer")
        except Exception as exc:  # noqa: BLE001 - down, slow, refused, malformed: no draft, never an error
            self._down_until = time.monotonic() + self.cfg.retry_after_s
            # the URL is logged without credentials or query; the key and the conversation never are
            log.warning("review.teacher_failed", teacher=self.source, endpoint=safe_url(self.endpoint),
                        error=str(exc) if isinstance(exc, TeacherError) else type(exc).__name__)
            return None
        return Draft(text.strip() or None, self.source)


class TeacherError(Exception):
    pass


def make_teacher(cfg: TeacherSettings, kb: Callable[[], KnowledgeBase | None]) -> Teacher | None:
    if cfg.kind == "retrieval":
        return RetrievalTeacher(kb, cfg.min_similarity)
    if cfg.kind == "openai":
        return OpenAITeacher(cfg)
    return None
