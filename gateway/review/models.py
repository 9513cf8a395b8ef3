"""The review tables: feedback, staff flags, queue items, labels, label pairs (agreement) and the audit trail.

Schema changes come with an Alembic migration (`gateway/store/migrations/versions`)."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column

from gateway.exchanges import models as _exchanges  # noqa: F401 - the "exchanges" table its foreign keys name
from gateway.store.base import Base

# a resolved item's `resolution` that means the model's answer stood (good); correct / reject = bad —
# what the calibrator learns from and the audit estimate counts
GOOD_RESOLUTIONS = ("approve",)


class Feedback(Base):
    """A client's rating of one exchange: one per exchange, changeable (changes are in the audit log)."""

    __tablename__ = "feedback"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    exchange_id: Mapped[str] = mapped_column(ForeignKey("exchanges.id"), unique=True)
    api_key_name: Mapped[str] = mapped_column(String(100))
    user: Mapped[str | None] = mapped_column(String(200))
    rating: Mapped[str] = mapped_column(String(8))  # "up" | "down"
    comment: Mapped[str | None] = mapped_column(Text, nullable=True)  # PII-scrubbed
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class Flag(Base):
    """A staff member's flag on an exchange (one per staff member and exchange)."""

    __tablename__ = "flags"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    exchange_id: Mapped[str] = mapped_column(ForeignKey("exchanges.id"), index=True)
    flagged_by: Mapped[str] = mapped_column(String(100))
    reason: Mapped[str] = mapped_column(Text)  # PII-scrubbed
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))

    __table_args__ = (UniqueConstraint("exchange_id", "flagged_by", name="uq_flags_exchange_staff"),)


class ReviewItem(Base):
    """An exchange that needs human review. Priority is computed at query time from the signal
    columns and the current weights (see `ReviewSettings`), so re-weighting needs no migration.
    `version` guards read-modify-write races (optimistic concurrency, portable to SQLite and PG)."""

    __tablename__ = "review_items"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    exchange_id: Mapped[str] = mapped_column(ForeignKey("exchanges.id"), unique=True)
    status: Mapped[str] = mapped_column(String(12), index=True)  # open | escalated | resolved | withdrawn
    confidence: Mapped[float | None] = mapped_column(Float, nullable=True)  # the exchange's (None: not scored)
    low_confidence: Mapped[bool] = mapped_column(Boolean, default=False)
    thumbs_down: Mapped[bool] = mapped_column(Boolean, default=False)
    flag_count: Mapped[int] = mapped_column(Integer, default=0)
    required_labels: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    created_epoch: Mapped[float] = mapped_column(Float)  # for the age term of the priority, in SQL
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    claimed_by: Mapped[str | None] = mapped_column(String(100), nullable=True)
    claim_expires_epoch: Mapped[float | None] = mapped_column(Float, nullable=True)
    resolution: Mapped[str | None] = mapped_column(String(12), nullable=True)  # approve | correct | reject
    resolved_answer: Mapped[str | None] = mapped_column(Text, nullable=True)
    resolved_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    decided_by: Mapped[str | None] = mapped_column(String(200), nullable=True)
    version: Mapped[int] = mapped_column(Integer, default=0)
    audit: Mapped[bool] = mapped_column(Boolean, default=False)  # drawn by the random audit sample
    audit_rate: Mapped[float | None] = mapped_column(Float, nullable=True)  # ...with this probability
    draft: Mapped[str | None] = mapped_column(Text, nullable=True)  # the teacher's proposed answer
    draft_source: Mapped[str | None] = mapped_column(String(100), nullable=True)  # e.g. "retrieval"
    draft_score: Mapped[float | None] = mapped_column(Float, nullable=True)  # e.g. the entry's similarity


class ReviewLabel(Base):
    """One reviewer's verdict on one item. `shown_answer` is the answer the reviewer saw proposed
    (the model's, or the latest correction); `outcome` is the answer their verdict stands for
    (approve → shown_answer, correct → corrected_answer, reject → none)."""

    __tablename__ = "review_labels"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    item_id: Mapped[int] = mapped_column(ForeignKey("review_items.id"), index=True)
    reviewer: Mapped[str] = mapped_column(String(100))
    role: Mapped[str] = mapped_column(String(12))
    verdict: Mapped[str] = mapped_column(String(12))
    category: Mapped[str] = mapped_column(String(8))  # keep | change | reject (for Cohen's kappa)
    shown_answer: Mapped[str] = mapped_column(Text)
    shown_label_id: Mapped[int | None] = mapped_column(Integer, nullable=True)  # None → the model's answer
    corrected_answer: Mapped[str | None] = mapped_column(Text, nullable=True)
    outcome: Mapped[str | None] = mapped_column(Text, nullable=True)
    note: Mapped[str | None] = mapped_column(Text, nullable=True)
    draft_outcome: Mapped[str | None] = mapped_column(String(8), nullable=True)  # accepted | edited | rejected
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))

    __table_args__ = (UniqueConstraint("item_id", "reviewer", name="uq_review_labels_item_reviewer"),)


class ReviewPair(Base):
    """Whether two reviewers' labels on one item agree; written when the second label arrives.
    Feeds consensus and the agreement statistics without re-embedding anything."""

    __tablename__ = "review_pairs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    item_id: Mapped[int] = mapped_column(ForeignKey("review_items.id"), index=True)
    label_a: Mapped[int] = mapped_column(ForeignKey("review_labels.id"))
    label_b: Mapped[int] = mapped_column(ForeignKey("review_labels.id"))
    reviewer_a: Mapped[str] = mapped_column(String(100))  # reviewer_a < reviewer_b
    reviewer_b: Mapped[str] = mapped_column(String(100))
    category_a: Mapped[str] = mapped_column(String(8))
    category_b: Mapped[str] = mapped_column(String(8))
    similarity: Mapped[float | None] = mapped_column(Float, nullable=True)
    agree: Mapped[bool] = mapped_column(Boolean)


class ReviewEvent(Base):
    """Audit trail: who did what to which exchange/item, when. Append-only."""

    __tablename__ = "review_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    exchange_id: Mapped[str] = mapped_column(String(40), index=True)
    item_id: Mapped[int | None] = mapped_column(Integer, nullable=True, index=True)
    actor: Mapped[str] = mapped_column(String(200))
    action: Mapped[str] = mapped_column(String(24))
    detail: Mapped[dict] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
