"""Knowledge base: ingest (admin), search and stats (reviewer), delete by source (admin)."""

from __future__ import annotations

import asyncio
from typing import Annotated, Literal

from litestar import Controller, Request, delete, get, post
from litestar.params import JSONBody, QueryParameter
from pydantic import BaseModel, ConfigDict, Field

from gateway.api.auth import require
from gateway.core import metrics
from gateway.core.errors import InvalidRequest, NotFound, Unavailable
from gateway.core.text import Text
from gateway.knowledge.documents import DocumentError
from gateway.knowledge.schemas import (
    DeleteResult,
    IngestResult,
    KnowledgeStats,
    SearchResult,
)
from gateway.knowledge.store import REVIEWED_SOURCE, KnowledgeBase


class IngestRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    source: Text = Field(min_length=1, max_length=200, description="file name; its extension picks the parser")
    content: Text = Field(min_length=1)
    format: Literal["text", "markdown", "csv", "jsonl"] | None = None


def _kb(request: Request) -> KnowledgeBase:
    kb = request.app.state.get("kb")
    if kb is None:
        raise Unavailable("The knowledge base is still loading; retry shortly.", code="knowledge_base_unavailable",
                       retry_after=5)
    return kb


class KnowledgeController(Controller):
    path = "/v1/knowledge"
    tags = ["knowledge"]

    @post("/documents", guards=[require("admin")], status_code=201, summary="Ingest (or replace) one document")
    async def ingest(self, request: Request, data: JSONBody[IngestRequest]) -> IngestResult:
        if data.source == REVIEWED_SOURCE:
            raise InvalidRequest(f"'{REVIEWED_SOURCE}' is reserved for reviewers' corrections, which each retraining "
                                 "run publishes (retraining.reviewed_answers_to_kb); choose another source name",
                                 param="source", code="reserved_source")
        kb = _kb(request)
        try:
            result = await asyncio.to_thread(kb.ingest_bytes, data.source, data.content.encode(), data.format)
        except DocumentError as exc:
            raise InvalidRequest(str(exc), param="content", code="invalid_document") from None
        metrics.KB_CHUNKS.set(kb.count())
        return IngestResult.model_validate(result.as_dict())

    @delete("/documents", guards=[require("admin")], status_code=200, summary="Delete every chunk of a source")
    async def delete_source(
        self, request: Request, source: Annotated[str, QueryParameter(min_length=1, max_length=200)]
    ) -> DeleteResult:
        kb = _kb(request)
        removed = await asyncio.to_thread(kb.delete_source, source)
        if not removed:
            raise NotFound(f"No documents from source '{source}'", param="source", code="not_found")
        metrics.KB_CHUNKS.set(kb.count())
        return DeleteResult(source=source, deleted=removed)

    @get("/search", guards=[require("reviewer")], summary="Semantic search over the knowledge base")
    async def search(
        self,
        request: Request,
        q: Annotated[str, QueryParameter(min_length=1, max_length=2000)],
        k: Annotated[int, QueryParameter(ge=1, le=50)] = 5,
    ) -> SearchResult:
        kb = _kb(request)
        hits = await asyncio.to_thread(kb.search, q, k, -1.0)
        return SearchResult.model_validate({"query": q, "results": [h.as_source() for h in hits]})

    @get("/stats", guards=[require("reviewer")], summary="Chunks per source")
    async def stats(self, request: Request) -> KnowledgeStats:
        return KnowledgeStats.model_validate(await asyncio.to_thread(_kb(request).stats))
