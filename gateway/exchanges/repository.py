"""Exchange log repository: the only code that reads or writes the `exchanges` table."""

from __future__ import annotations

import asyncio
import time
from typing import Awaitable, Callable

from sqlalchemy import delete, select, text, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from gateway.core.errors import Unavailable
from gateway.exchanges.models import STREAMING, Exchange
from gateway.store.base import iso_utc

SameTransaction = Callable[[AsyncSession, Exchange], Awaitable[None]]
STORAGE_ERRORS = (SQLAlchemyError, OSError, asyncio.TimeoutError)


class StorageUnavailable(Unavailable):
    """The exchange log cannot be written: the chat is refused (503), never answered unrecorded."""

    def __init__(self) -> None:
        super().__init__("The exchange log is unavailable (database); retry shortly.", code="storage_unavailable",
                         retry_after=5)


def exchange_record(row: Exchange) -> dict:
    """The full logged record of an exchange, as the API and the review console show it."""
    return {
        "id": row.id,
        "created_at": iso_utc(row.created_at),
        "completed_at": iso_utc(row.completed_at),
        "api_key_name": row.api_key_name,
        "user": row.user,
        "model": row.model_requested,
        "variant": row.variant,
        "messages": row.messages,
        "conversation": row.conversation,
        "answer": row.answer,
        "finish_reason": row.finish_reason,
        "error": row.error,
        "stream": row.stream,
        "rag": row.rag,
        "retrieval": row.retrieval,
        "retrieval_query": row.retrieval_query,
        "retrieval_ms": row.retrieval_ms,
        "sources": row.sources,
        "params": row.params,
        "usage": {"prompt_tokens": row.prompt_tokens, "completion_tokens": row.completion_tokens},
        "ttft_ms": row.ttft_ms,
        "latency_ms": row.latency_ms,
        "confidence": row.confidence,
        "confidence_parts": row.confidence_parts,
        "flagged": row.flagged,
    }


class ExchangeRepository:
    """Writes raise `StorageUnavailable` when the database fails; after a failure, `check()` pings it
    before the next chat is admitted, so chats are refused at once instead of generated and lost."""

    def __init__(self, sessions: async_sessionmaker, recheck_s: float = 30) -> None:
        self._sessions = sessions
        self._failed_at: float | None = None
        self._recheck_s = recheck_s

    async def _write(self, work) -> None:  # noqa: ANN001
        try:
            async with self._sessions() as session, session.begin():
                await work(session)
        except STORAGE_ERRORS as exc:
            self._failed_at = time.monotonic()
            raise StorageUnavailable() from exc
        self._failed_at = None

    async def check(self) -> None:
        """Cheap while healthy (no query); after a failure, one ping decides."""
        if self._failed_at is None or time.monotonic() - self._failed_at > self._recheck_s:
            return
        try:
            await self.ping()
        except STORAGE_ERRORS:
            self._failed_at = time.monotonic()
            raise StorageUnavailable() from None
        self._failed_at = None

    async def add(self, exchange: Exchange, also: SameTransaction | None = None) -> None:
        """Insert and commit; `also` writes its own rows in the same transaction (the review queue's
        item for an answer flagged at serving time), so both are durable or neither is. Returns only
        once the commit is done."""
        async def work(session: AsyncSession) -> None:
            session.add(exchange)
            if also is not None:
                await session.flush()
                await also(session, exchange)
        await self._write(work)

    async def open(self, exchange: Exchange) -> None:
        """Insert a streaming exchange before its first token; `finalise` completes it."""
        async def work(session: AsyncSession) -> None:
            session.add(exchange)
        await self._write(work)

    async def discard(self, exchange_id: str) -> None:
        """Remove a streaming row whose request the engine then refused (nothing was generated or
        sent): a refused request leaves no exchange, as when the refusal came before the row."""
        async def work(session: AsyncSession) -> None:
            await session.execute(delete(Exchange).where(Exchange.id == exchange_id, Exchange.finish_reason == STREAMING))
        await self._write(work)

    async def finalise(self, exchange: Exchange, also: SameTransaction | None = None) -> None:
        """Write the finished exchange over its streaming row (and `also`'s rows), in one transaction."""
        async def work(session: AsyncSession) -> None:
            merged = await session.merge(exchange)
            if also is not None:
                await session.flush()
                await also(session, merged)
        await self._write(work)

    async def settle_interrupted(self, served_by: str) -> int:
        """Streams a stopped gateway on this slot left unfinished become `error` rows; returns how many."""
        async with self._sessions() as session, session.begin():
            result = await session.execute(
                update(Exchange).where(Exchange.finish_reason == STREAMING, Exchange.served_by == served_by)
                .values(finish_reason="error", error="interrupted: the gateway stopped before the answer finished"))
            return result.rowcount or 0

    async def get(self, exchange_id: str) -> Exchange | None:
        async with self._sessions() as session:
            return await session.get(Exchange, exchange_id)

    async def recent(self, limit: int = 50) -> list[Exchange]:
        async with self._sessions() as session:
            rows = await session.scalars(select(Exchange).order_by(Exchange.created_at.desc()).limit(limit))
            return list(rows)

    async def ping(self) -> bool:
        async with self._sessions() as session:
            await session.execute(text("SELECT 1"))
        return True
