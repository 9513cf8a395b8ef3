"""API-key authentication middleware and role guards for the HTTP layer.

Keys are looked up by `gateway.core.security.KeyStore` (sha256 digests, constant-time compare);
roles rank client < reviewer < admin: a higher role may do everything a lower one can.
"""

from __future__ import annotations

from litestar.connection import ASGIConnection
from litestar.exceptions import NotAuthorizedException, PermissionDeniedException
from litestar.handlers.base import BaseRouteHandler
from litestar.middleware import (
    AbstractAuthenticationMiddleware,
    AuthenticationResult,
    DefineMiddleware,
)

from gateway.core.security import ROLE_RANK, KeyStore, Principal
from gateway.core.settings import Settings

PUBLIC_PATHS = {"/health", "/ready"}  # load balancers and probes never hold a key
OBSERVABILITY_PATHS = ("/metrics", "/schema")


class ApiKeyAuthMiddleware(AbstractAuthenticationMiddleware):
    def __init__(self, app, keystore: KeyStore, observability_role: str | None = None, **kwargs) -> None:  # noqa: ANN001
        super().__init__(app, **kwargs)
        self._keystore = keystore
        self._observability_role = observability_role  # None: /metrics and /schema are open

    async def authenticate_request(self, connection: ASGIConnection) -> AuthenticationResult:
        header = connection.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if not header:
            raise NotAuthorizedException(
                "You didn't provide an API key. Send it as 'Authorization: Bearer <key>'."
            )
        if scheme.lower() != "bearer" or not token.strip():
            raise NotAuthorizedException("Malformed Authorization header; expected 'Bearer <key>'.")
        principal = self._keystore.lookup(token.strip())
        if principal is None:
            raise NotAuthorizedException("Incorrect API key provided.")
        role = self._observability_role
        if role and connection.url.path.startswith(OBSERVABILITY_PATHS) and ROLE_RANK[principal.role] < ROLE_RANK[role]:
            raise PermissionDeniedException(f"This endpoint needs the '{role}' role on this bind "
                                            f"(server.observability_min_role); key '{principal.name}' has '{principal.role}'.")
        return AuthenticationResult(user=principal, auth=None)


def auth_middleware(settings: Settings) -> DefineMiddleware:
    open_paths = PUBLIC_PATHS | (set(OBSERVABILITY_PATHS) if settings.server.observability_open else set())
    return DefineMiddleware(
        ApiKeyAuthMiddleware,
        keystore=KeyStore(settings.auth.keys),
        observability_role=None if settings.server.observability_open else settings.server.observability_min_role,
        # The console authenticates with its own signed session cookie (gateway/console).
        exclude=[rf"^{p}" for p in sorted(open_paths | {"/console"})],
    )


def rate_limit(settings: Settings) -> DefineMiddleware | None:
    """Litestar's rate limiter, keyed on the API key (after authentication, before the handler: a
    refused request costs no parsing, embedding or tokenising). None when switched off."""
    from litestar.middleware.rate_limit import RateLimitConfig

    if not settings.limits.requests_per_minute:
        return None

    def key_of(request) -> str:  # noqa: ANN001
        principal = request.scope.get("user")
        return f"key:{principal.name}" if isinstance(principal, Principal) else f"ip:{request.client.host if request.client else '-'}"

    return RateLimitConfig(rate_limit=("minute", settings.limits.requests_per_minute), identifier_for_request=key_of,
                           exclude=[r"^/(?!v1/)"]).middleware  # the API only: probes and the console are never limited


def require(role: str):
    """Guard factory: the caller's role must rank at least `role`. The guard is a coroutine because
    litestar runs a plain-function guard in a worker thread: a thread hop on every request (measured
    in bench/upstream.py's profile), for a dictionary lookup."""

    async def guard(connection: ASGIConnection, _: BaseRouteHandler) -> None:
        principal: Principal = connection.user
        if ROLE_RANK[principal.role] < ROLE_RANK[role]:
            raise PermissionDeniedException(
                f"This endpoint needs the '{role}' role; key '{principal.name}' has '{principal.role}'."
            )

    guard.__name__ = f"require_{role}"
    return guard
