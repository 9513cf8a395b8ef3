"""Retraining cycles: when to run, the parent side (dataset → spawn the trainer → watch it), the
trainer side (train → evaluate → gate), and the APScheduler job.

One cycle at a time: the parent refuses a second run while one is queued or running (checked in the
database, so the CLI and the gateway see each other's runs). The trainer is a separate, niced
process (`python -m retraining.train`), so serving keeps answering; if it dies or is killed the
parent marks the run failed with the reason, and a gateway restart marks interrupted runs failed.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import structlog
from sqlalchemy.ext.asyncio import async_sessionmaker

from gateway.errors import CodedError
from gateway.rag.knowledge import Hit, KnowledgeBase
from gateway.settings import Settings
from gateway.store.models import as_utc, utcnow
from gateway.store.reviews import ReviewRepository
from retraining import dataset as datasets
from retraining.experiments import Experiments
from retraining.gate import decide, paired
from retraining.registry import AdapterRegistry, RegistryError, RunActive, RunStore

log = structlog.get_logger(__name__)


class RunRefused(CodedError):
    """Not started: another run is active, or too few new labels (unless forced)."""



def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def trainer_alive(pid: int | None, run_id: int) -> bool:
    """Is `pid` still this run's trainer (not a reused pid)? Where /proc is missing: is it alive."""
    if not pid or not _alive(pid):
        return False
    cmdline = Path(f"/proc/{pid}/cmdline")
    if not cmdline.parent.parent.is_dir():
        return True
    try:
        argv = cmdline.read_bytes().split(b"\0")
    except OSError:
        return False
    return b"retraining.train" in argv and str(run_id).encode() in argv


class FrozenRetrieval:
    """The retrieval results of the frozen split's questions, saved with the dataset, so the trainer
    process evaluates "with retrieval" without opening the (single-process) Chroma store."""

    def __init__(self, hits: dict[str, list[dict]]) -> None:
        self._hits = hits

    def search(self, query: str, k: int, min_score: float | None = None) -> list[Hit]:
        return [Hit(**h) for h in self._hits.get(query, [])][:k]


def run_dir(settings: Settings, run_id: int) -> Path:
    return settings.storage.data_dir / "runs" / str(run_id)


def apply_overrides(settings: Settings, overrides: dict) -> Settings:
    cls = type(settings.training)
    training = cls.model_validate({**settings.training.model_dump(), **{k: v for k, v in overrides.items() if k in cls.model_fields}})
    return settings.model_copy(update={"training": training})


async def resolved_rows(reviews: ReviewRepository) -> list[datasets.Resolved]:
    rows = []
    async for item, exchange in reviews.resolved():
        rows.append(datasets.Resolved(item.id, as_utc(item.resolved_at).isoformat() if item.resolved_at else "",
                                      exchange.messages, item.resolved_answer))
    return rows


def _slim(manifest: dict) -> dict:
    """The dataset manifest without its long lists (those stay in the dataset folder)."""
    return {k: v for k, v in manifest.items() if k not in ("known_reviews", "new_review_questions")}


async def fail_run(runs: RunStore, registry: AdapterRegistry, run_id: int, version: str | None, reason: str) -> None:
    """Mark an unfinished run failed (a first reason wins) and its adapter too if it never left training."""
    run = await runs.get(run_id)
    if run is not None and run.status not in ("succeeded", "failed"):  # queued, running or trained
        await runs.update(run_id, status="failed", error=reason[-2000:], finished_at=utcnow())
    version = version or (run.adapter_version if run else None)
    if version:
        adapter = await registry.get(version)
        if adapter is not None and adapter.state == "training":
            await registry.transition(version, "failed", reason=reason[-2000:])
    log.warning("retrain.failed", run_id=run_id, reason=reason[-300:])


