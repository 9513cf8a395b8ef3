"""Liveness and readiness probes (no auth)."""

from __future__ import annotations

from litestar import Response, get
from litestar.datastructures import State


@get("/health", tags=["health"], summary="Liveness: the process answers")
async def health() -> dict:
    return {"status": "ok"}


@get("/ready", tags=["health"], summary="Readiness: model and adapters loaded, database reachable")
async def ready(state: State) -> Response:
    engine = state.engine
    checks = {"model": bool(engine is not None and engine.ready), "database": False,
              "knowledge_base": state.get("kb") is not None,
              "adapters": bool(state.get("serving_ready"))}  # champion/challenger loaded and routed
    try:
        checks["database"] = await state.exchange_repository.ping()
    except Exception:  # noqa: BLE001 - any failure means "not ready"
        checks["database"] = False
    if state.get("startup_error"):
        checks["error"] = state.startup_error
    ok = checks["model"] and checks["database"] and checks["knowledge_base"] and checks["adapters"]
    return Response({"status": "ready" if ok else "not_ready", "checks": checks}, status_code=200 if ok else 503)
