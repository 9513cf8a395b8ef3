"""float32 decode steps with plain (MKL) vs oneDNN-prepacked weights, side by side in one process.

The engine's step (gateway/engine/slots.py `forward`) on the real SmolLM2-135M with the shipped
v0001 adapter routed to every row, in float32, for each weight layout: `plain` (`nn.Linear`, MKL
sgemm) and `packed-N` (gateway/engine/packed.py, oneDNN's blocked layout tuned for N rows). Every
layout is its own copy of the model in this one process, and the rounds alternate between them
(ABAB...), so the machine's drift hits every layout alike; the table gives each layout's median
step time per scenario and its speed-up over `plain` measured in the same rounds.

Scenarios: 1, 16 and 64 decoding rows at ~120 tokens of context, and 16 decoding rows with a
512-token prompt chunk in the same step (an admission). Also the output head's matrix alone
(49152 × 576) at 1 / 16 / 64 rows.

    .venv/bin/python bench/packed_linear.py [--hints 16,64] [--rounds 5]
Writes bench/results/packed_linear.json and .md.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results"
ADAPTER = ROOT / "data" / "adapters" / "bootstrap"

import torch  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from gateway.engine.lora import LoraBank  # noqa: E402
from gateway.engine.model_files import convert_embedded  # noqa: E402
from gateway.engine.packed import pack_linears  # noqa: E402
from gateway.engine.slots import ATTENTION, SlotCache, StepPlan, forward  # noqa: E402

CONTEXT = 120
SCENARIOS = [("1 row", 1, 0), ("16 rows", 16, 0), ("64 rows", 64, 0), ("16 rows + 512-token chunk", 16, 512)]


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


class Layout:
    def __init__(self, name: str, model_dir: Path, hint: int) -> None:
        self.name = name
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                          attn_implementation=ATTENTION).eval()
        if hint:
            pack_linears(self.model, hint)
        self.bank = LoraBank(self.model)
        self.bank.add("v0001", ADAPTER, self.bank.read("v0001", ADAPTER))
        cfg = self.model.config
        self.cache = SlotCache(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads,
                               torch.float32, max_rows=80, block_tokens=64)
        self.cache.reserve(65, 640)
        self.cache.used.update(range(65))
        for t in self.cache.keys + self.cache.values:
            t.normal_()

    def step(self, rows: int, chunk: int) -> None:
        plan = StepPlan(self.cache, torch.arange(rows), torch.full((rows,), CONTEXT, dtype=torch.long))
        tokens = rows
        if chunk:
            plan.chunk_row, plan.chunk_rows, plan.chunk_tokens = rows, 1, chunk
            plan.chunk_starts = torch.zeros(1, dtype=torch.long)
            tokens += chunk
        self.bank.route(["v0001"] * tokens)
        forward(self.model, plan, torch.randint(0, 1000, (tokens,)), torch.arange(rows))


def timed(fn, repeat: int) -> float:
    fn()  # warm: oneDNN creates its primitive for this shape on first use
    started = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - started) / repeat


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hints", default="16,64", help="row counts to pack for (comma-separated)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", default=str(RESULTS / "packed_linear.md"))
    args = parser.parse_args()
    model_dir = convert_embedded(ROOT / ".cache" / "test-models")
    layouts = [Layout("plain", model_dir, 0)] + [Layout(f"packed-{h}", model_dir, int(h)) for h in args.hints.split(",")]
    times: dict[str, dict[str, list[float]]] = {lay.name: {} for lay in layouts}
    head = layouts[0].model.lm_head.weight.detach()
    heads = {"plain": lambda x: torch.nn.functional.linear(x, head)}
    for lay in layouts[1:]:
        packed = lay.model.lm_head
        heads[lay.name] = packed
    with torch.inference_mode():
        for r in range(args.rounds):
            for label, rows, chunk in SCENARIOS:
                repeat = 2 if chunk else max(3, 48 // rows)
                for lay in layouts if r % 2 == 0 else layouts[::-1]:
                    times[lay.name].setdefault(label, []).append(timed(lambda: lay.step(rows, chunk), repeat))
            for rows in (1, 16, 64):
                x = torch.randn(rows, head.shape[1])
                for lay in layouts if r % 2 == 0 else layouts[::-1]:
                    times[lay.name].setdefault(f"head, {rows} rows", []).append(timed(lambda: heads[lay.name](x), 5))
            print(f"round {r + 1}/{args.rounds} done", flush=True)
    labels = list(times["plain"])
    table = {}
    for lay in layouts:
        table[lay.name] = {}
        for label in labels:
            ms = statistics.median(times[lay.name][label]) * 1000
            ratios = [p / t for p, t in zip(times["plain"][label], times[lay.name][label])]  # same round
            table[lay.name][label] = {"ms": round(ms, 2), "speedup": round(statistics.median(ratios), 2)}
    header = (f"# float32 weight layout: plain (MKL) vs oneDNN-prepacked ({time.strftime('%Y-%m-%d')}, {cpu_name()}, "
              f"{torch.get_num_threads()} torch threads, torch {torch.__version__})\n\n"
              f"Real SmolLM2-135M, v0001 adapter on every row, context {CONTEXT} tokens; median of {args.rounds} "
              "alternating rounds per layout, speed-up = median over rounds of plain's time / the layout's in the same round.\n")
    lines = [header, "| scenario | " + " | ".join(f"{lay.name} ms" for lay in layouts) + " | "
             + " | ".join(f"{lay.name} × plain" for lay in layouts[1:]) + " |",
             "| --- | " + " | ".join("---:" for _ in layouts) + " | " + " | ".join("---:" for _ in layouts[1:]) + " |"]
    for label in labels:
        lines.append(f"| {label} | " + " | ".join(f"{table[lay.name][label]['ms']:.1f}" for lay in layouts) + " | "
                     + " | ".join(f"{table[lay.name][label]['speedup']:.2f}" for lay in layouts[1:]) + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(args.out)
    out.write_text(text)
    out.with_suffix(".json").write_text(json.dumps({"cpu": cpu_name(), "threads": torch.get_num_threads(),
                                                    "table": table, "raw_s": times}, indent=1))


if __name__ == "__main__":
    main()
