"""Liveness and readiness probes (no auth)."""

from __future__ import annotations

from litestar import Response, get
from litestar.datastructures import State
from pydantic import BaseModel, ConfigDict, Field


class Health(BaseModel):
    model_config = ConfigDict(extra="forbid")
    status: str = Field(description="always 'ok' while the process answers")


class ReadyChecks(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: bool
    database: bool
    knowledge_base: bool
    adapters: bool = Field(description="the champion and challenger are loaded and routed")
    scheduler_leader: bool = Field(False, description="this replica holds the scheduler lease (runs the scheduled "
                                                      "retraining, experiment and calibration decisions)")
    error: str | None = Field(None, description="why start-up failed, if it did")


class Readiness(BaseModel):
    model_config = ConfigDict(extra="forbid")
    status: str = Field(description="ready | not_ready (then the status code is 503)")
    checks: ReadyChecks | None = Field(None, description="left out where observability is protected (server.observability)")


@get("/health", tags=["health"], summary="Liveness: the process answers")
async def health() -> Health:
    return Health(status="ok")


@get("/ready", tags=["health"], summary="Readiness: model and adapters loaded, database reachable")
async def ready(state: State) -> Response[Readiness]:
    engine = state.engine
    checks = {"model": bool(engine is not None and engine.ready), "database": False,
              "knowledge_base": state.get("kb") is not None,
              "adapters": bool(state.get("serving_ready"))}  # champion/challenger loaded and routed
    try:
        checks["database"] = await state.exchange_repository.ping()
    except Exception:  # noqa: BLE001 - any failure means "not ready"
        checks["database"] = False
    lease = state.get("lease")
    checks["scheduler_leader"] = bool(lease is not None and lease.held)
    if state.get("startup_error"):
        checks["error"] = state.startup_error
    ok = checks["model"] and checks["database"] and checks["knowledge_base"] and checks["adapters"]
    status = "ready" if ok else "not_ready"
    body = (Readiness(status=status, checks=ReadyChecks(**checks)) if state.settings.server.observability_open
            else Readiness(status=status))
    return Response(body, status_code=200 if ok else 503)
