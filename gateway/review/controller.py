"""Feedback and flags on exchanges, the review queue, claims, labels, agreement stats, export."""

from __future__ import annotations

from typing import Annotated, Literal

from litestar import Controller, Request, Response, delete, get, post
from litestar.di import NamedDependency
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import FromPath, JSONBody, QueryParameter
from litestar.response import Stream
from pydantic import BaseModel, ConfigDict, Field

from gateway.api.auth import require
from gateway.core.errors import InvalidRequest
from gateway.core.text import Text
from gateway.review.schemas import (
    ClaimResult,
    FeedbackResult,
    FlagResult,
    LabelResult,
    QueueList,
    ReleaseResult,
    ReviewItemDetail,
    ReviewStats,
)
from gateway.review.service import ReviewService


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    rating: Literal["up", "down"]
    comment: Text | None = Field(None, max_length=2000)
    user: Text | None = Field(None, max_length=200, description="the `user` sent with the chat request, if any")


class FlagRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: Text = Field(min_length=1, max_length=2000)


class LabelRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    verdict: Literal["approve", "correct", "reject"]
    corrected_answer: Text | None = Field(None, max_length=100_000)
    note: Text | None = Field(None, max_length=100_000)
    proposed_answer_id: int | None = Field(
        None, ge=0, description="the proposal you reviewed (0 = the model's answer); 409 if it changed meanwhile")


class ExchangeSignalsController(Controller):
    path = "/v1/exchanges"
    tags = ["feedback"]

    @post("/{exchange_id:str}/feedback", guards=[require("client")], status_code=200,
          summary="Rate an exchange (one rating per exchange; posting again changes it)")
    async def feedback(self, request: Request, exchange_id: FromPath[str], data: JSONBody[FeedbackRequest],
                       review_service: NamedDependency[ReviewService]) -> FeedbackResult:
        if data.comment and len(data.comment) > review_service.cfg.max_note_chars:
            raise InvalidRequest(f"comment is longer than {review_service.cfg.max_note_chars} characters",
                           param="comment")
        return FeedbackResult.model_validate(
            await review_service.feedback(exchange_id, request.user, data.rating, data.comment, data.user))

    @post("/{exchange_id:str}/flags", guards=[require("reviewer")], status_code=201,
          summary="Staff flag: put an exchange in the review queue")
    async def flag(self, request: Request, exchange_id: FromPath[str], data: JSONBody[FlagRequest],
                   review_service: NamedDependency[ReviewService]) -> FlagResult:
        if not data.reason.strip():
            raise InvalidRequest("reason must not be blank", param="reason")
        return FlagResult.model_validate(await review_service.flag(exchange_id, request.user, data.reason.strip()))


class ReviewController(Controller):
    path = "/v1/review"
    guards = [require("reviewer")]
    tags = ["review"]

    @get("/queue", summary="Open items, highest priority first, without those you already labelled")
    async def queue(
        self, request: Request, review_service: NamedDependency[ReviewService],
        limit: Annotated[int, QueryParameter(ge=1, le=1_000_000)] = 20, offset: Annotated[int, QueryParameter(ge=0, le=1_000_000)] = 0,
    ) -> QueueList:
        cap = review_service.cfg.max_queue_limit
        if limit > cap:
            raise InvalidRequest(f"limit may be at most {cap}", param="limit")
        items = await review_service.queue(request.user, limit, offset)
        return QueueList.model_validate({"object": "list", "data": items})

    @post("/next", status_code=200, summary="Claim and return the top item nobody else holds (204: none left)",
          responses={204: ResponseSpec(None, description="nothing left in the queue for you")})
    async def next_item(self, request: Request,
                        review_service: NamedDependency[ReviewService]) -> Response[ReviewItemDetail]:
        item = await review_service.next_item(request.user)
        if item is None:
            return Response(None, status_code=204)
        return Response(ReviewItemDetail.model_validate(item))

    @get("/items/{item_id:int}", summary="One item: conversation, answer, sources, signals, labels, audit trail")
    async def item(self, item_id: FromPath[int], review_service: NamedDependency[ReviewService]) -> ReviewItemDetail:
        return ReviewItemDetail.model_validate(await review_service.item_detail(item_id))

    @post("/items/{item_id:int}/claim", status_code=200, summary="Reserve an item (expires after review.claim_ttl_s)")
    async def claim(self, request: Request, item_id: FromPath[int],
                    review_service: NamedDependency[ReviewService]) -> ClaimResult:
        return ClaimResult.model_validate(await review_service.claim(item_id, request.user))

    @delete("/items/{item_id:int}/claim", status_code=200, summary="Give a claimed item back")
    async def release(self, request: Request, item_id: FromPath[int],
                      review_service: NamedDependency[ReviewService]) -> ReleaseResult:
        return ReleaseResult.model_validate(await review_service.release(item_id, request.user))

    @post("/items/{item_id:int}/labels", status_code=201, summary="Approve, correct or reject an item's answer")
    async def label(self, request: Request, item_id: FromPath[int], data: JSONBody[LabelRequest],
                    review_service: NamedDependency[ReviewService]) -> LabelResult:
        cfg = review_service.cfg
        if data.corrected_answer and len(data.corrected_answer) > cfg.max_answer_chars:
            raise InvalidRequest(f"corrected_answer is longer than {cfg.max_answer_chars} characters",
                           param="corrected_answer")
        if data.note and len(data.note) > cfg.max_note_chars:
            raise InvalidRequest(f"note is longer than {cfg.max_note_chars} characters", param="note")
        return LabelResult.model_validate(await review_service.label(
            item_id, request.user, data.verdict, data.corrected_answer, data.note, data.proposed_answer_id))

    @get("/stats", summary="Queue counts, labels per reviewer, agreement (percent, Cohen's kappa), confidence histogram")
    async def stats(self, review_service: NamedDependency[ReviewService]) -> ReviewStats:
        return ReviewStats.model_validate(await review_service.stats())

    @get("/export", guards=[require("admin")], summary="Resolved items as chat-format JSONL (PII scrubbed)")
    async def export(self, review_service: NamedDependency[ReviewService]) -> Stream:
        return Stream(review_service.export_lines(), media_type="application/x-ndjson",
                      headers={"Content-Disposition": 'attachment; filename="reviewed.jsonl"'})
