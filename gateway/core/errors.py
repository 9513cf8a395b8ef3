"""Domain errors: what a service refuses, and why, in words a caller can act on.

Services and repositories raise these and never an HTTP type; the HTTP layer maps each class to a
status in one table (`gateway.api.errors.STATUS`) and the console turns them into page messages. A
`code` is machine-readable (passed on as the OpenAI-style `error.code`), `param` names the offending
field, and `retry_after` (seconds) tells a caller of a temporary refusal when to come back.
"""

from __future__ import annotations


class DomainError(Exception):
    """A refusal the caller is meant to see (never a bug: those are plain exceptions)."""

    def __init__(self, message: str, code: str | None = None, *, param: str | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message, self.code, self.param, self.retry_after = message, code, param, retry_after


class InvalidRequest(DomainError):
    """The request cannot be served as asked (a limit, a malformed value, a missing field)."""


class PermissionDenied(DomainError):
    """The caller's role does not allow this."""


class NotFound(DomainError):
    """No such exchange, item, adapter, run, experiment or source."""


class Conflict(DomainError):
    """The current state forbids it (already labelled, busy, illegal transition, ...)."""


class TooManyRequests(DomainError):
    """A per-key limit: retry after `retry_after`."""


class Unavailable(DomainError):
    """Temporarily refused (loading, overloaded, a dependency down): retry after `retry_after`."""


class GenerationFailed(DomainError):
    """The engine failed while generating: nothing the caller did wrong."""
