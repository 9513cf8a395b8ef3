"""Does a cheaper dtype change the answers? float32 (the baseline) against bfloat16 and bf16-mixed, same run.

`tellerloop eval` on the same seeded sample of FAQ questions with retrieval, greedy, once per dtype
(each in its own process, each timed); then per question: identical answer or not, and the paired
similarity difference with its bootstrap interval (`retraining.gate.paired`, the gate's own test).

    .venv/bin/python bench/dtype_quality.py [--limit 100] [--adapter v0001 --data-dir var] [--set verbatim]
Writes bench/results/dtype_quality.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results"
DTYPES = ("float32", "bfloat16", "bf16-mixed")


def run_eval(dtype: str, args: argparse.Namespace, work: Path) -> tuple[dict, float]:
    config = work / f"{dtype}.toml"
    config.write_text(f'[model]\ndtype = "{dtype}"\n[engine]\nmax_batch = {args.concurrency}\n')
    out = work / f"{dtype}.json"
    cmd = [sys.executable, "-m", "gateway.cli", "eval", "--config", str(config), "--data-dir", args.data_dir or str(work / "var"),
           "--rag", "--max-tokens", "96", "--concurrency", str(args.concurrency), "--out", str(out)]
    if args.set:  # a whole evaluation set (the frozen split's questions: `verbatim`)
        cmd += ["--set", args.set]
    else:
        cmd += ["--data", str(ROOT / "data" / "bank_faq" / "faq.csv"), "--limit", str(args.limit)]
    if args.adapter:
        cmd += ["--adapter", args.adapter]
    started = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, check=True, capture_output=True)
    return json.loads(out.read_text()), time.perf_counter() - started


def main() -> None:
    from retraining.gate import paired

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--adapter", default="", help="evaluate this adapter version (needs --data-dir)")
    parser.add_argument("--data-dir", default="")
    parser.add_argument("--set", default="", help="an evaluation set instead of --limit FAQ questions (e.g. verbatim)")
    parser.add_argument("--out", default=str(RESULTS / "dtype_quality"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        runs = {dtype: run_eval(dtype, args, Path(tmp)) for dtype in DTYPES}
    base_items = runs["float32"][0]["items"]
    rows = []
    for dtype, (report, seconds) in runs.items():
        items = report["items"]
        comparison = paired([i["similarity"] for i in items], [i["similarity"] for i in base_items], 0.95, 4000)
        rows.append({"dtype": dtype, "seconds": round(seconds, 1), "summary": report["summary"],
                     "identical_answers": sum(a["answer"] == b["answer"] for a, b in zip(items, base_items)),
                     "vs_float32": comparison})
    lines = ["# Answer quality by dtype (`bench/dtype_quality.py`)", "",
             f"{('the ' + args.set + ' evaluation set') if args.set else str(args.limit) + ' FAQ questions'} with retrieval, greedy, max 96 tokens, {args.adapter or 'base model'}; "
             "baseline float32 in the same run.", "",
             "| dtype | eval s | similarity | good rate | identical answers | Δ similarity vs float32 [95 % CI] | sign test p |",
             "| --- | ---: | ---: | ---: | ---: | --- | ---: |"]
    for r in rows:
        c = r["vs_float32"]
        lines.append(f"| {r['dtype']} | {r['seconds']} | {r['summary']['similarity_mean']:.3f} | "
                     f"{r['summary']['good_rate']:.2f} | {r['identical_answers']}/{c['n']} | "
                     f"{c['mean_difference']:+.3f} [{c['interval'][0]:+.3f}, {c['interval'][1]:+.3f}] | {c['sign_test_p']} |")
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps({"limit": None if args.set else args.limit, "set": args.set, "adapter": args.adapter, "rows": rows}, indent=1))
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
