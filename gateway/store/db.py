"""Database engine, sessions and migrations (SQLite WAL by default, PostgreSQL via asyncpg)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import event
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
MAX_ROW_ID = 2**62  # integer primary keys stay below this; larger path ids would overflow the driver


def is_row_id(value: int) -> bool:
    """Whether `value` can be an integer primary key at all (so lookups of others are just "not found")."""
    return 0 < value < MAX_ROW_ID


def create_engine(url: str, connect_timeout_s: float = 10, statement_timeout_s: float = 30) -> AsyncEngine:
    """A database that stops answering fails requests within the timeouts instead of hanging them."""
    if url.startswith("sqlite"):
        # hide_parameters: a failed statement's error (and so the log) never carries the conversation it wrote
        engine = create_async_engine(url, connect_args={"timeout": 30}, hide_parameters=True)

        @event.listens_for(engine.sync_engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record) -> None:  # noqa: ANN001
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=FULL")  # an acknowledged write survives power loss
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        return engine
    connect_args = {"timeout": connect_timeout_s, "command_timeout": statement_timeout_s} if "asyncpg" in url else {}
    return create_async_engine(url, pool_pre_ping=True, hide_parameters=True, connect_args=connect_args,
                               pool_timeout=connect_timeout_s)


def session_factory(engine: AsyncEngine) -> async_sessionmaker:
    return async_sessionmaker(engine, expire_on_commit=False)


def alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", url)
    return cfg


async def migrate(engine: AsyncEngine, revision: str = "head") -> None:
    """Bring the schema to `revision` (head); runs on every start (idempotent).

    On SQLite, a batch ALTER (changing a column's nullability, say) rebuilds the table: copy, drop,
    rename. With foreign keys enforced, dropping a table other rows point at fails, so they are
    off while the migration runs (a PRAGMA outside the transaction, which is the only place
    SQLite honours it), checked afterwards, and on again before the connection goes back to the pool."""

    def _upgrade(connection: Connection) -> None:
        cfg = alembic_config(engine.url.render_as_string(hide_password=False))
        cfg.attributes["connection"] = connection
        command.upgrade(cfg, revision)

    sqlite = engine.url.get_backend_name() == "sqlite"
    async with engine.connect() as conn:
        if sqlite:
            await conn.exec_driver_sql("PRAGMA foreign_keys=OFF")
            await conn.commit()
        try:
            await conn.run_sync(_upgrade)
            await conn.commit()
            if sqlite:
                broken = (await conn.exec_driver_sql("PRAGMA foreign_key_check")).fetchall()
                if broken:
                    raise RuntimeError(f"the migration left {len(broken)} rows with dangling references, e.g. {broken[0]}")
        finally:
            if sqlite:
                await conn.rollback()
                await conn.exec_driver_sql("PRAGMA foreign_keys=ON")
                await conn.commit()
