"""What a durable stream costs: the stream's row is written before its first token and finalised at the
end (two commits), where the old path wrote it once at the end. Measured on the real database code
(SQLite, WAL, synchronous=FULL, as shipped) in the same run: per-exchange time of open + finalise
against a single insert, and the time added before the first token (the open).

    .venv/bin/python bench/stream_row.py [--n 300]
Writes bench/results/stream_row.md.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gateway.core.runtime import open_database  # noqa: E402
from gateway.core.settings import load_settings  # noqa: E402
from gateway.exchanges.models import Exchange  # noqa: E402
from gateway.exchanges.repository import ExchangeRepository  # noqa: E402


def row(finish: str) -> Exchange:
    now = datetime.now(timezone.utc)
    return Exchange(id=uuid.uuid4().hex, created_at=now, completed_at=now, api_key_name="bench", user=None,
                    model_requested="tellerloop", variant="base",
                    messages=[{"role": "system", "content": "x" * 1500}, {"role": "user", "content": "How do I block my card?"}],
                    answer="" if finish == "streaming" else "Call us at once." * 10, finish_reason=finish, stream=True,
                    rag=True, sources=[], params={}, prompt_tokens=300, completion_tokens=64, ttft_ms=100.0,
                    latency_ms=2000.0, confidence=0.8, confidence_parts={}, flagged=False)


async def main(n: int) -> str:
    work = Path(tempfile.mkdtemp())
    settings = load_settings(storage={"data_dir": str(work)})
    async with open_database(settings) as sessions:
        repo = ExchangeRepository(sessions)
        single, opens, both = [], [], []
        for _ in range(n):  # interleaved, so drift hits both paths alike
            started = time.perf_counter()
            await repo.add(row("stop"))
            single.append(time.perf_counter() - started)
            r = row("streaming")
            started = time.perf_counter()
            await repo.open(r)
            opened = time.perf_counter()
            r.finish_reason, r.answer = "stop", "Call us at once." * 10
            await repo.finalise(r)
            opens.append(opened - started)
            both.append(time.perf_counter() - started)
    ms = lambda xs: statistics.median(xs) * 1000  # noqa: E731
    p99 = lambda xs: sorted(xs)[int(0.99 * (len(xs) - 1))] * 1000  # noqa: E731
    return "\n".join([
        "# Durable stream rows: cost (bench/stream_row.py)", "",
        f"SQLite (WAL, synchronous=FULL), {n} exchanges per path, interleaved, one run on the 2-core VM.", "",
        "| path | median ms | p99 ms | ratio |", "| --- | ---: | ---: | ---: |",
        f"| before: one insert at the end | {ms(single):.2f} | {p99(single):.2f} | 1.00x |",
        f"| now: open before the first token + finalise | {ms(both):.2f} | {p99(both):.2f} | {ms(both) / ms(single):.2f}x |",
        f"| of which before the first token (open) | {ms(opens):.2f} | {p99(opens):.2f} | {ms(opens) / ms(single):.2f}x |",
        "", "For scale: the gateway's TTFT p50 for one stream is about 100 ms (docs/benchmarks.md).", ""])


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=300)
    text = asyncio.run(main(parser.parse_args().n))
    print(text)
    (ROOT / "bench" / "results" / "stream_row.md").write_text(text)
