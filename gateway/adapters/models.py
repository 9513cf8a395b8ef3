"""The adapter registry's table: versions, states, lineage, metrics and file checksums.

Schema changes come with an Alembic migration (`gateway/store/migrations/versions`)."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import JSON, DateTime, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from gateway.store.base import Base


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
