"""End-to-end answer quality on the demo FAQ, with and without retrieval, via the `tellerloop eval`
library function: a fixed, seeded sample of 100 questions; the no-retrieval run is the baseline.

Usage: python bench/answer_quality.py [--limit 100] [--seed 0] [--out bench/results/answer_quality.md]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway.core.runtime import build_engine, build_knowledge_base  # noqa: E402
from gateway.core.settings import load_settings  # noqa: E402
from retraining.evaluate import evaluate, load_qa  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


async def run(args: argparse.Namespace) -> list[dict]:
    data_dir = Path(args.data_dir or tempfile.mkdtemp())
    settings = load_settings(None, storage={"data_dir": str(data_dir)})
    engine = build_engine(settings)
    kb = await asyncio.to_thread(build_knowledge_base, settings)  # ingests the demo FAQ if empty
    await engine.start()
    rows = load_qa(ROOT / "data" / "bank_faq" / "faq.csv", args.limit, args.seed)
    reports = []
    try:
        for rag in (False, True):
            report = await evaluate(settings, engine, kb.embedder, rows, kb=kb, rag=rag)
            print(json.dumps({"rag": rag, **report["summary"], "seconds": report["seconds"]}), flush=True)
            reports.append(report)
    finally:
        await engine.stop()
    return reports


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", help="reuse a data dir (model cache + ingested FAQ)")
    parser.add_argument("--out", default="bench/results/answer_quality.md")
    args = parser.parse_args()
    base, rag = asyncio.run(run(args))
    cfg = rag["config"]
    lines = [
        f"# Answer quality on the demo FAQ ({time.strftime('%Y-%m-%d')}, base SmolLM2-135M-Instruct, {cfg['n']} questions, "
        f"seed {args.seed}, greedy, max_tokens {cfg['max_tokens']}, layout {cfg['layout']}, top_k {cfg['top_k']}, "
        f"repetition_penalty {cfg['repetition_penalty']})",
        "",
        "| condition | similarity mean | median | good (≥ 0.75) | ROUGE-L | hits cap | loops | retrieval hit | AUROC of confidence | seconds |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, r in (("no retrieval (baseline)", base), ("retrieval", rag)):
        s = r["summary"]
        hit = "–" if s["retrieval_hit_rate"] is None else f"{s['retrieval_hit_rate']:.0%}"
        lines.append(f"| {name} | {s['similarity_mean']:.3f} | {s['similarity_median']:.3f} | {s['good_rate']:.0%} | "
                     f"{s['rouge_l_mean']:.3f} | {s['cap_hit_rate']:.0%} | {s['loop_rate']:.0%} | {hit} | "
                     f"{s['auroc']['confidence']} | {r['seconds']} |")
    ratio = rag["summary"]["similarity_mean"] / base["summary"]["similarity_mean"]
    lines += ["", f"Retrieval / baseline similarity: {ratio:.2f}×. AUROC by part with retrieval: {rag['summary']['auroc']}."]
    report = "\n".join(lines)
    print(report)
    Path(args.out).write_text(report + "\n")
    Path(args.out).with_suffix(".json").write_text(json.dumps({"baseline": base, "retrieval": rag}, indent=1))


if __name__ == "__main__":
    main()
