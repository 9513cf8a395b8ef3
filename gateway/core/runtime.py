"""The runtime parts every entry point assembles the same way: the database, the engine and the
knowledge base.

One home used by the app, the CLI, the trainer process (offline evaluation), the benchmarks and the
tests, so nothing below the HTTP layer needs the app factory. The engine and the knowledge base
are imported where they are built: torch and transformers take seconds to import, and a command
that only opens the database (promote, export, `retrain` without `--now`) should not wait for them.
"""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager
from functools import partial
from typing import TYPE_CHECKING, AsyncIterator

import structlog
from sqlalchemy.ext.asyncio import async_sessionmaker

from gateway.core.settings import PROJECT_ROOT, Settings
from gateway.store.db import create_engine, migrate, session_factory

if TYPE_CHECKING:
    from gateway.engine.base import Engine
    from gateway.knowledge.store import KnowledgeBase

log = structlog.get_logger(__name__)


@asynccontextmanager
async def open_database(settings: Settings, *, migrate_schema: bool = True) -> AsyncIterator[async_sessionmaker]:
    """Sessions on the configured database, migrated to the head revision (unless the caller is a
    process that must not migrate, such as the trainer); the engine is disposed on exit."""
    settings.storage.data_dir.mkdir(parents=True, exist_ok=True)
    db = create_engine(settings.storage.resolved_database_url, settings.storage.connect_timeout_s,
                       settings.storage.statement_timeout_s)
    try:
        if migrate_schema:
            await migrate(db)
        yield session_factory(db)
    finally:
        try:  # a database that stopped answering must not hold up a process's exit
            await asyncio.wait_for(db.dispose(), settings.storage.connect_timeout_s)
        except asyncio.TimeoutError:
            log.warning("database.dispose_timed_out", seconds=settings.storage.connect_timeout_s)


def build_knowledge_base(settings: Settings, ingest_demo: bool = True) -> KnowledgeBase:
    """Blocking (loads the embedder, opens Chroma, may ingest the demo FAQ): run it in a thread."""
    from gateway.knowledge.embeddings import Embedder
    from gateway.knowledge.store import KnowledgeBase, ingest_demo_data

    settings.storage.data_dir.mkdir(parents=True, exist_ok=True)
    embedder = Embedder(settings.rag.embedding_model, batch_size=settings.rag.embedding_batch)
    kb = KnowledgeBase(settings.rag, settings.storage.data_dir, embedder)
    if ingest_demo:
        ingest_demo_data(kb, settings.rag.demo_data, PROJECT_ROOT)
    if settings.rag.search == "hybrid":
        kb.lexical_index()  # built before the first customer's search, not during it
    return kb


def build_engine(settings: Settings, *, borrowed: bool = False) -> Engine:
    """`engine.backend`: the in-process model, or an OpenAI-compatible upstream (vLLM).
    `borrowed`: a process that only borrows a shared upstream (the trainer's evaluation) and must
    unregister only the adapters it registered itself, never one a gateway serves."""
    if settings.engine.backend == "openai":
        from gateway.engine.upstream import UpstreamEngine

        return UpstreamEngine(settings.engine, max_context_tokens=settings.model.max_context_tokens,
                              release_foreign=not borrowed)
    from gateway.engine.local import LocalEngine
    from gateway.engine.model_files import resolve_base_model

    return LocalEngine(
        partial(resolve_base_model, settings.model.base, settings.storage.data_dir),
        dtype=settings.model.dtype,
        max_context_tokens=settings.model.max_context_tokens,
        max_batch=settings.engine.max_batch,
        max_queue=settings.engine.max_queue,
        torch_threads=settings.engine.torch_threads,
        prepack_rows=settings.engine.prepack_rows,
        prefill_chunk_tokens=settings.engine.prefill_chunk_tokens,
        kv_block_tokens=settings.engine.kv_block_tokens,
        prefix_cache_entries=settings.engine.prefix_cache_entries,
        prefix_min_tokens=settings.engine.prefix_min_tokens,
    )
