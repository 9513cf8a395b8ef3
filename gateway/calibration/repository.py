"""Calibrators in the database: one active fit per variant, older fits kept for lineage, and the
reviewed verdicts a refit learns from."""

from __future__ import annotations

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import async_sessionmaker

from gateway.calibration.calibrator import Calibrator, Fit
from gateway.calibration.models import CalibratorRow
from gateway.exchanges.models import Exchange
from gateway.review.models import GOOD_RESOLUTIONS, ReviewItem
from gateway.store.base import utcnow
from gateway.store.db import is_row_id


def as_calibrator(row: CalibratorRow) -> Calibrator:
    return Calibrator.from_params(row.params, variant=row.variant, source=row.source, id=row.id)


def has_signals(parts: dict | None) -> bool:
    """Logged with this version's raw signals: rows from before calibration have no `formula`, and
    rows from before the retrieval signals (v4) no `question_match` and another meaning of
    `second_similarity` — a fit on them would learn from features that no longer mean the same."""
    return bool(parts) and "formula" in parts and "question_match" in parts


class Calibrators:
    def __init__(self, sessions: async_sessionmaker) -> None:
        self.sessions = sessions

    async def add(self, variant: str, source: str, fit: Fit, labels: int, good: int) -> CalibratorRow:
        """Store a fit as the variant's active calibrator (the previous one stays, inactive)."""
        async with self.sessions.begin() as s:
            await s.execute(update(CalibratorRow).where(CalibratorRow.variant == variant, CalibratorRow.active)
                            .values(active=False))
            row = CalibratorRow(variant=variant, source=source, labels=labels, good=good,
                                params=fit.calibrator.params(), metrics=fit.metrics,
                                threshold=fit.calibrator.threshold, active=True, created_at=utcnow())
            s.add(row)
        return row

    async def active(self) -> dict[str, Calibrator]:
        """The active calibrator of every variant that has one (a row this version cannot read is skipped)."""
        async with self.sessions() as s:
            rows = (await s.scalars(select(CalibratorRow).where(CalibratorRow.active))).all()
        out = {}
        for row in rows:
            try:
                out[row.variant] = as_calibrator(row)
            except (KeyError, TypeError, ValueError):
                continue
        return out

    async def list(self, variant: str | None = None, limit: int = 50) -> list[CalibratorRow]:
        query = select(CalibratorRow).order_by(CalibratorRow.id.desc()).limit(limit)
        if variant is not None:
            query = query.where(CalibratorRow.variant == variant)
        async with self.sessions() as s:
            return list((await s.scalars(query)).all())

    async def get(self, calibrator_id: int) -> CalibratorRow | None:
        if not is_row_id(calibrator_id):  # beyond what the database can store: no such row
            return None
        async with self.sessions() as s:
            return await s.get(CalibratorRow, calibrator_id)

    async def reviewed(self, variant: str, limit: int) -> list[tuple[dict, bool]]:
        """(confidence parts, good) of the variant's newest resolved review items whose exchange has
        the raw signals (rows logged before calibration existed are skipped, and so are fallback
        answers: the model did not write them)."""
        query = (select(Exchange.confidence_parts, ReviewItem.resolution)
                 .join(ReviewItem, ReviewItem.exchange_id == Exchange.id)
                 .where(Exchange.variant == variant, ReviewItem.status == "resolved",
                        ReviewItem.resolution.is_not(None), Exchange.retrieval.is_distinct_from("no_match"))
                 .order_by(ReviewItem.resolved_at.desc()).limit(limit))
        async with self.sessions() as s:
            rows = (await s.execute(query)).all()
        return [(parts, resolution in GOOD_RESOLUTIONS) for parts, resolution in rows if has_signals(parts)]

    async def recent_parts(self, variant: str, limit: int) -> list[dict]:
        """Confidence parts of the variant's newest answered exchanges (for a review-share threshold)."""
        query = (select(Exchange.confidence_parts).where(Exchange.variant == variant,
                                                         Exchange.finish_reason.in_(("stop", "length")),
                                                         Exchange.retrieval.is_distinct_from("no_match"))
                 .order_by(Exchange.created_at.desc()).limit(limit))
        async with self.sessions() as s:
            return [p for p in (await s.scalars(query)).all() if has_signals(p)]
