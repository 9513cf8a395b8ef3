"""The declarative base every slice's tables share (`gateway/<slice>/models.py`) and the UTC time
helpers for stored timestamps. Every schema change comes with an Alembic migration in `migrations/versions`."""

from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy.orm import DeclarativeBase


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
