"""OpenAI-style error bodies for every failure: `{"error": {"type", "message", "param", "code"}}`.

Handlers here turn Litestar's own exceptions (validation, auth, routing, body size) and our
`ApiError` into that shape; anything unexpected becomes a 500 with a generic message and the
traceback goes to the log only, never to the client.
"""

from __future__ import annotations

import structlog
from litestar import MediaType, Request, Response
from litestar.exceptions import (
    HTTPException,
    NotAuthorizedException,
    PermissionDeniedException,
    ValidationException,
)
from litestar.status_codes import HTTP_500_INTERNAL_SERVER_ERROR

log = structlog.get_logger(__name__)

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "overloaded_error",
}


class CodedError(Exception):
    """A refusal from a service or store, with a machine-readable `code` the API passes on."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


class ApiError(Exception):
    """An error we mean to show the client."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {
        "error": {
            "type": _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error"),
            "message": message,
            "param": param,
            "code": code,
        }
    }


def _response(status: int, message: str, param=None, code=None, headers=None) -> Response:
    return Response(
        error_body(status, message, param, code), status_code=status, media_type=MediaType.JSON, headers=headers
    )


def _api_error(_: Request, exc: ApiError) -> Response:
    return _response(exc.status, exc.message, exc.param, exc.code, exc.headers)


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
    if status >= 500:
        log.error("http.server_error", status=status, detail=exc.detail)
        message = "The server had an error processing your request"
    return _response(status, message, None, None, getattr(exc, "headers", None))


def _unexpected(_: Request, exc: Exception) -> Response:
    log.exception("http.unhandled_exception", error_type=type(exc).__name__)
    return _response(HTTP_500_INTERNAL_SERVER_ERROR, "The server had an error processing your request")


exception_handlers = {
    ApiError: _api_error,
    ValidationException: _validation_error,
    HTTPException: _http_error,
    Exception: _unexpected,
}
