"""Engine throughput and cold start, with baselines measured in the same run.

Every row runs in its own fresh process: measured here, a model that ran earlier in the same
process slows later rows by up to 40 % (competing OpenMP thread pools), which would bias the ratios.

Rows:
  * `hf generate, 1 stream`  - plain `model.generate()` one request at a time (the baseline)
  * `engine, 1 stream`       - our LocalEngine, one request at a time
  * `engine, N concurrent`   - N requests submitted at once (continuous batching)
for float32 and bfloat16. Ratios are against the hf-generate baseline of the same dtype.
Also: cold start (GGUF → safetensors conversion) vs warm start (load the cache).

Usage: python bench/engine_throughput.py [--max-tokens 64] [--out bench/results/engine_throughput.md]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from gateway.engine.base import Finished, GenerationRequest, SamplingParams  # noqa: E402
from gateway.engine.local import LocalEngine  # noqa: E402
from gateway.engine.model_files import convert_embedded  # noqa: E402

QUESTIONS = [
    "How do I block my debit card?", "What is the daily ATM withdrawal limit?",
    "How can I change my registered mobile number?", "Can I open a savings account online?",
    "What is a fixed deposit?", "How do I reset my internet banking password?",
    "What should I do if I forget my PIN?", "How long does an international transfer take?",
    "Are there charges for cheque deposits?", "How do I apply for a home loan?",
    "What documents do I need to open an account?", "How can I update my address?",
    "What is the interest rate on savings?", "How do I activate mobile banking?",
    "Can I stop a cheque payment?", "How do I report a fraudulent transaction?",
]
SYSTEM = "You are a helpful and concise customer support assistant for a retail bank."


def messages(q: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}]


def hf_generate(model_dir: Path, dtype: torch.dtype, questions: list[str], max_tokens: int) -> tuple[int, float]:
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    tokens, started = 0, time.perf_counter()
    with torch.inference_mode():
        for q in questions:
            text = tok.apply_chat_template(messages(q), add_generation_prompt=True, tokenize=False)
            ids = tok(text, return_tensors="pt", add_special_tokens=False)
            out = model.generate(**ids, max_new_tokens=max_tokens, do_sample=False,
                                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
            tokens += out.shape[1] - ids["input_ids"].shape[1]
    return tokens, time.perf_counter() - started


async def engine_run(engine: LocalEngine, questions: list[str], max_tokens: int, concurrent: bool):
    async def one(q: str) -> tuple[int, float]:
        t0 = time.perf_counter()
        stream = await engine.submit(GenerationRequest("b", messages(q), SamplingParams(max_tokens=max_tokens)))
        ttft = None
        async for ev in stream:
            if ttft is None:
                ttft = time.perf_counter() - t0
            if isinstance(ev, Finished):
                return ev.completion_tokens, ttft
        raise RuntimeError("no Finished event")

    started = time.perf_counter()
    if concurrent:
        results = await asyncio.gather(*[one(q) for q in questions])
    else:
        results = [await one(q) for q in questions]
    elapsed = time.perf_counter() - started
    ttfts = sorted(r[1] for r in results)
    return sum(r[0] for r in results), elapsed, ttfts[len(ttfts) // 2]


async def bench_engine(model_dir: Path, dtype: str, batch: int, questions: list[str], max_tokens: int):
    engine = LocalEngine(str(model_dir), dtype=dtype, max_batch=batch, max_queue=256)
    await engine.start()
    try:
        await engine_run(engine, questions[:1], 4, False)  # warm-up
        single = await engine_run(engine, questions[:4], max_tokens, False)
        conc = await engine_run(engine, questions[:batch], max_tokens, True)
    finally:
        await engine.stop()
    return single, conc


def run_row(kind: str, model_dir: Path, dtype: str, batch: int, max_tokens: int) -> list:
    """Runs in a child process; prints one JSON result line."""
    if kind == "hf":
        tokens, seconds = hf_generate(model_dir, getattr(torch, dtype), QUESTIONS[:4], max_tokens)
        return [tokens, seconds, None]
    single, conc = asyncio.run(bench_engine(model_dir, dtype, batch, QUESTIONS, max_tokens))
    return [list(single), list(conc)]


def child(kind: str, model_dir: Path, dtype: str, args: argparse.Namespace):
    cmd = [sys.executable, __file__, "--row", kind, "--model-dir", str(model_dir), "--dtype", dtype,
           "--batch", str(args.batch), "--max-tokens", str(args.max_tokens)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--out", default="bench/results/engine_throughput.md")
    parser.add_argument("--row", choices=["hf", "engine"], help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--dtype", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.row:
        print(json.dumps(run_row(args.row, Path(args.model_dir), args.dtype, args.batch, args.max_tokens)))
        return

    cold_dir = Path(tempfile.mkdtemp())
    t0 = time.perf_counter()
    model_dir = convert_embedded(cold_dir)
    cold = time.perf_counter() - t0
    t0 = time.perf_counter()
    AutoModelForCausalLM.from_pretrained(model_dir)
    AutoTokenizer.from_pretrained(model_dir)
    warm = time.perf_counter() - t0

    rows = []
    for dtype_name in ("float32", "bfloat16"):
        base_tokens, base_s, _ = child("hf", model_dir, dtype_name, args)
        base_tps = base_tokens / base_s
        rows.append((dtype_name, "hf generate, 1 stream (baseline)", base_tokens, base_s, base_tps, 1.0, None))
        (s_tok, s_s, s_ttft), (c_tok, c_s, c_ttft) = child("engine", model_dir, dtype_name, args)
        rows.append((dtype_name, "engine, 1 stream", s_tok, s_s, s_tok / s_s, s_tok / s_s / base_tps, s_ttft))
        rows.append((dtype_name, f"engine, {args.batch} concurrent", c_tok, c_s, c_tok / c_s,
                     c_tok / c_s / base_tps, c_ttft))
    shutil.rmtree(cold_dir, ignore_errors=True)

    lines = [
        f"# Engine throughput ({time.strftime('%Y-%m-%d')}, {platform.machine()}, {torch.get_num_threads()} torch threads,"
        f" greedy, max_tokens={args.max_tokens}, each row in a fresh process)",
        "",
        "| dtype | mode | tokens | seconds | tokens/s | × baseline | TTFT p50 (s) |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for d, mode, tok, sec, tps, ratio, ttft in rows:
        lines.append(f"| {d} | {mode} | {tok} | {sec:.1f} | {tps:.1f} | {ratio:.2f} | {'' if ttft is None else f'{ttft:.2f}'} |")
    lines += ["", f"Cold start (GGUF → safetensors conversion): {cold:.1f} s; warm load of the cache: {warm:.2f} s"]
    report = "\n".join(lines)
    print(report)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report + "\n")
    out.with_suffix(".json").write_text(json.dumps({"rows": rows, "cold_start_s": cold, "warm_load_s": warm}, indent=1))


if __name__ == "__main__":
    main()
