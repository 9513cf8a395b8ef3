"""Does the loop compound? Three retraining cycles on a bootstrapped install, per training mode.

Set-up (`bootstrap`): the demo FAQ is the knowledge base; the frozen split is the product's usual
100 FAQ questions; a pool of 3 × N further FAQ questions is held out of the seed data, so the
bootstrap adapter (v0001) never trained on them — they are what customers will ask and reviewers
will correct later. v0001 is trained by the product's own pipeline and promoted.

Each cycle (`cycles --mode warm|cumulative`, on a copy of the bootstrapped install): N simulated
reviewer corrections arrive (the customer asked a pool question, the model saw the prompt serving
builds with retrieval, the reviewers' resolved answer is the bank's reference answer); the
product's retraining run builds the dataset, trains (warm start from the champion, or cumulative
from the base), evaluates against the champion and applies the gate; a passing candidate is
promoted (what a won A/B test does). Recorded per cycle: frozen-split similarity (candidate vs
champion, paired interval), forgetting probe, this cycle's reviewed questions before/after, all
reviewed questions so far, training time, gate decision.

    .venv/bin/python bench/cycles.py bootstrap              # ~35 min on 2 cores
    .venv/bin/python bench/cycles.py cycles --mode warm     # ~10 min per cycle
    .venv/bin/python bench/cycles.py cycles --mode cumulative  # ~40 min per cycle
    .venv/bin/python bench/cycles.py report

`--kb-gap` (cycles only) removes the pool questions' entries from the knowledge base of the copied
install before the first cycle: the champion can no longer copy those answers from a retrieved
entry, so only what the reviews teach can make it answer them (with the full knowledge base the
champion already answers the pool at ~0.96, and no cycle can show learning).

`--max-steps 2 --eval-limit 5 --per-cycle 4` makes a smoke run of the whole script.
Writes bench/results/cycles-<mode>[-gap].json and bench/results/cycles.md.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import random
import shutil
import sys
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results"
POOL_SEED = 7


def settings_for(data_dir: Path, args, rag: dict | None = None, **retraining):  # noqa: ANN001
    from gateway.core.settings import load_settings

    training = {"nice": 0}
    if args.max_steps:
        training["max_steps"] = args.max_steps
    return load_settings(None, storage={"data_dir": str(data_dir)}, training=training,
                         experiment={"enabled": False}, rag=rag or {},
                         retraining={"seed_data": str(data_dir / "seed.csv"), "eval_limit": args.eval_limit,
                                     **retraining})


async def open_all(settings):  # noqa: ANN001
    from gateway.core.runtime import build_knowledge_base
    from gateway.store.db import create_engine, migrate, session_factory

    db = create_engine(settings.storage.resolved_database_url)
    await migrate(db)
    kb = await asyncio.to_thread(build_knowledge_base, settings)
    return db, session_factory(db), kb


async def bootstrap(args) -> None:  # noqa: ANN001
    from gateway.core.settings import PROJECT_ROOT
    from gateway.experiments.repository import Experiments
    from gateway.runs.control import Retrainer
    from retraining.dataset import FrozenSplit, usable_seeds

    data_dir = Path(args.root) / "bootstrap"
    shutil.rmtree(data_dir, ignore_errors=True)
    data_dir.mkdir(parents=True)
    faq = PROJECT_ROOT / "data" / "bank_faq" / "faq.csv"
    full = settings_for(data_dir, args, seed_data=str(faq))
    split = FrozenSplit.load_or_create(full)  # the product's usual frozen split, from the whole FAQ
    usable, _ = usable_seeds(full, split)
    pool = random.Random(POOL_SEED).sample(usable, 3 * args.per_cycle)
    pooled = {qa.question for qa in pool}
    with faq.open(newline="", encoding="utf-8-sig") as fh:
        rows = list(csv.DictReader(fh))
    with (data_dir / "seed.csv").open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(r for r in rows if r["question"].strip() not in pooled)
    (data_dir / "pool.json").write_text(json.dumps([{"question": q.question, "answer": q.answer} for q in pool], indent=1))

    settings = settings_for(data_dir, args)
    db, sessions, kb = await open_all(settings)
    retrainer = Retrainer(settings, sessions, kb=lambda: kb)
    started = time.perf_counter()
    run = await retrainer.start("cli", "bench", force=True)
    await retrainer.wait()
    run = await retrainer.runs.get(run.id)
    if run.status != "succeeded":
        raise SystemExit(f"bootstrap failed: {run.error}")
    adapter = await retrainer.registry.get(run.adapter_version)
    if adapter.state != "champion":
        await Experiments(settings, sessions, retrainer.registry).promote(adapter.version, "bench")
    await db.dispose()
    result = {"seconds": round(time.perf_counter() - started, 1), "version": adapter.version,
              "gate": run.metrics["gate"], "training": run.metrics["training"], "dataset": run.metrics["dataset"],
              "evaluation": {w: run.metrics["evaluation"][w] for w in ("candidate", "baseline")}}
    (data_dir / "bootstrap.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({k: result[k] for k in ("seconds", "version")}), result["gate"]["reason"])


async def add_reviews(settings, sessions, kb, pool: list[dict], cycle: int) -> None:  # noqa: ANN001
    """Resolved review items as the review loop leaves them: the exchange as the model saw it, the
    reviewers' consensus answer = the bank's reference answer."""
    from gateway.chat.prompting import build_messages, retrieve
    from gateway.exchanges.models import Exchange
    from gateway.review.models import ReviewItem
    now = datetime.now(timezone.utc) + timedelta(seconds=cycle)
    async with sessions() as session, session.begin():
        for qa in pool:
            hits, *_ = await retrieve(settings, kb, qa["question"], settings.rag.top_k)
            messages = build_messages(settings, [{"role": "user", "content": qa["question"]}], hits)
            ex = Exchange(id=uuid.uuid4().hex, created_at=now, completed_at=now, api_key_name="bench", user=None,
                          model_requested="tellerloop", variant="champion", messages=messages, answer="(model answer)",
                          finish_reason="stop", stream=False, rag=True, sources=[], params={}, prompt_tokens=1,
                          completion_tokens=1, ttft_ms=1, latency_ms=1, confidence=0.1, confidence_parts={},
                          flagged=True)
            session.add(ex)
            await session.flush()
            session.add(ReviewItem(exchange_id=ex.id, status="resolved", confidence=0.1, low_confidence=True,
                                   thumbs_down=False, flag_count=0, required_labels=2, created_at=now,
                                   created_epoch=now.timestamp(), updated_at=now, resolution="correct",
                                   resolved_answer=qa["answer"], resolved_at=now, version=1))


async def answer_quality(settings, registry, kb, version: str | None, rows: list[dict]) -> dict:  # noqa: ANN001
    """Similarity of `version`'s answers (with retrieval) to the reference answers of `rows`."""
    from gateway.core.runtime import build_engine
    from gateway.knowledge.embeddings import Embedder
    from retraining.evaluate import QA, evaluate

    engine = build_engine(settings)
    await engine.start()
    try:
        if version:
            await engine.load_adapter(version, str(await registry.verify(version)))
        report = await evaluate(settings, engine, kb.embedder if hasattr(kb, "embedder") else Embedder(settings.rag.embedding_model),
                                [QA(r["question"], r["answer"]) for r in rows], kb=kb, rag=True, adapter=version,
                                max_tokens=settings.retraining.eval_max_tokens)
    finally:
        await engine.stop()
    s = report["summary"]
    return {"similarity_mean": s["similarity_mean"], "share_ge_0.9": s["share_similarity_ge"]["0.9"],
            "good_rate": s["good_rate"], "n": len(rows)}


