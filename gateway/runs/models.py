"""The training-run table (one active run at a time: the unique `active_slot`).

Schema changes come with an Alembic migration (`gateway/store/migrations/versions`)."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import JSON, DateTime, Float, Index, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from gateway.store.base import Base


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
    # the host (hostname/boot id) whose process runs it: a pid means something only there (migration 0012)
    host: Mapped[str | None] = mapped_column(String(200), nullable=True)
    # 1 while active, NULL once terminal; unique, so the database admits one active run (migration 0006)
    active_slot: Mapped[int | None] = mapped_column(Integer, nullable=True)
    log_path: Mapped[str | None] = mapped_column(String(500), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class SchedulerLease(Base):
    """Who runs the scheduled decisions among replicas sharing this database (one row per lease
    name). `token` grows with every new holder: a fencing token that tells an old leader, paused
    past its expiry, that it lost the lease."""

    __tablename__ = "scheduler_lease"

    name: Mapped[str] = mapped_column(String(32), primary_key=True)
    holder: Mapped[str | None] = mapped_column(String(200), nullable=True)
    token: Mapped[int] = mapped_column(Integer, default=0)
    expires_epoch: Mapped[float] = mapped_column(Float, default=0.0)
    acquired_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