# ---- parent side ---------------------------------------------------------------------------------
class Retrainer:
    """Starts and watches retraining runs. Lives in the gateway (scheduler, admin API) and in the CLI."""

    def __init__(self, settings: Settings, sessions: async_sessionmaker, kb: Callable[[], KnowledgeBase | None],
                 on_adapter_ready: Callable | None = None) -> None:
        self.settings = settings
        self.sessions = sessions
        self.runs = RunStore(sessions)
        self.registry = AdapterRegistry(sessions, settings.storage.data_dir)
        self.reviews = ReviewRepository(sessions, settings.review)
        self._kb = kb
        self._on_adapter_ready = on_adapter_ready
        self._lock = asyncio.Lock()
        self.tasks: set[asyncio.Task] = set()
        self._watching: set[int] = set()  # runs whose trainer this process watches

    async def mark_interrupted(self) -> int:
        """Runs left active by a process that stopped: a trainer still running is adopted (watched
        to its end by this process), a finished one is completed, anything else is failed (and
        retried next slot). Called at start-up and before every new run. Returns how many failed."""
        n = 0
        for run in await self.runs.active():
            if run.id in self._watching:
                continue
            if trainer_alive(run.pid, run.id):
                self._spawn(self._adopt(run.id, run.pid, run.adapter_version))
                continue
            if run.status == "trained" and run.pid and not _alive(run.pid):
                self._spawn(self._finish(self.settings, run.id, run.adapter_version, 0))
                continue
            if run.status == "queued" and not run.pid and (utcnow() - as_utc(run.created_at)).total_seconds() < 1800:
                continue  # still building its dataset in another process
            await self._fail(run.id, run.adapter_version, "interrupted: the process running it stopped")
            n += 1
        return n

    def _spawn(self, coro) -> None:  # noqa: ANN001
        task = asyncio.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _adopt(self, run_id: int, pid: int, version: str | None) -> None:
        """Watch a trainer another (stopped) process started, until it exits, then complete the run."""
        self._watching.add(run_id)
        log.info("retrain.adopted", run_id=run_id, pid=pid)
        try:
            while trainer_alive(pid, run_id):
                await asyncio.sleep(self.settings.retraining.adopt_poll_s)
            await self._finish(self.settings, run_id, version, None)
        finally:
            self._watching.discard(run_id)

    async def new_labels(self) -> int:
        return await self.runs.resolved_labels() - await self.runs.last_watermark()

    async def check_due(self, force: bool) -> None:
        """Raise RunRefused when a run is active, or (unless forced or bootstrapping) too few new labels."""
        await self.mark_interrupted()
        active = await self.runs.active()
        if active:
            raise RunRefused(f"run {active[0].id} is already {active[0].status}; one run at a time", "busy")
        if force or await self.bootstrap_due():
            return
        testing = [a.version for a in await self.registry.list() if a.state == "challenger"]
        if testing and self.settings.experiment.enabled:
            raise RunRefused(f"challenger {testing[0]} is being A/B tested; the next run waits for its decision "
                             "(force to run anyway)", "experiment_running")
        new = await self.new_labels()
        if new < self.settings.retraining.min_new_labels:
            raise RunRefused(f"{new} new resolved labels; retraining.min_new_labels="
                             f"{self.settings.retraining.min_new_labels} (force to run anyway)", "not_due")

    async def bootstrap_due(self) -> bool:
        """No adapter has ever been trained successfully (so there is no champion) and seeds exist."""
        cfg = self.settings.retraining
        return (cfg.bootstrap and bool(cfg.seed_data)
                and all(a.state == "failed" for a in await self.registry.list()))

    async def start(self, trigger: str, requested_by: str, overrides: dict | None = None, force: bool = False):
        """Create the run, build its dataset, spawn the trainer; returns the run at once (watching
        continues in a task). Raises RunRefused when busy or not due. From the moment the run row
        exists, every path ends it in a terminal state or hands it to the trainer."""
        overrides = overrides or {}
        async with self._lock:
            await self.check_due(force)
            bootstrap = await self.bootstrap_due()
            watermark = await self.runs.resolved_labels()
            try:
                run = await self.runs.create("bootstrap" if bootstrap else trigger, requested_by, overrides, watermark)
            except RunActive as exc:  # another process won the race for the active slot
                raise RunRefused(str(exc), "busy") from None
        version = None
        try:
            settings = apply_overrides(self.settings, overrides)
            champion = await self.registry.champion()
            warm = settings.retraining.mode == "warm" and champion is not None and not bootstrap
            parent_manifest = datasets.load_manifest(settings.storage.data_dir, champion.dataset_hash) if warm else None
            if warm:
                await self.registry.verify(champion.version)  # refuse to build on a corrupted champion
            snapshot = await self._prepare(settings, run.id, bootstrap, parent_manifest if warm else None)
            init = champion.version if warm else "base"
            adapter = await self.registry.create(
                run_id=run.id, base_model=settings.model.base or "embedded SmolLM2-135M-Instruct",
                parent=champion.version if champion else None,
                config={**settings.training.model_dump(), "mode": snapshot.manifest["mode"], "initialised_from": init})
            version = adapter.version
            await self.registry.update(version, dataset_hash=snapshot.hash, label_count=snapshot.label_count,
                                       train_examples=len(snapshot.train))
            await self.runs.update(run.id, adapter_version=version, dataset_hash=snapshot.hash,
                                   metrics={"dataset": _slim(snapshot.manifest)},
                                   progress={"phase": "starting", "dataset": _slim(snapshot.manifest)})
        except Exception as exc:  # noqa: BLE001 - recorded on the run
            await self._fail(run.id, version, f"{type(exc).__name__}: {exc}")
            return await self.runs.get(run.id)
        self._spawn(self._watch(settings, run.id, version))
        return await self.runs.get(run.id)

    async def _prepare(self, settings: Settings, run_id: int, bootstrap: bool,
                       parent_manifest: dict | None) -> datasets.Snapshot:
        kb = self._kb()
        if kb is None:
            raise datasets.DatasetError("the knowledge base is unavailable: the evaluation with retrieval (and "
                                        "context-aware training) cannot run without it")
        rows = await resolved_rows(self.reviews)
        snapshot = await asyncio.to_thread(datasets.build, settings, rows, kb, bootstrap=bootstrap,
                                           parent_manifest=parent_manifest)
        hits: dict[str, list[dict]] = {}
        for question in [qa.question for qa in snapshot.eval_rows + snapshot.probe]:
            found = await asyncio.to_thread(kb.search, question, settings.rag.top_k, -1.0)
            hits[question] = [asdict(h) for h in found]
        (snapshot.path / "eval_hits.json").write_text(json.dumps(hits))
        folder = run_dir(settings, run_id)
        folder.mkdir(parents=True, exist_ok=True)
        settings_file = folder / "settings.json"
        fd = os.open(settings_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # holds API key digests
        with os.fdopen(fd, "w") as fh:
            fh.write(settings.model_dump_json(by_alias=True))
        return snapshot

    async def _watch(self, settings: Settings, run_id: int, version: str) -> None:
        self._watching.add(run_id)
        try:
            await self._run_trainer(settings, run_id, version)
        finally:
            self._watching.discard(run_id)

    async def _run_trainer(self, settings: Settings, run_id: int, version: str) -> None:
        folder = run_dir(settings, run_id)
        log_path = folder / "train.log"
        nice = settings.training.nice
        try:
            with log_path.open("ab") as out:
                proc = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "retraining.train", str(run_id), "--settings", str(folder / "settings.json"),
                    stdout=out, stderr=asyncio.subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                    preexec_fn=(lambda: os.nice(nice)) if nice else None, start_new_session=True,
                )
            await self.runs.update(run_id, pid=proc.pid, log_path=str(log_path))
        except Exception as exc:  # noqa: BLE001 - e.g. no such interpreter, out of file descriptors
            await self._fail(run_id, version, f"could not start the trainer: {type(exc).__name__}: {exc}")
            return
        log.info("retrain.started", run_id=run_id, adapter=version, pid=proc.pid)
        try:
            code = await asyncio.wait_for(proc.wait(), settings.retraining.timeout_minutes * 60)
        except asyncio.TimeoutError:
            proc.kill()
            await proc.wait()
            await self._fail(run_id, version, f"timed out after {settings.retraining.timeout_minutes} minutes")
            return
        except asyncio.CancelledError:  # the gateway is stopping: the trainer stops with it
            proc.send_signal(signal.SIGTERM)
            await self._fail(run_id, version, "interrupted: the gateway stopped")
            raise
        await self._finish(settings, run_id, version, code)

    async def _finish(self, settings: Settings, run_id: int, version: str | None, code: int | None) -> None:
        """The trainer exited (`code`, None when adopted and unknown): put the adapter in service and
        end the run succeeded, or fail it with the reason."""
        run = await self.runs.get(run_id)
        if run is None or run.status in ("succeeded", "failed"):
            return
        if run.status != "trained" or (code is not None and code != 0):
            how = ("exited" if code is None else f"killed by signal {-code}" if code < 0
                   else f"exited with status {code}")
            await self._fail(run_id, version, run.error or f"trainer {how}; see {run.log_path}")
            return
        adapter = await self.registry.get(version) if version else None
        try:
            if self._on_adapter_ready is not None and adapter is not None and adapter.state in ("challenger", "champion"):
                await self._on_adapter_ready()
        except Exception as exc:  # noqa: BLE001 - e.g. a corrupted file: the run's adapter is not served
            await self._fail(run_id, version, f"trained, but loading {version} failed: {type(exc).__name__}: {exc}")
            return
        await self.runs.update(run_id, status="succeeded", finished_at=utcnow())
        log.info("retrain.finished", run_id=run_id, adapter=version, state=adapter.state if adapter else None)

    async def _fail(self, run_id: int, version: str | None, reason: str) -> None:
        await fail_run(self.runs, self.registry, run_id, version, reason)

    async def wait(self) -> None:
        while self.tasks:
            await asyncio.gather(*list(self.tasks), return_exceptions=True)


