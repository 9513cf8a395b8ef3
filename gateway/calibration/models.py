"""The calibrators table: fitted confidence calibrators per served variant (see
`gateway/calibration/calibrator.py`). Schema changes come with an Alembic migration."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import JSON, Boolean, DateTime, Float, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from gateway.store.base import Base


class CalibratorRow(Base):
    """One fit. `source`: "calibration_split" (scored against references when the adapter was
    trained, or shipped with it) or "reviews" (reviewers' verdicts). One active row per variant."""

    __tablename__ = "calibrators"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    variant: Mapped[str] = mapped_column(String(16))
    source: Mapped[str] = mapped_column(String(24))
    labels: Mapped[int] = mapped_column(Integer)
    good: Mapped[int] = mapped_column(Integer)
    params: Mapped[dict] = mapped_column(JSON)
    metrics: Mapped[dict] = mapped_column(JSON)
    threshold: Mapped[float] = mapped_column(Float)
    active: Mapped[bool] = mapped_column(Boolean)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