async def cycles(args) -> None:  # noqa: ANN001
    from gateway.experiments.repository import Experiments
    from gateway.runs.control import Retrainer

    source = Path(args.root) / "bootstrap"
    if not (source / "bootstrap.json").is_file():
        raise SystemExit("run `bench/cycles.py bootstrap` first")
    name = run_name(args.mode, args.kb_gap)
    data_dir = Path(args.root) / name
    shutil.rmtree(data_dir, ignore_errors=True)
    shutil.copytree(source, data_dir)
    (data_dir / "seed.csv").write_bytes((source / "seed.csv").read_bytes())
    pool = json.loads((data_dir / "pool.json").read_text())
    rag = {}
    if args.kb_gap:
        rag = {"demo_data": str(write_gap_faq(data_dir, pool))}
        # the champion's cached frozen-split answers were computed with the full knowledge base
        shutil.rmtree(data_dir / "eval_cache", ignore_errors=True)
    settings = settings_for(data_dir, args, rag, mode=args.mode, min_new_labels=0)
    db, sessions, kb = await open_all(settings)
    if args.kb_gap:
        gap = Path(settings.rag.demo_data)
        result = await asyncio.to_thread(kb.ingest_bytes, "faq.csv", gap.read_bytes())  # replaces the full FAQ
        # another FAQ row may carry the same answer under other words: such a pool question is no gap
        leaks = [qa["question"] for qa in pool
                 if any(qa["answer"][:60] in h.text for h in kb.search(qa["question"], settings.rag.top_k))]
        print(f"kb-gap: knowledge base re-ingested without the {len(pool)} pool entries ({result.chunks} chunks); "
              f"{len(leaks)} pool answers still retrieved from other rows")
    retrainer = Retrainer(settings, sessions, kb=lambda: kb)
    experiments = Experiments(settings, sessions, retrainer.registry)
    boot = json.loads((source / "bootstrap.json").read_text())
    out = {"mode": args.mode, "kb_gap": args.kb_gap, "gap_leaks": len(leaks) if args.kb_gap else None, "pool": len(pool),
           "per_cycle": args.per_cycle, "bootstrap": {
        "version": boot["version"], "seconds": boot["seconds"],
        "frozen_rag": boot["evaluation"]["candidate"]["rag"]["similarity_mean"],
        "frozen_no_rag": boot["evaluation"]["candidate"]["no_rag"]["similarity_mean"],
        "base_frozen_rag": boot["evaluation"]["baseline"]["rag"]["similarity_mean"]}, "cycles": []}
    reviewed_so_far: list[dict] = []
    for cycle in range(1, args.cycles + 1):
        batch = pool[(cycle - 1) * args.per_cycle: cycle * args.per_cycle]
        champion = (await retrainer.registry.champion()).version
        before = await answer_quality(settings, retrainer.registry, kb, champion, batch)
        await add_reviews(settings, sessions, kb, batch, cycle)
        reviewed_so_far += batch
        started = time.perf_counter()
        run = await retrainer.start("cli", "bench", force=True)
        await retrainer.wait()
        run = await retrainer.runs.get(run.id)
        seconds = time.perf_counter() - started
        if run.status != "succeeded":
            raise SystemExit(f"cycle {cycle} failed: {run.error}")
        gate = run.metrics["gate"]
        version = run.adapter_version
        if gate["passed"]:
            await experiments.promote(version, "bench", reason="gate passed (bench stands in for the A/B test)")
        new_champion = (await retrainer.registry.champion()).version
        after = await answer_quality(settings, retrainer.registry, kb, new_champion, batch)
        so_far = await answer_quality(settings, retrainer.registry, kb, new_champion, reviewed_so_far)
        ev = run.metrics["evaluation"]
        row = {"cycle": cycle, "candidate": version, "champion_before": champion, "champion_after": new_champion,
               "promoted": gate["passed"], "gate_reason": gate["reason"], "gate_checks": gate["checks"],
               "train_examples": run.metrics["dataset"]["train_examples"],
               "dataset": run.metrics["dataset"], "train_seconds": run.metrics["training"]["train_seconds"],
               "cycle_seconds": round(seconds, 1),
               "frozen_rag": {"candidate": ev["candidate"]["rag"]["similarity_mean"],
                              "champion": ev["baseline"]["rag"]["similarity_mean"]},
               "frozen_no_rag": {"candidate": ev["candidate"]["no_rag"]["similarity_mean"],
                                 "champion": ev["baseline"]["no_rag"]["similarity_mean"]},
               "forgetting": {"candidate": ev["candidate"].get("forgetting", {}).get("similarity_mean"),
                              "champion": ev["baseline"].get("forgetting", {}).get("similarity_mean")},
               "reviewed_before": before, "reviewed_after": after, "reviewed_so_far": so_far}
        out["cycles"].append(row)
        print(json.dumps({k: row[k] for k in ("cycle", "candidate", "promoted", "frozen_rag", "forgetting",
                                               "reviewed_before", "reviewed_after", "train_seconds")}), flush=True)
        (RESULTS / f"cycles-{name}.json").write_text(json.dumps(out, indent=1))
    await db.dispose()