# ---- trainer side (runs in the trainer process) ---------------------------------------------------
async def execute_run(settings: Settings, run_id: int) -> None:
    from gateway.store.db import create_engine, session_factory

    db = create_engine(settings.storage.resolved_database_url)
    sessions = session_factory(db)
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
    finally:
        await db.dispose()


async def _train_evaluate_gate(settings, run, runs: RunStore, registry: AdapterRegistry, folder: Path) -> dict:  # noqa: ANN001
    from retraining.train import train_adapter

    snap_dir = settings.storage.data_dir / "datasets" / run.dataset_hash[:16]
    train = [e.messages for e in datasets.load_train(snap_dir)]
    eval_rows = [json.loads(x) for x in (snap_dir / "eval.jsonl").read_text().splitlines()]
    probe_file = snap_dir / "probe.jsonl"
    probe_rows = [json.loads(x) for x in probe_file.read_text().splitlines()] if probe_file.is_file() else []
    hits = json.loads((snap_dir / "eval_hits.json").read_text())
    if settings.retraining.eval_limit:
        eval_rows = eval_rows[: settings.retraining.eval_limit]
        probe_rows = probe_rows[: settings.retraining.eval_limit]
    retrieval = FrozenRetrieval(hits)
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
    train_metrics = await asyncio.to_thread(train_adapter, settings, train, eval_messages, out, report, write,
                                            parent_dir)
    train_metrics["initialised_from"] = init
    await registry.seal(run.adapter_version)
    await registry.transition(run.adapter_version, "candidate", metrics={"training": train_metrics})
    await runs.update(run.id, progress={"phase": "evaluating", "training": train_metrics})
    evaluation = await evaluate_against_baseline(settings, registry, run.adapter_version, eval_rows, probe_rows,
                                                 retrieval)
    decision = decide(settings.retraining, evaluation.pop("comparisons"), evaluation["baseline_version"])
    metrics = {"training": train_metrics, "evaluation": evaluation, "gate": decision}
    await registry.update(run.adapter_version, reason=decision["reason"], metrics=metrics)
    if decision["passed"] and not settings.experiment.enabled and await registry.champion() is None:
        await Experiments(settings, registry.sessions, registry).promote(  # no experiments: the first one serves
            run.adapter_version, "gate", automatic=True, reason=decision["reason"], evidence={"gate": decision})
    elif decision["passed"]:  # live traffic decides (retraining/experiments.py), or an admin when disabled
        await registry.transition(run.adapter_version, "challenger")
    write(json.dumps({"gate": decision}))
    log_file.close()
    return metrics


