"""Application factory: wires settings → store → engine → services → controllers."""

from __future__ import annotations

import asyncio
import gc
from contextlib import asynccontextmanager
from typing import AsyncIterator

import structlog
from litestar import Litestar
from litestar.datastructures import State
from litestar.di import Provide
from litestar.openapi import OpenAPIConfig
from litestar.plugins.htmx import HTMXPlugin
from litestar.plugins.prometheus import PrometheusConfig, PrometheusController
from litestar.plugins.pydantic import PydanticPlugin

from gateway import console
from gateway.adapters import shipped
from gateway.adapters.controller import AdaptersController, DynamicLoraController
from gateway.adapters.registry import AdapterRegistry
from gateway.adapters.service import AdapterService
from gateway.api.auth import auth_middleware, rate_limit
from gateway.api.errors import exception_handlers
from gateway.api.health import health, ready
from gateway.api.logging import RequestContextMiddleware, structlog_plugin
from gateway.calibration.controller import CalibrationController
from gateway.calibration.repository import Calibrators
from gateway.calibration.service import CalibrationService
from gateway.chat.controller import ChatController
from gateway.chat.service import ChatService
from gateway.console.auth import ConsoleAuthController, LoginThrottle
from gateway.core import metrics
from gateway.core.memory import trim_heap
from gateway.core.runtime import build_engine, build_knowledge_base, open_database
from gateway.core.security import CustomerIds
from gateway.core.settings import Settings
from gateway.engine.base import Engine
from gateway.engine.threads import in_own_thread, on_all_cores
from gateway.exchanges.controller import ExchangesController
from gateway.exchanges.repository import ExchangeRepository
from gateway.experiments.console import ExperimentsConsoleController
from gateway.experiments.controller import ExperimentsController
from gateway.experiments.repository import Experiments
from gateway.experiments.service import ExperimentService
from gateway.knowledge.controller import KnowledgeController
from gateway.review.console import ReviewConsoleController
from gateway.review.controller import ExchangeSignalsController, ReviewController
from gateway.review.repository import ReviewRepository
from gateway.review.service import ReviewService
from gateway.runs.control import Retrainer
from gateway.runs.controller import RetrainingController
from gateway.runs.lease import Lease, replica_id
from gateway.runs.scheduler import (
    ScheduledJobs,
    make_scheduler,
    retrain_anchor,
    schedule_bootstrap,
)
from gateway.runs.service import RunService

log = structlog.get_logger(__name__)


SERVICES = ("chat_service", "exchange_repository", "review_service", "adapter_service", "experiment_service",
            "run_service", "calibration_service")


def _provider(name: str):  # noqa: ANN202 - a Litestar dependency provider reading one service off app.state
    def provide(state: State) -> object:
        return state[name]
    return Provide(provide, sync_to_thread=False)


class _MetricsController(PrometheusController):
    path = "/metrics"


