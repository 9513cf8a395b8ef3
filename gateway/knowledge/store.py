"""The knowledge base: one Chroma collection of embedded chunks.

Embedded `PersistentClient` under `<data_dir>/chroma` by default, `HttpClient` when `rag.chroma_url`
is set. Vectors always come from our own `Embedder`. All methods block: call them from a worker
thread (`asyncio.to_thread`) in the gateway.

Ingestion is per *source* (a file name): an unchanged file (same content hash) is a no-op; a changed
one is upserted and its chunks that no longer exist are deleted afterwards, so searches never see
an empty gap; if the upsert fails, chunks it added are removed again (nothing half-ingested).

Search is hybrid by default (`rag.search`): the embedding neighbours and a BM25 ranking of the
same chunks (`lexical.py`) are fused by reciprocal rank. Every write stamps a new
`lexical_version` in the collection's metadata; a searcher rebuilds its BM25 index when the stamp
differs from the one it indexed (checked at most every `rag.lexical_refresh_s`, at once after a
write of its own), so replicas sharing a Chroma server stay in step with ingest and delete.
A hit's `score` is always the embedding cosine similarity, whichever ranking found it, so the
confidence signals and `rag.min_score` mean the same thing in both modes.
"""

from __future__ import annotations

import functools
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator, NamedTuple
from urllib.parse import urlparse

import numpy as np
import structlog

from gateway.core.settings import RagSettings
from gateway.knowledge.documents import Chunk, content_hash, parse
from gateway.knowledge.embeddings import Embedder
from gateway.knowledge.lexical import LexicalIndex, cosine, rrf

log = structlog.get_logger(__name__)
_WRITE_BATCH = 256
_READ_PAGE = 5000
_VERSION_KEY = "lexical_version"
REVIEWED_SOURCE = "reviewed-answers.jsonl"  # reviewers' corrections, published by each retraining run (reserved)
_QUESTION_CACHE = 4096  # entry questions whose embedding is kept (384 floats each: ~6 MB)