def _eval_fingerprint(settings: Settings) -> str:
    """What an evaluation's answers depend on besides the adapter and the question."""
    parts = {"model": settings.model.model_dump(), "rag": settings.rag.model_dump(),
             "confidence": settings.confidence.model_dump(), "max_tokens": settings.retraining.eval_max_tokens}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


class EvalCache:
    """Per-question evaluation results of sealed adapters (and the base model), so a champion's
    answers on the frozen split are computed once, not again in every cycle's gate. Greedy decoding
    makes them a pure function of (adapter files, question, settings fingerprint)."""

    def __init__(self, settings: Settings, version: str, files: dict | None) -> None:
        identity = json.dumps({"v": version, "files": files or {}, "fp": _eval_fingerprint(settings)}, sort_keys=True)
        self.path = settings.storage.data_dir / "eval_cache" / f"{version}-{hashlib.sha256(identity.encode()).hexdigest()[:16]}.json"
        self.items: dict = json.loads(self.path.read_text()) if self.path.is_file() else {}

    def get(self, mode: str, question: str) -> dict | None:
        return self.items.get(f"{mode}\x1f{question}")

    def put(self, mode: str, item: dict) -> None:
        self.items[f"{mode}\x1f{item['question']}"] = item

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.items))
        tmp.replace(self.path)