def create_app(settings: Settings, engine: Engine | None = None) -> Litestar:
    engine = engine or build_engine(settings)
    secret = console.session_secret(settings)

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        async with open_database(settings) as sessions:
            repo = ExchangeRepository(sessions)
            app.state.exchange_repository = repo
            reviews = ReviewRepository(sessions, settings.review)
            customers = CustomerIds.from_settings(settings)
            app.state.review_service = ReviewService(
                settings, reviews, embedder=lambda: app.state.kb.embedder if app.state.kb is not None else None,
                customers=customers, kb=lambda: app.state.kb)
            await app.state.review_service.refresh_queue_gauge()
            chat = app.state.chat_service = ChatService(settings, engine, repo, reviews, customers)
            interrupted_streams = await repo.settle_interrupted(chat.served_by)  # a killed predecessor's
            if interrupted_streams:
                log.warning("exchange.interrupted_streams", count=interrupted_streams, served_by=chat.served_by)
            retrainer = Retrainer(settings, sessions, kb=lambda: app.state.kb,
                                  on_adapter_ready=lambda: app.state.adapter_service.reconcile())
            registry = AdapterRegistry(sessions, settings.storage.data_dir)
            await shipped.install(settings, registry, Calibrators(sessions))  # a fresh install's first champion
            experiments = Experiments(settings, sessions, registry)
            serving = app.state.adapter_service = AdapterService(settings, engine, chat, registry, experiments)
            app.state.experiment_service = ExperimentService(settings, experiments, serving)
            app.state.run_service = RunService(retrainer)
            calibration = app.state.calibration_service = CalibrationService(settings, Calibrators(sessions))
            lease = app.state.lease = Lease(sessions, replica_id(settings.server.port), settings.server.scheduler_lease_s)
            scheduler = make_scheduler(settings, ScheduledJobs(retrainer, serving, calibration, lease),
                                       anchor=await retrain_anchor(retrainer))
            scheduler.start(paused=True)  # the jobs need the model: resumed once it is loaded
            if settings.retraining.enabled and await retrainer.bootstrap_due():
                schedule_bootstrap(scheduler, settings)
            metrics.ENGINE_QUEUED.set_function(lambda: engine.stats()["queued"])
            metrics.ENGINE_ACTIVE.set_function(lambda: engine.stats()["active"])
            metrics.ENGINE_KV_BYTES.set_function(lambda: engine.stats().get("kv_cache_bytes", 0))
            metrics.ENGINE_ADAPTER_BYTES.set_function(lambda: engine.stats().get("adapter_bytes", 0))
            metrics.ENGINE_STEPS.set_function(lambda: engine.stats().get("steps", 0))
            metrics.ENGINE_STEP_SECONDS.set_function(lambda: engine.stats().get("step_ms", 0) / 1000)
            metrics.ENGINE_TOKENS.set_function(lambda: engine.stats().get("tokens", 0))
            metrics.ENGINE_PREFIX_HITS.set_function(lambda: engine.stats().get("prefix_hits", 0))

            async def load_knowledge() -> None:
                try:
                    # on all cores, on a thread whose OpenMP team ends with it (engine/threads.py)
                    kb = await in_own_thread(on_all_cores(build_knowledge_base), settings)
                    app.state.kb = app.state.chat_service.kb = kb
                    metrics.KB_CHUNKS.set(kb.count())
                except Exception as exc:  # noqa: BLE001
                    log.exception("kb.start_failed")
                    app.state.startup_error = f"knowledge base: {type(exc).__name__}: {exc}"

            async def load() -> None:
                # In the background so /health answers during the first start's model conversion.
                try:
                    await asyncio.gather(engine.start(), load_knowledge())
                    if getattr(engine, "dtype", None):  # the local engine: which dtype "auto" chose on this CPU
                        metrics.ENGINE_DTYPE.labels(engine.dtype).set(1)
                    await app.state.adapter_service.reconcile()
                    # Runs a stopped process left behind: adopt live trainers, complete finished ones, fail the rest
                    # (after the engine is up, so a completed run's adapter can be put in service).
                    interrupted = await retrainer.mark_interrupted()
                    if interrupted:
                        log.warning("retrain.interrupted_runs_failed", runs=interrupted)
                    if settings.server.gc_freeze:  # what startup built (~600k objects) leaves the collector's full passes
                        gc.collect()  # its garbage first: frozen objects are never collected
                        gc.freeze()
                    if settings.server.trim_heap:  # what startup freed goes back to the OS (core/memory.py)
                        await asyncio.to_thread(trim_heap)
                    app.state.serving_ready = True
                    await lease.tick()  # lead at once if nobody does (a single gateway, the first replica)
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
                gc.unfreeze()  # an app stopped in a process that goes on (tests) can be collected
                scheduler.shutdown(wait=False)
                try:  # another replica leads at its next tick; a database that hangs must not hold up the stop
                    await asyncio.wait_for(lease.release(), 3)
                except asyncio.TimeoutError:
                    log.warning("lease.release_timed_out")
                for task in list(retrainer.tasks):
                    task.cancel()
                await asyncio.gather(*retrainer.tasks, return_exceptions=True)
                await engine.stop()

    return Litestar(
        route_handlers=[ChatController, ExchangesController, ExchangeSignalsController, ReviewController,
                        AdaptersController, DynamicLoraController, ExperimentsController, RetrainingController, CalibrationController,
                        KnowledgeController, health, ready, _MetricsController,
                        ConsoleAuthController, ReviewConsoleController, ExperimentsConsoleController,
                        console.static_router()],
        dependencies={name: _provider(name) for name in SERVICES},
        state=State({"settings": settings, "engine": engine, "kb": None, "startup_error": None,
                     "serving_ready": False,
                     "login_throttle": LoginThrottle(settings.console.login_max_failures,
                                                     settings.console.login_window_s)}),
        lifespan=[lifespan],
        middleware=[
            RequestContextMiddleware,
            PrometheusConfig(app_name="tellerloop", prefix="tellerloop_http", group_path=True,
                             exclude=["/metrics"]).middleware,
            auth_middleware(settings),
            *([limiter] if (limiter := rate_limit(settings)) else []),
            console.session_config(settings, secret).middleware,
        ],
        csrf_config=console.csrf_config(settings, secret),
        template_config=console.template_config(),
        # responses leave out what a model was not given (optional source metadata): the wire shape is the data
        plugins=[structlog_plugin(settings.logging), HTMXPlugin(), PydanticPlugin(exclude_unset=True)],
        exception_handlers=exception_handlers,
        request_max_body_size=settings.server.max_body_bytes,
        openapi_config=OpenAPIConfig(title="tellerloop", version="0.1.0", path="/schema"),
        debug=False,
    )
