"""The trainer process: `python -m retraining.train RUN_ID --settings FILE`.

Started (niced) by the gateway's run control (`gateway/runs/control.py`) or the CLI with the run's
dataset already built. It fine-tunes the adapter (`retraining/finetune.py`), writes progress to the
run record and a log file, seals (checksums) the adapter, evaluates it against the champion (or the
base model) on the frozen split with and without retrieval and on the forgetting probe, and applies
the paired offline gate (`retraining/gate.py`). Any failure marks the run (and the adapter) failed
with the reason; serving, in another process, is never touched.

It imports only lower layers — settings, the database, the repositories (runs, adapters,
experiments), the engine, prompting and evaluation — never the app, a controller or a service.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import sys
import time
import traceback
from pathlib import Path

from gateway.adapters.registry import AdapterRegistry
from gateway.calibration.calibrator import NotEnoughLabels
from gateway.calibration.repository import Calibrators
from gateway.core.runtime import build_engine, open_database
from gateway.core.settings import Settings
from gateway.engine.threads import in_own_thread
from gateway.experiments.repository import Experiments
from gateway.knowledge.embeddings import Embedder
from gateway.knowledge.store import Hit, Search
from gateway.runs.repository import RunStore, fail_run, run_dir
from gateway.store.base import utcnow
from retraining import dataset as datasets
from retraining.calibrate import fit_from_evaluation
from retraining.evaluate import QA, evaluate, summarise
from retraining.finetune import train_adapter
from retraining.gate import decide, paired


class FrozenRetrieval:
    """The retrieval results of the frozen split's questions, saved with the dataset, so the trainer
    process evaluates "with retrieval" without opening the (single-process) Chroma store. Per
    question: {"hits": [...], "rival": ..., "question_match": ...} (a bare list of hits in datasets
    saved before the retrieval signals were)."""

    def __init__(self, hits: dict[str, list[dict] | dict]) -> None:
        self._hits = hits

    def search(self, query: str, k: int, min_score: float | None = None) -> list[Hit]:
        return self.search_detailed(query, k, min_score).hits

    def signature(self, query: str) -> str:
        """What retrieval gave this question: cached answers count only while it is the same (each run
        may change the knowledge base, e.g. by publishing reviewers' corrections)."""
        return hashlib.sha256(json.dumps(self._hits.get(query), sort_keys=True).encode()).hexdigest()[:16]

    def search_detailed(self, query: str, k: int, min_score: float | None = None) -> Search:
        saved = self._hits.get(query, [])
        if isinstance(saved, list):
            return Search([Hit(**h) for h in saved][:k], None, None)
        return Search([Hit(**h) for h in saved["hits"]][:k], saved.get("rival"), saved.get("question_match"))




async def execute_run(settings: Settings, run_id: int) -> None:
    """The whole run in this process; the parent built the dataset and migrated the database."""
    async with open_database(settings, migrate_schema=False) as sessions:
        runs, registry = RunStore(sessions), AdapterRegistry(sessions, settings.storage.data_dir)
        run = await runs.get(run_id)
        version = run.adapter_version
        folder = run_dir(settings, run_id)
        try:
            await runs.update(run_id, status="running", started_at=utcnow(), pid=os.getpid())
            metrics = await _train_evaluate_gate(settings, run, runs, registry, folder)
            # "trained": the parent marks it succeeded once the adapter is in service (or needs none).
            await runs.update(run_id, status="trained", metrics={**(run.metrics or {}), **metrics},
                              progress={"phase": "done"})
        except BaseException as exc:
            await fail_run(runs, registry, run_id, version, f"{type(exc).__name__}: {exc}")
            raise


def _rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []


async def _train_evaluate_gate(settings, run, runs: RunStore, registry: AdapterRegistry, folder: Path) -> dict:  # noqa: ANN001
    snap_dir = settings.storage.data_dir / "datasets" / run.dataset_hash[:16]
    train = [e.messages for e in datasets.load_train(snap_dir)]
    eval_rows = _rows(snap_dir / "eval.jsonl")[: settings.retraining.eval_limit or None]
    retrieval = FrozenRetrieval(json.loads((snap_dir / "eval_hits.json").read_text()))
    eval_messages = [datasets.seed_messages(settings, r["question"], r["answer"], retrieval) for r in eval_rows]
    adapter = await registry.get(run.adapter_version)
    init = (adapter.config or {}).get("initialised_from", "base")
    parent_dir = None if init == "base" else await registry.verify(init)
    log_file = (folder / "train.log").open("a")
    loop = asyncio.get_running_loop()
    last = [0.0]

    def report(progress: dict) -> None:  # called on the training thread
        if time.monotonic() - last[0] < 2 and progress.get("eval_loss") is None:
            return
        last[0] = time.monotonic()
        asyncio.run_coroutine_threadsafe(runs.update(run.id, progress=progress), loop).result(30)

    def write(line: str) -> None:
        log_file.write(line + "\n")
        log_file.flush()

    out = registry.path(run.adapter_version)
    # on a thread that ends with the training: its OpenMP team must not stay beside the evaluation
    # engine's (gateway/engine/threads.py)
    train_metrics = await in_own_thread(train_adapter, settings, train, eval_messages, out, report, write,
                                        parent_dir)
    train_metrics["initialised_from"] = init
    await registry.seal(run.adapter_version)
    await registry.transition(run.adapter_version, "candidate", metrics={"training": train_metrics})
    await runs.update(run.id, progress={"phase": "evaluating", "training": train_metrics})
    metrics = {"training": train_metrics, **await evaluate_version(settings, registry, run.adapter_version)}
    decision = metrics["gate"]
    await registry.update(run.adapter_version, reason=decision["reason"], metrics=metrics)
    over_base = _clear_win_over_base(settings, decision)
    if decision["passed"] and await registry.champion() is None and (over_base or not settings.experiment.enabled):
        # Nobody chose the base model: a first adapter that beats it clearly (or any passing one when
        # experiments are off) serves at once instead of waiting for an A/B test against it.
        reason = over_base or decision["reason"]
        await Experiments(settings, registry.sessions, registry).promote(
            run.adapter_version, "gate", automatic=True, reason=reason, evidence={"gate": decision})
    elif decision["passed"]:  # live traffic decides (retraining/experiments.py), or an admin when disabled
        await registry.transition(run.adapter_version, "challenger")
    write(json.dumps({"gate": decision}))
    log_file.close()
    return metrics


async def evaluate_version(settings: Settings, registry: AdapterRegistry, version: str) -> dict:
    """A sealed version against the champion (or the base model) on its dataset's frozen split and
    forgetting probe, the gate's decision, and its calibrator fitted on the calibration split —
    what a run does after training; also for a version evaluated again (bench/bootstrap.py --ship).
    Answers already in the evaluation cache are not generated again."""
    adapter = await registry.get(version)
    snap_dir = settings.storage.data_dir / "datasets" / adapter.dataset_hash[:16]
    limit = settings.retraining.eval_limit or None
    retrieval = FrozenRetrieval(json.loads((snap_dir / "eval_hits.json").read_text()))
    evaluation = await evaluate_against_baseline(settings, registry, version, _rows(snap_dir / "eval.jsonl")[:limit],
                                                 _rows(snap_dir / "probe.jsonl")[:limit], retrieval,
                                                 _rows(snap_dir / "calibration.jsonl"),
                                                 _rows(snap_dir / "calibration_reworded.jsonl"))
    decision = decide(settings.retraining, evaluation.pop("comparisons"), evaluation["baseline_version"])
    calibration_items = evaluation.pop("calibration_items", {})
    frozen_items = evaluation.pop("candidate_items", {})
    metrics = {"evaluation": evaluation, "gate": decision}
    if settings.calibration.enabled and calibration_items:
        metrics["calibration"] = await _calibrate(settings, registry, version, calibration_items, frozen_items)
    return metrics


def _clear_win_over_base(settings: Settings, decision: dict) -> str | None:
    """The reason to promote a candidate straight over the base model, if its gain with retrieval
    clears `retraining.promote_over_base_margin` at the interval's lower bound."""
    rag = decision.get("checks", {}).get("rag")
    if decision.get("baseline_version") != "base" or not rag or not decision.get("passed"):
        return None
    margin = settings.retraining.promote_over_base_margin
    if rag["interval"][0] < margin:
        return None
    return (f"promoted over the base model: similarity with retrieval {rag['candidate_mean']:.3f} vs "
            f"{rag['baseline_mean']:.3f}, lower bound of the gain {rag['interval'][0]:+.3f} ≥ {margin:+.3f} "
            f"(retraining.promote_over_base_margin); {decision['reason']}")


CALIBRATION_SETS = ("calibration_rag", "calibration_no_rag", "calibration_reworded_rag")  # what a calibrator is fitted on


async def _calibrate(settings: Settings, registry: AdapterRegistry, version: str, calibration_items: dict,
                     frozen_items: dict) -> dict:
    """Fit the candidate's calibrator on its calibration-split answers and make it the version's
    active one; a fit that cannot be made (too few good or bad answers) is recorded, not fatal."""
    items = [i for mode in CALIBRATION_SETS for i in calibration_items.get(mode, [])]
    try:
        fitted = fit_from_evaluation(settings, items, {m: frozen_items[m] for m in ("rag", "no_rag") if m in frozen_items},
                                     version)
    except NotEnoughLabels as exc:
        return {"error": str(exc)}
    row = await Calibrators(registry.sessions).add(version, "calibration_split", fitted,
                                                   fitted.metrics["labels"]["n"], fitted.metrics["labels"]["good"])
    return {"calibrator_id": row.id, "threshold": row.threshold, **fitted.metrics}


def _eval_fingerprint(settings: Settings) -> str:
    """What an evaluation's answers depend on besides the adapter and the question."""
    parts = {"model": settings.model.model_dump(), "rag": settings.rag.model_dump(),
             "confidence": settings.confidence.model_dump(), "max_tokens": settings.retraining.eval_max_tokens,
             "confidence_parts": 4}  # v4: + the retrieval's rival candidate and question match
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


class EvalCache:
    """Per-question evaluation results of sealed adapters (and the base model), so a champion's
    answers on the frozen split are computed once, not again in every cycle's gate. Greedy decoding
    makes them a function of (adapter files, question, what retrieval gave it, settings fingerprint): exactly in float32; in
    bf16-mixed up to the rare near-tie a different batch composition flips (bench/results/batch_agreement.md),
    so reusing the first computed answers is as good as recomputing them."""

    def __init__(self, settings: Settings, version: str, files: dict | None) -> None:
        identity = json.dumps({"v": version, "files": files or {}, "fp": _eval_fingerprint(settings)}, sort_keys=True)
        self.path = settings.storage.data_dir / "eval_cache" / f"{version}-{hashlib.sha256(identity.encode()).hexdigest()[:16]}.json"
        self.items: dict = json.loads(self.path.read_text()) if self.path.is_file() else {}

    def get(self, mode: str, question: str, retrieved: str = "") -> dict | None:
        """`retrieved`: the signature of what retrieval gave the question (`FrozenRetrieval.signature`)."""
        return self.items.get(f"{mode}\x1f{question}\x1f{retrieved}" if retrieved else f"{mode}\x1f{question}")

    def put(self, mode: str, item: dict, retrieved: str = "") -> None:
        key = f"{mode}\x1f{item['question']}"
        self.items[f"{key}\x1f{retrieved}" if retrieved else key] = item

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.items))
        tmp.replace(self.path)