async def evaluate_against_baseline(settings: Settings, registry: AdapterRegistry, version: str,
                                    eval_rows: list[dict], probe_rows: list[dict], retrieval: FrozenRetrieval) -> dict:
    """Candidate vs the champion (or the base model): the frozen split with and without retrieval,
    and the forgetting probe with retrieval; per-question paired comparisons for the gate."""
    from gateway.runtime import build_engine
    from gateway.rag.embeddings import Embedder
    from retraining.evaluate import QA, evaluate, summarise

    frozen = [QA(r["question"], r["answer"]) for r in eval_rows]
    probe = [QA(r["question"], r["answer"]) for r in probe_rows]
    champion = await registry.champion()
    baseline = champion.version if champion else "base"
    sets = {"rag": (frozen, True), "no_rag": (frozen, False), "forgetting": (probe, True)}
    engine = build_engine(settings)
    await engine.start()
    try:
        await engine.load_adapter(version, str(await registry.verify(version)))
        if champion:
            await engine.load_adapter(champion.version, str(await registry.verify(champion.version)))
        embedder = await asyncio.to_thread(Embedder, settings.rag.embedding_model)
        result: dict = {"baseline_version": baseline, "rows": len(frozen), "probe_rows": len(probe)}
        per_question: dict[str, dict[str, list[dict]]] = {}
        for name, adapter in (("candidate", version), ("baseline", None if baseline == "base" else baseline)):
            row = await registry.get(adapter) if adapter else None
            cache = EvalCache(settings, adapter or "base", row.files if row else None)
            result[name], per_question[name] = {}, {}
            for mode, (rows, rag) in sets.items():
                if not rows:
                    continue
                missing = [qa for qa in rows if cache.get(mode, qa.question) is None]
                if missing:
                    report = await evaluate(settings, engine, embedder, missing, kb=retrieval if rag else None,
                                            rag=rag, adapter=adapter, max_tokens=settings.retraining.eval_max_tokens)
                    for item in report["items"]:
                        cache.put(mode, item)
                items = [cache.get(mode, qa.question) for qa in rows]
                per_question[name][mode] = items
                result[name][mode] = summarise(items)
            cache.save()
        result["comparisons"] = {
            mode: paired([i["similarity"] for i in per_question["candidate"][mode]],
                         [i["similarity"] for i in per_question["baseline"][mode]],
                         settings.retraining.gate_confidence, settings.retraining.gate_bootstrap_samples)
            for mode in per_question["candidate"]}
        return result
    finally:
        await engine.stop()


