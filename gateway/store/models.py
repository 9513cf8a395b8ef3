"""SQLAlchemy 2 models. Every schema change comes with an Alembic migration in `migrations/versions`."""

from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import JSON, Boolean, DateTime, Float, ForeignKey, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def as_utc(value: datetime) -> datetime:
    """A stored timestamp, timezone-aware. SQLite hands datetimes back naive; we only ever store
    UTC, so a naive value is UTC."""
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)


def iso_utc(value: datetime | float | None) -> str | None:
    """A stored timestamp (or epoch seconds) as ISO-8601 UTC."""
    if value is None:
        return None
    if isinstance(value, (int, float)):
        return datetime.fromtimestamp(value, timezone.utc).isoformat(timespec="seconds")
    return as_utc(value).isoformat(timespec="seconds")


class Exchange(Base):
    """One chat completion: what was asked, what was answered, by which variant, how confidently.
    Message contents are PII-scrubbed before they reach this table."""

    __tablename__ = "exchanges"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    completed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    api_key_name: Mapped[str] = mapped_column(String(100), index=True)
    user: Mapped[str | None] = mapped_column(String(200), index=True)
    model_requested: Mapped[str] = mapped_column(String(200))
    variant: Mapped[str] = mapped_column(String(100), index=True)
    messages: Mapped[list] = mapped_column(JSON)
    answer: Mapped[str] = mapped_column(Text)
    finish_reason: Mapped[str] = mapped_column(String(20))
    stream: Mapped[bool] = mapped_column(Boolean)
    rag: Mapped[bool] = mapped_column(Boolean, default=False)
    sources: Mapped[list] = mapped_column(JSON, default=list)
    retrieval_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    params: Mapped[dict] = mapped_column(JSON, default=dict)
    prompt_tokens: Mapped[int] = mapped_column(Integer)
    completion_tokens: Mapped[int] = mapped_column(Integer)
    ttft_ms: Mapped[float | None] = mapped_column(Float)
    latency_ms: Mapped[float] = mapped_column(Float)
    confidence: Mapped[float] = mapped_column(Float, index=True)
    confidence_parts: Mapped[dict] = mapped_column(JSON, default=dict)
    flagged: Mapped[bool] = mapped_column(Boolean, index=True)
    experiment_id: Mapped[int | None] = mapped_column(Integer, nullable=True, index=True)  # routed by the A/B split
    # the routing unit (customer or session) as a digest salted by the experiment: the A/B rule counts customers
    routing_unit: Mapped[str | None] = mapped_column(String(32), nullable=True)

    __table_args__ = (Index("ix_exchanges_variant_created", "variant", "created_at"),)


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
    confidence: Mapped[float] = mapped_column(Float)
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


class Adapter(Base):
    """A trained LoRA adapter version (folder `<data_dir>/adapters/<version>`), with its lineage.
    State machine (retraining/registry.py): training → candidate → challenger → champion → retired;
    training → failed."""

    __tablename__ = "adapters"

    version: Mapped[str] = mapped_column(String(16), primary_key=True)  # v0001, v0002, ...
    state: Mapped[str] = mapped_column(String(12), index=True)
    parent: Mapped[str | None] = mapped_column(String(16), nullable=True)  # champion it was compared against
    run_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    base_model: Mapped[str] = mapped_column(String(500))
    dataset_hash: Mapped[str | None] = mapped_column(String(64), nullable=True)
    label_count: Mapped[int] = mapped_column(Integer, default=0)
    train_examples: Mapped[int] = mapped_column(Integer, default=0)
    config: Mapped[dict] = mapped_column(JSON, default=dict)
    metrics: Mapped[dict] = mapped_column(JSON, default=dict)
    files: Mapped[dict] = mapped_column(JSON, default=dict)  # file name → sha256
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)  # why it stopped where it is
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class TrainingRun(Base):
    """One retraining cycle: dataset → train → evaluate → gate. Progress is written by the trainer."""

    __tablename__ = "training_runs"
    __table_args__ = (Index("uq_training_runs_active_slot", "active_slot", unique=True),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    status: Mapped[str] = mapped_column(String(12), index=True)  # queued | running | trained | succeeded | failed
    trigger: Mapped[str] = mapped_column(String(12))  # schedule | manual | cli | bootstrap
    requested_by: Mapped[str] = mapped_column(String(100))
    overrides: Mapped[dict] = mapped_column(JSON, default=dict)
    adapter_version: Mapped[str | None] = mapped_column(String(16), nullable=True)
    dataset_hash: Mapped[str | None] = mapped_column(String(64), nullable=True)
    label_watermark: Mapped[int] = mapped_column(Integer, default=0)  # resolved labels counted at start
    progress: Mapped[dict] = mapped_column(JSON, default=dict)
    metrics: Mapped[dict] = mapped_column(JSON, default=dict)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    pid: Mapped[int | None] = mapped_column(Integer, nullable=True)
    # 1 while active, NULL once terminal; unique, so the database admits one active run (migration 0006)
    active_slot: Mapped[int | None] = mapped_column(Integer, nullable=True)
    log_path: Mapped[str | None] = mapped_column(String(500), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class Experiment(Base):
    """Champion vs challenger on live traffic. One runs at a time; exchanges routed by its split
    carry its id, so each arm's metrics come straight from the exchange log."""

    __tablename__ = "experiments"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    champion: Mapped[str] = mapped_column(String(16))  # a version, or "base"
    challenger: Mapped[str] = mapped_column(String(16))
    share: Mapped[float] = mapped_column(Float)  # challenger's share of routing units
    status: Mapped[str] = mapped_column(String(12), index=True)  # running | promoted | retired | ended
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)  # why it ended
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    ended_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class Decision(Base):
    """Every change of who serves (promote, retire, rollback) and every evaluation that saw new
    evidence (continue), with the evidence it was taken on. Append-only."""

    __tablename__ = "decisions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    experiment_id: Mapped[int | None] = mapped_column(Integer, nullable=True, index=True)
    action: Mapped[str] = mapped_column(String(12))  # promote | retire | rollback | continue
    version: Mapped[str | None] = mapped_column(String(16), nullable=True)  # the version acted on
    champion_before: Mapped[str] = mapped_column(String(16))  # a version, or "base"
    champion_after: Mapped[str] = mapped_column(String(16))
    actor: Mapped[str] = mapped_column(String(100))  # "scheduler", "gate" or the admin key's name
    automatic: Mapped[bool] = mapped_column(Boolean)
    reason: Mapped[str] = mapped_column(Text)
    evidence: Mapped[dict] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
