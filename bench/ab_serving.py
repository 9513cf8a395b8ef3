"""What serving a challenger beside the champion costs: throughput, memory, load time.

Rows (each in its own fresh process, the real SmolLM2 in `--dtype` (the product's default), greedy):
  * `champion only`     - 16 concurrent requests, all on one adapter (the baseline)
  * `champion + challenger` - the same 16 requests split 50/50 between two adapters (one batch)
  * `base model only`   - the same requests with no adapter: what applying LoRA per row costs
Also per row: seconds to load (read) an adapter, weight bytes per variant and the process RSS
growth per loaded adapter. Adapters are real PEFT LoRA folders (r=16 on q/k/v/o, like training)
with random weights: speed and memory do not depend on what they learned.

Usage: python bench/ab_serving.py [--requests 16] [--max-tokens 48] [--out bench/results/ab_serving.md]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.engine_throughput import QUESTIONS  # noqa: E402  (the same 16 banking questions)
from gateway.core.settings import ModelSettings  # noqa: E402


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def make_adapter(model_dir: Path, out: Path, seed: int) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                           LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                      init_lora_weights=False))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(0.01)
    model.save_pretrained(out)


async def run_row(model_dir: str, adapters: list[str], requests: int, max_tokens: int, dtype: str) -> dict:
    from gateway.engine.base import Finished, GenerationRequest, SamplingParams
    from gateway.engine.local import LocalEngine

    engine = LocalEngine(model_dir, dtype=dtype, max_batch=requests, max_queue=requests * 2)
    await engine.start()
    rss = [rss_bytes()]
    load_s = []
    names: list[str] = []
    for i, path in enumerate(adapters):
        started = time.perf_counter()
        await engine.load_adapter(f"v{i + 1}", path)
        load_s.append(time.perf_counter() - started)
        rss.append(rss_bytes())
        names.append(f"v{i + 1}")
    names = names or ["base"]
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, repetition_penalty=1.15)

    async def one(i: int) -> int:
        msgs = [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]
        adapter = names[i % len(names)]
        stream = await engine.submit(GenerationRequest(uuid.uuid4().hex, msgs, params,
                                                       adapter=None if adapter == "base" else adapter))
        events = [e async for e in stream]
        return events[-1].completion_tokens if isinstance(events[-1], Finished) else 0

    await asyncio.gather(*[one(i) for i in range(len(names))])  # warm-up: one request per variant
    started = time.perf_counter()
    tokens = sum(await asyncio.gather(*[one(i) for i in range(requests)]))
    seconds = time.perf_counter() - started
    weights = engine.weight_bytes()
    rss_after = rss_bytes()
    await engine.stop()
    return {"variants": names, "tokens": tokens, "seconds": seconds, "tok_s": tokens / seconds,
            "load_s": load_s, "weight_bytes": weights, "rss_after_run": rss_after,
            "rss_growth_per_adapter": [b - a for a, b in zip(rss, rss[1:])]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default=ModelSettings().dtype, help="model.dtype (default: the product's)")
    ap.add_argument("--out", default="bench/results/ab_serving.md")
    ap.add_argument("--row", help=argparse.SUPPRESS)  # internal: run one row in this process
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--adapters", nargs="*", default=[], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.row:
        print(json.dumps(asyncio.run(run_row(args.model, args.adapters, args.requests, args.max_tokens, args.dtype))))
        return

    from gateway.engine.model_files import convert_embedded

    model_dir = convert_embedded(Path(".cache/test-models"))
    with tempfile.TemporaryDirectory() as tmp:
        paths = [Path(tmp) / "a1", Path(tmp) / "a2"]
        for seed, path in enumerate(paths, 1):
            make_adapter(model_dir, path, seed)
        runs: dict[str, list[dict]] = {}
        for _ in range(args.repeats):  # rows interleaved, so drifting machine load hits all of them
            for label, adapters in (("champion only", paths[:1]), ("champion + challenger", paths), ("base model only", [])):
                out = subprocess.run([sys.executable, __file__, "--row", label, "--model", str(model_dir),
                                      "--requests", str(args.requests), "--max-tokens", str(args.max_tokens), "--dtype", args.dtype,
                                      "--adapters", *map(str, adapters)], capture_output=True, text=True, check=True)
                runs.setdefault(label, []).append(json.loads(out.stdout.strip().splitlines()[-1]))
                print(label, runs[label][-1]["tok_s"], flush=True)
        rows = {label: {**sorted(rs, key=lambda r: r["tok_s"])[len(rs) // 2],
                        "all_tok_s": [round(r["tok_s"], 1) for r in rs]} for label, rs in runs.items()}
    base = rows["champion only"]["tok_s"]
    lines = [
        "# Serving a challenger beside the champion",
        "",
        f"{platform.processor() or platform.machine()}, {args.requests} concurrent requests × {args.max_tokens} tokens, "
        f"real SmolLM2-135M {args.dtype}, greedy; each row in a fresh process, {args.repeats} interleaved repeats, "
        "the median shown (all runs in the last column).",
        "",
        "| row | tokens/s | ratio vs champion only | adapter load (read) s | weight MB per variant | RSS growth at load MB | RSS after the run MB | all runs tok/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, r in rows.items():
        weights = ", ".join(f"{k} {v / 2**20:.0f}" for k, v in r["weight_bytes"].items())
        lines.append(f"| {label} | {r['tok_s']:.1f} | {r['tok_s'] / base:.2f}x | "
                     f"{', '.join(f'{s:.1f}' for s in r['load_s'])} | {weights} | "
                     f"{', '.join(f'{b / 2**20:.0f}' for b in r['rss_growth_per_adapter'])} | "
                     f"{r['rss_after_run'] / 2**20:.0f} | {', '.join(map(str, r['all_tok_s']))} |")
    extra = rows["champion + challenger"]["rss_after_run"] - rows["champion only"]["rss_after_run"]
    lora_cost = rows["champion only"]["tok_s"] / rows["base model only"]["tok_s"]
    lines += ["", f"A served challenger costs {extra / 2**20:.0f} MB of resident memory after use (RSS difference "
              "between the rows). Adapters are unmerged LoRA matrices over the one shared base, and every variant "
              "decodes in the same batch, so a 50/50 split keeps the batch whole; applying LoRA per row runs at "
              f"{lora_cost:.2f}x the base model's throughput."]
    out = Path(args.out)
    out.write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
