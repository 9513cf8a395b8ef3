"""Review repository: the only code that reads or writes feedback, flags, review items, labels,
label pairs and the audit trail.

Writes that read first (feedback, flags, claims, labels) run in `_transaction`, which retries on
the races a shared database produces: a unique-key collision (two first thumbs-downs creating the
same item), SQLite's "database is locked" on a read→write upgrade, or a stale `version` on a
review item (its UPDATE is conditional on the version read). So every rule below holds under
concurrency on SQLite and PostgreSQL alike, without database-specific locking.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Awaitable, Callable, TypeVar

from sqlalchemy import and_, case, exists, func, literal, or_, select, update
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from gateway.core.errors import Conflict
from gateway.core.settings import ReviewSettings
from gateway.exchanges.models import UNANSWERED, Exchange
from gateway.review.models import (
    Feedback,
    Flag,
    ReviewEvent,
    ReviewItem,
    ReviewLabel,
    ReviewPair,
)
from gateway.store.base import utcnow
from gateway.store.db import is_row_id

T = TypeVar("T")
OPEN_STATUSES = ("open", "escalated")


class StaleItem(Exception):
    """The review item changed between read and write; the transaction is retried."""


class ReviewConflict(Conflict):
    """A rule refuses the write (already labelled, claimed by someone else, resolved...)."""



def new_item(exchange: Exchange, cfg: ReviewSettings, *, low_confidence: bool = False, thumbs_down: bool = False,
             flag_count: int = 0, now: datetime | None = None, audit_rate: float | None = None) -> ReviewItem:
    now = now or utcnow()
    return ReviewItem(
        exchange_id=exchange.id, status="open", confidence=exchange.confidence, low_confidence=low_confidence,
        thumbs_down=thumbs_down, flag_count=flag_count, required_labels=cfg.required_reviews, created_at=now,
        created_epoch=now.timestamp(), updated_at=now, version=0, audit=audit_rate is not None, audit_rate=audit_rate,
    )


def event(exchange_id: str, item_id: int | None, actor: str, action: str, **detail: object) -> ReviewEvent:
    return ReviewEvent(exchange_id=exchange_id, item_id=item_id, actor=actor, action=action, detail=detail,
                       created_at=utcnow())


def priority_expression(cfg: ReviewSettings, now_epoch: float):
    """The documented priority formula as a SQL expression (same on SQLite and PostgreSQL)."""
    as_int = lambda cond: case((cond, 1.0), else_=0.0)  # noqa: E731
    return (
        cfg.weight_confidence * (1.0 - func.coalesce(ReviewItem.confidence, 1.0))  # unscored: no doubt term
        + cfg.weight_low_confidence * as_int(ReviewItem.low_confidence)
        + cfg.weight_thumbs_down * as_int(ReviewItem.thumbs_down)
        + cfg.weight_flag * ReviewItem.flag_count
        + cfg.weight_escalated * as_int(ReviewItem.status == "escalated")
        + cfg.weight_audit * as_int(ReviewItem.audit)
        + cfg.weight_age_per_hour * ((literal(now_epoch) - ReviewItem.created_epoch) / 3600.0)
    )


def priority_parts(item: ReviewItem, cfg: ReviewSettings, now_epoch: float) -> dict[str, float]:
    """The same formula term by term, to show reviewers why an item ranks where it does."""
    return {
        "confidence": cfg.weight_confidence * (1.0 - (1.0 if item.confidence is None else item.confidence)),
        "low_confidence": cfg.weight_low_confidence * item.low_confidence,
        "thumbs_down": cfg.weight_thumbs_down * item.thumbs_down,
        "flags": cfg.weight_flag * item.flag_count,
        "escalated": cfg.weight_escalated * (item.status == "escalated"),
        "audit": cfg.weight_audit * bool(item.audit),
        "age": cfg.weight_age_per_hour * max(0.0, now_epoch - item.created_epoch) / 3600.0,
    }


@dataclass
class QueueEntry:
    item: ReviewItem
    exchange: Exchange
    priority: float
    labels: int


@dataclass
class LabelCommit:
    """Everything one label changes, decided by the service from a snapshot at `expected_version`."""

    label: ReviewLabel
    pairs: list[ReviewPair]  # label_a/label_b hold the *other* label's id; the new one is filled in here
    item_values: dict
    events: list[ReviewEvent]


class ReviewRepository:
    def __init__(self, sessions: async_sessionmaker, cfg: ReviewSettings) -> None:
        self._sessions = sessions
        self.cfg = cfg

    async def enqueue_in(self, session: AsyncSession, exchange: Exchange, now: datetime | None = None, *,
                         low_confidence: bool = True, audit_rate: float | None = None) -> None:
        """Queue a just-logged exchange — its confidence is under the threshold, or the random audit
        sample drew it (with probability `audit_rate`), or both — inside the caller's transaction
        (`ExchangeRepository.add(..., also=...)`), with its audit-trail event."""
        item = new_item(exchange, self.cfg, low_confidence=low_confidence, now=now, audit_rate=audit_rate)
        session.add(item)
        await session.flush()
        reasons = [r for r, on in (("low_confidence", low_confidence), ("audit", audit_rate is not None)) if on]
        session.add(event(exchange.id, item.id, "system", "enqueued", reason="+".join(reasons),
                          **({"audit_rate": audit_rate} if audit_rate is not None else {})))

    async def _transaction(self, work: Callable[[AsyncSession], Awaitable[T]], attempts: int = 8) -> T:
        for attempt in range(attempts):
            try:
                async with self._sessions() as session, session.begin():
                    return await work(session)
            except (StaleItem, IntegrityError, OperationalError) as exc:
                if attempt == attempts - 1:
                    raise
                if isinstance(exc, OperationalError) and "locked" not in str(exc).lower():
                    raise
                await asyncio.sleep(0.01 * (attempt + 1))
        raise AssertionError("unreachable")

    @staticmethod
    async def _update_item(session: AsyncSession, item: ReviewItem, **values: object) -> None:
        values.setdefault("updated_at", utcnow())
        result = await session.execute(
            update(ReviewItem)
            .where(ReviewItem.id == item.id, ReviewItem.version == item.version)
            .values(version=item.version + 1, **values)
        )
        if result.rowcount != 1:
            raise StaleItem(item.id)

    # ---- reads ------------------------------------------------------------------------------
    async def exchange(self, exchange_id: str) -> Exchange | None:
        async with self._sessions() as session:
            return await session.get(Exchange, exchange_id)

    async def item(self, item_id: int) -> ReviewItem | None:
        if not is_row_id(item_id):
            return None
        async with self._sessions() as session:
            return await session.get(ReviewItem, item_id)

    async def item_for_exchange(self, exchange_id: str) -> ReviewItem | None:
        async with self._sessions() as session:
            return await session.scalar(select(ReviewItem).where(ReviewItem.exchange_id == exchange_id))

    async def labels(self, item_id: int) -> list[ReviewLabel]:
        async with self._sessions() as session:
            return list(await session.scalars(
                select(ReviewLabel).where(ReviewLabel.item_id == item_id).order_by(ReviewLabel.id)))

    async def pairs(self, item_id: int) -> list[ReviewPair]:
        async with self._sessions() as session:
            return list(await session.scalars(select(ReviewPair).where(ReviewPair.item_id == item_id)))

    async def signals(self, exchange_id: str) -> tuple[Feedback | None, list[Flag], list[ReviewEvent]]:
        async with self._sessions() as session:
            feedback = await session.scalar(select(Feedback).where(Feedback.exchange_id == exchange_id))
            flags = list(await session.scalars(
                select(Flag).where(Flag.exchange_id == exchange_id).order_by(Flag.id)))
            events = list(await session.scalars(
                select(ReviewEvent).where(ReviewEvent.exchange_id == exchange_id).order_by(ReviewEvent.id)))
            return feedback, flags, events

    async def queue(self, reviewer: str, limit: int, now_epoch: float, *, exclude_claimed: bool = False,
                    offset: int = 0) -> list[QueueEntry]:
        """Open and escalated items, highest priority first (oldest first on ties), leaving out
        items `reviewer` already labelled (and, if asked, items someone else holds a live claim on)."""
        prio = priority_expression(self.cfg, now_epoch).label("priority")
        label_count = (select(func.count(ReviewLabel.id)).where(ReviewLabel.item_id == ReviewItem.id)
                       .correlate(ReviewItem).scalar_subquery())
        mine = exists().where(ReviewLabel.item_id == ReviewItem.id, ReviewLabel.reviewer == reviewer)
        query = (
            select(ReviewItem, Exchange, prio, label_count)
            .join(Exchange, Exchange.id == ReviewItem.exchange_id)
            .where(ReviewItem.status.in_(OPEN_STATUSES), ~mine)
            .order_by(prio.desc(), ReviewItem.created_epoch.asc(), ReviewItem.id.asc())
            .limit(limit).offset(offset)
        )
        if exclude_claimed:
            query = query.where(or_(ReviewItem.claimed_by.is_(None), ReviewItem.claimed_by == reviewer,
                                    ReviewItem.claim_expires_epoch < now_epoch))
        async with self._sessions() as session:
            rows = (await session.execute(query)).all()
        return [QueueEntry(item, exchange, float(p), int(n)) for item, exchange, p, n in rows]

    async def claimed_by(self, reviewer: str, now_epoch: float) -> ReviewItem | None:
        async with self._sessions() as session:
            return await session.scalar(
                select(ReviewItem).where(ReviewItem.claimed_by == reviewer, ReviewItem.claim_expires_epoch >= now_epoch,
                                         ReviewItem.status.in_(OPEN_STATUSES)).order_by(ReviewItem.id).limit(1))

    async def status_counts(self) -> dict[str, int]:
        async with self._sessions() as session:
            rows = await session.execute(select(ReviewItem.status, func.count()).group_by(ReviewItem.status))
            return {status: n for status, n in rows}

    async def label_counts(self) -> dict[str, dict[str, int]]:
        async with self._sessions() as session:
            rows = await session.execute(
                select(ReviewLabel.reviewer, ReviewLabel.verdict, func.count())
                .group_by(ReviewLabel.reviewer, ReviewLabel.verdict))
            counts: dict[str, dict[str, int]] = {}
            for reviewer, verdict, n in rows:
                counts.setdefault(reviewer, {})[verdict] = n
            return counts

    async def all_pairs(self) -> list[ReviewPair]:
        async with self._sessions() as session:
            return list(await session.scalars(select(ReviewPair).order_by(ReviewPair.id)))

    async def recent_confidences(self, limit: int) -> list[tuple[float, bool]]:
        async with self._sessions() as session:
            rows = await session.execute(
                select(Exchange.confidence, Exchange.flagged).where(Exchange.finish_reason.not_in(UNANSWERED),
                                                                    Exchange.confidence.is_not(None))
                .order_by(Exchange.created_at.desc()).limit(limit))
            return [(c, f) for c, f in rows]

    async def resolved(self, batch: int = 500):
        """Resolved items with an answer (approve/correct), oldest resolution first, in batches."""
        last_id = 0
        while True:
            async with self._sessions() as session:
                rows = (await session.execute(
                    select(ReviewItem, Exchange).join(Exchange, Exchange.id == ReviewItem.exchange_id)
                    .where(ReviewItem.status == "resolved", ReviewItem.resolved_answer.is_not(None),
                           ReviewItem.id > last_id)
                    .order_by(ReviewItem.id).limit(batch))).all()
            if not rows:
                return
            for item, exchange in rows:
                yield item, exchange
            last_id = rows[-1][0].id

    # ---- signals ----------------------------------------------------------------------------
    async def set_feedback(self, exchange: Exchange, actor: str, rating: str, comment: str | None) -> tuple[Feedback, ReviewItem | None]:
        """Upsert the exchange's one rating. Thumbs-down puts the exchange in the queue; changing it
        to thumbs-up withdraws an item that nothing else keeps there and nobody has labelled yet."""

        async def work(session: AsyncSession) -> tuple[Feedback, ReviewItem | None]:
            now = utcnow()
            fb = await session.scalar(select(Feedback).where(Feedback.exchange_id == exchange.id))
            before = fb.rating if fb else None
            if fb is None:
                fb = Feedback(exchange_id=exchange.id, api_key_name=exchange.api_key_name, user=exchange.user,
                              rating=rating, comment=comment, created_at=now, updated_at=now)
                session.add(fb)
            else:
                fb.rating, fb.comment, fb.updated_at = rating, comment, now
            item = await session.scalar(select(ReviewItem).where(ReviewItem.exchange_id == exchange.id))
            down = rating == "down"
            if item is None and down:
                item = new_item(exchange, self.cfg, thumbs_down=True, now=now)
                session.add(item)
                await session.flush()
                session.add(event(exchange.id, item.id, actor, "enqueued", reason="thumbs_down"))
            elif item is not None and item.thumbs_down != down:
                values: dict = {"thumbs_down": down}
                if down and item.status == "withdrawn":
                    values["status"] = "open"
                    session.add(event(exchange.id, item.id, actor, "reopened", reason="thumbs_down"))
                if (not down and item.status == "open" and not item.low_confidence and item.flag_count == 0
                        and not await session.scalar(select(exists().where(ReviewLabel.item_id == item.id)))):
                    values["status"] = "withdrawn"
                    session.add(event(exchange.id, item.id, actor, "withdrawn", reason="thumbs_up"))
                await self._update_item(session, item, **values)
            session.add(event(exchange.id, item.id if item else None, actor, "feedback", rating=rating, previous=before))
            return fb, item

        return await self._transaction(work)

    async def add_flag(self, exchange: Exchange, actor: str, reason: str) -> tuple[Flag, ReviewItem]:
        async def work(session: AsyncSession) -> tuple[Flag, ReviewItem]:
            if await session.scalar(select(Flag).where(Flag.exchange_id == exchange.id, Flag.flagged_by == actor)):
                raise ReviewConflict(f"'{actor}' has already flagged exchange {exchange.id}", "already_flagged")
            item = await session.scalar(select(ReviewItem).where(ReviewItem.exchange_id == exchange.id))
            if item is not None and item.status == "resolved":
                raise ReviewConflict(
                    f"Exchange {exchange.id} was already reviewed (item {item.id}, resolution '{item.resolution}').",
                    "already_resolved")
            flag = Flag(exchange_id=exchange.id, flagged_by=actor, reason=reason, created_at=utcnow())
            session.add(flag)
            if item is None:
                item = new_item(exchange, self.cfg, flag_count=1)
                session.add(item)
                await session.flush()
                session.add(event(exchange.id, item.id, actor, "enqueued", reason="staff_flag"))
            else:
                await self._update_item(session, item, flag_count=item.flag_count + 1, status=(
                    "open" if item.status == "withdrawn" else item.status))
            session.add(event(exchange.id, item.id, actor, "flag", reason=reason))
            return flag, item

        return await self._transaction(work)

    # ---- claims -----------------------------------------------------------------------------
    async def claim(self, item_id: int, reviewer: str, ttl_s: int) -> ReviewItem:
        """Reserve an item for `reviewer` until now + ttl. Only one live claim per item: the
        UPDATE is conditional on the item being unclaimed, expired, or already ours."""

        async def work(session: AsyncSession) -> ReviewItem:
            now = time.time()
            item = await session.get(ReviewItem, item_id) if is_row_id(item_id) else None
            if item is None:
                raise LookupError(item_id)
            self.check_reviewable(item, reviewer, now)
            if await session.scalar(select(exists().where(ReviewLabel.item_id == item_id,
                                                          ReviewLabel.reviewer == reviewer))):
                raise ReviewConflict(f"You have already labelled item {item_id}.", "already_labelled")
            result = await session.execute(
                update(ReviewItem).where(
                    ReviewItem.id == item_id, ReviewItem.status.in_(OPEN_STATUSES),
                    or_(ReviewItem.claimed_by.is_(None), ReviewItem.claimed_by == reviewer,
                        ReviewItem.claim_expires_epoch < now))
                .values(claimed_by=reviewer, claim_expires_epoch=now + ttl_s, version=ReviewItem.version + 1))
            if result.rowcount != 1:
                raise StaleItem(item_id)
            if item.claimed_by != reviewer:
                session.add(event(item.exchange_id, item_id, reviewer, "claimed", ttl_s=ttl_s))
            await session.refresh(item)
            return item

        return await self._transaction(work)

    async def release(self, item_id: int, reviewer: str) -> bool:
        if not is_row_id(item_id):
            return False
        async with self._sessions() as session, session.begin():
            result = await session.execute(
                update(ReviewItem).where(ReviewItem.id == item_id, ReviewItem.claimed_by == reviewer)
                .values(claimed_by=None, claim_expires_epoch=None, version=ReviewItem.version + 1))
            return result.rowcount == 1

    @staticmethod
    def check_reviewable(item: ReviewItem, reviewer: str, now: float) -> None:
        if item.status == "resolved":
            raise ReviewConflict(f"Item {item.id} is already resolved ('{item.resolution}').", "already_resolved")
        if item.status == "withdrawn":
            raise ReviewConflict(f"Item {item.id} was withdrawn (nothing keeps it in the queue).", "withdrawn")
        if item.claimed_by not in (None, reviewer) and (item.claim_expires_epoch or 0) >= now:
            until = datetime.fromtimestamp(item.claim_expires_epoch, timezone.utc).isoformat(timespec="seconds")
            raise ReviewConflict(f"Item {item.id} is claimed by '{item.claimed_by}' until {until}.", "claimed")

    # ---- labels -----------------------------------------------------------------------------
    async def commit_label(self, item: ReviewItem, commit: LabelCommit) -> ReviewLabel:
        """Apply a label decided against `item` as read (its version). A stale item → StaleItem,
        and the caller re-reads and decides again; the unique (item, reviewer) key stops doubles."""
        async with self._sessions() as session:
            try:
                async with session.begin():
                    await self._update_item(session, item, claimed_by=None, claim_expires_epoch=None,
                                            **commit.item_values)
                    session.add(commit.label)
                    await session.flush()
                    for pair in commit.pairs:
                        pair.label_b = commit.label.id
                        session.add(pair)
                    for ev in commit.events:
                        session.add(ev)
            except IntegrityError:
                raise ReviewConflict(f"You have already labelled item {item.id}.", "already_labelled") from None
            except OperationalError as exc:
                if "locked" in str(exc).lower():
                    raise StaleItem(item.id) from None
                raise
        return commit.label

    async def resolved_count(self) -> int:
        """Items resolved with an answer to learn (the retraining watermark counts these)."""
        async with self._sessions() as session:
            return await session.scalar(select(func.count(ReviewItem.id)).where(
                ReviewItem.status == "resolved", ReviewItem.resolved_answer.is_not(None))) or 0

    # ---- teacher drafts -------------------------------------------------------------------
    async def set_draft(self, item_id: int, draft: str | None, source: str, score: float | None) -> bool:
        """Store the teacher's draft (or, with `draft` None, that it had none) on an open item that
        has none yet: the first writer wins, so every reviewer sees the same draft. Bumps the
        version, so a label decided on a snapshot without the draft is decided again with it."""
        if not is_row_id(item_id):
            return False
        async with self._sessions() as session, session.begin():
            result = await session.execute(
                update(ReviewItem).where(ReviewItem.id == item_id, ReviewItem.draft_source.is_(None),
                                         ReviewItem.status.in_(OPEN_STATUSES))
                .values(draft=draft, draft_source=source, draft_score=score, version=ReviewItem.version + 1))
            return result.rowcount == 1

    async def audit_items(self) -> list[tuple[str, float, str, str | None]]:
        """(variant, audit_rate, status, resolution) of every audit item, for the audit estimates."""
        async with self._sessions() as session:
            rows = await session.execute(
                select(Exchange.variant, ReviewItem.audit_rate, ReviewItem.status, ReviewItem.resolution)
                .join(Exchange, Exchange.id == ReviewItem.exchange_id).where(ReviewItem.audit))
            return [(variant, rate, status, resolution) for variant, rate, status, resolution in rows]

    async def draft_outcomes(self) -> dict[str, dict[str, int]]:
        """Per draft source: `asked` (items the teacher was asked about), `drafted` (of those, with a
        draft), `shown` (items whose draft was judged by at least one label) and the labels' draft
        outcomes (`accepted` / `edited` / `rejected`: label counts)."""
        async with self._sessions() as session:
            judged = (select(ReviewItem.draft_source, ReviewLabel.draft_outcome, ReviewLabel.item_id)
                      .join(ReviewItem, ReviewItem.id == ReviewLabel.item_id)
                      .where(ReviewLabel.draft_outcome.is_not(None), ReviewItem.draft.is_not(None))
                      .subquery())
            rows = await session.execute(
                select(judged.c.draft_source, judged.c.draft_outcome, func.count())
                .group_by(judged.c.draft_source, judged.c.draft_outcome))
            items = await session.execute(
                select(judged.c.draft_source, func.count(func.distinct(judged.c.item_id)))
                .group_by(judged.c.draft_source))
            out: dict[str, dict[str, int]] = {}
            for source, outcome, n in rows:
                out.setdefault(source, {})[outcome] = n
            for source, n in items:
                out.setdefault(source, {})["shown"] = n
            asked = await session.execute(
                select(ReviewItem.draft_source, func.count(), func.count(ReviewItem.draft))
                .where(ReviewItem.draft_source.is_not(None)).group_by(ReviewItem.draft_source))
            for source, n, drafted in asked:
                out.setdefault(source, {}).update(asked=n, drafted=drafted)
            return out

    async def has_label(self, item_id: int, reviewer: str) -> bool:
        async with self._sessions() as session:
            return bool(await session.scalar(select(exists().where(
                and_(ReviewLabel.item_id == item_id, ReviewLabel.reviewer == reviewer)))))
