"""The HTTP face of every failure: `{"error": {"type", "message", "param", "code"}}` (OpenAI style).

One table (`STATUS`) maps the services' domain errors (`gateway.core.errors`) to HTTP statuses; the
handlers here also turn Litestar's own exceptions (validation, auth, routing, body size) into that
shape. Anything unexpected becomes a 500 with a generic message; the traceback goes to the log
only, never to the client.
"""

from __future__ import annotations

import math

import structlog
from litestar import MediaType, Request, Response
from litestar.exceptions import (
    HTTPException,
    NotAuthorizedException,
    PermissionDeniedException,
    ValidationException,
)
from litestar.status_codes import HTTP_500_INTERNAL_SERVER_ERROR

from gateway.chat.protocol import error_body
from gateway.core.errors import (
    Conflict,
    DomainError,
    GenerationFailed,
    InvalidRequest,
    NotFound,
    PermissionDenied,
    TooManyRequests,
    Unavailable,
)
from gateway.core.pii import scrubber

log = structlog.get_logger(__name__)

STATUS: dict[type[DomainError], int] = {
    InvalidRequest: 400,
    PermissionDenied: 403,
    NotFound: 404,
    Conflict: 409,
    TooManyRequests: 429,
    GenerationFailed: 500,
    Unavailable: 503,
}


def http_status(exc: DomainError) -> int:
    """The status of a domain error: its nearest class in `STATUS` (a bare DomainError is a 400)."""
    return next((STATUS[cls] for cls in type(exc).__mro__ if cls in STATUS), 400)


def _response(status: int, message: str, param=None, code=None, headers=None) -> Response:
    """An error can quote what the client sent (an unknown model name, a bad value): scrubbed first."""
    return Response(error_body(status, scrubber().scrub(message) or message, param, code), status_code=status,
                    media_type=MediaType.JSON, headers=headers)


def _domain_error(_: Request, exc: DomainError) -> Response:
    headers = {"Retry-After": str(math.ceil(exc.retry_after))} if exc.retry_after is not None else None
    return _response(http_status(exc), exc.message, exc.param, exc.code, headers)


def _validation_error(_: Request, exc: ValidationException) -> Response:
    details = exc.extra if isinstance(exc.extra, list) else []
    if details and isinstance(details[0], dict):
        first = details[0]
        param = first.get("key") or None
        message = str(first.get("message", exc.detail))
        if message.startswith("Extra inputs are not permitted") and param:
            message = f"Unrecognized request argument supplied: {param}"
        elif param:
            message = f"Invalid value for '{param}': {message}"
        return _response(400, message, param, "invalid_value")
    detail = exc.detail or "Invalid request"
    if "JSON" in detail or "decode" in detail.lower():
        detail = "We could not parse the JSON body of your request. Send valid JSON with Content-Type: application/json."
    return _response(400, detail, None, "invalid_request")


def _http_error(_: Request, exc: HTTPException) -> Response:
    status = exc.status_code
    if isinstance(exc, NotAuthorizedException):
        return _response(401, exc.detail, None, "invalid_api_key", {"WWW-Authenticate": "Bearer"})
    if isinstance(exc, PermissionDeniedException):
        if "CSRF" in (exc.detail or ""):
            return _response(403, "CSRF token missing or invalid: reload the page and submit the form again.",
                             None, "csrf_failed")
        return _response(403, exc.detail, None, "insufficient_role")
    messages = {
        404: "Not found: no such route",
        405: "Method not allowed for this route",
        413: "Request body too large",
    }
    message = exc.detail if exc.detail and exc.detail not in {"Not Found", "Method Not Allowed"} else messages.get(status, exc.detail)
    if status == 413:
        message = "Request body too large for this server (server.max_body_bytes)"
    headers = dict(getattr(exc, "headers", None) or {})
    if status == 429:  # Litestar's rate limiter says when the window resets; clients read Retry-After
        headers.setdefault("Retry-After", headers.get("RateLimit-Reset", "1"))
        message = ("Too many requests for this API key (limits.requests_per_minute); retry after "
                   f"{headers['Retry-After']} s")
    if status >= 500:
        log.error("http.server_error", status=status, detail=exc.detail)
        message = "The server had an error processing your request"
    return _response(status, message, None, "rate_limited" if status == 429 else None, headers or None)


def _too_deep(request: Request, exc: RecursionError) -> Response:
    """msgspec refuses JSON nested deeper than Python's recursion limit with a RecursionError."""
    if "deserializ" in str(exc):
        return _response(400, "The JSON body is nested too deeply.", None, "invalid_request")
    return _unexpected(request, exc)


def _unexpected(_: Request, exc: Exception) -> Response:
    log.exception("http.unhandled_exception", error_type=type(exc).__name__)
    return _response(HTTP_500_INTERNAL_SERVER_ERROR, "The server had an error processing your request")


exception_handlers = {
    DomainError: _domain_error,
    ValidationException: _validation_error,
    HTTPException: _http_error,
    RecursionError: _too_deep,
    Exception: _unexpected,
}
