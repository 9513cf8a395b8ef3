"""The exchange log's table: one row per completion, its messages, answer, sources and confidence.

Schema changes come with an Alembic migration (`gateway/store/migrations/versions`)."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import JSON, Boolean, DateTime, Float, Index, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from gateway.store.base import Base


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
    messages: Mapped[list] = mapped_column(JSON)  # the prompt the model saw (scrubbed): what training learns from
    # the turns before the customer's last message as the client sent them (scrubbed); None for one question
    conversation: Mapped[list | None] = mapped_column(JSON, nullable=True)
    answer: Mapped[str] = mapped_column(Text)
    # streaming (the row exists, the answer is coming) → stop | length | cancelled | error
    finish_reason: Mapped[str] = mapped_column(String(20))
    error: Mapped[str | None] = mapped_column(Text, nullable=True)  # why an `error` exchange failed
    served_by: Mapped[str | None] = mapped_column(String(200), nullable=True)  # host:port of the gateway
    stream: Mapped[bool] = mapped_column(Boolean)
    rag: Mapped[bool] = mapped_column(Boolean, default=False)
    # ok | unavailable (answered without) | no_match (nothing relevant: answered with rag.fallback_answer)
    retrieval: Mapped[str | None] = mapped_column(String(20), nullable=True)
    retrieval_query: Mapped[str | None] = mapped_column(Text, nullable=True)  # what was searched (scrubbed)
    sources: Mapped[list] = mapped_column(JSON, default=list)
    retrieval_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    params: Mapped[dict] = mapped_column(JSON, default=dict)
    prompt_tokens: Mapped[int] = mapped_column(Integer)
    completion_tokens: Mapped[int] = mapped_column(Integer)
    ttft_ms: Mapped[float | None] = mapped_column(Float)
    latency_ms: Mapped[float] = mapped_column(Float)
    confidence: Mapped[float | None] = mapped_column(Float, index=True, nullable=True)  # None: not scored (no logprobs)
    confidence_parts: Mapped[dict] = mapped_column(JSON, default=dict)
    flagged: Mapped[bool] = mapped_column(Boolean, index=True)
    experiment_id: Mapped[int | None] = mapped_column(Integer, nullable=True, index=True)  # routed by the A/B split
    # the routing unit (customer or session) as a digest salted by the experiment: the A/B rule counts customers
    routing_unit: Mapped[str | None] = mapped_column(String(32), nullable=True)

    __table_args__ = (Index("ix_exchanges_variant_created", "variant", "created_at"),
                      Index("ix_exchanges_finish_served", "finish_reason", "served_by"))

STREAMING = "streaming"  # the finish_reason of a row whose answer is still being generated
UNANSWERED = ("streaming", "cancelled", "error")  # rows that are no answer to judge (A/B arms, confidence stats)