def run_name(mode: str, kb_gap: bool) -> str:
    return f"{mode}-gap" if kb_gap else mode


def write_gap_faq(data_dir: Path, pool: list[dict]) -> Path:
    """The demo FAQ without the pool questions' rows: the knowledge base of a bank whose FAQ lacks them."""
    from gateway.core.settings import PROJECT_ROOT

    pooled = {qa["question"].strip() for qa in pool}
    with (PROJECT_ROOT / "data" / "bank_faq" / "faq.csv").open(newline="", encoding="utf-8-sig") as fh:
        rows = list(csv.DictReader(fh))
    path = data_dir / "kb-gap" / "faq.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(r for r in rows if r["question"].strip() not in pooled)
    return path


def report() -> str:
    lines = ["# Three retraining cycles on a bootstrapped install", "",
             "Per cycle, N simulated reviewer corrections (pool questions held out of the bootstrap's seed data), "
             "then one retraining run through the product's pipeline; a gate-passing candidate is promoted. "
             "Similarity = MiniLM cosine to the reference, greedy, max 96 tokens, retrieval on unless noted. "
             "Frozen split: 100 FAQ questions never trained on. Forgetting probe: 100 seed questions the training uses.", ""]
    for name in ("warm", "cumulative", "warm-gap", "cumulative-gap", "warm-gap-nokb"):
        path = RESULTS / f"cycles-{name}.json"  # the latest run; stop 18's warm run: cycles-warm-stop18.json
        if not path.is_file():
            if not name.endswith("-gap"):
                lines += [f"## mode = {name}: not run in this measurement", "",
                          "A cumulative cycle retrains from the base on every review plus the whole seed set: the "
                          "bootstrap run above is that composition minus the cycle's reviews, so its time is the "
                          "cost of each cumulative cycle.", ""]
            continue
        r = json.loads(path.read_text())
        b = r["bootstrap"]
        mode = r["mode"]
        gap = (f"; **knowledge-base gap**: the pool questions' entries removed from the knowledge base "
               f"({r['gap_leaks']} of {r.get('pool', 3 * r['per_cycle'])} pool answers still retrieved from other rows)"
               if r.get("kb_gap") else "")
        if name.endswith("-nokb"):
            gap += ("; before `retraining.reviewed_answers_to_kb`: corrections trained on the prompt the model saw "
                    "(a wrong entry), never published to the knowledge base; stopped after one cycle")
        lines += [f"## mode = {mode} ({r['per_cycle']} corrections per cycle{gap})", "",
                  f"Bootstrap {b['version']}: frozen split {b['frozen_rag']:.3f} with retrieval (base model "
                  f"{b['base_frozen_rag']:.3f}), {b['frozen_no_rag']:.3f} without; {b['seconds'] / 60:.1f} min.", "",
                  "| cycle | candidate | examples | train min | frozen (rag) cand / champ, Δ [95 % CI] | frozen (no rag) cand / champ "
                  "| forgetting probe cand / champ | this cycle's reviewed: before → after (share ≥ 0.9) | all reviewed so far "
                  "| promoted |",
                  "| ---: | --- | ---: | ---: | --- | --- | --- | --- | ---: | --- |"]
        for c in r["cycles"]:
            rag = c["gate_checks"]["rag"]
            lines.append(
                f"| {c['cycle']} | {c['candidate']} | {c['train_examples']} | {c['train_seconds'] / 60:.1f} | "
                f"{c['frozen_rag']['candidate']:.3f} / {c['frozen_rag']['champion']:.3f}, {rag['mean_difference']:+.3f} "
                f"[{rag['interval'][0]:+.3f}, {rag['interval'][1]:+.3f}] | "
                f"{c['frozen_no_rag']['candidate']:.3f} / {c['frozen_no_rag']['champion']:.3f} | "
                f"{c['forgetting']['candidate']:.3f} / {c['forgetting']['champion']:.3f} | "
                f"{c['reviewed_before']['similarity_mean']:.3f} → {c['reviewed_after']['similarity_mean']:.3f} "
                f"({c['reviewed_after']['share_ge_0.9']:.0%}) | {c['reviewed_so_far']['similarity_mean']:.3f} | "
                f"{'yes' if c['promoted'] else 'no'} |")
        lines.append("")
    lines += side_by_side("") + side_by_side("-gap")
    text = "\n".join(lines)
    (RESULTS / "cycles.md").write_text(text + "\n")
    return text


