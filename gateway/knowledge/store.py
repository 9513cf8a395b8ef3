"""The knowledge base: one Chroma collection of embedded chunks.

Embedded `PersistentClient` under `<data_dir>/chroma` by default, `HttpClient` when `rag.chroma_url`
is set. Vectors always come from our own `Embedder`. All methods block: call them from a worker
thread (`asyncio.to_thread`) in the gateway.

Ingestion is per *source* (a file name): an unchanged file (same content hash) is a no-op; a changed
one is upserted and its chunks that no longer exist are deleted afterwards, so searches never see
an empty gap; if the upsert fails, chunks it added are removed again (nothing half-ingested).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable
from urllib.parse import urlparse

import structlog

from gateway.core.settings import RagSettings
from gateway.knowledge.documents import Chunk, content_hash, parse
from gateway.knowledge.embeddings import Embedder

log = structlog.get_logger(__name__)
_WRITE_BATCH = 256


@dataclass(frozen=True)
class Hit:
    id: str
    text: str
    score: float
    metadata: dict

    def as_source(self) -> dict:
        meta = {k: v for k, v in self.metadata.items() if k in {"source", "title", "category", "question", "answer"} and v}
        return {"id": self.id, "text": self.text, "score": round(self.score, 4), **meta}


@dataclass(frozen=True)
class IngestResult:
    source: str
    chunks: int
    added: int
    updated: int
    removed: int
    unchanged: bool

    def as_dict(self) -> dict:
        return self.__dict__.copy()


def make_client(cfg: RagSettings, data_dir: Path):
    import chromadb
    from chromadb.config import Settings as ChromaSettings

    chroma_settings = ChromaSettings(anonymized_telemetry=False)
    if cfg.chroma_url:
        url = urlparse(cfg.chroma_url)
        return chromadb.HttpClient(host=url.hostname or "localhost", port=url.port or 8000,
                                   ssl=url.scheme == "https", settings=chroma_settings)
    path = data_dir / "chroma"
    path.mkdir(parents=True, exist_ok=True)
    return chromadb.PersistentClient(path=str(path), settings=chroma_settings)


class KnowledgeBase:
    def __init__(self, cfg: RagSettings, data_dir: Path, embedder: Embedder, collection: str | None = None) -> None:
        self.cfg = cfg
        self.embedder = embedder
        self.client = make_client(cfg, data_dir)
        self.collection_name = collection or cfg.collection
        self.collection = self.client.get_or_create_collection(
            self.collection_name, embedding_function=None, configuration={"hnsw": {"space": "cosine"}}
        )

    # ---- writing --------------------------------------------------------------------------
    def ingest_bytes(self, source: str, data: bytes, fmt: str | None = None,
                     progress: Callable[[int, int], None] | None = None) -> IngestResult:
        """Parse (raises DocumentError before touching the collection), embed, then write."""
        chunks = parse(source, data, fmt=fmt, chunk_chars=self.cfg.chunk_chars,
                       chunk_overlap=self.cfg.chunk_overlap, max_bytes=self.cfg.max_document_bytes)
        return self.ingest_chunks(source, chunks, content_hash(data), progress)

    def ingest_chunks(self, source: str, chunks: list[Chunk], digest: str,
                      progress: Callable[[int, int], None] | None = None) -> IngestResult:
        existing = self.collection.get(where={"source": source}, include=["metadatas"])
        old_ids = set(existing["ids"])
        if old_ids and all(m.get("content_hash") == digest for m in existing["metadatas"]) \
                and old_ids == {c.id for c in chunks}:
            return IngestResult(source, len(chunks), 0, 0, 0, True)
        now = datetime.now(timezone.utc).isoformat()
        vectors = self.embedder.embed([c.text for c in chunks], progress)
        added_ids: list[str] = []
        try:
            for start in range(0, len(chunks), _WRITE_BATCH):
                batch = chunks[start : start + _WRITE_BATCH]
                self.collection.upsert(
                    ids=[c.id for c in batch],
                    embeddings=[v.tolist() for v in vectors[start : start + _WRITE_BATCH]],
                    documents=[c.text for c in batch],
                    metadatas=[{**c.metadata, "content_hash": digest, "ingested_at": now} for c in batch],
                )
                added_ids += [c.id for c in batch if c.id not in old_ids]
        except Exception:
            if added_ids:
                self.collection.delete(ids=added_ids)
            raise
        new_ids = {c.id for c in chunks}
        stale = sorted(old_ids - new_ids)
        for start in range(0, len(stale), _WRITE_BATCH):
            self.collection.delete(ids=stale[start : start + _WRITE_BATCH])
        result = IngestResult(source, len(chunks), len(new_ids - old_ids), len(new_ids & old_ids), len(stale), False)
        log.info("kb.ingested", **result.as_dict())
        return result

    def delete_source(self, source: str) -> int:
        ids = self.collection.get(where={"source": source}, include=[])["ids"]
        for start in range(0, len(ids), _WRITE_BATCH):
            self.collection.delete(ids=ids[start : start + _WRITE_BATCH])
        return len(ids)

    # ---- reading --------------------------------------------------------------------------
    def search(self, query: str, k: int, min_score: float | None = None) -> list[Hit]:
        if self.collection.count() == 0:
            return []
        vector = self.embedder.embed([query])[0]
        res = self.collection.query(query_embeddings=[vector.tolist()], n_results=k,
                                    include=["documents", "metadatas", "distances"])
        hits = [
            Hit(i, doc, 1.0 - float(dist), meta or {})
            for i, doc, meta, dist in zip(res["ids"][0], res["documents"][0], res["metadatas"][0], res["distances"][0])
        ]
        floor = self.cfg.min_score if min_score is None else min_score
        return [h for h in hits if h.score >= floor]

    def count(self) -> int:
        return self.collection.count()

    def stats(self) -> dict:
        sources: dict[str, int] = {}
        offset = 0
        while True:
            page = self.collection.get(include=["metadatas"], limit=5000, offset=offset)
            for meta in page["metadatas"]:
                src = (meta or {}).get("source", "?")
                sources[src] = sources.get(src, 0) + 1
            if len(page["ids"]) < 5000:
                break
            offset += 5000
        return {"collection": self.collection_name, "chunks": sum(sources.values()), "sources": sources,
                "backend": "http" if self.cfg.chroma_url else "embedded"}


def ingest_demo_data(kb: KnowledgeBase, path: str, root: Path) -> IngestResult | None:
    """Make the quickstart answer bank questions: ingest the demo FAQ into an empty collection."""
    if not path or kb.count() > 0:
        return None
    file = Path(path) if Path(path).is_absolute() else root / path
    if not file.is_file():
        log.warning("kb.demo_data_missing", path=str(file))
        return None
    started = time.perf_counter()
    result = kb.ingest_bytes(file.name, file.read_bytes())
    log.info("kb.demo_data_ingested", chunks=result.chunks, seconds=round(time.perf_counter() - started, 1))
    return result
