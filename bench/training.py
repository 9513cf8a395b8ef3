"""Training speed and peak memory: LoRA (fp32 base) vs QLoRA (bitsandbytes nf4 base) on the demo FAQ.

Each row trains in a fresh subprocess (peak RSS is per process; in-process rows would disturb each
other), with the prompts serving would build: the system prompt plus the FAQ entry as retrieved
context (`--no-context` for bare questions). LoRA is the baseline measured in the same run.

    .venv/bin/python bench/training.py [--steps 6] [--no-context]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results"


def one(quantization: str, steps: int, context: bool, bf16: bool = False) -> dict:
    """Runs in the child process."""
    import resource

    from gateway.chat.prompting import build_messages
    from gateway.core.settings import load_settings
    from gateway.knowledge.store import Hit
    from retraining.evaluate import load_qa
    from retraining.finetune import train_adapter

    settings = load_settings(None, storage={"data_dir": str(ROOT / ".cache" / "bench")},
                             training={"quantization": quantization, "max_steps": steps, "nice": 0, "bf16": bf16})
    rows = load_qa(ROOT / "data" / "bank_faq" / "faq.csv", steps * 16 + 16, seed=7)

    def messages(qa):  # noqa: ANN001
        hit = Hit("x", qa.answer, 0.9, {"kind": "qa", "question": qa.question, "answer": qa.answer})
        return build_messages(settings, [{"role": "user", "content": qa.question}], [hit] if context else None) + [
            {"role": "assistant", "content": qa.answer}]

    train = [messages(qa) for qa in rows[16:]]
    evals = [messages(qa) for qa in rows[:16]]
    out = ROOT / ".cache" / "bench" / f"adapter-{quantization}"
    started = time.perf_counter()
    metrics = train_adapter(settings, train, evals, out, lambda p: None, lambda line: None)
    metrics["wall_s"] = round(time.perf_counter() - started, 1)
    metrics["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    metrics["examples"] = len(train)
    return metrics


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--no-context", action="store_true")
    parser.add_argument("--child", choices=["none", "4bit"])
    args = parser.parse_args()
    if args.child:
        print(json.dumps(one(args.child, args.steps, not args.no_context)))
        return
    rows = {}
    for quant in ("none", "4bit"):
        cmd = [sys.executable, __file__, "--child", quant, "--steps", str(args.steps)] + (["--no-context"] if args.no_context else [])
        out = subprocess.run(cmd, capture_output=True, text=True, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
        if out.returncode:
            raise SystemExit(out.stderr[-3000:])
        rows[quant] = json.loads(out.stdout.strip().splitlines()[-1])
    base = rows["none"]
    lines = ["| method | optimizer steps | examples/s | ratio vs LoRA | peak RSS MB | ratio vs LoRA | train loss | eval loss |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for quant, name in (("none", "LoRA (fp32 base)"), ("4bit", "QLoRA (nf4 base, bitsandbytes)")):
        r = rows[quant]
        lines.append(f"| {name} | {r['steps']} | {r['examples_per_s']:.3f} | {r['examples_per_s'] / base['examples_per_s']:.2f}x "
                     f"| {r['peak_rss_mb']:.0f} | {r['peak_rss_mb'] / base['peak_rss_mb']:.2f}x | {r['train_loss']:.3f} | {r['eval_loss']:.3f} |")
    table = "\n".join(lines)
    print(table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    note = (f"SmolLM2-135M-Instruct, r=16 on q/k/v/o, batch 4 x accumulation 4 (16 examples per step), "
            f"{'with' if not args.no_context else 'without'} the retrieved FAQ entry in the prompt, 2-core CPU.\n\n")
    (RESULTS / "training.md").write_text(f"# Training speed: LoRA vs QLoRA\n\n{note}{table}\n")
    (RESULTS / "training.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