# ---- scheduler ------------------------------------------------------------------------------------
# Jobs are stored by reference (the job store pickles the function's import path), so they reach the
# gateway's objects through these module globals, set by `make_scheduler`.
_RETRAINER: Retrainer | None = None
_SERVING = None  # the gateway's AdapterService: `evaluate(actor)` and `reconcile()`


async def scheduled_run() -> None:
    """The retraining job: start a run if one is due (too few labels → nothing happens)."""
    if _RETRAINER is None:
        return
    try:
        run = await _RETRAINER.start("schedule", "scheduler")
        log.info("retrain.scheduled_run", run_id=run.id, status=run.status)
    except RunRefused as exc:
        log.info("retrain.not_started", reason=exc.code, detail=str(exc))
    except RegistryError as exc:
        log.warning("retrain.registry_error", detail=str(exc))


async def scheduled_evaluation() -> None:
    """The experiment job: apply the decision rule and act (promote / retire / keep collecting)."""
    if _SERVING is None:
        return
    try:
        result = await _SERVING.evaluate("scheduler")
        log.info("experiment.evaluated", experiment_id=result["experiment_id"], action=result["action"],
                 reason=result["reason"])
    except RegistryError as exc:  # e.g. an admin changed the registry at the same moment
        log.warning("experiment.evaluation_refused", detail=str(exc))


async def scheduled_sync() -> None:
    """Serving follows the registry, including changes made by the CLI or another process."""
    if _SERVING is not None:
        await _SERVING.reconcile()


def sync_url(url: str) -> str:
    """The job store uses a synchronous engine: same database, synchronous driver."""
    return url.replace("+aiosqlite", "").replace("+asyncpg", "+psycopg")


def make_scheduler(settings: Settings, retrainer: Retrainer, serving=None):  # noqa: ANN001
    """APScheduler with the retraining job persisted in the database (a restart keeps its next run
    time: it may be a day away) and the frequent jobs (experiment decision, registry sync) in memory:
    they run every few minutes or seconds, and writing their next run time to SQLite each time would
    compete with the gateway's own writes for the database lock."""
    from apscheduler.jobstores.memory import MemoryJobStore
    from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
    from apscheduler.schedulers.asyncio import AsyncIOScheduler
    from apscheduler.triggers.cron import CronTrigger
    from apscheduler.triggers.interval import IntervalTrigger

    global _RETRAINER, _SERVING
    _RETRAINER, _SERVING = retrainer, serving
    cfg, exp = settings.retraining, settings.experiment
    url = sync_url(settings.storage.resolved_database_url)
    wait_for_lock = {"connect_args": {"timeout": 30}} if url.startswith("sqlite") else {}
    scheduler = AsyncIOScheduler(jobstores={
        "default": SQLAlchemyJobStore(url=url, tablename="scheduler_jobs", engine_options=wait_for_lock),
        "memory": MemoryJobStore()})
    common = {"replace_existing": True, "coalesce": True, "max_instances": 1}
    if cfg.enabled:
        trigger = CronTrigger.from_crontab(cfg.cron) if cfg.cron else IntervalTrigger(hours=cfg.interval_hours)
        scheduler.add_job(scheduled_run, trigger, id="retrain", name="retraining cycle", misfire_grace_time=3600,
                          **common)
    if serving is not None and exp.enabled:
        scheduler.add_job(scheduled_evaluation, IntervalTrigger(seconds=exp.evaluate_interval_s), id="experiment",
                          name="experiment decision", jobstore="memory",
                          misfire_grace_time=int(exp.evaluate_interval_s) + 60, **common)
    if serving is not None:
        scheduler.add_job(scheduled_sync, IntervalTrigger(seconds=exp.sync_interval_s), id="sync",
                          name="serving follows the registry", jobstore="memory", **common)
    return scheduler


def drop_disabled_jobs(scheduler, settings: Settings) -> None:  # noqa: ANN001
    """The retraining job, persisted while it was enabled, must not outlive its switch."""
    if not settings.retraining.enabled and scheduler.get_job("retrain", "default") is not None:
        scheduler.remove_job("retrain", "default")
