"""The HTTP side of logging: Litestar's structlog plugin (access log with method, path and status
only) and a request id for every request, bound for every log line and echoed as X-Request-Id."""

from __future__ import annotations

import logging
import uuid

import structlog
from litestar.logging.config import StructLoggingConfig
from litestar.middleware.logging import LoggingMiddlewareConfig
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
            middleware_logging_config=LoggingMiddlewareConfig(
                request_log_fields=("path", "method"),
                response_log_fields=("status_code",),
            ),
        )
    )


class RequestContextMiddleware:
    """Give every request an id (honouring a sane incoming X-Request-Id), bind it for logs, echo it."""

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

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", request_id.encode())]
            await send(message)

        await self.app(scope, receive, send_with_id)
