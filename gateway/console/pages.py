"""Console pages. Handlers only translate between forms/pages and the services (`ReviewService`,
`AdapterService` for experiments)."""

from __future__ import annotations

from typing import Annotated, Any
from urllib.parse import quote

from litestar import Controller, Request, Response, get, post
from litestar.connection import ASGIConnection
from litestar.di import NamedDependency
from litestar.enums import RequestEncodingType
from litestar.exceptions import NotAuthorizedException
from litestar.handlers.base import BaseRouteHandler
from litestar.params import Body, FromPath, QueryParameter
from litestar.plugins.htmx import HTMXRequest
from litestar.response import Redirect, Template
from pydantic import BaseModel, ConfigDict, Field

from gateway.adapters import AdapterService
from gateway.errors import ApiError
from gateway.review import ReviewService
from gateway.security import ROLE_RANK, KeyStore, Principal

FORM = Body(media_type=RequestEncodingType.URL_ENCODED)


class LoginForm(BaseModel):
    model_config = ConfigDict(extra="ignore")  # the CSRF field rides along

    key: str = Field("", max_length=500)
    next: str = Field("/console", max_length=500)


class VersionForm(BaseModel):
    model_config = ConfigDict(extra="ignore")

    version: str = Field("", max_length=20)


class LabelForm(BaseModel):
    model_config = ConfigDict(extra="ignore")

    verdict: str = Field("", max_length=20)
    corrected_answer: str = Field("", max_length=100_000)
    note: str = Field("", max_length=100_000)
    proposed_answer_id: int | None = Field(None, ge=0)


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

    @get("/login")
    async def login_page(self, request: Request, next: Annotated[str, QueryParameter(max_length=500)] = "/console") -> Template:
        return page("login.html", request, next=_safe_next(next), error=None)

    @post("/login", status_code=303)
    async def login(self, request: Request, data: Annotated[LoginForm, FORM]) -> Response:
        principal = KeyStore(request.app.state.settings.auth.keys).lookup(data.key.strip()) if data.key else None
        error = None
        if principal is None:
            error = "That key is not valid."
        elif ROLE_RANK[principal.role] < ROLE_RANK["reviewer"]:
            error = f"Key '{principal.name}' has the '{principal.role}' role; the console needs a reviewer key."
        if error:
            return page("login.html", request, status_code=401, next=_safe_next(data.next), error=error)
        request.set_session({"name": principal.name, "role": principal.role})
        return Redirect(_safe_next(data.next), status_code=303)

    @post("/logout", status_code=303)
    async def logout(self, request: Request) -> Response:
        request.clear_session()
        return Redirect("/console/login", status_code=303)


