"""The lexical half of hybrid retrieval: a BM25 index (bm25s, English stemming and stop words) over
the knowledge base's chunk texts, and reciprocal-rank fusion of ranked lists.

Why: embeddings miss rewordings that keep the bank's own words ("NEFT", "Demat", "Platinum card")
and keyword matching misses the ones that do not; fusing the two ranks (RRF, Cormack et al. 2009)
needs no score calibration between them. The index is rebuilt whole from the collection — bm25s
indexes ~100k short chunks in seconds, and a rebuild is only needed after a write
(`KnowledgeBase` keeps it in step, across processes through a version stamp in the collection's
metadata). Immutable once built, so searches from many worker threads need no lock.
"""

from __future__ import annotations

from dataclasses import dataclass

import bm25s
import numpy as np
import Stemmer


def _tokenizer() -> bm25s.tokenization.Tokenizer:
    return bm25s.tokenization.Tokenizer(stemmer=Stemmer.Stemmer("english"), stopwords="en")


@dataclass(frozen=True)
class LexicalIndex:
    ids: tuple[str, ...]
    version: str
    _tokenizer: bm25s.tokenization.Tokenizer | None = None
    _bm25: bm25s.BM25 | None = None

    @classmethod
    def build(cls, ids: list[str], texts: list[str], version: str) -> "LexicalIndex":
        if not ids:
            return cls((), version)
        tokenizer = _tokenizer()
        tokens = tokenizer.tokenize(texts, update_vocab=True, return_as="ids", show_progress=False)
        bm25 = bm25s.BM25()
        bm25.index(tokens, show_progress=False)
        return cls(tuple(ids), version, tokenizer, bm25)

    def __len__(self) -> int:
        return len(self.ids)

    def search(self, query: str, k: int) -> list[tuple[str, float]]:
        """The `k` best chunk ids with a positive BM25 score (a query of only unknown or stop words
        matches nothing)."""
        if self._bm25 is None or not query.strip():
            return []
        tokens = self._tokenizer.tokenize([query], update_vocab=False, return_as="ids", show_progress=False)
        docs, scores = self._bm25.retrieve(tokens, k=min(k, len(self.ids)), show_progress=False, n_threads=1)
        return [(self.ids[int(d)], float(s)) for d, s in zip(docs[0], scores[0]) if s > 0]


def rrf(rankings: list[list[str]], k: int, weights: list[float] | None = None) -> list[tuple[str, float]]:
    """Reciprocal-rank fusion: each id scores Σ weight / (k + rank) over the lists it appears in
    (rank from 1); ties keep the order of first appearance, so the dense list wins a tie."""
    weights = weights or [1.0] * len(rankings)
    fused: dict[str, float] = {}
    for ranking, weight in zip(rankings, weights):
        for rank, item in enumerate(ranking, start=1):
            fused[item] = fused.get(item, 0.0) + weight / (k + rank)
    order = sorted(fused.items(), key=lambda kv: -kv[1])  # stable: first appearance breaks ties
    return order


def cosine(query: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """Cosine similarity of one query vector with each row (Chroma's cosine space, 1 - distance)."""
    norms = np.linalg.norm(vectors, axis=1) * (np.linalg.norm(query) or 1.0)
    return (vectors @ query) / np.where(norms == 0, 1.0, norms)
