"""The lexical half of hybrid retrieval: a BM25 index (bm25s) over the knowledge base's chunk texts,
and reciprocal-rank fusion of ranked lists.

Why: embeddings miss rewordings that keep the bank's own words ("NEFT", "Demat", "Platinum card")
and keyword matching misses the ones that do not; fusing the two ranks (RRF, Cormack et al. 2009)
needs no score calibration between them. The terms are character n-grams of each word (English
stop words dropped, `#` marking word ends), not whole words: customers type "acount" and
"netbankng", and a misspelt word still shares most of its n-grams with the right one. Measured on
the evaluation sets (docs/benchmarks.md): whole stemmed words made rewordings worse than the
embeddings alone; 4-grams are at least as good as the embeddings on every set.

The index is rebuilt whole from the collection — bm25s indexes the demo FAQ in ~0.1 s and 100k
short chunks in seconds, and a rebuild is only needed after a write (`KnowledgeBase` keeps it in
step, across processes through a version stamp in the collection's metadata). Immutable once
built, so searches from many worker threads need no lock.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import bm25s
import numpy as np
from bm25s.stopwords import STOPWORDS_EN

_WORD = re.compile(r"\w\w+")
_STOP = frozenset(STOPWORDS_EN)


def terms(text: str, n: int) -> list[str]:
    """The character n-grams of each non-stop word, with word boundaries ("#card#" → "#car", "card", "ard#")."""
    out: list[str] = []
    for word in _WORD.findall(text.lower()):
        if word in _STOP:
            continue
        padded = f"#{word}#"
        out += [padded[i : i + n] for i in range(max(1, len(padded) - n + 1))]
    return out


@dataclass(frozen=True)
class LexicalIndex:
    ids: tuple[str, ...]
    version: str
    ngram: int = 4
    _vocab: dict[str, int] = field(default_factory=dict)
    _bm25: bm25s.BM25 | None = None

    @classmethod
    def build(cls, ids: list[str], texts: list[str], version: str, ngram: int = 4) -> "LexicalIndex":
        if not ids:
            return cls((), version, ngram)
        vocab: dict[str, int] = {}
        docs = [[vocab.setdefault(t, len(vocab)) for t in terms(text, ngram)] for text in texts]
        if not vocab:  # nothing but stop words: nothing for BM25 to match
            return cls(tuple(ids), version, ngram)
        bm25 = bm25s.BM25()
        bm25.index(bm25s.tokenization.Tokenized(ids=docs, vocab=vocab), show_progress=False)
        return cls(tuple(ids), version, ngram, vocab, bm25)

    def __len__(self) -> int:
        return len(self.ids)

    def search(self, query: str, k: int) -> list[tuple[str, float]]:
        """The `k` best chunk ids with a positive BM25 score (a query of only unknown or stop words
        matches nothing)."""
        known = [self._vocab[t] for t in terms(query, self.ngram) if t in self._vocab]
        if self._bm25 is None or not known:
            return []
        docs, scores = self._bm25.retrieve(bm25s.tokenization.Tokenized(ids=[known], vocab=self._vocab),
                                           k=min(k, len(self.ids)), show_progress=False, n_threads=1)
        return [(self.ids[int(d)], float(s)) for d, s in zip(docs[0], scores[0]) if s > 0]


def rrf(rankings: list[list[str]], k: int, weights: list[float] | None = None) -> list[tuple[str, float]]:
    """Reciprocal-rank fusion: each id scores Σ weight / (k + rank) over the lists it appears in
    (rank from 1); ties keep the order of first appearance, so the dense list wins a tie."""
    weights = weights or [1.0] * len(rankings)
    fused: dict[str, float] = {}
    for ranking, weight in zip(rankings, weights):
        for rank, item in enumerate(ranking, start=1):
            fused[item] = fused.get(item, 0.0) + weight / (k + rank)
    return sorted(fused.items(), key=lambda kv: -kv[1])  # stable: first appearance breaks ties


def cosine(query: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """Cosine similarity of one query vector with each row (Chroma's cosine space, 1 - distance)."""
    norms = np.linalg.norm(vectors, axis=1) * (np.linalg.norm(query) or 1.0)
    return (vectors @ query) / np.where(norms == 0, 1.0, norms)