class ConsoleController(Controller):
    path = "/console"
    include_in_schema = False
    guards = [console_guard]
    request_class = HTMXRequest
    exception_handlers = {NotAuthorizedException: _to_login}

    @get("/")
    async def queue_page(self, request: HTMXRequest, review_service: NamedDependency[ReviewService],
                         done: Annotated[int | None, QueryParameter(ge=0)] = None,
                         empty: Annotated[bool, QueryParameter()] = False) -> Template:
        me = signed_in(request)
        items = await review_service.queue(me, review_service.settings.console.page_size)
        notice = None
        if done:
            try:
                item = await review_service.item_detail(done)
            except ApiError:
                item = None
            if item:
                notice = f"Saved your label on item {done}: it is now {item['status']}."
        if empty:
            notice = "Nothing left in the queue for you right now."
        return page("queue.html", request, items=items, notice=notice)

    @get("/queue/rows")
    async def queue_rows(self, request: HTMXRequest, review_service: NamedDependency[ReviewService]) -> Response:
        """The queue table body, for HTMX polling; a plain browser gets the whole page."""
        if not request.htmx:
            return Redirect("/console", status_code=303)
        items = await review_service.queue(signed_in(request), review_service.settings.console.page_size)
        return page("_rows.html", request, items=items)

    @post("/next", status_code=303)
    async def next_item(self, request: Request, review_service: NamedDependency[ReviewService]) -> Response:
        item = await review_service.next_item(signed_in(request))
        return Redirect(f"/console/items/{item['id']}" if item else "/console?empty=true", status_code=303)

    @get("/items/{item_id:int}")
    async def item_page(self, request: Request, item_id: FromPath[int],
                        review_service: NamedDependency[ReviewService]) -> Template:
        me = signed_in(request)
        return await self._item(request, review_service, me, item_id, claim=True)

    async def _item(self, request: Request, service: ReviewService, me: Principal, item_id: int, claim: bool,
                    error: str | None = None, status_code: int = 200, form: LabelForm | None = None) -> Template:
        claim_error = None
        if claim:
            try:
                await service.claim(item_id, me)
            except ApiError as exc:
                if exc.status == 404:
                    return page("error.html", request, status_code=404, message=exc.message)
                claim_error = exc.message
        try:
            item = await service.item_detail(item_id)
        except ApiError as exc:
            return page("error.html", request, status_code=exc.status, message=exc.message)
        mine = next((x for x in item["labels"] if x["reviewer"] == me.name), None)
        can_label = item["status"] in ("open", "escalated") and mine is None and (
            item["claimed_by"] in (None, me.name))
        return page("item.html", request, status_code=status_code, item=item, mine=mine, can_label=can_label,
                    claim_error=claim_error if not mine and item["status"] in ("open", "escalated") else None,
                    error=error, form=form, threshold=service.cfg.confidence_threshold)

    @post("/items/{item_id:int}/label", status_code=303)
    async def label(self, request: Request, item_id: FromPath[int], data: Annotated[LabelForm, FORM],
                    review_service: NamedDependency[ReviewService]) -> Response:
        me = signed_in(request)
        verdict = data.verdict
        corrected = data.corrected_answer.strip() if verdict == "correct" else None
        error = None
        if verdict not in ("approve", "correct", "reject"):
            error = "Choose approve, correct or reject."
        elif verdict == "correct" and not corrected:
            error = "Write the corrected answer before choosing Correct."
        if error is None and verdict == "correct":
            try:
                item = await review_service.item_detail(item_id)
            except ApiError:
                item = None  # unknown item: the label call below says so
            if item and " ".join(corrected.split()) == " ".join(item["proposed_answer"]["text"].split()):
                error = "The answer is unchanged: edit it, or choose Approve."
        if error is None:
            try:
                await review_service.label(item_id, me, verdict, corrected, data.note.strip() or None,
                                           data.proposed_answer_id)
                return Redirect(f"/console?done={item_id}", status_code=303)
            except ApiError as exc:
                if exc.status == 404:
                    return page("error.html", request, status_code=404, message=exc.message)
                error, status = exc.message, exc.status
        else:
            status = 400
        return await self._item(request, review_service, me, item_id, claim=False, error=error,
                                status_code=status, form=data)

    @post("/items/{item_id:int}/release", status_code=303)
    async def release(self, request: Request, item_id: FromPath[int],
                      review_service: NamedDependency[ReviewService]) -> Response:
        try:
            await review_service.release(item_id, signed_in(request))
        except ApiError:
            pass  # nothing held: going back to the queue is still right
        return Redirect("/console", status_code=303)

    @get("/stats")
    async def stats_page(self, request: Request, review_service: NamedDependency[ReviewService]) -> Template:
        stats = await review_service.stats()
        peak = max((b["count"] for b in stats["confidence_histogram"]["bins"]), default=0) or 1
        return page("stats.html", request, stats=stats, peak=peak)

    # ---- experiments ---------------------------------------------------------------------------
    @get("/experiments")
    async def experiments_page(self, request: Request, adapter_service: NamedDependency[AdapterService]) -> Template:
        notice = request.session.pop("notice", None) if "session" in request.scope else None  # after an action
        return await self._experiments(request, adapter_service, notice=notice)

    async def _experiments(self, request: Request, service: AdapterService, status_code: int = 200,
                           notice: str | None = None, error: str | None = None) -> Template:
        overview = await service.experiments_overview()
        return page("experiments.html", request, status_code=status_code, o=overview,
                    chart=experiment_chart(overview["current"]), notice=notice, error=error)

    @post("/experiments/{action:str}", status_code=303)
    async def experiment_action(self, request: Request, action: FromPath[str], data: Annotated[VersionForm, FORM],
                                adapter_service: NamedDependency[AdapterService]) -> Response:
        me = signed_in(request)
        if me.role != "admin":
            return await self._experiments(request, adapter_service, 403,
                                           error=f"Only admins decide experiments; key '{me.name}' has '{me.role}'.")
        try:
            if action == "evaluate":
                result = await adapter_service.evaluate(me.name)
                notice = f"Evaluated: {result['action']} — {result['reason']}"
            elif action in ("promote", "retire") and data.version:
                act = adapter_service.promote if action == "promote" else adapter_service.retire
                result = await act(data.version, me.name)
                notice = f"{data.version} is now {result['state']}."
            elif action == "rollback":
                notice = f"Rolled back: {(await adapter_service.rollback(me.name))['champion']} is champion."
            else:
                return await self._experiments(request, adapter_service, 404, error=f"Unknown action '{action[:30]}'.")
        except ApiError as exc:
            return await self._experiments(request, adapter_service, exc.status, error=exc.message)
        request.session["notice"] = notice[:300]
        return Redirect("/console/experiments", status_code=303)


def experiment_chart(view: dict | None, width: int = 600, height: int = 220) -> dict:
    """SVG coordinates for the cumulative thumbs-up rate per arm (server-side: no chart library)."""
    left, right, top, bottom = 40, width - 10, 10, height - 20
    ticks = [{"y": bottom - (bottom - top) * v, "label": f"{int(v * 100)}%"} for v in (0, 0.25, 0.5, 0.75, 1.0)]
    lines = {"champion": "", "challenger": ""}
    for arm in lines:
        pts = [(left + (right - left) * p["fraction"], bottom - (bottom - top) * p[arm])
               for p in (view or {}).get("timeline", []) if p[arm] is not None]
        lines[arm] = " ".join(f"{x:.1f},{y:.1f}" for x, y in pts)
    return {"width": width, "height": height, "left": left, "right": right, "ticks": ticks, **lines}
