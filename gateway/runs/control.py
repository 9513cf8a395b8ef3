"""Retraining cycles, the gateway's side: when a run is due, its dataset snapshot, spawning the
trainer (`python -m retraining.train RUN_ID`, by module name: the trainer's code is never imported
here) and watching it to its end. The trainer side (train → evaluate → gate) is `retraining/train.py`.

The dataset is built here, not in the trainer, because it reads the knowledge base and the embedded
Chroma store is single-process; `retraining.dataset` is a pure lower layer (it imports no service).

One cycle at a time: the parent refuses a second run while one is queued or running (checked in the
database, so the CLI and the gateway see each other's runs). The trainer is a separate, niced
process (`python -m retraining.train`), so serving keeps answering; if it dies or is killed the
parent marks the run failed with the reason, and a gateway restart marks interrupted runs failed.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import structlog
from sqlalchemy.ext.asyncio import async_sessionmaker

from gateway.adapters.registry import AdapterRegistry
from gateway.core import metrics
from gateway.core.errors import Conflict
from gateway.core.settings import Settings
from gateway.review.repository import ReviewRepository
from gateway.runs.repository import RunActive, RunStore, fail_run, host_id, run_dir
from gateway.store.base import as_utc, utcnow
from retraining import dataset as datasets

if TYPE_CHECKING:
    from gateway.knowledge.store import KnowledgeBase

log = structlog.get_logger(__name__)


class RunRefused(Conflict):
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


def apply_overrides(settings: Settings, overrides: dict) -> Settings:
    cls = type(settings.training)
    training = cls.model_validate({**settings.training.model_dump(), **{k: v for k, v in overrides.items() if k in cls.model_fields}})
    return settings.model_copy(update={"training": training})


async def resolved_rows(reviews: ReviewRepository) -> list[datasets.Resolved]:
    rows = []
    async for item, exchange in reviews.resolved():
        rows.append(datasets.Resolved(item.id, as_utc(item.resolved_at).isoformat() if item.resolved_at else "",
                                      exchange.messages, item.resolved_answer, exchange.conversation,
                                      item.resolution or "correct"))
    return rows


def _slim(manifest: dict) -> dict:
    """The dataset manifest without its long lists (those stay in the dataset folder)."""
    return {k: v for k, v in manifest.items() if k not in ("known_reviews", "new_review_questions")}


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
        n, here = 0, host_id()
        for run in await self.runs.active():
            if run.id in self._watching:
                continue
            if run.host and run.host != here:  # another replica's or training host's: its pid means nothing here
                age = (utcnow() - as_utc(run.created_at)).total_seconds()
                if age < self.settings.retraining.timeout_minutes * 60 + 1800:
                    continue
                await self._fail(run.id, run.adapter_version,
                                 f"interrupted: {run.host} stopped watching it (older than retraining.timeout_minutes)")
                n += 1
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
        return await self.reviews.resolved_count() - await self.runs.last_watermark()

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
            watermark = await self.reviews.resolved_count()
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
        hits: dict[str, dict] = {}
        for question in [qa.question for qa in snapshot.eval_rows + snapshot.probe + snapshot.calibration
                         + snapshot.calibration_reworded]:
            found = await asyncio.to_thread(kb.search_detailed, question, settings.rag.top_k, -1.0)
            hits[question] = {"hits": [asdict(h) for h in found.hits], "rival": found.rival,
                              "question_match": found.question_match}
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
            await self.runs.update(run_id, pid=proc.pid, host=host_id(), log_path=str(log_path))
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
            if run is not None and run.status == "failed":  # the trainer recorded its own failure
                metrics.RUNS.labels("failed").inc()
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
        metrics.RUNS.labels("succeeded").inc()
        log.info("retrain.finished", run_id=run_id, adapter=version, state=adapter.state if adapter else None)

    async def _fail(self, run_id: int, version: str | None, reason: str) -> None:
        await fail_run(self.runs, self.registry, run_id, version, reason)
        metrics.RUNS.labels("failed").inc()

    async def wait(self) -> None:
        while self.tasks:
            await asyncio.gather(*list(self.tasks), return_exceptions=True)


