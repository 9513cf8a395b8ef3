"""What a gateway in front of an upstream engine adds (`engine.backend = "openai"`).

B is a tellerloop gateway in `local` mode (the upstream: an OpenAI-compatible server with
log-probabilities and vLLM's dynamic LoRA API); A is a second gateway whose engine is B. The same
streamed chats go straight to B (the baseline) and through A, interleaved round by round in the
same run, at 1 and 16 concurrent streams. Retrieval is off on both, so the difference is the
gateway's own path: HTTP, auth, validation, PII scrubbing, the relay of every chunk, confidence
and the exchange write. The upstream runs a tiny random-weight model by default, so its own time
is small and the gateway's cost is visible (`--model real` uses the embedded SmolLM2).

    .venv/bin/python bench/upstream.py [--model tiny|real] [--requests 48] [--rounds 3] [--pin]

Reports p50/p99 of the time to first token and of the whole answer, per level, direct vs through A,
and the difference; chunks per answer show that A relays the stream chunk by chunk (a buffering
proxy would have TTFT ≈ the whole answer). Writes bench/results/upstream.{md,json}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

from serve import (  # noqa: E402
    BENCH_KEY,
    CACHE,
    Server,
    load_prompts,
    one_request,
    pct,
    start_gateway,
)

MAX_TOKENS = 32


def tiny_model() -> Path:
    """A 2-layer random-weight Llama with SmolLM2's tokenizer (what the plumbing tests use)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from gateway.engine.model_files import convert_embedded

    target = CACHE / "tiny-llama-v1"
    if (target / "model.safetensors").is_file():
        return target
    tokenizer = AutoTokenizer.from_pretrained(convert_embedded(CACHE))
    torch.manual_seed(1234)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    tmp = CACHE / ".tiny-llama.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    LlamaForCausalLM(config).save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(target)
    return target


