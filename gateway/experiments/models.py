"""The A/B tables: experiments and every serving decision with its evidence.

Schema changes come with an Alembic migration (`gateway/store/migrations/versions`)."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import JSON, Boolean, DateTime, Float, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from gateway.store.base import Base


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
