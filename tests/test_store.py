"""The exchange log on real databases: SQLite (always) and PostgreSQL (when TELLERLOOP_TEST_POSTGRES_URL is set)."""

import uuid
from datetime import datetime, timezone

from sqlalchemy import text

from gateway.exchanges.models import Exchange
from gateway.exchanges.repository import ExchangeRepository
from gateway.store.db import create_engine, migrate, session_factory
from tests.conftest import fresh_postgres_database


def make_row(**kw) -> Exchange:
    now = datetime.now(timezone.utc)
    fields = dict(
        id=uuid.uuid4().hex, created_at=now, completed_at=now, api_key_name="k", user="u", model_requested="m",
        variant="base", messages=[{"role": "user", "content": "hé"}], answer="ok", finish_reason="stop",
        stream=False, rag=False, sources=[], params={"max_tokens": 5}, prompt_tokens=3, completion_tokens=1,
        ttft_ms=1.0, latency_ms=2.0, confidence=0.5, confidence_parts={"token_prob": 0.5}, flagged=False,
    )
    fields.update(kw)
    return Exchange(**fields)


async def roundtrip(url: str) -> None:
    engine = create_engine(url)
    await migrate(engine)
    await migrate(engine)  # idempotent
    repo = ExchangeRepository(session_factory(engine))
    row = make_row()
    await repo.add(row)
    got = await repo.get(row.id)
    assert got.messages == [{"role": "user", "content": "hé"}] and got.confidence_parts == {"token_prob": 0.5}
    assert await repo.ping()
    assert [r.id for r in await repo.recent(5)] == [row.id]
    await engine.dispose()
    # durability: a brand-new connection sees the committed row
    engine = create_engine(url)
    assert (await ExchangeRepository(session_factory(engine)).get(row.id)).answer == "ok"
    await engine.dispose()


async def test_sqlite_roundtrip_and_wal(tmp_path):
    url = f"sqlite+aiosqlite:///{tmp_path / 't.db'}"
    await roundtrip(url)
    engine = create_engine(url)
    async with engine.connect() as conn:
        assert (await conn.execute(text("PRAGMA journal_mode"))).scalar() == "wal"
    await engine.dispose()


async def test_postgres_roundtrip():
    async with fresh_postgres_database("tellerloop_test") as url:
        await roundtrip(url)


async def test_an_sqlite_install_with_data_upgrades_through_table_rebuilds(tmp_path):
    """Migration 0010 rebuilds `exchanges` and `review_items` (SQLite's way of changing a column's
    nullability) while review items point at exchanges: the rows survive, the references hold, and
    foreign keys are enforced again afterwards."""
    from gateway.review.models import ReviewItem

    url = f"sqlite+aiosqlite:///{tmp_path / 'old.db'}"
    engine = create_engine(url)
    await migrate(engine, "0009")
    row = make_row()
    now = datetime.now(timezone.utc)
    async with session_factory(engine)() as s, s.begin():
        s.add(row)
        await s.flush()
        s.add(ReviewItem(exchange_id=row.id, status="open", confidence=0.5, low_confidence=True, thumbs_down=False,
                         flag_count=0, required_labels=2, created_at=now, created_epoch=now.timestamp(),
                         updated_at=now, version=0, audit=False))
    await migrate(engine)
    async with engine.connect() as conn:
        assert (await conn.exec_driver_sql("SELECT count(*) FROM review_items")).scalar() == 1
        assert (await conn.exec_driver_sql("SELECT holder FROM scheduler_lease")).all() == [(None,)]
        assert (await conn.exec_driver_sql("PRAGMA foreign_keys")).scalar() == 1
    repo = ExchangeRepository(session_factory(engine))
    assert (await repo.get(row.id)).answer == "ok"
    await repo.add(make_row(confidence=None, confidence_parts={"unavailable": "no logprobs"}))  # now nullable
    await engine.dispose()
