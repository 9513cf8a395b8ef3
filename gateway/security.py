"""API-key authentication and role guards.

Keys are held only as sha256 digests and compared with `hmac.compare_digest` against every
configured digest (no early exit), so lookup time does not reveal which key nearly matched.
Roles are ordered client < reviewer < admin: a higher role may do everything a lower one can.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from dataclasses import dataclass

from litestar.connection import ASGIConnection
from litestar.exceptions import NotAuthorizedException, PermissionDeniedException
from litestar.handlers.base import BaseRouteHandler
from litestar.middleware import AbstractAuthenticationMiddleware, AuthenticationResult, DefineMiddleware

from gateway.settings import ApiKey, Settings

ROLE_RANK = {"client": 0, "reviewer": 1, "admin": 2}
PUBLIC_PATHS = {"/health", "/ready", "/metrics", "/schema"}


@dataclass(frozen=True)
class Principal:
    name: str
    role: str


class KeyStore:
    def __init__(self, keys: list[ApiKey]) -> None:
        self._entries = [(bytes.fromhex(k.digest), Principal(k.name, k.role)) for k in keys]

    def lookup(self, presented: str) -> Principal | None:
        digest = hashlib.sha256(presented.encode()).digest()
        found = None
        for candidate, principal in self._entries:
            if hmac.compare_digest(candidate, digest):
                found = principal
        return found


class ApiKeyAuthMiddleware(AbstractAuthenticationMiddleware):
    def __init__(self, app, keystore: KeyStore, **kwargs) -> None:  # noqa: ANN001
        super().__init__(app, **kwargs)
        self._keystore = keystore

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
        return AuthenticationResult(user=principal, auth=None)


def auth_middleware(settings: Settings) -> DefineMiddleware:
    return DefineMiddleware(
        ApiKeyAuthMiddleware,
        keystore=KeyStore(settings.auth.keys),
        # The console authenticates with its own signed session cookie (gateway/console).
        exclude=[rf"^{p}" for p in sorted(PUBLIC_PATHS | {"/console"})],
    )


def require(role: str):
    """Guard factory: the caller's role must rank at least `role`."""

    def guard(connection: ASGIConnection, _: BaseRouteHandler) -> None:
        principal: Principal = connection.user
        if ROLE_RANK[principal.role] < ROLE_RANK[role]:
            raise PermissionDeniedException(
                f"This endpoint needs the '{role}' role; key '{principal.name}' has '{principal.role}'."
            )

    guard.__name__ = f"require_{role}"
    return guard


def is_loopback(host: str) -> bool:
    if host in {"localhost", "localhost.localdomain"}:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class UnsafeBindError(RuntimeError):
    pass


def check_bind_safety(settings: Settings) -> None:
    """Refuse to serve with the documented dev keys anywhere but loopback."""
    dev = [k.name for k in settings.auth.keys if k.is_dev_key]
    if dev and not is_loopback(settings.server.host):
        raise UnsafeBindError(
            f"refusing to bind {settings.server.host}: the documented dev keys {dev} are configured. "
            "Configure your own keys (by sha256) in a --config file, or bind 127.0.0.1."
        )
    if not settings.auth.keys:
        raise UnsafeBindError("no API keys configured ([[auth.keys]]); nobody could use the server")
