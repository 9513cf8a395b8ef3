"""structlog setup: JSON lines carrying request_id / exchange_id from contextvars.

Message contents never go to info-level logs: the access log records method, path and status
only (no bodies, headers or query strings), and the chat service logs ids, counts and scores.
"""

from __future__ import annotations

import logging
import sys
import uuid

import structlog
from litestar.logging.config import StructLoggingConfig
from litestar.middleware.logging import LoggingMiddlewareConfig
from litestar.plugins.structlog import StructlogConfig, StructlogPlugin
from litestar.types import ASGIApp, Message, Receive, Scope, Send

from gateway.settings import LoggingSettings


def _processors(json_lines: bool) -> list:
    return [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info if json_lines else structlog.dev.set_exc_info,
        structlog.processors.JSONRenderer() if json_lines else structlog.dev.ConsoleRenderer(),
    ]


def configure_logging(cfg: LoggingSettings) -> None:
    """Configure structlog for code that runs outside the app (CLI, startup). Logs go to stderr so
    a command's own output on stdout stays machine-readable."""
    level = getattr(logging, cfg.level.upper())
    logging.basicConfig(level=level, format="%(message)s")
    structlog.configure(
        processors=_processors(cfg.json_lines),
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.WriteLoggerFactory(file=sys.stderr),  # one write per line
        cache_logger_on_first_use=False,
    )


def structlog_plugin(cfg: LoggingSettings) -> StructlogPlugin:
    level = getattr(logging, cfg.level.upper())
    return StructlogPlugin(
        StructlogConfig(
            structlog_logging_config=StructLoggingConfig(
                processors=_processors(cfg.json_lines),
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
