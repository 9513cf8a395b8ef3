"""Console sign-in and what every console page shares: the signed-in principal (re-checked against
the configured keys on each request), the guard that sends strangers to the sign-in page, the page
renderer, and the base controller the slices' console pages (`review/console.py`,
`experiments/console.py`) build on."""

from __future__ import annotations

import hashlib
import math
import time
from collections import deque
from typing import Annotated, Any
from urllib.parse import quote

from litestar import Controller, Request, Response, get, post
from litestar.connection import ASGIConnection
from litestar.datastructures import ResponseHeader
from litestar.enums import RequestEncodingType
from litestar.exceptions import NotAuthorizedException
from litestar.handlers.base import BaseRouteHandler
from litestar.params import Body, QueryParameter
from litestar.plugins.htmx import HTMXRequest
from litestar.response import Redirect, Template
from pydantic import BaseModel, ConfigDict, Field

from gateway.core.security import ROLE_RANK, KeyStore, Principal

FORM = Body(media_type=RequestEncodingType.URL_ENCODED)
# Every console response: no framing (clickjacking), scripts only from the console's own static files,
# no MIME sniffing, no referrer leaving the console, and pages holding customer conversations never cached.
SECURITY_HEADERS = [
    ResponseHeader(name="Content-Security-Policy", value=(
        "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
        "frame-ancestors 'none'; form-action 'self'; base-uri 'none'; object-src 'none'")),
    ResponseHeader(name="X-Frame-Options", value="DENY"),
    ResponseHeader(name="X-Content-Type-Options", value="nosniff"),
    ResponseHeader(name="Referrer-Policy", value="no-referrer"),
    ResponseHeader(name="Cache-Control", value="no-store"),
]


class LoginThrottle:
    """Failed console sign-ins per client address and per key tried, in a sliding window: past
    `max_failures` within `window_s`, sign-in answers 429 until the oldest failure leaves the window
    (a key-guessing script gets a handful of tries, a reviewer with a typo is not locked out for long)."""

    def __init__(self, max_failures: int, window_s: float) -> None:
        self.max_failures, self.window_s = max_failures, window_s
        self._failures: dict[str, deque[float]] = {}

    def _recent(self, who: str, now: float) -> deque[float]:
        times = self._failures.get(who, deque())
        while times and now - times[0] > self.window_s:
            times.popleft()
        return times

    def wait_s(self, whos: list[str]) -> int:
        now = time.monotonic()
        waits = [self.window_s - (now - times[0]) for who in whos
                 if len(times := self._recent(who, now)) >= self.max_failures]
        return max(1, math.ceil(max(waits))) if waits else 0

    def failed(self, whos: list[str]) -> None:
        now = time.monotonic()
        for who in whos:
            self._failures[who] = self._recent(who, now)
            self._failures[who].append(now)
        if len(self._failures) > 100_000:  # bounded memory under a spray of addresses
            self._failures = {k: v for k, v in self._failures.items() if self._recent(k, now)}


class LoginForm(BaseModel):
    model_config = ConfigDict(extra="ignore")  # the CSRF field rides along

    key: str = Field("", max_length=500)
    next: str = Field("/console", max_length=500)


def signed_in(request: ASGIConnection) -> Principal | None:
    """The principal in the session, re-checked against the configured keys (a removed or
    demoted key loses console access at its next request)."""
    data = request.session if "session" in request.scope else {}
    name, role = data.get("name"), data.get("role")
    keys = {k.name: k.role for k in request.app.state.settings.auth.keys}
    if not name or keys.get(name) != role or ROLE_RANK.get(role, -1) < ROLE_RANK["reviewer"]:
        return None
    return Principal(name, role)


def console_guard(connection: ASGIConnection, _: BaseRouteHandler) -> None:
    if signed_in(connection) is None:
        raise NotAuthorizedException("sign in")


def _to_login(request: Request, _: Exception) -> Response:
    target = request.url.path if request.method == "GET" else "/console"
    return Redirect(f"/console/login?next={quote(target)}", status_code=303)


def _safe_next(target: str) -> str:
    return target if target.startswith("/console") and not target.startswith("//") else "/console"


def page(name: str, request: Request, status_code: int = 200, **context: Any) -> Template:
    principal = signed_in(request)
    return Template(template_name=name, status_code=status_code,
                    context={"me": principal, "path": request.url.path, **context})


class ConsoleAuthController(Controller):
    path = "/console"
    include_in_schema = False
    response_headers = SECURITY_HEADERS

    @get("/login")
    async def login_page(self, request: Request, next: Annotated[str, QueryParameter(max_length=500)] = "/console") -> Template:
        return page("login.html", request, next=_safe_next(next), error=None)

    @post("/login", status_code=303)
    async def login(self, request: Request, data: Annotated[LoginForm, FORM]) -> Response:
        throttle: LoginThrottle = request.app.state.login_throttle
        who = [f"ip:{request.client.host if request.client else '-'}",
               "key:" + hashlib.sha256(data.key.strip().encode()).hexdigest()[:16]]
        wait = throttle.wait_s(who)
        if wait:
            response = page("login.html", request, status_code=429, next=_safe_next(data.next),
                            error=f"Too many failed sign-ins; try again in {wait} seconds.")
            response.headers["Retry-After"] = str(wait)
            return response
        principal = KeyStore(request.app.state.settings.auth.keys).lookup(data.key.strip()) if data.key else None
        error = None
        if principal is None:
            error = "That key is not valid."
        elif ROLE_RANK[principal.role] < ROLE_RANK["reviewer"]:
            error = f"Key '{principal.name}' has the '{principal.role}' role; the console needs a reviewer key."
        if error:
            throttle.failed(who)
            return page("login.html", request, status_code=401, next=_safe_next(data.next), error=error)
        request.set_session({"name": principal.name, "role": principal.role})
        return Redirect(_safe_next(data.next), status_code=303)

    @post("/logout", status_code=303)
    async def logout(self, request: Request) -> Response:
        request.clear_session()
        return Redirect("/console/login", status_code=303)


class ConsolePages(Controller):
    """Base of the signed-in console pages: guarded, HTMX-aware, strangers redirected to sign in."""

    path = "/console"
    include_in_schema = False
    response_headers = SECURITY_HEADERS
    guards = [console_guard]
    request_class = HTMXRequest
    exception_handlers = {NotAuthorizedException: _to_login}
