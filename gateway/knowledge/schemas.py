"""Response models of the knowledge-base endpoints (`/v1/knowledge`), key for key."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class IngestResult(BaseModel):
    """POST /v1/knowledge/documents."""

    model_config = ConfigDict(extra="forbid")

    source: str
    chunks: int = Field(description="chunks the document has now")
    added: int
    updated: int
    removed: int = Field(description="chunks of the previous version that no longer exist")
    unchanged: bool = Field(description="same content as already ingested: nothing was written")
    embedded: int = Field(0, description="chunks embedded by this ingest; the vectors of chunks whose text did not "
                                         "change are reused")


class DeleteResult(BaseModel):
    """DELETE /v1/knowledge/documents."""

    model_config = ConfigDict(extra="forbid")

    source: str
    deleted: int = Field(description="chunks removed")


class SearchHit(BaseModel):
    """One chunk (a search result, or a source a chat answer was shown); metadata it does not have
    (or has empty) is left out."""

    model_config = ConfigDict(extra="forbid")

    id: str
    text: str
    score: float = Field(description="cosine similarity to the query, rounded to 4 places")
    source: str | None = Field(None, description="the document it came from")
    title: str | None = None
    category: str | None = None
    question: str | None = None
    answer: str | None = None


class SearchResult(BaseModel):
    """GET /v1/knowledge/search."""

    model_config = ConfigDict(extra="forbid")

    query: str
    results: list[SearchHit] = Field(description="best first")


class KnowledgeStats(BaseModel):
    """GET /v1/knowledge/stats."""

    model_config = ConfigDict(extra="forbid")

    collection: str
    chunks: int
    sources: dict[str, int] = Field(description="source → chunk count")
    backend: Literal["embedded", "http"]
