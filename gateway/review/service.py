"""Review service: feedback and flags in, a prioritised queue out, labels → consensus → export.

Rules (README "Review loop" has the long version):
* A label's *outcome* is the answer its verdict stands for: approve → the answer the reviewer was
  shown as current proposal (the model's, or the latest correction), correct → the corrected
  answer, reject → no answer. Two labels agree when both reject, or both outcomes are answers whose
  embeddings' cosine is at least `review.correction_similarity` (identical text needs no model).
* `review.required_reviews` mutually agreeing labels resolve an item. When the required number of
  labels is reached without that, the item is escalated: it needs one more reviewer, or an admin,
  whose label on an escalated item decides it.
* Decisions are made on a snapshot of the item and committed only if the item did not change
  meanwhile (version check); otherwise the snapshot is re-read and the decision made again.
* Teacher drafts (`review.teacher`, gateway/review/teacher.py, docs/review.md): the first time an
  open item is shown (or claimed, or listed near the top of the queue) the teacher drafts an answer,
  which is PII-scrubbed and stored on the item (the first stored draft wins: every reviewer sees the
  same one). Each label records how it treated the draft (`draft_outcome`), judged by the answer it
  stands for (its outcome): accepted (the draft, whitespace aside), edited (a changed answer — not
  the model's — whose MiniLM cosine to the draft reaches `review.correction_similarity`, the rule
  that makes two corrections agree; difflib's ratio ≥ `review.teacher.edit_ratio` while the embedder
  is not loaded), else rejected (a reject, the model's answer kept, or an answer far from the
  draft); null when the item had no draft.
"""

from __future__ import annotations

import asyncio
import difflib
import json
import re
import time
from datetime import datetime, timezone
from typing import AsyncIterator, Callable

import structlog

from gateway.core import metrics
from gateway.core.errors import Conflict, InvalidRequest, NotFound, Unavailable
from gateway.core.security import ROLE_RANK, CustomerIds, Principal
from gateway.core.settings import Settings
from gateway.exchanges.models import Exchange
from gateway.exchanges.repository import exchange_record
from gateway.knowledge.embeddings import Embedder
from gateway.knowledge.store import KnowledgeBase
from gateway.review.agreement import cohen_kappa, consensus_group, percent_agreement
from gateway.review.audit import estimates as audit_estimates
from gateway.review.models import (
    Feedback,
    Flag,
    ReviewEvent,
    ReviewItem,
    ReviewLabel,
    ReviewPair,
)
from gateway.review.repository import (
    OPEN_STATUSES,
    LabelCommit,
    QueueEntry,
    ReviewConflict,
    ReviewRepository,
    StaleItem,
    event,
    priority_parts,
)
from gateway.review.teacher import Teacher, make_teacher
from gateway.store.base import iso_utc

log = structlog.get_logger(__name__)
NEW = -1  # placeholder id of the label being decided
VERDICTS = ("approve", "correct", "reject")
DRAFT_OUTCOMES = ("accepted", "edited", "rejected")
_DEFAULT = object()


def _norm(text: str | None) -> str:
    return re.sub(r"\s+", " ", text or "").strip().lower()


def same_text(a: str | None, b: str | None) -> bool:
    """Equal after whitespace normalisation (case counts: a draft with its case changed was edited)."""
    return a is not None and b is not None and " ".join(a.split()) == " ".join(b.split())


def _trim(text: str, limit: int = 280) -> str:
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def question_of(exchange: Exchange) -> str:
    return next((m["content"] for m in reversed(exchange.messages) if m["role"] == "user"), "")


def current_proposal(exchange: Exchange, labels: list[ReviewLabel]) -> tuple[int, str, str | None]:
    """(id, text, by): the latest correction, else the model's answer (id 0)."""
    for label in reversed(labels):
        if label.verdict == "correct":
            return label.id, label.corrected_answer or "", label.reviewer
    return 0, exchange.answer, None


