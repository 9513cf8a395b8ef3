"""The review console: server-rendered pages for support staff (Litestar templates + HTMX).

Sign-in exchanges a reviewer (or admin) API key for a signed, encrypted session cookie; every
form is CSRF-protected; the core actions are plain HTML forms, so they work without JavaScript.
HTMX only adds conveniences (boosted navigation, a queue that refreshes itself) and a small
script adds keyboard shortcuts.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from litestar.config.csrf import CSRFConfig
from litestar.middleware.session.client_side import CookieBackendConfig
from litestar.plugins.jinja import JinjaTemplateEngine
from litestar.static_files import create_static_files_router
from litestar.template.config import TemplateConfig

from gateway.core.security import stored_secret
from gateway.core.settings import Settings

HERE = Path(__file__).resolve().parent
# Cookies (session, CSRF) belong to the console only; the JSON API uses bearer keys, no ambient credentials.
NOT_CONSOLE = [r"^/v1/", r"^/health", r"^/ready", r"^/metrics", r"^/schema"]
SESSION_COOKIE = "tellerloop_session"
CSRF_COOKIE = "tellerloop_csrf"


def session_secret(settings: Settings) -> bytes:
    """32 bytes: from `console.session_secret`, or generated once into `<data_dir>/console_secret`."""
    return stored_secret(settings.storage.data_dir, "console_secret", settings.console.session_secret)


def session_config(settings: Settings, secret: bytes) -> CookieBackendConfig:
    return CookieBackendConfig(
        secret=secret, key=SESSION_COOKIE, max_age=settings.console.session_max_age_s, path="/console",
        secure=settings.console.secure_cookies, httponly=True, samesite="strict", exclude=NOT_CONSOLE,
    )


def csrf_config(settings: Settings, secret: bytes) -> CSRFConfig:
    return CSRFConfig(
        secret=hashlib.sha256(b"csrf" + secret).hexdigest(), cookie_name=CSRF_COOKIE, cookie_path="/console",
        cookie_secure=settings.console.secure_cookies, cookie_samesite="strict", exclude=NOT_CONSOLE,
    )


def template_config() -> TemplateConfig:
    return TemplateConfig(directory=HERE / "templates", engine=JinjaTemplateEngine)


def static_router():
    return create_static_files_router(path="/console/static", directories=[HERE / "static"],
                                      include_in_schema=False, name="console_static")
