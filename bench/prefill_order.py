"""Which prompts of a burst the engine reads first: every prompt a slice per step (the order before
stop 33) against the shortest whole first (`local.next_chunk`), in one process.

The engine alone (no HTTP), the real SmolLM2-135M with the shipped v0001, bf16-mixed on a CPU with
bf16 instructions: a burst of 16 requests submitted at once, each a Banking77 utterance with the
retrieved FAQ entry as the gateway builds it (~300-token prompts; `--plain` for the system prompt
alone), max 64 new tokens, greedy. Each round sends a new burst to both orders, alternating which
goes first; the table gives each round's TTFT p50 / p90 and tokens/s per order.

    .venv/bin/python bench/prefill_order.py [--rounds 3] [--plain]
Writes bench/results/prefill_order.json and .md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results"
BURST = 16


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--plain", action="store_true")
    parser.add_argument("--out", default=str(RESULTS / "prefill_order"))
    args = parser.parse_args()

    import gateway.engine.local as local
    from bench.serve import cpu_name, load_prompts, plain_messages, rag_messages
    from gateway.core.settings import Settings
    from gateway.engine.base import GenerationRequest, SamplingParams, TokenEvent
    from gateway.engine.model_files import convert_embedded

    settings = Settings()
    questions = load_prompts(BURST * args.rounds)
    messages = (plain_messages if args.plain else rag_messages)(settings, questions)

    def every_prompt_a_slice(self, cohort):  # noqa: ANN001, ANN202 - the order before stop 33
        reading = cohort.seqs[: cohort.reading]
        return reading, min(max(16, self._chunk_tokens // len(reading)), len(reading[0].prompt_ids) - reading[0].kv_len)

    orders = {"every prompt a slice (before)": every_prompt_a_slice, "shortest whole first": local.LocalEngine._next_chunk}

    async def run() -> list[dict]:
        engine = local.LocalEngine(str(convert_embedded(ROOT / ".cache" / "test-models")), max_batch=64)
        await engine.start()
        await engine.load_adapter("v0001", str(ROOT / "data" / "adapters" / "bootstrap"))

        async def one(m: list[dict], started: float) -> tuple[float, int]:
            stream = await engine.submit(GenerationRequest("bench", m, SamplingParams(max_tokens=64), "v0001"))
            ttft, tokens = None, 0
            async for event in stream:
                if isinstance(event, TokenEvent):
                    tokens += 1
                    ttft = ttft if ttft is not None else time.perf_counter() - started
            return ttft, tokens

        rows = []
        try:
            for r in range(args.rounds):
                burst = messages[r * BURST : (r + 1) * BURST]
                names = list(orders) if r % 2 == 0 else list(reversed(orders))
                for name in names:
                    local.LocalEngine._next_chunk = orders[name]
                    started = time.perf_counter()
                    results = await asyncio.gather(*[one(m, started) for m in burst])
                    wall = time.perf_counter() - started
                    ttfts = sorted(t for t, _ in results)
                    rows.append({"round": r + 1, "order": name, "ttft_p50": round(statistics.median(ttfts), 2),
                                 "ttft_p90": round(ttfts[int(0.9 * (len(ttfts) - 1))], 2),
                                 "tok_s": round(sum(n for _, n in results) / wall, 1), "seconds": round(wall, 1)})
                    print(rows[-1], flush=True)
        finally:
            local.LocalEngine._next_chunk = orders["shortest whole first"]
            await engine.stop()
        return rows

    rows = asyncio.run(run())
    meta = {"cpu": cpu_name(), "date": time.strftime("%Y-%m-%d"), "prompts": "plain" if args.plain else "retrieval",
            "burst": BURST, "rounds": args.rounds}
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = [f"# Prefill order in a burst of {BURST} ({meta['date']}, {meta['cpu']}, {meta['prompts']} prompts, "
             f"engine in-process, SmolLM2-135M + v0001, max 64 new tokens)", "",
             "| round | order | TTFT p50 | TTFT p90 | tok/s | seconds |", "| ---: | --- | ---: | ---: | ---: | ---: |"]
    lines += [f"| {r['round']} | {r['order']} | {r['ttft_p50']} s | {r['ttft_p90']} s | {r['tok_s']} | {r['seconds']} |" for r in rows]
    for name in orders:
        mine = [r for r in rows if r["order"] == name]
        lines.append(f"| median | {name} | {statistics.median(r['ttft_p50'] for r in mine)} s | "
                     f"{statistics.median(r['ttft_p90'] for r in mine)} s | {statistics.median(r['tok_s'] for r in mine)} | |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
