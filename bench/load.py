"""Load test (not part of `make test`): N concurrent clients replay Banking77 utterances against a real
`tellerloop serve` on the embedded SmolLM2 with retrieval on (the default path), for a fixed time —
half of them streaming, a third of the answers rated (thumbs up/down, with the customer's `user`),
and one support reviewer working the queue (queue, next, approve) all along.

Per level: completed chats, throughput (chats/s and completion tokens/s), latency p50/p99 (full
answer; first token for streams), errors by status, and lost exchanges — every chat the client saw
complete (a 200 or a `[DONE]`) must be in the database, finalised — plus rows left `streaming`.
Server RSS is sampled every second (a PNG over time). The ratio column compares each level with the
first one, measured in the same run.

    .venv/bin/python bench/load.py                   # 16 and 64 clients, 90 s each (~6 min on 2 cores)
    .venv/bin/python bench/load.py --levels 16 --seconds 30
Writes bench/results/load.json, load.md and load.png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sqlite3
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

from serve import RESULTS, load_prompts, pct, start_gateway  # noqa: E402


class RssSampler(threading.Thread):
    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.samples, self.stopped = pid, [], threading.Event()

    def run(self) -> None:
        started = time.monotonic()
        while not self.stopped.wait(1.0):
            try:
                for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        self.samples.append((time.monotonic() - started, int(line.split()[1]) / 1024))
            except OSError:
                return


async def client_loop(i: int, base: str, headers: dict, prompts: list[str], until: float, stats: dict,
                      max_tokens: int) -> None:
    rng = random.Random(i)
    user = f"load-customer-{i}"
    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=300) as c:
        while time.monotonic() < until:
            stream = rng.random() < 0.5
            body = {"model": "tellerloop", "max_tokens": max_tokens, "user": user, "stream": stream,
                    "messages": [{"role": "user", "content": rng.choice(prompts)}]}
            started = time.perf_counter()
            exchange_id, first = None, None
            try:
                if stream:
                    async with c.stream("POST", "/v1/chat/completions", json=body) as r:
                        if r.status_code != 200:
                            stats["status"][r.status_code] += 1
                            await r.aread()
                            continue
                        exchange_id, done, tokens = r.headers.get("x-exchange-id"), False, 0
                        async for line in r.aiter_lines():
                            if line == "data: [DONE]":
                                done = True
                            elif line.startswith("data: {"):
                                event = json.loads(line[6:])
                                if "error" in event:
                                    stats["status"]["stream-error"] += 1
                                for ch in event.get("choices") or []:
                                    if (ch.get("delta") or {}).get("content"):
                                        first = first or time.perf_counter() - started
                                if event.get("usage"):
                                    tokens = event["usage"]["completion_tokens"]
                        if not done:
                            continue
                        stats["ttft"].append(first or time.perf_counter() - started)
                else:
                    r = await c.post("/v1/chat/completions", json=body)
                    stats["status"][r.status_code] += 1 if r.status_code != 200 else 0
                    if r.status_code != 200:
                        continue
                    exchange_id, tokens = r.json()["exchange_id"], r.json()["usage"]["completion_tokens"]
                stats["status"][200] += 1
                stats["latency"].append(time.perf_counter() - started)
                stats["tokens"] += tokens
                stats["completed"].append(exchange_id)
                if rng.random() < 0.33:
                    f = await c.post(f"/v1/exchanges/{exchange_id}/feedback",
                                     json={"rating": rng.choice(["up", "down"]), "user": user})
                    stats["feedback"][f.status_code] += 1
            except httpx.HTTPError as exc:
                stats["status"][type(exc).__name__] += 1


async def reviewer_loop(base: str, headers: dict, until: float, stats: dict) -> None:
    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=120) as c:
        while time.monotonic() < until:
            try:
                q = await c.get("/v1/review/queue?limit=20")
                stats["review"][q.status_code] += 1
                item = await c.post("/v1/review/next")
                stats["review"][item.status_code] += 1
                if item.status_code == 200:
                    label = await c.post(f"/v1/review/items/{item.json()['id']}/labels", json={"verdict": "approve"})
                    stats["review"][label.status_code] += 1
            except httpx.HTTPError as exc:
                stats["review"][type(exc).__name__] += 1
            await asyncio.sleep(2)


def level_run(server, data_dir: Path, clients: int, seconds: float, prompts: list[str], max_tokens: int) -> dict:
    stats = {"status": Counter(), "feedback": Counter(), "review": Counter(), "latency": [], "ttft": [],
             "tokens": 0, "completed": []}

    async def go() -> None:
        until = time.monotonic() + seconds
        await asyncio.gather(reviewer_loop(server.base_url, server.headers, until, stats),
                             *[client_loop(i, server.base_url, server.headers, prompts, until, stats, max_tokens)
                               for i in range(clients)])

    started = time.monotonic()
    asyncio.run(go())
    elapsed = time.monotonic() - started
    db = sqlite3.connect(f"file:{data_dir / 'tellerloop.db'}?mode=ro", uri=True)
    final = {row[0]: row[1] for row in db.execute("SELECT id, finish_reason FROM exchanges")}
    streaming = db.execute("SELECT count(*) FROM exchanges WHERE finish_reason = 'streaming'").fetchone()[0]
    db.close()
    lost = [e for e in stats["completed"] if final.get(e) not in ("stop", "length")]
    return {"clients": clients, "seconds": round(elapsed, 1), "completed": len(stats["completed"]),
            "chats_per_s": len(stats["completed"]) / elapsed, "tokens_per_s": stats["tokens"] / elapsed,
            "latency_p50": pct(stats["latency"], 0.5), "latency_p99": pct(stats["latency"], 0.99),
            "ttft_p50": pct(stats["ttft"], 0.5), "ttft_p99": pct(stats["ttft"], 0.99),
            "status": {str(k): v for k, v in stats["status"].items()},
            "errors_5xx": sum(v for k, v in stats["status"].items() if isinstance(k, int) and k >= 500),
            "feedback": {str(k): v for k, v in stats["feedback"].items()},
            "review": {str(k): v for k, v in stats["review"].items()},
            "lost_exchanges": len(lost), "left_streaming": streaming}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--levels", default="16,64")
    parser.add_argument("--seconds", type=float, default=90)
    parser.add_argument("--max-tokens", type=int, default=48)
    args = parser.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    prompts = load_prompts(2000)
    results, rss = [], {}
    work = Path(tempfile.mkdtemp(prefix="tellerloop-load-"))  # one data dir: the model cache and FAQ are built once
    for clients in levels:
        server = start_gateway(work, rag=True)  # a fresh server process per level
        sampler = RssSampler(server.proc.pid)
        sampler.start()
        try:
            result = level_run(server, work / "var", clients, args.seconds, prompts, args.max_tokens)
            result["peak_rss_mb"] = max((mb for _, mb in sampler.samples), default=None)
            results.append(result)
            rss[clients] = sampler.samples
            print(json.dumps(result), flush=True)
        finally:
            sampler.stopped.set()
            server.stop()
    base = results[0]
    lines = ["# Load test (bench/load.py)", "",
             f"Real SmolLM2, retrieval on, {args.max_tokens} new tokens at most, {args.seconds:.0f} s per level; "
             "half the chats streamed, a third rated, one reviewer approving from the queue. 2-core VM, one run.", "",
             "| clients | chats | chats/s | tok/s | ratio vs first level | latency p50 / p99 | TTFT p50 / p99 (streams) "
             "| 5xx | other errors | lost exchanges | left streaming | peak RSS |",
             "| ---: | ---: | ---: | ---: | ---: | --- | --- | ---: | --- | ---: | ---: | ---: |"]
    for r in results:
        other = {k: v for k, v in r["status"].items() if k != "200" and not (k.isdigit() and int(k) >= 500)}
        lines.append(f"| {r['clients']} | {r['completed']} | {r['chats_per_s']:.2f} | {r['tokens_per_s']:.1f} | "
                     f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x | {r['latency_p50']:.2f} / {r['latency_p99']:.2f} s | "
                     f"{(r['ttft_p50'] or 0):.2f} / {(r['ttft_p99'] or 0):.2f} s | {r['errors_5xx']} | {other or '—'} | "
                     f"{r['lost_exchanges']} | {r['left_streaming']} | {r['peak_rss_mb']:.0f} MB |")
    lines += ["", "Feedback and review calls per level: " + "; ".join(
        f"{r['clients']} clients: feedback {r['feedback']}, review {r['review']}" for r in results)]
    text = "\n".join(lines) + "\n"
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "load.md").write_text(text)
    (RESULTS / "load.json").write_text(json.dumps({"args": vars(args), "results": results, "rss": rss}, indent=1))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 3.5))
        for clients, samples in rss.items():
            ax.plot([t for t, _ in samples], [mb for _, mb in samples], label=f"{clients} clients")
        ax.set_xlabel("seconds into the level"), ax.set_ylabel("server RSS (MB)"), ax.legend()
        ax.set_title("tellerloop under load: memory over time")
        fig.tight_layout()
        fig.savefig(RESULTS / "load.png", dpi=110)
    except ImportError:
        print("matplotlib missing (make bench-deps): no plot")


if __name__ == "__main__":
    main()