def pin(pid: int, cpus: set[int]) -> None:
    """Every thread of a process onto `cpus` (threads it starts later inherit it)."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            os.sched_setaffinity(int(task.name), cpus)
        except OSError:
            pass


def cpu_seconds(server: Server) -> float:
    """User + system CPU time the server process has used so far (/proc/<pid>/stat)."""
    fields = Path(f"/proc/{server.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def level(server: Server, prompts: list[list[dict]], streams: int, requests: int) -> dict:
    """`requests` streamed chats over `streams` concurrent clients: raw TTFTs and answer times."""
    import httpx

    async def go() -> dict:
        limits = httpx.Limits(max_connections=streams + 4, max_keepalive_connections=streams + 4)
        async with httpx.AsyncClient(timeout=httpx.Timeout(600), limits=limits) as client:
            async def worker(w: int) -> list[tuple]:
                out = []
                for i in range(max(1, requests // streams)):
                    t0 = time.perf_counter()
                    result = await one_request(client, server, prompts[(w * 97 + i) % len(prompts)], MAX_TOKENS,
                                               {"rag": False})
                    out.append((result, time.perf_counter() - t0))
                return out

            started = time.perf_counter()
            done = [x for xs in await asyncio.gather(*[worker(w) for w in range(streams)]) for x in xs]
            wall = time.perf_counter() - started
        ok = [(r, t) for r, t in done if r.error is None]
        errors = [r.error for r, _ in done if r.error]
        return {"requests": len(done), "errors": len(errors), "first_error": errors[0] if errors else None,
                "ttfts": [r.ttft for r, _ in ok if r.ttft is not None], "totals": [t for _, t in ok],
                "tok_s": sum(r.tokens for r, _ in ok) / wall}

    return asyncio.run(go())


def chunks_per_answer(server: Server, prompt: list[dict]) -> int:
    import httpx

    body = {"model": server.model, "messages": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "stream": True,
            "rag": False}
    with httpx.stream("POST", f"{server.base_url}/v1/chat/completions", json=body, headers=server.headers,
                      timeout=120) as r:
        return sum(1 for line in r.iter_lines()
                   if line.startswith("data: {") and any((c.get("delta") or {}).get("content")
                                                         for c in json.loads(line[6:]).get("choices") or []))


def run(model: str, requests: int, rounds: int, pinned: bool) -> dict:
    base = str(tiny_model()) if model == "tiny" else ""
    model_toml = f'[model]\nbase = "{base}"\n' if base else ""
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "b").mkdir()
        (work / "a").mkdir()
        upstream = start_gateway(work / "b", rag=False, extra_toml=model_toml)
        try:
            front = start_gateway(work / "a", rag=False, extra_toml=(
                model_toml + f'[engine]\nbackend = "openai"\nupstream_url = "{upstream.base_url}/v1"\n'
                f'upstream_api_key = "{BENCH_KEY}"\nupstream_model = "base"\nupstream_extra_body = {{rag = false}}\n'))
            try:
                upstream.model = front.model = "base"
                if pinned:  # the upstream gets a core of its own, as on its own host; the gateway shares the client's
                    pin(upstream.proc.pid, {0})
                    pin(front.proc.pid, {1})
                    pin(os.getpid(), {1})
                prompts = [[{"role": "user", "content": q}] for q in load_prompts(64)]
                level(upstream, prompts, 2, 4)  # warm-up both paths
                level(front, prompts, 2, 4)
                rows = []
                for streams in (1, 16):
                    direct, via = [], []
                    cpu = {"upstream_direct": 0.0, "upstream_via": 0.0, "gateway": 0.0}
                    for _ in range(rounds):  # interleaved: the machine's noise falls on both
                        b0 = cpu_seconds(upstream)
                        direct.append(level(upstream, prompts, streams, requests))
                        b1, a1 = cpu_seconds(upstream), cpu_seconds(front)
                        via.append(level(front, prompts, streams, requests))
                        cpu["upstream_direct"] += b1 - b0
                        cpu["upstream_via"] += cpu_seconds(upstream) - b1
                        cpu["gateway"] += cpu_seconds(front) - a1
                    answers = {"upstream_direct": sum(r["requests"] for r in direct)}
                    answers["upstream_via"] = answers["gateway"] = sum(r["requests"] for r in via)
                    rows.append({"streams": streams, "direct": merge(direct), "via": merge(via),
                                 "cpu_ms_per_answer": {k: round(1000 * v / answers[k], 1) for k, v in cpu.items()}})
                    print(f"  {streams:2d} streams: TTFT p50 direct {rows[-1]['direct']['ttft_p50']:.4f} s, "
                          f"via gateway {rows[-1]['via']['ttft_p50']:.4f} s", flush=True)
                chunks = {"direct": chunks_per_answer(upstream, prompts[0]), "via": chunks_per_answer(front, prompts[0])}
            finally:
                front.stop()
        finally:
            upstream.stop()
    return {"model": model, "pinned": pinned, "max_tokens": MAX_TOKENS, "requests_per_round": requests, "rounds": rounds,
            "levels": rows, "chunks_per_answer": chunks}


def merge(runs: list[dict]) -> dict:
    """p50/p99 over every request of every round (the rounds' raw values are kept in `rounds`)."""
    ttft = [v for r in runs for v in r["ttfts"]]
    total = [v for r in runs for v in r["totals"]]
    return {"requests": sum(r["requests"] for r in runs), "errors": sum(r["errors"] for r in runs),
            "ttft_p50": pct(ttft, 0.5), "ttft_p99": pct(ttft, 0.99),
            "total_p50": pct(total, 0.5), "total_p99": pct(total, 0.99),
            "tok_s": round(sum(r["tok_s"] for r in runs) / len(runs), 1),
            "first_error": next((r["first_error"] for r in runs if r["first_error"]), None)}


def report(data: dict) -> str:
    ms = lambda v: f"{v * 1000:.1f}"  # noqa: E731
    lines = [f"Upstream: a tellerloop gateway on the {'tiny random-weight' if data['model'] == 'tiny' else 'embedded SmolLM2'} "
             f"model, {data['max_tokens']} tokens per answer, streamed, retrieval off; {data['rounds']} interleaved rounds "
             f"of {data['requests_per_round']} requests per path and level."
             + (" The upstream pinned to core 0, the gateway and the client to core 1." if data.get("pinned") else
                " All processes share every core."), "",
             "| streams | path | TTFT p50 ms | TTFT p99 ms | answer p50 ms | answer p99 ms | tok/s | errors |",
             "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for row in data["levels"]:
        for path, label in (("direct", "client → upstream (baseline)"), ("via", "client → gateway → upstream")):
            r = row[path]
            lines.append(f"| {row['streams']} | {label} | {ms(r['ttft_p50'])} | {ms(r['ttft_p99'])} | {ms(r['total_p50'])} | "
                         f"{ms(r['total_p99'])} | {r['tok_s']} | {r['errors']} |")
        d, v = row["direct"], row["via"]
        lines.append(f"| {row['streams']} | **added by the gateway** | **{ms(v['ttft_p50'] - d['ttft_p50'])}** | "
                     f"{ms(v['ttft_p99'] - d['ttft_p99'])} | **{ms(v['total_p50'] - d['total_p50'])}** | "
                     f"{ms(v['total_p99'] - d['total_p99'])} | {v['tok_s'] / d['tok_s']:.2f}× | |")
    lines += ["", "CPU time per answer (ms; the processes share this machine's cores, so the gateway's CPU is time the "
                  "upstream could not use):", "",
              "| streams | upstream, direct | upstream, behind the gateway | the gateway itself |", "| ---: | ---: | ---: | ---: |"]
    for row in data["levels"]:
        c = row["cpu_ms_per_answer"]
        lines.append(f"| {row['streams']} | {c['upstream_direct']} | {c['upstream_via']} | {c['gateway']} |")
    c = data["chunks_per_answer"]
    lines += ["", f"Content chunks in one {data['max_tokens']}-token answer: {c['direct']} direct, {c['via']} through the "
                  "gateway (relayed one by one, not buffered)."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=["tiny", "real"], default="tiny")
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--pin", action="store_true", help="upstream on core 0; gateway and client on core 1")
    parser.add_argument("--from-json")
    args = parser.parse_args()
    data = json.loads(Path(args.from_json).read_text()) if args.from_json else run(args.model, args.requests, args.rounds, args.pin)
    text = report(data)
    print(text)
    if not args.from_json:
        out = ROOT / "bench" / "results"
        (out / "upstream.json").write_text(json.dumps(data, indent=1))
        (out / "upstream.md").write_text("# Gateway in front of an upstream engine (bench/upstream.py)\n\n" + text + "\n")


if __name__ == "__main__":
    main()