def side_by_side(suffix: str) -> list[str]:
    """Both modes from the same bootstrap, cycle by cycle: what each costs and what each keeps."""
    runs = {m: json.loads((RESULTS / f"cycles-{m}{suffix}.json").read_text()) for m in ("warm", "cumulative")
            if (RESULTS / f"cycles-{m}{suffix}.json").is_file()}
    if len(runs) < 2 or runs["warm"]["bootstrap"] != runs["cumulative"]["bootstrap"]:
        return []
    title = " with the knowledge-base gap" if suffix else ""
    lines = [f"## warm vs cumulative{title}, from the same bootstrap", "",
             "| cycle | train min warm / cumulative (cumulative ÷ warm) | frozen (rag) candidate warm / cumulative | forgetting probe "
             "warm / cumulative | this cycle's reviewed after, warm / cumulative | all reviewed so far | promoted |",
             "| ---: | --- | --- | --- | --- | --- | --- |"]
    for w, c in zip(runs["warm"]["cycles"], runs["cumulative"]["cycles"]):
        lines.append(
            f"| {w['cycle']} | {w['train_seconds'] / 60:.1f} / {c['train_seconds'] / 60:.1f} "
            f"({c['train_seconds'] / w['train_seconds']:.1f}×) | {w['frozen_rag']['candidate']:.3f} / "
            f"{c['frozen_rag']['candidate']:.3f} | {w['forgetting']['candidate']:.3f} / {c['forgetting']['candidate']:.3f} | "
            f"{w['reviewed_after']['similarity_mean']:.3f} / {c['reviewed_after']['similarity_mean']:.3f} | "
            f"{w['reviewed_so_far']['similarity_mean']:.3f} / {c['reviewed_so_far']['similarity_mean']:.3f} | "
            f"{'yes' if w['promoted'] else 'no'} / {'yes' if c['promoted'] else 'no'} |")
    return lines + [""]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("phase", choices=["bootstrap", "cycles", "report"])
    parser.add_argument("--mode", choices=["warm", "cumulative"], default="warm")
    parser.add_argument("--root", default=str(ROOT / ".cache" / "cycles"))
    parser.add_argument("--cycles", type=int, default=3)
    parser.add_argument("--kb-gap", action="store_true", help="cycles: the knowledge base lacks the pool entries")
    parser.add_argument("--per-cycle", type=int, default=30)
    parser.add_argument("--max-steps", type=int, default=0, help="smoke runs only")
    parser.add_argument("--eval-limit", type=int, default=0, help="smoke runs only")
    args = parser.parse_args()
    if args.phase == "bootstrap":
        asyncio.run(bootstrap(args))
    elif args.phase == "cycles":
        asyncio.run(cycles(args))
    print(report())


if __name__ == "__main__":
    main()
