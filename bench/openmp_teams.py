"""Why the serving process keeps one multi-threaded OpenMP team (gateway/engine/threads.py).

The engine alone, in-process (no HTTP), the real SmolLM2-135M with the shipped adapter, plain
Banking77 prompts with the product's system prompt, greedy, 64 new tokens, 2 requests per stream,
at 1 and 16 concurrent streams; each case in a fresh process:

  * `one team`   - the engine as it serves (its worker thread alone computes on several threads);
  * `extra team` - the same, after another thread ran one multi-threaded matmul before the engine
                   started: what the model loader and the knowledge base's embedders did to every
                   gateway process before threads.py. That thread's OpenMP team stays, idle.

Per case: tokens/s, inter-token p50, mean step time, and the CPU share of the process's two busiest
threads (the worker and its OpenMP helper) while it ran.

    .venv/bin/python bench/openmp_teams.py [--rounds 2]
Writes bench/results/openmp_teams.json and .md.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results"
ADAPTER = ROOT / "data" / "adapters" / "bootstrap"
CASES = ("one team", "extra team")
LEVELS = (1, 16)


def thread_ticks() -> dict[str, int]:
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            fields = Path(f"/proc/self/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[tid] = int(fields[11]) + int(fields[12])
    return out


def child(case: str) -> dict:
    import torch

    from gateway.core.settings import Settings
    from gateway.engine.base import GenerationRequest, SamplingParams
    from gateway.engine.local import LocalEngine
    from gateway.engine.model_files import convert_embedded

    if case == "extra team":  # a thread that ran torch on its default thread count, and lives on
        x = torch.randn(512, 512)
        ready = threading.Event()
        threading.Thread(target=lambda: ((x @ x).sum().item(), ready.set(), threading.Event().wait()),
                         daemon=True).start()
        ready.wait()
    settings = Settings()
    with (ROOT / "data" / "banking77" / "train.csv").open() as f:
        questions = [row["text"] for row in csv.DictReader(f)][::300]
    model_dir = str(convert_embedded(ROOT / ".cache" / "test-models"))

    async def one(engine: LocalEngine, i: int, gaps: list[float]) -> int:
        messages = [{"role": "system", "content": settings.model.system_prompt},
                    {"role": "user", "content": questions[i % len(questions)]}]
        stream = await engine.submit(GenerationRequest(f"r{i}", messages, SamplingParams(max_tokens=64), "v0001"))
        last, n = None, 0
        async for _ in stream:
            now = time.perf_counter()
            if last is not None:
                gaps.append(now - last)
            last, n = now, n + 1
        return n

    async def run() -> dict:
        engine = LocalEngine(model_dir, max_batch=64)
        await engine.start()
        await engine.load_adapter("v0001", str(ADAPTER))
        await one(engine, 0, [])  # warm-up
        rows = {}
        for streams in LEVELS:
            gaps: list[float] = []
            before, ticks, started = engine.stats(), thread_ticks(), time.perf_counter()
            tokens = 0
            for k in range(2):
                tokens += sum(await asyncio.gather(*[one(engine, i + 100 * k, gaps) for i in range(streams)]))
            wall = time.perf_counter() - started
            after, ticks_after = engine.stats(), thread_ticks()
            hz = os.sysconf("SC_CLK_TCK")
            busiest = sorted(((ticks_after[t] - ticks.get(t, 0)) / hz / wall for t in ticks_after), reverse=True)[:2]
            steps = after["steps"] - before["steps"]
            rows[streams] = {"tok_s": round(tokens / wall, 1), "itl_p50_ms": round(statistics.median(gaps) * 1000, 1),
                             "step_ms": round((after["step_ms"] - before["step_ms"]) / steps, 1),
                             "cpu_busiest_threads": [round(b, 2) for b in busiest]}
        await engine.stop()
        return rows

    return asyncio.run(run())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--child", default="")
    parser.add_argument("--out", default=str(RESULTS / "openmp_teams.md"))
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.child)), flush=True)
        return
    runs: dict[str, list[dict]] = {case: [] for case in CASES}
    for r in range(args.rounds):
        for case in CASES if r % 2 == 0 else CASES[::-1]:
            proc = subprocess.run([sys.executable, __file__, "--child", case], capture_output=True, text=True,
                                  env={**os.environ, "HF_HUB_OFFLINE": "1"}, cwd=ROOT)
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                raise SystemExit(f"{case}: no result\n{proc.stderr[-3000:]}")
            runs[case].append({int(k): v for k, v in json.loads(line[7:]).items()})
            print(f"round {r + 1} {case}: {runs[case][-1]}", flush=True)
    import torch

    from bench.serve import cpu_name

    lines = [f"# One OpenMP team vs an extra one ({time.strftime('%Y-%m-%d')}, {cpu_name()}, {os.cpu_count()} cores, "
             f"torch {torch.__version__})\n",
             "The engine in-process, v0001, plain prompts, greedy, 64 tokens, 2 requests per stream; each case a fresh "
             f"process, {args.rounds} alternating rounds (median). CPU: the two busiest threads' share of one core.\n",
             "| streams | case | tok/s | ITL p50 | step ms | CPU of the 2 busiest threads | × one team (tok/s, same round) |",
             "| ---: | --- | ---: | ---: | ---: | --- | ---: |"]
    for streams in LEVELS:
        for case in CASES:
            rows = [run[streams] for run in runs[case]]
            ratio = statistics.median(b[streams]["tok_s"] / a[streams]["tok_s"]
                                      for a, b in zip(runs["one team"], runs[case]))
            cpu = " / ".join(f"{statistics.median(r['cpu_busiest_threads'][i] for r in rows):.0%}" for i in range(2))
            lines.append(f"| {streams} | {case} | {statistics.median(r['tok_s'] for r in rows):.1f} | "
                         f"{statistics.median(r['itl_p50_ms'] for r in rows):.0f} ms | "
                         f"{statistics.median(r['step_ms'] for r in rows):.1f} | {cpu} | {ratio:.2f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(args.out)
    out.write_text(text)
    out.with_suffix(".json").write_text(json.dumps({"cpu": cpu_name(), "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
