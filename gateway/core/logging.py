"""structlog setup: JSON lines carrying request_id / exchange_id from contextvars.

Message contents never go to info-level logs: the access log (`http.request`, one line per request)
records method, path, status and duration only (no bodies, headers or query strings), and the chat
service logs ids, counts and scores.
"""

from __future__ import annotations

import logging
import sys

import structlog

from gateway.core.pii import scrubber as default_scrubber
from gateway.core.settings import LoggingSettings

_NOT_TEXT = {"timestamp", "level", "request_id", "exchange_id", "variant", "logger"}


def scrub_event(_logger: object, _method: str, event: dict) -> dict:
    """Last line of defence: no log line carries customer data, whatever a caller put in it
    (string values are scrubbed; ids, counts and scores pass unchanged)."""
    scrubber = default_scrubber()
    for key, value in event.items():
        if isinstance(value, str) and key not in _NOT_TEXT:
            event[key] = scrubber.scrub(value)
    return event


def processors(json_lines: bool) -> list:
    return [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info if json_lines else structlog.dev.set_exc_info,
        scrub_event,  # after the traceback is formatted: it can quote a value
        structlog.processors.JSONRenderer() if json_lines else structlog.dev.ConsoleRenderer(),
    ]


def configure_logging(cfg: LoggingSettings) -> None:
    """Configure structlog for code that runs outside the app (CLI, startup). Logs go to stderr so
    a command's own output on stdout stays machine-readable."""
    level = getattr(logging, cfg.level.upper())
    logging.basicConfig(level=level, format="%(message)s")
    structlog.configure(
        processors=processors(cfg.json_lines),
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.WriteLoggerFactory(file=sys.stderr),  # one write per line
        cache_logger_on_first_use=False,
    )
