"""API keys and roles: who a presented key is, and what a role may do (the HTTP middleware and
guards that use them are `gateway/api/auth.py`).

Keys are held only as sha256 digests and compared with `hmac.compare_digest` against every
configured digest (no early exit), so lookup time does not reveal which key nearly matched.
Roles are ordered client < reviewer < admin: a higher role may do everything a lower one can.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from dataclasses import dataclass

from gateway.core.settings import ApiKey, Settings

ROLE_RANK = {"client": 0, "reviewer": 1, "admin": 2}


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