async def evaluate_against_baseline(settings: Settings, registry: AdapterRegistry, version: str,
                                    eval_rows: list[dict], probe_rows: list[dict], retrieval: FrozenRetrieval,
                                    calibration_rows: list[dict] | None = None,
                                    calibration_reworded_rows: list[dict] | None = None) -> dict:
    """Candidate vs the champion (or the base model): the frozen split with and without retrieval,
    and the forgetting probe with retrieval; per-question paired comparisons for the gate. The
    candidate also answers the calibration split (both ways) and its rewordings (with retrieval)
    for its calibrator."""
    frozen = [QA(r["question"], r["answer"]) for r in eval_rows]
    probe = [QA(r["question"], r["answer"]) for r in probe_rows]
    calibration = [QA(r["question"], r["answer"]) for r in calibration_rows or []]
    reworded = [QA(r["question"], r["answer"]) for r in calibration_reworded_rows or []]
    champion = await registry.champion()
    baseline = champion.version if champion else "base"
    sets = {"rag": (frozen, True), "no_rag": (frozen, False), "forgetting": (probe, True),
            "calibration_rag": (calibration, True), "calibration_no_rag": (calibration, False),
            "calibration_reworded_rag": (reworded, True)}
    engine = build_engine(settings, borrowed=True)
    await engine.start()
    try:
        await engine.load_adapter(version, str(await registry.verify(version)))
        if champion and champion.version != version:
            await engine.load_adapter(champion.version, str(await registry.verify(champion.version)))
        embedder = await asyncio.to_thread(Embedder, settings.rag.embedding_model)
        result: dict = {"baseline_version": baseline, "rows": len(frozen), "probe_rows": len(probe)}
        per_question: dict[str, dict[str, list[dict]]] = {}
        for name, adapter in (("candidate", version), ("baseline", None if baseline == "base" else baseline)):
            row = await registry.get(adapter) if adapter else None
            cache = EvalCache(settings, adapter or "base", row.files if row else None)
            result[name], per_question[name] = {}, {}
            for mode, (rows, rag) in sets.items():
                if not rows or (mode.startswith("calibration") and name != "candidate"):
                    continue
                seen = (lambda q: retrieval.signature(q)) if rag else (lambda q: "")  # noqa: E731
                missing = [qa for qa in rows if cache.get(mode, qa.question, seen(qa.question)) is None]
                if missing:
                    report = await evaluate(settings, engine, embedder, missing, kb=retrieval if rag else None,
                                            rag=rag, adapter=adapter, max_tokens=settings.retraining.eval_max_tokens)
                    for item in report["items"]:
                        cache.put(mode, item, seen(item["question"]))
                items = [cache.get(mode, qa.question, seen(qa.question)) for qa in rows]
                per_question[name][mode] = items
                if not mode.startswith("calibration"):  # the calibration split feeds the calibrator only
                    result[name][mode] = summarise(items)
            cache.save()
        result["comparisons"] = {
            mode: paired([i["similarity"] for i in per_question["candidate"][mode]],
                         [i["similarity"] for i in per_question["baseline"][mode]],
                         settings.retraining.gate_confidence, settings.retraining.gate_bootstrap_samples)
            for mode in per_question["candidate"] if not mode.startswith("calibration")}
        result["calibration_items"] = {m: v for m, v in per_question["candidate"].items() if m.startswith("calibration")}
        result["calibration_answers"] = {m: len(v) for m, v in result["calibration_items"].items()}
        result["candidate_items"] = {m: v for m, v in per_question["candidate"].items() if m in ("rag", "no_rag")}
        return result
    finally:
        # an upstream engine (engine.backend = "openai") is shared with the gateways: what this
        # evaluation registered there is unregistered again (a borrowed engine never touches the rest)
        try:
            await engine.unload_adapter(version)
        finally:
            await engine.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m retraining.train")
    parser.add_argument("run_id", type=int)
    parser.add_argument("--settings", required=True, help="the run's settings JSON (written by gateway.runs.control)")
    args = parser.parse_args(argv)
    settings = Settings.model_validate_json(Path(args.settings).read_text())
    try:
        asyncio.run(execute_run(settings, args.run_id))
    except Exception:  # noqa: BLE001 - already recorded on the run; the exit status tells the parent
        traceback.print_exc()
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
