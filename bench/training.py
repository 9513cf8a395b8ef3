"""Training speed and peak memory on the demo FAQ: the output head on every position (the model's
own loss) vs on answer tokens only (the default), bf16 autocast, QLoRA (bitsandbytes nf4 base).

Each row trains in a fresh subprocess (peak RSS is per process; in-process rows would disturb each
other), with the prompts serving would build: the system prompt plus the FAQ entry as retrieved
context (`--no-context` for bare questions). The first row is the baseline measured in the same run.

    .venv/bin/python bench/training.py [--steps 6] [--no-context] [--methods full-head,lora,bf16,qlora]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results"


# name → (training settings, table label); the first row run is the baseline of the others
METHODS = {
    "full-head": ({"answer_only_logits": False}, "LoRA fp32, head on every position (transformers' own loss)"),
    "lora": ({}, "LoRA fp32, head on answer tokens only (`training.answer_only_logits`, the default)"),
    "bf16": ({"bf16": True}, "LoRA, bf16 autocast (`training.bf16`), head on answer tokens"),
    "qlora": ({"quantization": "4bit"}, "QLoRA (nf4 base, bitsandbytes), head on answer tokens"),
}


def one(training: dict, steps: int, context: bool) -> dict:
    """Runs in the child process."""
    import resource

    from gateway.chat.prompting import build_messages
    from gateway.core.settings import load_settings
    from gateway.knowledge.store import Hit
    from retraining.evaluate import load_qa
    from retraining.finetune import train_adapter

    settings = load_settings(None, storage={"data_dir": str(ROOT / ".cache" / "bench")},
                             training={"max_steps": steps, "nice": 0, **training})
    rows = load_qa(ROOT / "data" / "bank_faq" / "faq.csv", steps * 16 + 16, seed=7)

    def messages(qa):  # noqa: ANN001
        hit = Hit("x", qa.answer, 0.9, {"kind": "qa", "question": qa.question, "answer": qa.answer})
        return build_messages(settings, [{"role": "user", "content": qa.question}], [hit] if context else None) + [
            {"role": "assistant", "content": qa.answer}]

    train = [messages(qa) for qa in rows[16:]]
    evals = [messages(qa) for qa in rows[:16]]
    out = ROOT / ".cache" / "bench" / "adapter"
    started = time.perf_counter()
    metrics = train_adapter(settings, train, evals, out, lambda p: None, lambda line: None)
    metrics["wall_s"] = round(time.perf_counter() - started, 1)
    metrics["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    metrics["examples"] = len(train)
    return metrics


def cpu() -> str:
    from bench.serve import cpu_name
    from gateway.engine.precision import native_bf16

    return f"{cpu_name()}, {os.cpu_count()} cores, {'native' if native_bf16() else 'no'} bf16 instructions"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--no-context", action="store_true")
    parser.add_argument("--methods", default="full-head,lora,bf16,qlora",
                        help="rows, in order, the first the baseline: " + ",".join(METHODS))
    parser.add_argument("--child", choices=list(METHODS))
    args = parser.parse_args()
    if args.child:
        print(json.dumps(one(METHODS[args.child][0], args.steps, not args.no_context)))
        return
    methods = [m for m in args.methods.split(",") if m]
    rows = {}
    for method in methods:
        cmd = [sys.executable, __file__, "--child", method, "--steps", str(args.steps)] + (["--no-context"] if args.no_context else [])
        out = subprocess.run(cmd, capture_output=True, text=True, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
        if out.returncode:
            raise SystemExit(out.stderr[-3000:])
        rows[method] = json.loads(out.stdout.strip().splitlines()[-1])
        print(method, json.dumps(rows[method]), flush=True)
    base = rows[methods[0]]
    lines = [f"| method | optimizer steps | examples/s | ratio vs {methods[0]} | peak RSS MB | ratio vs {methods[0]} | train loss | eval loss |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for method in methods:
        r, name = rows[method], METHODS[method][1]
        lines.append(f"| {name} | {r['steps']} | {r['examples_per_s']:.3f} | {r['examples_per_s'] / base['examples_per_s']:.2f}x "
                     f"| {r['peak_rss_mb']:.0f} | {r['peak_rss_mb'] / base['peak_rss_mb']:.2f}x | {r['train_loss']:.3f} | {r['eval_loss']:.3f} |")
    table = "\n".join(lines)
    print(table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    note = (f"SmolLM2-135M-Instruct, r=16 on q/k/v/o, batch 4 x accumulation 4 (16 examples per step), "
            f"{'with' if not args.no_context else 'without'} the retrieved FAQ entry in the prompt; {cpu()}, "
            f"{time.strftime('%Y-%m-%d')}.\n\n")
    (RESULTS / "training.md").write_text(f"# Training speed: where the head runs, bf16 autocast, QLoRA\n\n{note}{table}\n")
    (RESULTS / "training.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
