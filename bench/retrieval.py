"""Retrieval latency at 1k / 10k / 100k chunks and ingestion throughput, with baselines from the same run.

* Latency: end-to-end `KnowledgeBase.search` (embed the query + Chroma HNSW query; in hybrid mode
  also BM25 and reciprocal-rank fusion) p50/p99 over 200 queries, dense and hybrid interleaved, against
  the baseline of exact brute-force cosine search over the same vectors in NumPy.
  Collections beyond the 1039 real FAQ entries are filled with random unit vectors (embedding 100k
  real chunks would take over an hour on 2 cores and does not change HNSW query cost).
* Both searches include the retrieval signals the confidence calibrator reads (the best rival's
  similarity, and the first entry's own question against the query, its vector cached per entry);
  the last column is what one uncached entry question adds (one short embedding).
* Ingestion: the demo FAQ through `KnowledgeBase.ingest_bytes` (parse + embed + upsert), against the
  baseline of embedding the same texts in file order (no length bucketing).

Usage: python bench/retrieval.py [--sizes 1000 10000 100000] [--out bench/results/retrieval.md]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from gateway.core.settings import load_settings  # noqa: E402
from gateway.knowledge.documents import parse  # noqa: E402
from gateway.knowledge.embeddings import Embedder  # noqa: E402
from gateway.knowledge.store import KnowledgeBase  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
FAQ = ROOT / "data" / "bank_faq" / "faq.csv"
QUERIES = ["my card was stolen", "fixed deposit penalty", "how to reset netbanking password",
           "international transfer fees", "update my address", "home loan documents"]


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


def embed_in_file_order(embedder: Embedder, texts: list[str]) -> None:
    for start in range(0, len(texts), embedder.batch_size):
        embedder.embed(texts[start : start + embedder.batch_size])  # each call sorts only within its batch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000])
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--out", default="bench/results/retrieval.md")
    args = parser.parse_args()
    settings = load_settings()
    embedder = Embedder(batch_size=settings.rag.embedding_batch)
    chunks = parse("faq.csv", FAQ.read_bytes())
    texts = [c.text for c in chunks]

    t0 = time.perf_counter()
    embed_in_file_order(embedder, texts)
    baseline_s = time.perf_counter() - t0
    tmp = Path(tempfile.mkdtemp())
    kb = KnowledgeBase(settings.rag, tmp, embedder, collection="bench-ingest")
    t0 = time.perf_counter()
    kb.ingest_bytes("faq.csv", FAQ.read_bytes())
    ours_s = time.perf_counter() - t0
    ingest = {"chunks": len(texts), "baseline_chunks_per_s": len(texts) / baseline_s,
              "ingest_chunks_per_s": len(texts) / ours_s}

    rng = np.random.default_rng(0)
    rows = []
    for size in args.sizes:
        kb = KnowledgeBase(settings.rag, tmp, embedder, collection=f"bench-{size}")
        real = embedder.embed(texts[: min(size, len(texts))])
        fill = rng.standard_normal((max(0, size - len(real)), embedder.dimension)).astype(np.float32)
        fill /= np.linalg.norm(fill, axis=1, keepdims=True)
        vectors = np.concatenate([real, fill])
        t0 = time.perf_counter()
        for start in range(0, size, 5000):
            block = vectors[start : start + 5000]
            kb.collection.add(ids=[f"c{start + i}" for i in range(len(block))], embeddings=block.tolist(),
                              documents=[texts[(start + i) % len(texts)] for i in range(len(block))],
                              # the real FAQ chunks keep their question (the calibrator's question_match)
                              metadatas=[{"source": "bench", **({"question": chunks[start + i].metadata["question"]}
                                                               if start + i < len(real) else {})}
                                         for i in range(len(block))])
        load_s = time.perf_counter() - t0
        queries = [QUERIES[i % len(QUERIES)] + f" {i}" for i in range(args.queries)]
        hybrid_kb = KnowledgeBase(settings.rag.model_copy(update={"search": "hybrid"}), tmp, embedder,
                                  collection=f"bench-{size}")
        t0 = time.perf_counter()
        hybrid_kb.lexical_index()
        index_s = time.perf_counter() - t0
        kb.cfg = settings.rag.model_copy(update={"search": "dense"})
        lat, hyb, brute, miss = [], [], [], []
        for n, q in enumerate(queries):  # interleaved, so both modes see the same machine load
            t0 = time.perf_counter()
            kb.search(q, 3, min_score=-1.0)
            lat.append((time.perf_counter() - t0) * 1000)
            t0 = time.perf_counter()
            hybrid_kb.search(q, 3, min_score=-1.0)
            hyb.append((time.perf_counter() - t0) * 1000)
            t0 = time.perf_counter()
            qv = embedder.embed([q])[0]
            np.argpartition(-(vectors @ qv), 3)[:3]
            brute.append((time.perf_counter() - t0) * 1000)
            t0 = time.perf_counter()  # what question_match adds when the first entry's question is not cached
            embedder.embed([chunks[(n * 7) % len(chunks)].metadata["question"]])
            miss.append((time.perf_counter() - t0) * 1000)
        rows.append({"chunks": size, "load_s": load_s, "p50_ms": pct(lat, 50), "p99_ms": pct(lat, 99),
                     "hybrid_p50_ms": pct(hyb, 50), "hybrid_p99_ms": pct(hyb, 99), "bm25_index_s": index_s,
                     "brute_p50_ms": pct(brute, 50), "brute_p99_ms": pct(brute, 99),
                     "question_miss_p50_ms": pct(miss, 50)})
        print(rows[-1], flush=True)

    lines = [f"# Retrieval ({time.strftime('%Y-%m-%d')}, 2-core CPU, embedded Chroma, all-MiniLM-L6-v2, top 3)", "",
             "| chunks | dense p50 (ms) | dense p99 (ms) | hybrid p50 (ms) | hybrid p99 (ms) | brute-force p50 (ms) | "
             "brute-force p99 (ms) | dense p50 × brute force | hybrid p50 × dense | bulk load (s) | BM25 index (s) | "
             "question_match, uncached entry p50 (ms) |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['chunks']:,} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['hybrid_p50_ms']:.1f} | "
                     f"{r['hybrid_p99_ms']:.1f} | {r['brute_p50_ms']:.1f} | {r['brute_p99_ms']:.1f} | "
                     f"{r['p50_ms'] / r['brute_p50_ms']:.2f} | {r['hybrid_p50_ms'] / r['p50_ms']:.2f} | {r['load_s']:.1f} | "
                     f"{r['bm25_index_s']:.1f} | {r['question_miss_p50_ms']:.1f} |")
    lines += ["", "| ingestion of the demo FAQ | chunks/s | × baseline |", "| --- | ---: | ---: |",
              f"| embed in file order (baseline) | {ingest['baseline_chunks_per_s']:.1f} | 1.00 |",
              f"| `KnowledgeBase.ingest_bytes` (length-bucketed embed + upsert) | {ingest['ingest_chunks_per_s']:.1f} | "
              f"{ingest['ingest_chunks_per_s'] / ingest['baseline_chunks_per_s']:.2f} |"]
    report = "\n".join(lines)
    print(report)
    Path(args.out).write_text(report + "\n")
    Path(args.out).with_suffix(".json").write_text(json.dumps({"latency": rows, "ingest": ingest}, indent=1))


if __name__ == "__main__":
    main()
