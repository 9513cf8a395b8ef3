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
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

import httpx

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


def stored_secret(data_dir: Path, name: str, configured: str = "") -> bytes:
    """32 bytes: from the configured value, or generated once into `<data_dir>/<name>` (mode 0600)."""
    if configured:
        return hashlib.sha256(configured.encode()).digest()
    path = Path(data_dir) / name
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_hex(32))
        os.replace(tmp, path)
    return hashlib.sha256(path.read_text().strip().encode()).digest()


class CustomerIds:
    """Customer ids as keyed hashes (HMAC-SHA256 with a server secret): the same `user` always gives
    the same id, so sticky A/B routing and feedback ownership work, two customers never share one
    (no scrubbing that would turn every e-mail into "[EMAIL]"), and what is stored cannot be turned
    back into an e-mail or phone number without the secret (an unkeyed hash could, by guessing)."""

    def __init__(self, secret: bytes) -> None:
        self._secret = secret

    @classmethod
    def from_settings(cls, settings: Settings) -> "CustomerIds":
        return cls(stored_secret(settings.storage.data_dir, "user_hash_secret", settings.pii.user_hash_secret))

    def key(self, user: str | None, kind: str = "user") -> str | None:
        """`kind` keeps a `user` and a session id with the same text apart."""
        if not user:
            return None
        digest = hmac.new(self._secret, f"{kind}\x00{user}".encode(), hashlib.sha256).hexdigest()
        return f"u_{digest[:40]}"


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


def safe_url(url: str) -> str:
    """A URL fit for logs and messages: without credentials, query or fragment."""
    u = httpx.URL(url)
    return str(u.copy_with(username=None, password=None, query=None, fragment=None))
