"""The bootstrap cycle, timed: demo FAQ → knowledge base → dataset → train v0001 → evaluate against
the base model (the baseline, measured in the same run) on the frozen split, with and without
retrieval. `--no-context` trains on bare questions instead of serving's prompts with the retrieved
entry, which is how `retraining.context_in_prompts` was decided.

    .venv/bin/python bench/bootstrap.py [--no-context] [--data-dir .cache/bootstrap] [--ship | --ship-only]

Takes ~40 minutes on 2 cores. Writes bench/results/bootstrap-<context|no-context>.{md,json}.
`--ship` then writes the trained adapter, its calibrator and manifest to data/adapters/bootstrap —
the adapter tellerloop ships and registers as the first champion (gateway/adapters/shipped.py);
`--ship-only` does that from an earlier run's data dir.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results"


def table(result: dict) -> str:
    ev = result["metrics"]["evaluation"]
    lines = ["| model | retrieval | similarity mean | × base | share ≥ 0.75 | ROUGE-L | capped | looping | mean confidence | AUROC (confidence) |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for who, name in (("baseline", "base model"), ("candidate", "v0001 (bootstrap)")):
        for mode in ("rag", "no_rag"):
            s, b = ev[who][mode], ev["baseline"][mode]
            lines.append(f"| {name} | {'on' if mode == 'rag' else 'off'} | {s['similarity_mean']:.3f} | "
                         f"{s['similarity_mean'] / b['similarity_mean']:.2f} | {s['share_similarity_ge']['0.75']:.0%} | "
                         f"{s['rouge_l_mean']:.3f} | {s['cap_hit_rate']:.0%} | {s['loop_rate']:.0%} | "
                         f"{s['mean_confidence']:.3f} | {s['auroc']['confidence']} |")
    t = result["metrics"]["training"]
    lines += ["", f"Training: {result['metrics']['dataset']['train_examples']} examples, {t['steps']} steps, "
              f"{t['train_seconds'] / 60:.1f} min ({t['examples_per_s']} examples/s), train loss {t['train_loss']:.3f}, "
              f"eval loss {t['eval_loss']:.3f}, peak RSS {t['peak_rss_mb']:.0f} MB. Whole cycle (dataset → train → "
              f"evaluate, after the knowledge base exists): {result['cycle_seconds'] / 60:.1f} min. Gate: {result['gate']}"]
    return "\n".join(lines)


async def run(context: bool, data_dir: Path) -> dict:
    from gateway.core.runtime import build_knowledge_base
    from gateway.core.settings import load_settings
    from gateway.runs.control import Retrainer
    from gateway.store.db import create_engine, migrate, session_factory

    shutil.rmtree(data_dir, ignore_errors=True)
    data_dir.mkdir(parents=True)
    settings = load_settings(None, storage={"data_dir": str(data_dir)}, retraining={"context_in_prompts": context},
                             training={"nice": 0})
    db = create_engine(settings.storage.resolved_database_url)
    await migrate(db)
    started = time.perf_counter()
    kb = await asyncio.to_thread(build_knowledge_base, settings)
    kb_seconds = time.perf_counter() - started
    retrainer = Retrainer(settings, session_factory(db), kb=lambda: kb)
    started = time.perf_counter()
    run = await retrainer.start("cli", "bench", force=True)
    await retrainer.wait()
    run = await retrainer.runs.get(run.id)
    adapter = await retrainer.registry.get(run.adapter_version)
    await db.dispose()
    if run.status != "succeeded":
        raise SystemExit(f"run failed: {run.error}")
    return {"context_in_prompts": context, "kb_seconds": round(kb_seconds, 1),
            "cycle_seconds": round(time.perf_counter() - started, 1), "state": adapter.state,
            "gate": adapter.reason, "metrics": run.metrics}


async def ship(data_dir: Path, out: Path) -> dict:
    """Export the data dir's bootstrap adapter (v0001) as the shipped one, calibrating it first if
    its run predates calibration."""
    from gateway.adapters import shipped
    from gateway.adapters.registry import AdapterRegistry
    from gateway.calibration.repository import Calibrators
    from gateway.core.settings import load_settings
    from gateway.store.db import create_engine, migrate, session_factory
    from retraining.train import evaluate_version

    settings = load_settings(None, storage={"data_dir": str(data_dir)}, training={"nice": 0})
    db = create_engine(settings.storage.resolved_database_url)
    await migrate(db)
    sessions = session_factory(db)
    registry = AdapterRegistry(sessions, settings.storage.data_dir)
    adapter = await registry.get("v0001")
    calibrators = Calibrators(sessions)
    if "v0001" not in await calibrators.active() or "gate" not in (adapter.metrics or {}):
        # a run from before calibration (or one stopped after training): evaluate and calibrate it now
        fresh = await evaluate_version(settings, registry, "v0001")
        await registry.update("v0001", reason=fresh["gate"]["reason"], metrics={**(adapter.metrics or {}), **fresh})
        adapter = await registry.get("v0001")
    row = next(r for r in await calibrators.list("v0001") if r.active)
    metrics = adapter.metrics or {}
    evaluation = metrics.get("evaluation", {})
    slim_eval = {who: evaluation[who] for who in ("candidate", "baseline") if who in evaluation}
    dataset = {k: v for k, v in (await _dataset_manifest(settings, adapter.dataset_hash)).items()
               if k not in ("known_reviews", "new_review_questions")}
    manifest = shipped.export(settings, registry.path("v0001"), out, training=adapter.config, dataset=dataset,
                              metrics={"training": metrics.get("training"), "evaluation": slim_eval,
                                       "gate": metrics.get("gate")},
                              gate_reason=adapter.reason or "", calibrator={
                                  "params": row.params, "metrics": row.metrics, "labels": row.labels, "good": row.good})
    await db.dispose()
    return manifest


async def _dataset_manifest(settings, dataset_hash: str) -> dict:  # noqa: ANN001
    from retraining.dataset import load_manifest
    return load_manifest(settings.storage.data_dir, dataset_hash) or {}


def write(result: dict) -> str:
    name = "context" if result["context_in_prompts"] else "no-context"
    text = table(result)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"bootstrap-{name}.md").write_text(
        f"# Bootstrap cycle, training prompts {'with' if result['context_in_prompts'] else 'without'} retrieved context\n\n"
        "Frozen split: 100 demo-FAQ questions never trained on; SmolLM2-135M-Instruct, LoRA r=16, 1 epoch, "
        "2-core CPU, greedy, max 96 tokens.\n\n" + text + "\n")
    slim = {k: v for k, v in result.items() if k != "metrics"}
    slim["metrics"] = {k: v for k, v in result["metrics"].items() if k != "evaluation"}
    slim["metrics"]["evaluation"] = {w: result["metrics"]["evaluation"][w] for w in ("candidate", "baseline")}
    (RESULTS / f"bootstrap-{name}.json").write_text(json.dumps(slim, indent=1))
    return text


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--no-context", action="store_true")
    parser.add_argument("--data-dir", default=str(ROOT / ".cache" / "bootstrap"))
    parser.add_argument("--from-json", help="re-render a saved result instead of running")
    parser.add_argument("--ship", action="store_true", help="then export v0001 as data/adapters/bootstrap")
    parser.add_argument("--ship-only", action="store_true", help="only export an earlier run's v0001")
    args = parser.parse_args()
    out = ROOT / "data" / "adapters" / "bootstrap"
    if args.ship_only:
        manifest = asyncio.run(ship(Path(args.data_dir), out))
        print(json.dumps({k: manifest[k] for k in ("base_model", "seed_data", "files")}, indent=1))
        return
    if args.from_json:
        result = json.loads(Path(args.from_json).read_text())
    else:
        result = asyncio.run(run(not args.no_context, Path(args.data_dir)))
    print(write(result))
    if args.ship:
        asyncio.run(ship(Path(args.data_dir), out))


if __name__ == "__main__":
    main()