class ReviewService:
    def __init__(self, settings: Settings, repo: ReviewRepository, embedder: Callable[[], Embedder | None],
                 customers: CustomerIds | None = None, kb: Callable[[], KnowledgeBase | None] | None = None,
                 teacher: Teacher | None = _DEFAULT) -> None:  # type: ignore[assignment]
        self.settings = settings
        self.cfg = settings.review
        self.repo = repo
        self._embedder = embedder
        self.customers = customers or CustomerIds.from_settings(settings)  # feedback ownership by keyed id
        self.scrubber = settings.pii.scrubber()
        # the teacher drafting answers (review.teacher); `kb` reads the knowledge base as it is now
        # (None while it loads), so the retrieval teacher starts drafting once it is there
        self.teacher: Teacher | None = (make_teacher(self.cfg.teacher, kb or (lambda: None))
                                        if teacher is _DEFAULT else teacher)
        self._drafting: dict[int, asyncio.Task] = {}  # item id → the draft being made (shared by callers)
        self._filler: asyncio.Task | None = None  # the queue's background fill (one at a time)

    # ---- signals ------------------------------------------------------------------------------
    async def owned_exchange(self, exchange_id: str, principal: Principal, user: str | None) -> Exchange:
        """Clients may rate only their own exchanges: same API key and same `user` as the request.
        Anything else is a 404, so ids of other customers' exchanges are not confirmed."""
        row = await self.repo.exchange(exchange_id) if len(exchange_id) <= 64 else None
        expected_user = self.customers.key(user)
        if row is None or row.api_key_name != principal.name or row.user != expected_user:
            hint = " (send the same 'user' as in the chat request)" if row is not None and not user else ""
            raise NotFound(f"No exchange '{exchange_id[:64]}' made with this API key and user{hint}.",
                           param="exchange_id", code="not_found")
        return row

    async def feedback(self, exchange_id: str, principal: Principal, rating: str, comment: str | None,
                       user: str | None) -> dict:
        exchange = await self.owned_exchange(exchange_id, principal, user)
        comment = self.scrubber.scrub(comment) if comment else None
        fb, item = await self.repo.set_feedback(exchange, principal.name, rating, comment)
        metrics.FEEDBACK.labels(rating).inc()
        await self.refresh_queue_gauge()
        return {"exchange_id": exchange.id, **self._feedback_dict(fb),
                "review_item_id": item.id if item is not None and item.status != "withdrawn" else None}

    async def flag(self, exchange_id: str, principal: Principal, reason: str) -> dict:
        exchange = await self.repo.exchange(exchange_id) if len(exchange_id) <= 64 else None
        if exchange is None:
            raise NotFound(f"No exchange with id '{exchange_id[:64]}'", param="exchange_id", code="not_found")
        try:
            flag, item = await self.repo.add_flag(exchange, principal.name, self.scrubber.scrub(reason))
        except ReviewConflict as exc:
            raise Conflict(str(exc), code=exc.code) from None
        metrics.FLAGS.inc()
        await self.refresh_queue_gauge()
        return {"exchange_id": exchange.id, "flag": self._flag_dict(flag), "review_item_id": item.id}

    async def refresh_queue_gauge(self) -> None:
        counts = await self.repo.status_counts()
        for status in ("open", "escalated", "resolved", "withdrawn"):
            metrics.REVIEW_ITEMS.labels(status).set(counts.get(status, 0))

    # ---- queue and claims ---------------------------------------------------------------------
    def reasons(self, item: ReviewItem) -> list[dict]:
        out = []
        if item.status == "escalated":
            out.append({"code": "escalated", "text": "Reviewers disagreed: needs another reviewer or an admin decision"})
        if item.flag_count:
            out.append({"code": "staff_flag", "text": f"Flagged by {item.flag_count} staff member(s)"})
        if item.thumbs_down:
            out.append({"code": "thumbs_down", "text": "The customer gave a thumbs-down"})
        if item.low_confidence:
            out.append({"code": "low_confidence",
                        "text": f"Confidence {item.confidence or 0.0:.2f} is below the flag threshold"})
        if item.audit:
            out.append({"code": "audit", "text": f"Random audit sample (drawn with probability {item.audit_rate:.3g}): "
                                                 "judge it like any other answer"})
        return out

    def _claim_info(self, item: ReviewItem, now: float) -> tuple[str | None, str | None]:
        live = item.claimed_by is not None and (item.claim_expires_epoch or 0) >= now
        return (item.claimed_by, iso_utc(item.claim_expires_epoch)) if live else (None, None)

    def _summary(self, item: ReviewItem, exchange: Exchange, priority: float, n_labels: int, now: float) -> dict:
        claimed_by, until = self._claim_info(item, now)
        return {
            "id": item.id, "exchange_id": item.exchange_id, "status": item.status,
            "priority": round(priority, 4), "reasons": self.reasons(item),
            "confidence": item.confidence, "question": _trim(question_of(exchange)),
            "answer": _trim(exchange.answer), "created_at": iso_utc(item.created_at),
            "waiting_s": round(max(0.0, now - item.created_epoch)), "labels": n_labels,
            "required_labels": item.required_labels, "claimed_by": claimed_by, "claimed_until": until,
            "draft": _trim(item.draft) if item.draft else None, "draft_source": item.draft_source,
            "draft_score": item.draft_score, "audit": bool(item.audit), "audit_rate": item.audit_rate,
        }

    async def queue(self, principal: Principal, limit: int, offset: int = 0) -> list[dict]:
        now = time.time()
        entries = await self.repo.queue(principal.name, limit, now, offset=offset)
        self._fill(entries)
        return [self._summary(e.item, e.exchange, e.priority, e.labels, now) for e in entries]

    async def claim(self, item_id: int, principal: Principal) -> dict:
        try:
            item = await self.repo.claim(item_id, principal.name, self.cfg.claim_ttl_s)
        except LookupError:
            raise NotFound(f"No review item {item_id}", param="item_id", code="not_found") from None
        except ReviewConflict as exc:
            raise Conflict(str(exc), code=exc.code) from None
        if self.teacher is not None and item.draft_source is None:  # drafted while the reviewer opens it
            exchange = await self.repo.exchange(item.exchange_id)
            if exchange is not None:
                self._draft_task(item.id, exchange)
        return {"item_id": item.id, "claimed_by": item.claimed_by, "claimed_until": iso_utc(item.claim_expires_epoch)}

    async def release(self, item_id: int, principal: Principal) -> dict:
        if not await self.repo.release(item_id, principal.name):
            raise Conflict(f"You hold no claim on item {item_id}.", code="not_claimed")
        return {"item_id": item_id, "released": True}

    async def next_item(self, principal: Principal) -> dict | None:
        """Claim and return the highest-priority item nobody else holds (or the one already held)."""
        now = time.time()
        held = await self.repo.claimed_by(principal.name, now)
        if held is not None:
            return await self.item_detail(held.id)
        for entry in await self.repo.queue(principal.name, 20, now, exclude_claimed=True):
            try:
                await self.repo.claim(entry.item.id, principal.name, self.cfg.claim_ttl_s)
            except (ReviewConflict, StaleItem, LookupError):
                continue  # someone else got it first
            return await self.item_detail(entry.item.id)
        return None

    # ---- item detail --------------------------------------------------------------------------
    async def item_detail(self, item_id: int, with_draft: bool = True) -> dict:
        """The item as a reviewer sees it; `with_draft`: ask the teacher first if it has not been asked."""
        item = await self.repo.item(item_id)
        if item is None:
            raise NotFound(f"No review item {item_id}", param="item_id", code="not_found")
        exchange = await self.repo.exchange(item.exchange_id)
        if with_draft:
            item = await self.ensure_draft(item, exchange)
        labels = await self.repo.labels(item_id)
        feedback, flags, events = await self.repo.signals(item.exchange_id)
        now = time.time()
        parts = priority_parts(item, self.cfg, now)
        pid, ptext, pby = current_proposal(exchange, labels)
        return {
            **self._summary(item, exchange, sum(parts.values()), len(labels), now),
            "question": question_of(exchange), "answer": exchange.answer,
            "priority_parts": {k: round(v, 4) for k, v in parts.items()},
            "proposed_answer": {"id": pid, "text": ptext, "by": pby}, "draft": item.draft,
            "resolution": item.resolution, "resolved_answer": item.resolved_answer,
            "resolved_at": iso_utc(item.resolved_at), "decided_by": item.decided_by,
            "exchange": exchange_record(exchange),
            "feedback": self._feedback_dict(feedback) if feedback else None,
            "flags": [self._flag_dict(f) for f in flags],
            "labels": [self._label_dict(label) for label in labels],
            "events": [self._event_dict(e) for e in events],
        }

    # ---- teacher drafts -----------------------------------------------------------------------
    async def ensure_draft(self, item: ReviewItem, exchange: Exchange) -> ReviewItem:
        """The item with its draft: asks the teacher if nobody has yet (open items only) and waits for
        it; a draft being made for another caller is shared, not made twice."""
        if self.teacher is None or item.draft_source is not None or item.status not in OPEN_STATUSES:
            return item
        await asyncio.shield(self._draft_task(item.id, exchange))
        return await self.repo.item(item.id) or item

    def _draft_task(self, item_id: int, exchange: Exchange) -> asyncio.Task:
        task = self._drafting.get(item_id)
        if task is None:
            task = self._drafting[item_id] = asyncio.get_running_loop().create_task(
                self._draft_and_store(item_id, exchange))
            task.add_done_callback(lambda _t: self._drafting.pop(item_id, None))
        return task

    async def _draft_and_store(self, item_id: int, exchange: Exchange) -> bool:
        """Ask the teacher and store its answer, scrubbed. Never raises: no draft is no error."""
        try:
            draft = await self.teacher.draft(exchange.messages, question_of(exchange))
            if draft is None:  # the teacher is unavailable now: store nothing, ask again later
                return False
            text = self.scrubber.scrub(draft.text.strip()) if draft.text else None
            if text is not None and (not text.strip() or len(text) > self.cfg.max_answer_chars):
                text = None  # no draft a label could not carry
            return await self.repo.set_draft(item_id, text, draft.source[:100], draft.score)
        except Exception as exc:  # noqa: BLE001
            log.warning("review.draft_failed", item_id=item_id, error=type(exc).__name__)
            return False

    def _fill(self, entries: list[QueueEntry]) -> None:
        """Draft the top undrafted items of a listed queue in the background (one fill at a time),
        so a slow teacher has answered before the reviewer opens them."""
        if self.teacher is None or (self._filler is not None and not self._filler.done()):
            return
        todo = [(e.item.id, e.exchange) for e in entries if e.item.draft_source is None][: self.cfg.teacher.fill_items]
        if todo:
            self._filler = asyncio.get_running_loop().create_task(self._fill_run(todo))

    async def _fill_run(self, todo: list[tuple[int, Exchange]]) -> None:
        for item_id, exchange in todo:
            await asyncio.shield(self._draft_task(item_id, exchange))

    async def _draft_outcome(self, draft: str | None, outcome: str | None, model_answer: str) -> str | None:
        """How a label treated the item's draft (see the module docstring): by the answer it stands for."""
        if draft is None:
            return None
        if outcome is None:
            return "rejected"
        if same_text(outcome, draft):
            return "accepted"
        if _norm(outcome) == _norm(model_answer):
            return "rejected"  # kept the model's answer rather than the draft
        embedder = self._embedder()
        if embedder is not None:
            close = float((await asyncio.to_thread(embedder.similarity, [outcome], [draft]))[0]) \
                >= self.cfg.correction_similarity
        else:
            close = difflib.SequenceMatcher(None, " ".join(outcome.split()), " ".join(draft.split()),
                                            autojunk=False).ratio() >= self.cfg.teacher.edit_ratio
        return "edited" if close else "rejected"

    async def exchange_signals(self, exchange_id: str) -> dict:
        """What GET /v1/exchanges/{id} adds: feedback, staff flags, the review item and its labels."""
        feedback, flags, _ = await self.repo.signals(exchange_id)
        item = await self.repo.item_for_exchange(exchange_id)
        labels = await self.repo.labels(item.id) if item else []
        return {
            "feedback": [self._feedback_dict(feedback)] if feedback else [],
            "flags": [self._flag_dict(f) for f in flags],
            "review_item": None if item is None else {
                "id": item.id, "status": item.status, "resolution": item.resolution,
                "resolved_answer": item.resolved_answer, "reasons": self.reasons(item)},
            "reviews": [self._label_dict(label) for label in labels],
        }

    @staticmethod
    def _feedback_dict(fb: Feedback) -> dict:
        return {"rating": fb.rating, "comment": fb.comment, "created_at": iso_utc(fb.created_at),
                "updated_at": iso_utc(fb.updated_at)}

    @staticmethod
    def _flag_dict(flag: Flag) -> dict:
        return {"flagged_by": flag.flagged_by, "reason": flag.reason, "created_at": iso_utc(flag.created_at)}

    @staticmethod
    def _label_dict(label: ReviewLabel) -> dict:
        return {"id": label.id, "reviewer": label.reviewer, "role": label.role, "verdict": label.verdict,
                "category": label.category, "corrected_answer": label.corrected_answer,
                "approved_proposal": label.shown_label_id, "note": label.note, "draft_outcome": label.draft_outcome,
                "created_at": iso_utc(label.created_at)}

    @staticmethod
    def _event_dict(ev: ReviewEvent) -> dict:
        return {"at": iso_utc(ev.created_at), "actor": ev.actor, "action": ev.action, "detail": ev.detail}

    # ---- labels and consensus -----------------------------------------------------------------
    async def _similarity(self, a: str, b: str) -> float:
        if _norm(a) == _norm(b):
            return 1.0
        embedder = self._embedder()
        if embedder is None:
            raise Unavailable("The embedding model is still loading; retry shortly.", code="embedder_unavailable",
                           retry_after=5)
        return float((await asyncio.to_thread(embedder.similarity, [a], [b]))[0])

    async def _compare(self, a: str | None, b: str | None) -> tuple[bool, float | None]:
        if a is None or b is None:
            return a is None and b is None, None
        sim = await self._similarity(a, b)
        return sim >= self.cfg.correction_similarity, sim

    async def label(self, item_id: int, principal: Principal, verdict: str, corrected_answer: str | None,
                    note: str | None, proposed_answer_id: int | None = None) -> dict:
        if verdict == "correct" and not (corrected_answer or "").strip():
            raise InvalidRequest("A 'correct' verdict needs a non-empty 'corrected_answer'.", param="corrected_answer")
        if verdict != "correct" and corrected_answer:
            raise InvalidRequest(f"'corrected_answer' goes only with the verdict 'correct' (got '{verdict}').",
                           param="corrected_answer")
        corrected = self.scrubber.scrub(corrected_answer.strip()) if verdict == "correct" else None
        note = self.scrubber.scrub(note) if note else None
        for _ in range(8):
            try:
                label, item = await self._label_once(item_id, principal, verdict, corrected, note, proposed_answer_id)
            except StaleItem:
                continue
            except ReviewConflict as exc:
                raise Conflict(str(exc), code=exc.code) from None
            metrics.LABELS.labels(verdict).inc()
            if item["status"] == "resolved":
                metrics.RESOLVED.labels(item["resolution"]).inc()
            await self.refresh_queue_gauge()
            return {"label": self._label_dict(label), "item": item}
        raise Conflict(f"Item {item_id} is changing too quickly; retry.", code="busy")

    async def _label_once(self, item_id: int, principal: Principal, verdict: str, corrected: str | None,
                          note: str | None, proposed_answer_id: int | None) -> tuple[ReviewLabel, dict]:
        me = principal.name
        item = await self.repo.item(item_id)
        if item is None:
            raise NotFound(f"No review item {item_id}", param="item_id", code="not_found")
        self.repo.check_reviewable(item, me, time.time())
        exchange = await self.repo.exchange(item.exchange_id)
        labels = await self.repo.labels(item_id)
        if any(label.reviewer == me for label in labels):
            raise ReviewConflict(f"You have already labelled item {item_id}; each reviewer labels an item once.",
                                 "already_labelled")
        pid, ptext, _ = current_proposal(exchange, labels)
        if proposed_answer_id is not None and proposed_answer_id != pid:
            raise ReviewConflict("The proposed answer changed since you opened the item (another reviewer "
                                 "corrected it); reload and review the new proposal.", "proposal_changed")
        outcome = None if verdict == "reject" else (corrected if verdict == "correct" else ptext)
        category = "reject" if outcome is None else ("keep" if _norm(outcome) == _norm(exchange.answer) else "change")
        now = datetime.now(timezone.utc)
        draft_outcome = await self._draft_outcome(item.draft, outcome, exchange.answer)
        label = ReviewLabel(item_id=item_id, reviewer=me, role=principal.role, verdict=verdict, category=category,
                            shown_answer=ptext, shown_label_id=pid or None, corrected_answer=corrected,
                            outcome=outcome, note=note, draft_outcome=draft_outcome, created_at=now)
        agrees = {frozenset((p.label_a, p.label_b)): p.agree for p in await self.repo.pairs(item_id)}
        pairs = []
        for other in labels:
            agree, sim = await self._compare(other.outcome, outcome)
            agrees[frozenset((other.id, NEW))] = agree
            (ra, ca), (rb, cb) = sorted([(other.reviewer, other.category), (me, category)])
            pairs.append(ReviewPair(item_id=item_id, label_a=other.id, reviewer_a=ra, reviewer_b=rb,
                                    category_a=ca, category_b=cb, similarity=sim, agree=agree))
        by_id = {label_.id: label_ for label_ in labels} | {NEW: label}
        values: dict = {}
        events = [event(exchange.id, item_id, me, "label", verdict=verdict, category=category,
                        **({"draft_outcome": draft_outcome} if draft_outcome else {}))]
        if ROLE_RANK[principal.role] >= ROLE_RANK["admin"] and item.status == "escalated":
            values = self._resolution(exchange, [label], now, decided_by=f"admin:{me}")
        elif (group := consensus_group([*by_id], agrees, self.cfg.required_reviews)) is not None:
            chosen = [by_id[i] for i in sorted(group, key=lambda i: (i == NEW, i))]  # oldest → newest
            values = self._resolution(exchange, chosen, now,
                                      decided_by="consensus:" + ",".join(sorted(x.reviewer for x in chosen)))
        elif len(by_id) >= item.required_labels:
            values = {"status": "escalated", "required_labels": len(by_id) + 1}
            events.append(event(exchange.id, item_id, "system", "escalated", labels=len(by_id)))
        if values.get("status") == "resolved":
            events.append(event(exchange.id, item_id, "system", "resolved", resolution=values["resolution"],
                                decided_by=values["decided_by"]))
        await self.repo.commit_label(item, LabelCommit(label, pairs, values, events))
        return label, await self.item_detail(item_id, with_draft=False)

    @staticmethod
    def _resolution(exchange: Exchange, chosen: list[ReviewLabel], now: datetime, decided_by: str) -> dict:
        if chosen[0].outcome is None:
            answer, resolution = None, "reject"
        else:
            corrections = [x for x in chosen if x.verdict == "correct"]
            answer = (corrections[-1] if corrections else chosen[0]).outcome
            resolution = "approve" if _norm(answer) == _norm(exchange.answer) else "correct"
        return {"status": "resolved", "resolution": resolution, "resolved_answer": answer, "resolved_at": now,
                "decided_by": decided_by}

    # ---- statistics and export ----------------------------------------------------------------
    async def stats(self) -> dict:
        pairs = await self.repo.all_pairs()
        by_pair: dict[tuple[str, str], list[ReviewPair]] = {}
        for p in pairs:
            by_pair.setdefault((p.reviewer_a, p.reviewer_b), []).append(p)

        def summary(rows: list[ReviewPair]) -> dict:
            kappa = cohen_kappa([(p.category_a, p.category_b) for p in rows])
            return {"items": len(rows), "percent_agreement": percent_agreement(p.agree for p in rows),
                    "category_agreement": percent_agreement(p.category_a == p.category_b for p in rows),
                    "cohen_kappa": None if kappa is None else round(kappa, 4)}

        confidences = await self.repo.recent_confidences(self.cfg.stats_recent_exchanges)
        bins = [{"from": i / 10, "to": (i + 1) / 10, "count": 0, "flagged": 0} for i in range(10)]
        for conf, flagged in confidences:
            b = bins[min(9, max(0, int(conf * 10)))]
            b["count"] += 1
            b["flagged"] += int(bool(flagged))
        return {
            "items": await self.repo.status_counts(),
            "labels_by_reviewer": await self.repo.label_counts(),
            "overall": summary(pairs),
            "pairs": [{"reviewers": list(k), **summary(v)} for k, v in sorted(by_pair.items())],
            "confidence_histogram": {"exchanges": len(confidences), "threshold": self.cfg.confidence_threshold,
                                     "bins": bins},
            "teacher": await self.teacher_stats(),
            "audit": audit_estimates(await self.repo.audit_items(), self.cfg.audit_confidence),
        }

    async def teacher_stats(self) -> dict:
        """Per draft source: how often the teacher drafted, and how reviewers treated its drafts."""
        sources = []
        for source, c in sorted((await self.repo.draft_outcomes()).items()):
            labels = sum(c.get(k, 0) for k in DRAFT_OUTCOMES)
            sources.append({
                "source": source, "asked": c.get("asked", 0), "drafted": c.get("drafted", 0),
                "shown": c.get("shown", 0), "labels": labels,
                **{k: c.get(k, 0) for k in DRAFT_OUTCOMES},
                **{f"{k}_rate": round(c.get(k, 0) / labels, 4) if labels else None for k in DRAFT_OUTCOMES}})
        return {"kind": self.cfg.teacher.kind,
                "source": self.teacher.source if self.teacher is not None else None, "sources": sources}

    async def export_lines(self) -> AsyncIterator[str]:
        """Resolved items with an answer as chat-format JSONL (PII scrubbed again on the way out)."""
        async for item, exchange in self.repo.resolved():
            messages = self.scrubber.scrub_messages(exchange.messages) + [
                {"role": "assistant", "content": self.scrubber.scrub(item.resolved_answer)}]
            yield json.dumps({
                "messages": messages, "item_id": item.id, "exchange_id": exchange.id,
                "resolution": item.resolution, "decided_by": item.decided_by, "resolved_at": iso_utc(item.resolved_at),
                "variant": exchange.variant,
            }, ensure_ascii=False) + "\n"
