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