class Search(NamedTuple):
    """One search's hits and the retrieval signals the confidence calibrator learns from."""

    hits: list[Hit]
    rival: float | None  # the best similarity of any other candidate than the first-ranked entry
    question_match: float | None  # query vs the first-ranked entry's own question (Q&A entries only)


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
    embedded: int = 0  # chunks whose vectors were computed (the others' stored vectors were reused)

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
        self._lexical: LexicalIndex | None = None
        self._lexical_lock = threading.Lock()
        self._lexical_checked = 0.0
        self._lexical_stale = True  # this process wrote since the index was built
        # an entry's question embedded alone (chunks are embedded with their answer), least recently
        # used evicted: the same popular entries come back again and again
        self._question_vector = functools.lru_cache(maxsize=_QUESTION_CACHE)(lambda q: self.embedder.embed([q])[0])

    # ---- writing --------------------------------------------------------------------------
    def ingest_bytes(self, source: str, data: bytes, fmt: str | None = None,
                     progress: Callable[[int, int], None] | None = None, max_bytes: int | None = None) -> IngestResult:
        """Parse (raises DocumentError before touching the collection), embed, then write. `max_bytes`:
        the size cap (`rag.max_document_bytes`, an upload's; the product's own sources set theirs)."""
        chunks = parse(source, data, fmt=fmt, chunk_chars=self.cfg.chunk_chars, chunk_overlap=self.cfg.chunk_overlap,
                       max_bytes=self.cfg.max_document_bytes if max_bytes is None else max_bytes)
        return self.ingest_chunks(source, chunks, content_hash(data), progress)

    def ingest_chunks(self, source: str, chunks: list[Chunk], digest: str,
                      progress: Callable[[int, int], None] | None = None) -> IngestResult:
        existing = self.collection.get(where={"source": source}, include=["metadatas", "documents", "embeddings"])
        old_ids = set(existing["ids"])
        if old_ids and all(m.get("content_hash") == digest for m in existing["metadatas"]) \
                and old_ids == {c.id for c in chunks}:
            return IngestResult(source, len(chunks), 0, 0, 0, True)
        now = datetime.now(timezone.utc).isoformat()
        # a changed file re-embeds only the chunks whose text changed (a one-line edit of a large FAQ
        # costs one embedding, not thousands), if the stored vectors come from this same model
        old_vectors = existing["embeddings"] if existing["embeddings"] is not None else []
        stored = {i: (doc, vec) for i, doc, meta, vec in zip(existing["ids"], existing["documents"],
                                                             existing["metadatas"], old_vectors)
                  if (meta or {}).get("embedder") == self.embedder.identity}
        todo = [n for n, c in enumerate(chunks) if c.id not in stored or stored[c.id][0] != c.text]
        fresh = self.embedder.embed([chunks[n].text for n in todo], progress) if todo else []
        vectors = [np.asarray(stored[c.id][1], dtype=np.float32) if c.id in stored else None for c in chunks]
        for n, vec in zip(todo, fresh):
            vectors[n] = vec
        meta_extra = {"content_hash": digest, "ingested_at": now, "embedder": self.embedder.identity}
        added_ids: list[str] = []
        try:
            for start in range(0, len(chunks), _WRITE_BATCH):
                batch = chunks[start : start + _WRITE_BATCH]
                self.collection.upsert(
                    ids=[c.id for c in batch],
                    embeddings=[v.tolist() for v in vectors[start : start + _WRITE_BATCH]],
                    documents=[c.text for c in batch],
                    metadatas=[{**c.metadata, **meta_extra} for c in batch],
                )
                added_ids += [c.id for c in batch if c.id not in old_ids]
        except Exception:
            if added_ids:
                self.collection.delete(ids=added_ids)
            self._stamp()  # whatever the upsert changed before it failed
            raise
        new_ids = {c.id for c in chunks}
        stale = sorted(old_ids - new_ids)
        for start in range(0, len(stale), _WRITE_BATCH):
            self.collection.delete(ids=stale[start : start + _WRITE_BATCH])
        self._stamp()
        result = IngestResult(source, len(chunks), len(new_ids - old_ids), len(new_ids & old_ids), len(stale), False,
                              len(todo))
        log.info("kb.ingested", **result.as_dict())
        return result

    def delete_source(self, source: str) -> int:
        ids = self.collection.get(where={"source": source}, include=[])["ids"]
        for start in range(0, len(ids), _WRITE_BATCH):
            self.collection.delete(ids=ids[start : start + _WRITE_BATCH])
        if ids:
            self._stamp()
        return len(ids)

    def _stamp(self) -> None:
        """Tell every searcher (this process at once, others within `rag.lexical_refresh_s`) that the
        chunks changed and the BM25 index must be rebuilt."""
        self._lexical_stale = True
        self.collection.modify(metadata={_VERSION_KEY: uuid.uuid4().hex})
        if self.cfg.search == "hybrid":  # rebuild now, in the writer's thread, not in a customer's search
            with self._lexical_lock:
                self._refresh()

    # ---- reading --------------------------------------------------------------------------
    def search(self, query: str, k: int, min_score: float | None = None) -> list[Hit]:
        """The `k` best chunks for `query` whose cosine similarity is at least `min_score`
        (`rag.min_score` when None): embedding neighbours, fused with BM25 in hybrid mode."""
        return self.search_detailed(query, k, min_score, signals=False).hits

    def search_detailed(self, query: str, k: int, min_score: float | None = None, *, signals: bool = True) -> Search:
        """`search`, with the signals of how sure the retrieval is (`Search`), for the confidence
        calibrator: the best rival of the first-ranked entry (which may be more similar than it, when
        the fusion ranked it first) and how well that entry's own question matches the query. They
        cost one more candidate and one short embedding (cached); `signals=False` skips them."""
        if self.collection.count() == 0:
            return Search([], None, None)
        vector = self.embedder.embed([query])[0]
        hybrid = self.cfg.search == "hybrid"
        res = self.collection.query(query_embeddings=[vector.tolist()],
                                    n_results=max(k, self.cfg.candidates) if hybrid else max(k, 2),
                                    include=["documents", "metadatas", "distances"])
        dense = [
            Hit(i, doc, 1.0 - float(dist), meta or {})
            for i, doc, meta, dist in zip(res["ids"][0], res["documents"][0], res["metadatas"][0], res["distances"][0])
        ]
        ranked = self._fuse(query, vector, dense, k) if hybrid else dense[:k]
        floor = self.cfg.min_score if min_score is None else min_score
        hits = [h for h in ranked if h.score >= floor]
        if not ranked or not signals:
            return Search(hits, None, None)
        first = ranked[0]
        rival = max((h.score for h in dense + ranked[1:] if h.id != first.id), default=None)
        question = first.metadata.get("question")
        match = float(cosine(vector, self._question_vector(question)[None, :])[0]) if question else None
        return Search(hits, rival, match)

    def _fuse(self, query: str, vector: np.ndarray, dense: list[Hit], k: int) -> list[Hit]:
        lexical = self.lexical_index().search(query, max(k, self.cfg.candidates))
        fused = rrf([[h.id for h in dense], [i for i, _ in lexical]], self.cfg.rrf_k,
                    [1.0, self.cfg.lexical_weight])[:k]
        by_id = {h.id: h for h in dense}
        missing = [i for i, _ in fused if i not in by_id]
        if missing:  # found by BM25 alone: fetch it and score it by the same cosine
            got = self.collection.get(ids=missing, include=["documents", "metadatas", "embeddings"])
            if got["ids"]:
                sims = cosine(vector, np.asarray(got["embeddings"], dtype=np.float32))
                for i, doc, meta, sim in zip(got["ids"], got["documents"], got["metadatas"], sims):
                    by_id[i] = Hit(i, doc, float(sim), meta or {})
        return [by_id[i] for i, _ in fused if i in by_id]  # a chunk deleted since indexing is skipped

    def lexical_index(self) -> LexicalIndex:
        """The BM25 index of the collection as it is now. The first one is built before answering;
        after that a search never waits for a rebuild (~10 s at 100k chunks): while one runs —
        in the writer's thread after its own write, or in the background when another process's
        write is noticed — searches use the previous index."""
        index = self._lexical
        fresh = time.monotonic() - self._lexical_checked < self.cfg.lexical_refresh_s
        if index is not None and not self._lexical_stale and fresh:
            return index
        if index is None:
            with self._lexical_lock:
                return self._refresh()
        if not self._lexical_lock.acquire(blocking=False):
            return index  # a rebuild is under way
        self._lexical_lock.release()
        threading.Thread(target=self._refresh_locked, name="bm25-rebuild", daemon=True).start()
        return index

    def _refresh_locked(self) -> None:
        with self._lexical_lock:
            self._refresh()

    def _refresh(self) -> LexicalIndex:
        """Rebuild if stale (call with the lock held). A failed rebuild keeps the previous index and
        is retried at the next search."""
        try:
            version = self._stored_version()
            self._lexical_checked = time.monotonic()
            if self._lexical is None or self._lexical_stale or version != self._lexical.version \
                    or self._lexical.ngram != self.cfg.lexical_ngram:
                self._lexical_stale = False  # before reading: a write during the read marks it again
                self._lexical = self._build_lexical(version)
        except Exception:
            self._lexical_stale = True
            if self._lexical is None:
                raise
            log.exception("kb.lexical_rebuild_failed")
        return self._lexical

    def _stored_version(self) -> str:
        collection = self.client.get_collection(self.collection_name, embedding_function=None)
        return str((collection.metadata or {}).get(_VERSION_KEY, ""))

    def _build_lexical(self, version: str) -> LexicalIndex:
        started = time.perf_counter()
        ids, texts = [], []
        for page in self._pages(["documents", "metadatas"]):
            for i, doc, meta in zip(page["ids"], page["documents"], page["metadatas"]):
                title = (meta or {}).get("title") or ""
                ids.append(i)
                texts.append(f"{title}\n{doc}" if title else doc)  # a Q&A entry's question counts twice
        index = LexicalIndex.build(ids, texts, version, self.cfg.lexical_ngram)
        log.info("kb.lexical_indexed", chunks=len(ids), seconds=round(time.perf_counter() - started, 2))
        return index

    def _pages(self, include: list[str]) -> Iterator[dict]:
        """The whole collection, `_READ_PAGE` chunks at a time."""
        offset = 0
        while True:
            page = self.collection.get(include=include, limit=_READ_PAGE, offset=offset)
            yield page
            if len(page["ids"]) < _READ_PAGE:
                return
            offset += _READ_PAGE

    def count(self) -> int:
        return self.collection.count()

    def stats(self) -> dict:
        sources: dict[str, int] = {}
        for page in self._pages(["metadatas"]):
            for meta in page["metadatas"]:
                src = (meta or {}).get("source", "?")
                sources[src] = sources.get(src, 0) + 1
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
