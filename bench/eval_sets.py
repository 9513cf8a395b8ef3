"""The four evaluation sets side by side, base model vs champion, with issue 16's targets.

Runs `tellerloop eval --set verbatim --set reworded --set conversations --set out_of_coverage
--adapter base --adapter <champion>` on a data dir where the champion is registered (a `make serve`
first start installs the shipped v0001), or re-summarises a report it wrote (`--report`), then writes
bench/results/eval_sets.md and a summary JSON (no per-answer items). The follow-up target compares
each conversation's answer with the answer to its own frozen question asked alone (the verbatim set).

Usage: python bench/eval_sets.py --data-dir var [--champion v0001] [--report sets.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway.core.settings import load_settings  # noqa: E402
from retraining.evaluate import load_eval_set, sets_table, summarise  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SETS = ("verbatim", "reworded", "conversations", "out_of_coverage")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data-dir", default="var")
    parser.add_argument("--champion", default="v0001")
    parser.add_argument("--report", help="a report `tellerloop eval` already wrote (skip answering)")
    parser.add_argument("--out", default="bench/results/eval_sets.md")
    parser.add_argument("--note", default="", help="a line on how the report was made, under the title")
    args = parser.parse_args()
    report_path = Path(args.report or Path(args.out).with_suffix(".full.json"))
    if not args.report:
        cmd = [sys.executable, "-m", "gateway.cli", "eval", "--data-dir", args.data_dir, "--concurrency", "16",
               "--adapter", "base", "--adapter", args.champion, "--out", str(report_path)]
        for name in SETS:
            cmd += ["--set", name]
        subprocess.run(cmd, cwd=ROOT, check=True)
    variants = json.loads(report_path.read_text())["variants"]
    for by_set in variants.values():  # the current summary (e.g. AUROC over generated answers only)
        for report in by_set.values():
            report["summary"] = summarise(report["items"])

    champion = variants[args.champion]
    alone = {i["question"]: i["similarity"] for i in champion["verbatim"]["items"]}
    convo = champion["conversations"]["items"]
    rows = load_eval_set("conversations", load_settings(), ROOT)  # same order as the items
    pairs = [(i["similarity"], alone[i.get("target") or qa.target]) for i, qa in zip(convo, rows)
             if (i.get("target") or qa.target) in alone]
    gap = statistics.fmean(a - c for c, a in pairs) if pairs else None
    covered = [i for name in ("verbatim", "reworded", "conversations") for i in champion[name]["items"]]
    refused = sum(i["fallback"] for i in covered) / len(covered)
    s = {name: champion[name]["summary"] for name in SETS}
    targets = [
        ("rewordings: similarity ≥ 0.90", s["reworded"]["similarity_mean"], s["reworded"]["similarity_mean"] >= 0.90),
        ("rewordings: good ≥ 85 %", s["reworded"]["good_rate"], s["reworded"]["good_rate"] >= 0.85),
        ("verbatim: not below 0.93 / 90 %", f"{s['verbatim']['similarity_mean']} / {s['verbatim']['good_rate']}",
         s["verbatim"]["similarity_mean"] >= 0.93 and s["verbatim"]["good_rate"] >= 0.90),
        ("follow-ups: within 0.05 of the same questions alone", None if gap is None else round(gap, 4),
         gap is not None and gap <= 0.05),
        ("out-of-coverage: ≥ 80 % fallback", s["out_of_coverage"]["fallback_rate"],
         s["out_of_coverage"]["fallback_rate"] >= 0.80),
        ("covered questions wrongly refused ≤ 5 %", round(refused, 4), refused <= 0.05),
    ]
    lines = ["# The evaluation sets, base vs champion (bench/eval_sets.py)", "",
             "`tellerloop eval` with retrieval and the shipped defaults (hybrid search, `query_turns` 2, earlier turns quoted in the system prompt, fallback at "
             f"0.49 similarity, `top_k` {load_settings().rag.top_k}), greedy; {args.champion} is the champion. AUROC is the confidence's "
             "over generated answers (fallbacks are not the model's).", "",
             *([args.note, ""] if args.note else []),
             sets_table(variants), "", "| target (champion) | measured | met |", "| --- | ---: | --- |"]
    lines += [f"| {label} | {value} | {'yes' if ok else '**no**'} |" for label, value, ok in targets]
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).write_text(text)
    Path(args.out).with_suffix(".json").write_text(json.dumps(
        {"variants": {v: {n: {"config": r["config"], "summary": r["summary"]} for n, r in by.items()}
                      for v, by in variants.items()},
         "follow_up_gap": gap, "covered_refused": refused}, indent=1))


if __name__ == "__main__":
    main()
