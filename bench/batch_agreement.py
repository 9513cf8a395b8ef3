"""Does batching change a greedy answer? Each question alone, then all of them in one running batch.

In float32 the engine's answers are token-identical batched and alone (tests/test_engine.py and
tests/test_e2e_real.py assert it). In bfloat16 arithmetic the matmul kernels (oneDNN) block the
work by the number of rows, so a row's rounding can depend on how many others share its step and a
near-tie can flip: this measures how often that happens, per dtype, on the shipped adapter.

Per dtype (each in its own fresh process): the real SmolLM2 with the shipped v0001 adapter, the
product's system prompt, the first `--questions` customer-style rewordings (data/eval/reworded.jsonl),
greedy, `--max-tokens`; every question alone, then all at once (`--batch` rows per step). Reports the
share of identical answers, where the differing ones first diverge, and the largest log-prob
difference over the tokens both share.

    .venv/bin/python bench/batch_agreement.py [--dtypes float32,bf16-mixed] [--questions 32]
Writes bench/results/batch_agreement.json and .md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results"
ADAPTER = ROOT / "data" / "adapters" / "bootstrap"


def questions(n: int) -> list[str]:
    lines = (ROOT / "data" / "eval" / "reworded.jsonl").read_text().splitlines()
    return [json.loads(line)["question"] for line in lines[:n]]


async def run_dtype(dtype: str, n: int, max_tokens: int, batch: int) -> dict:
    from gateway.core.settings import load_settings
    from gateway.engine.base import GenerationRequest, SamplingParams, TokenEvent
    from gateway.engine.local import LocalEngine
    from gateway.engine.model_files import convert_embedded

    system = load_settings(None).model.system_prompt
    engine = LocalEngine(str(convert_embedded(ROOT / ".cache" / "test-models")), dtype=dtype, max_batch=batch,
                         max_queue=4 * n)
    await engine.start()
    await engine.load_adapter("v0001", str(ADAPTER))

    async def answer(question: str) -> tuple[list[int], list[float]]:
        messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
        stream = await engine.submit(GenerationRequest("b", messages, SamplingParams(max_tokens=max_tokens), adapter="v0001"))
        events = [e async for e in stream if isinstance(e, TokenEvent)]
        return [e.token_id for e in events], [e.logprob for e in events]

    asked = questions(n)
    try:
        started = time.perf_counter()
        alone = [await answer(q) for q in asked]
        alone_s = time.perf_counter() - started
        started = time.perf_counter()
        together = await asyncio.gather(*[answer(q) for q in asked])
        together_s = time.perf_counter() - started
    finally:
        await engine.stop()
    diverge, logprob_gap = [], 0.0
    for (a_ids, a_lp), (b_ids, b_lp) in zip(alone, together):
        shared = next((i for i, (x, y) in enumerate(zip(a_ids, b_ids)) if x != y), min(len(a_ids), len(b_ids)))
        if a_ids != b_ids:
            diverge.append(shared)
        if shared:
            logprob_gap = max(logprob_gap, max(abs(x - y) for x, y in zip(a_lp[:shared], b_lp[:shared])))
    return {"dtype": dtype, "questions": n, "identical": n - len(diverge), "first_divergence": sorted(diverge),
            "max_logprob_gap": round(logprob_gap, 5), "alone_s": round(alone_s, 1), "together_s": round(together_s, 1),
            "tokens_alone": sum(len(a) for a, _ in alone)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dtypes", default="float32,bf16-mixed")
    parser.add_argument("--questions", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--out", default=str(RESULTS / "batch_agreement"))
    parser.add_argument("--row", help=argparse.SUPPRESS)  # internal: one dtype in this process
    args = parser.parse_args()
    if args.row:
        print(json.dumps(asyncio.run(run_dtype(args.row, args.questions, args.max_tokens, args.batch))))
        return
    rows = []
    for dtype in args.dtypes.split(","):
        out = subprocess.run([sys.executable, __file__, "--row", dtype, "--questions", str(args.questions),
                              "--max-tokens", str(args.max_tokens), "--batch", str(args.batch)],
                             capture_output=True, text=True, check=True, cwd=ROOT)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    lines = ["# Batched vs alone (`bench/batch_agreement.py`)", "",
             f"{time.strftime('%Y-%m-%d')}, {platform.machine()}; the shipped v0001 adapter, the product's system prompt, "
             f"the first {args.questions} reworded evaluation questions (no retrieval), greedy, max {args.max_tokens} tokens; "
             f"each question alone, then all at once ({args.batch} rows per step); each dtype in a fresh process.", "",
             "| dtype | identical answers | first divergence (token index) of the others | max log-prob gap on shared tokens | alone s | batched s |",
             "| --- | ---: | --- | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['dtype']} | {r['identical']}/{r['questions']} | {', '.join(map(str, r['first_divergence'])) or '—'} | "
                     f"{r['max_logprob_gap']} | {r['alone_s']} | {r['together_s']} |")
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps({"max_tokens": args.max_tokens, "batch": args.batch, "rows": rows}, indent=1))
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
