"""Application factory: wires settings → store → engine → services → controllers."""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager
from datetime import datetime, timedelta, timezone
from typing import AsyncIterator

import structlog
from litestar import Litestar
from litestar.datastructures import State
from litestar.di import Provide
from litestar.openapi import OpenAPIConfig
from litestar.plugins.prometheus import PrometheusConfig, PrometheusController

from gateway import metrics
from gateway.api.chat import ChatController
from gateway.api.exchanges import ExchangesController
from gateway.api.health import health, ready
from gateway.api.knowledge import KnowledgeController
from gateway.api.review import ExchangeSignalsController, ReviewController
from gateway.api.adapters import AdaptersController, ExperimentsController, RetrainingController
from gateway.adapters import AdapterService
from retraining.jobs import Retrainer, drop_disabled_jobs, make_scheduler
from gateway.chat import ChatService
from gateway import console
from gateway.console.pages import ConsoleAuthController, ConsoleController
from litestar.plugins.htmx import HTMXPlugin
from gateway.errors import exception_handlers
from gateway.logging import RequestContextMiddleware, structlog_plugin
from gateway.security import auth_middleware
from gateway.engine.base import Engine
from gateway.runtime import build_engine, build_knowledge_base
from gateway.settings import Settings
from gateway.store.db import create_engine, migrate, session_factory
from gateway.store.exchanges import ExchangeRepository
from gateway.store.reviews import ReviewRepository
from gateway.review import ReviewService

log = structlog.get_logger(__name__)


def _chat_service(state: State) -> ChatService:
    return state.chat_service


def _exchange_repository(state: State) -> ExchangeRepository:
    return state.exchange_repository


def _review_service(state: State) -> ReviewService:
    return state.review_service


def _adapter_service(state: State) -> AdapterService:
    return state.adapter_service


class _MetricsController(PrometheusController):
    path = "/metrics"


def create_app(settings: Settings, engine: Engine | None = None) -> Litestar:
    engine = engine or build_engine(settings)
    secret = console.session_secret(settings)

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        settings.storage.data_dir.mkdir(parents=True, exist_ok=True)
        db = create_engine(settings.storage.resolved_database_url)
        await migrate(db)
        sessions = session_factory(db)
        repo = ExchangeRepository(sessions)
        app.state.exchange_repository = repo
        app.state.review_service = ReviewService(
            settings, ReviewRepository(sessions, settings.review),
            embedder=lambda: app.state.kb.embedder if app.state.kb is not None else None)
        await app.state.review_service.refresh_queue_gauge()
        app.state.chat_service = ChatService(settings, engine, repo)
        retrainer = Retrainer(settings, sessions, kb=lambda: app.state.kb,
                              on_adapter_ready=lambda: app.state.adapter_service.reconcile())
        app.state.adapter_service = AdapterService(settings, engine, app.state.chat_service, retrainer)
        scheduler = make_scheduler(settings, retrainer, app.state.adapter_service)
        scheduler.start(paused=True)  # the jobs need the model: resumed once it is loaded
        drop_disabled_jobs(scheduler, settings)
        if settings.retraining.enabled and await retrainer.bootstrap_due():
            first = datetime.now(timezone.utc) + timedelta(minutes=settings.retraining.bootstrap_delay_minutes)
            scheduler.modify_job("retrain", next_run_time=first)
            log.info("retrain.bootstrap_scheduled", at=first.isoformat(timespec="seconds"))
        metrics.ENGINE_QUEUED.set_function(lambda: engine.stats()["queued"])
        metrics.ENGINE_ACTIVE.set_function(lambda: engine.stats()["active"])
        metrics.ENGINE_KV_BYTES.set_function(lambda: engine.stats().get("kv_cache_bytes", 0))
        metrics.ENGINE_STEPS.set_function(lambda: engine.stats().get("steps", 0))
        metrics.ENGINE_STEP_SECONDS.set_function(lambda: engine.stats().get("step_ms", 0) / 1000)
        metrics.ENGINE_TOKENS.set_function(lambda: engine.stats().get("tokens", 0))
        metrics.ENGINE_PREFIX_HITS.set_function(lambda: engine.stats().get("prefix_hits", 0))

        async def load_knowledge() -> None:
            try:
                kb = await asyncio.to_thread(build_knowledge_base, settings)
                app.state.kb = app.state.chat_service.kb = kb
                metrics.KB_CHUNKS.set(kb.count())
            except Exception as exc:  # noqa: BLE001
                log.exception("kb.start_failed")
                app.state.startup_error = f"knowledge base: {type(exc).__name__}: {exc}"

        async def load() -> None:
            # In the background so /health answers during the first start's model conversion.
            try:
                await asyncio.gather(engine.start(), load_knowledge())
                await app.state.adapter_service.reconcile()
                # Runs a stopped process left behind: adopt live trainers, complete finished ones, fail the rest
                # (after the engine is up, so a completed run's adapter can be put in service).
                interrupted = await retrainer.mark_interrupted()
                if interrupted:
                    log.warning("retrain.interrupted_runs_failed", runs=interrupted)
                app.state.serving_ready = True
                scheduler.resume()
                log.info("gateway.ready", host=settings.server.host, port=settings.server.port)
            except Exception as exc:  # noqa: BLE001
                log.exception("engine.start_failed")
                app.state.startup_error = f"{type(exc).__name__}: {exc}"

        loader = asyncio.create_task(load())
        try:
            yield
        finally:
            loader.cancel()
            scheduler.shutdown(wait=False)
            for task in list(retrainer.tasks):
                task.cancel()
            await asyncio.gather(*retrainer.tasks, return_exceptions=True)
            await engine.stop()
            await db.dispose()

    return Litestar(
        route_handlers=[ChatController, ExchangesController, ExchangeSignalsController, ReviewController,
                        AdaptersController, ExperimentsController, RetrainingController,
                        KnowledgeController, health, ready, _MetricsController,
                        ConsoleAuthController, ConsoleController, console.static_router()],
        dependencies={
            "chat_service": Provide(_chat_service, sync_to_thread=False),
            "exchange_repository": Provide(_exchange_repository, sync_to_thread=False),
            "review_service": Provide(_review_service, sync_to_thread=False),
            "adapter_service": Provide(_adapter_service, sync_to_thread=False),
        },
        state=State({"settings": settings, "engine": engine, "kb": None, "startup_error": None,
                     "serving_ready": False}),
        lifespan=[lifespan],
        middleware=[
            RequestContextMiddleware,
            PrometheusConfig(app_name="tellerloop", prefix="tellerloop_http", group_path=True,
                             exclude=["/metrics"]).middleware,
            auth_middleware(settings),
            console.session_config(settings, secret).middleware,
        ],
        csrf_config=console.csrf_config(settings, secret),
        template_config=console.template_config(),
        plugins=[structlog_plugin(settings.logging), HTMXPlugin()],
        exception_handlers=exception_handlers,
        request_max_body_size=settings.server.max_body_bytes,
        openapi_config=OpenAPIConfig(title="tellerloop", version="0.1.0", path="/schema"),
        debug=False,
    )
