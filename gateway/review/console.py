"""The review console's pages: the queue (HTMX-refreshed), an item with its conversation, signals
and the teacher's draft, labelling (approve / correct / reject, or "use the draft"), releasing a
claim, and agreement stats. Handlers only translate between forms/pages and `ReviewService`."""

from __future__ import annotations

from typing import Annotated, Literal

from litestar import Request, Response, get, post
from litestar.di import NamedDependency
from litestar.params import FromPath, QueryParameter
from litestar.plugins.htmx import HTMXRequest
from litestar.response import Redirect, Template
from pydantic import BaseModel, ConfigDict, Field

from gateway.api.errors import http_status
from gateway.calibration.service import CalibrationService
from gateway.chat.service import ChatService
from gateway.console.auth import FORM, ConsolePages, page, signed_in
from gateway.core.errors import DomainError, NotFound
from gateway.core.security import Principal
from gateway.review.service import ReviewService, same_text

# The draft's shortcut, by the rules of console.js (no modifier, not while typing). Served from the
# console's own origin because the pages' CSP allows no inline script; loaded by item.html, and
# guarded so pages swapped in by hx-boost do not add the listener twice.


class LabelForm(BaseModel):
    model_config = ConfigDict(extra="ignore")

    verdict: str = Field("", max_length=20)
    corrected_answer: str = Field("", max_length=100_000)
    note: str = Field("", max_length=100_000)
    proposed_answer_id: int | None = Field(None, ge=0)


class ReviewConsoleController(ConsolePages):
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
            except DomainError:
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
                        review_service: NamedDependency[ReviewService],
                        start: Annotated[Literal["draft"] | None, QueryParameter()] = None) -> Template:
        """`?start=draft`: the correction box starts from the teacher's draft (to edit it)."""
        me = signed_in(request)
        return await self._item(request, review_service, me, item_id, claim=True, start_from_draft=start == "draft")

    async def _item(self, request: Request, service: ReviewService, me: Principal, item_id: int, claim: bool,
                    error: str | None = None, status_code: int = 200, form: LabelForm | None = None,
                    start_from_draft: bool = False) -> Template:
        claim_error = None
        if claim:
            try:
                await service.claim(item_id, me)
            except NotFound as exc:
                return page("error.html", request, status_code=404, message=exc.message)
            except DomainError as exc:
                claim_error = exc.message
        try:
            item = await service.item_detail(item_id)
        except DomainError as exc:
            return page("error.html", request, status_code=http_status(exc), message=exc.message)
        mine = next((x for x in item["labels"] if x["reviewer"] == me.name), None)
        can_label = item["status"] in ("open", "escalated") and mine is None and (
            item["claimed_by"] in (None, me.name))
        draft = item["draft"]
        return page("item.html", request, status_code=status_code, item=item, mine=mine, can_label=can_label,
                    claim_error=claim_error if not mine and item["status"] in ("open", "escalated") else None,
                    error=error, form=form, threshold=service.cfg.confidence_threshold,
                    draft_is_proposal=same_text(draft, item["proposed_answer"]["text"]),
                    prefill=draft if start_from_draft and draft else None,
                    draft_threshold=service.cfg.teacher.min_similarity)

    @post("/items/{item_id:int}/label", status_code=303)
    async def label(self, request: Request, item_id: FromPath[int], data: Annotated[LabelForm, FORM],
                    review_service: NamedDependency[ReviewService]) -> Response:
        me = signed_in(request)
        verdict = data.verdict
        corrected = data.corrected_answer.strip() if verdict == "correct" else None
        error = None
        if verdict == "draft":  # "use the draft": approve it when it is the proposal, else correct with it
            try:
                shown = await review_service.item_detail(item_id, with_draft=False)
            except NotFound as exc:
                return page("error.html", request, status_code=404, message=exc.message)
            if not shown["draft"]:
                error = "This item has no teacher draft to use."
            elif same_text(shown["draft"], shown["proposed_answer"]["text"]):
                verdict = "approve"
            else:
                verdict, corrected = "correct", shown["draft"]
        if error is None and verdict not in ("approve", "correct", "reject"):
            error = "Choose approve, correct or reject."
        elif error is None and verdict == "correct" and not corrected:
            error = "Write the corrected answer before choosing Correct."
        if error is None and verdict == "correct":
            try:
                item = await review_service.item_detail(item_id, with_draft=False)
            except DomainError:
                item = None  # unknown item: the label call below says so
            if item and " ".join(corrected.split()) == " ".join(item["proposed_answer"]["text"].split()):
                error = "The answer is unchanged: edit it, or choose Approve."
        if error is None:
            try:
                await review_service.label(item_id, me, verdict, corrected, data.note.strip() or None,
                                           data.proposed_answer_id)
                return Redirect(f"/console?done={item_id}", status_code=303)
            except NotFound as exc:
                return page("error.html", request, status_code=404, message=exc.message)
            except DomainError as exc:
                error, status = exc.message, http_status(exc)
        else:
            status = 400
        return await self._item(request, review_service, me, item_id, claim=False, error=error,
                                status_code=status, form=data)

    @post("/items/{item_id:int}/release", status_code=303)
    async def release(self, request: Request, item_id: FromPath[int],
                      review_service: NamedDependency[ReviewService]) -> Response:
        try:
            await review_service.release(item_id, signed_in(request))
        except DomainError:
            pass  # nothing held: going back to the queue is still right
        return Redirect("/console", status_code=303)

    @get("/stats")
    async def stats_page(self, request: Request, review_service: NamedDependency[ReviewService],
                         calibration_service: NamedDependency[CalibrationService],
                         chat_service: NamedDependency[ChatService]) -> Template:
        stats = await review_service.stats()
        peak = max((b["count"] for b in stats["confidence_histogram"]["bins"]), default=0) or 1
        split = chat_service.split
        calibration = await calibration_service.overview([v for v in (split.champion, split.challenger) if v])
        return page("stats.html", request, stats=stats, peak=peak, calibration=calibration)
