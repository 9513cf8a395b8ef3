"""One engine step, this tree against an earlier commit, side by side in one process.

The engine's step (gateway/engine/slots.py `forward`) on the real SmolLM2-135M with the shipped
v0001 adapter routed to every row, in the engine's default dtype on this CPU, as loaded by each
tree's own `LocalEngine` (fusion, packing, precision: whatever that tree does). The earlier commit
is checked out into a temporary git worktree and imported under its own module names; the two
engines live in this one process and the rounds alternate between them (ABAB...), so the machine's
drift hits both alike. The table gives each tree's median step time per scenario, the speed-up
measured in the same rounds, and the largest |difference| between the two trees' logits (0.0: the
same arithmetic).

Scenarios: 1, 4, 16 and 64 decoding rows at 150 tokens of context, 16 and 64 at 400 (a retrieval
prompt and its answer), and 16 decoding rows with a 512-token prompt chunk in the same step (an
admission).

    .venv/bin/python bench/engine_step.py --before 2c05772 [--rounds 16]
Writes bench/results/engine_step.json and .md.
"""

from __future__ import annotations

import argparse
import importlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
ADAPTER = ROOT / "data" / "adapters" / "bootstrap"
SCENARIOS = [("1 row", 1, 0, 150), ("4 rows", 4, 0, 150), ("16 rows", 16, 0, 150), ("64 rows", 64, 0, 150),
             ("16 rows at 400 tokens (retrieval-sized)", 16, 0, 400), ("64 rows at 400 tokens", 64, 0, 400),
             ("16 rows + 512-token chunk", 16, 512, 150)]  # (label, decoding rows, prompt chunk, context)


class Tree:
    """One source tree's engine, loaded with that tree's own code."""

    def __init__(self, label: str, path: Path, model_dir: Path) -> None:
        for name in [m for m in sys.modules if m == "gateway" or m.startswith("gateway.")]:
            del sys.modules[name]  # import this tree's gateway package afresh
        sys.path.insert(0, str(path))
        try:
            local = importlib.import_module("gateway.engine.local")
            self.slots = importlib.import_module("gateway.engine.slots")
            threads = importlib.import_module("gateway.engine.threads")
        finally:
            sys.path.remove(str(path))
        self.label = label
        self.use_threads_here = threads.use_threads_here
        self.engine = local.LocalEngine(str(model_dir), max_batch=64)
        self.engine._load()  # the model as the server loads it, without the worker thread
        bank = self.engine._bank
        bank.add("v0001", str(ADAPTER), bank.read("v0001", str(ADAPTER)))
        config = self.engine.model.config
        self.cache = self.slots.SlotCache(config.num_hidden_layers, config.num_key_value_heads,
                                          config.hidden_size // config.num_attention_heads, self.engine._dtype,
                                          max_rows=64)

    def step(self, rows: int, chunk: int, context: int):  # noqa: ANN201
        import torch

        self.engine._bank.route(["v0001"] * (rows + chunk))
        plan = self.slots.StepPlan(self.cache, torch.arange(rows), torch.full((rows,), context))
        if chunk:
            plan.chunk_row, plan.chunk_rows, plan.chunk_tokens = rows, 1, chunk
            plan.chunk_starts = torch.tensor([0])
        ids = torch.arange(rows + chunk) % 900 + 100
        pick = torch.arange(rows + (1 if chunk else 0))
        started = time.perf_counter()
        logits = self.slots.forward(self.engine.model, plan, ids, pick)
        return time.perf_counter() - started, logits


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--before", required=True, help="the git ref to compare against")
    parser.add_argument("--rounds", type=int, default=16)
    parser.add_argument("--out", default=str(RESULTS / "engine_step"))
    args = parser.parse_args()

    sys.path.insert(0, str(ROOT))
    from bench.serve import cpu_name
    from gateway.engine.model_files import convert_embedded

    import torch

    threads = torch.get_num_threads()  # torch's default (the cores), read before an engine lowers it to 1
    model_dir = convert_embedded(ROOT / ".cache" / "test-models")
    commit = subprocess.run(["git", "rev-parse", "--short", args.before], cwd=ROOT, capture_output=True, text=True,
                            check=True).stdout.strip()
    with tempfile.TemporaryDirectory() as tmp:
        worktree = Path(tmp) / "before"
        subprocess.run(["git", "worktree", "add", "--detach", "-f", str(worktree), commit], cwd=ROOT, check=True,
                       capture_output=True)
        try:
            trees = [Tree(f"before ({commit})", worktree, model_dir), Tree("this tree", ROOT, model_dir)]
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(worktree)], cwd=ROOT, capture_output=True)

    trees[-1].use_threads_here(threads)  # this thread steps both engines, as their worker would
    rows_out = []
    with torch.inference_mode():
        for label, rows, chunk, context in SCENARIOS:
            times: dict[str, list[float]] = {t.label: [] for t in trees}
            logits = {}
            for _ in range(args.rounds + 2):
                for tree in trees:
                    seconds, logits[tree.label] = tree.step(rows, chunk, context)
                    times[tree.label].append(seconds)
            medians = {k: statistics.median(v[2:]) * 1000 for k, v in times.items()}  # the first two warm up
            before, after = (medians[t.label] for t in trees)
            diff = float((logits[trees[0].label] - logits[trees[1].label]).abs().max())
            rows_out.append({"scenario": label, "before_ms": round(before, 1), "after_ms": round(after, 1),
                             "speedup": round(before / after, 2), "max_abs_logit_diff": diff})
            print(rows_out[-1], flush=True)
    meta = {"cpu": cpu_name(), "threads": threads, "before": commit, "rounds": args.rounds,
            "date": time.strftime("%Y-%m-%d"), "dtype": trees[-1].engine.dtype}
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows_out}, indent=2) + "\n")
    lines = [f"# One engine step: this tree vs {commit} ({meta['date']}, {meta['cpu']}, {threads} threads, "
             f"{meta['dtype']}, SmolLM2-135M + v0001 on every row, {args.rounds} alternating rounds, one process)", "",
             f"| scenario | before ({commit}) ms | this tree ms | speed-up | max abs logit diff |",
             "| --- | ---: | ---: | ---: | ---: |"]
    lines += [f"| {r['scenario']} | {r['before_ms']} | {r['after_ms']} | {r['speedup']}x | {r['max_abs_logit_diff']:.3g} |"
              for r in rows_out]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
