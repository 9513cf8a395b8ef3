"""The HTTP side of logging: Litestar's structlog plugin for the log lines, and our own middleware
that gives every request an id (bound for every log line, echoed as X-Request-Id) and writes its
one access-log line: method, path, status and duration only.

Litestar's LoggingMiddleware is switched off: it writes a line for every body message, so a
streamed answer logged ~35 "HTTP Response" lines, each rendered and PII-scrubbed — measured as
about a third of the gateway's CPU per relayed token (bench/upstream.py, py-spy).
"""

from __future__ import annotations

import logging
import time
import uuid

import structlog
from litestar.logging.config import StructLoggingConfig
from litestar.plugins.structlog import StructlogConfig, StructlogPlugin
from litestar.types import ASGIApp, Message, Receive, Scope, Send

from gateway.core.logging import processors
from gateway.core.settings import LoggingSettings


def structlog_plugin(cfg: LoggingSettings) -> StructlogPlugin:
    level = getattr(logging, cfg.level.upper())
    return StructlogPlugin(
        StructlogConfig(
            structlog_logging_config=StructLoggingConfig(
                processors=processors(cfg.json_lines),
                wrapper_class=structlog.make_filtering_bound_logger(level),
                logger_factory=structlog.WriteLoggerFactory(),  # one write per line: never interleaved mid-line
                log_exceptions="debug",
            ),
            enable_middleware_logging=False,  # RequestContextMiddleware writes one line per request
        )
    )


access_log = structlog.get_logger("gateway.access")


class RequestContextMiddleware:
    """Give every request an id (honouring a sane incoming X-Request-Id), bind it for logs, echo it;
    log one `http.request` line when the request is over (a stream: after its last chunk, or when
    the client went away; status 0: the client left before any response was started)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        request_id = incoming if 0 < len(incoming) <= 64 and incoming.isprintable() else uuid.uuid4().hex
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(request_id=request_id)

        started, status = time.perf_counter(), 0

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception as exc:  # answered by Litestar's outer handler (401/403 from auth, 429): its status
            status = status or getattr(exc, "status_code", 500)
            raise
        finally:
            access_log.info("http.request", method=scope["method"], path=scope["path"], status_code=status,
                            duration_ms=round((time.perf_counter() - started) * 1000, 1))
