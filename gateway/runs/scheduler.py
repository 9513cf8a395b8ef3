"""The gateway's scheduled jobs (APScheduler): a retraining cycle when one is due, the experiment's
decision rule, the calibrators' refit on reviewers' verdicts, and serving following the registry.

The jobs are bound methods of `ScheduledJobs`, which is handed its collaborators (the run control
and the serving service); nothing is reached through module globals. Every job lives in the
in-memory job store, so the scheduler holds no pickled code and trusts nothing read back from the
database. The retraining slot survives restarts anyway: its interval is anchored on the newest run's
start (`IntervalTrigger(start_date=...)` fires on that grid), so a restart does not push the next
slot away; a cron schedule needs no anchor. The first start with no champion moves the slot to
`bootstrap_delay_minutes` after start (`schedule_bootstrap`).
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING

import structlog
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger

from gateway.adapters.registry import RegistryError
from gateway.core import metrics
from gateway.core.settings import Settings
from gateway.runs.control import Retrainer, RunRefused
from gateway.runs.lease import Lease
from gateway.store.base import as_utc

if TYPE_CHECKING:
    from gateway.adapters.service import AdapterService
    from gateway.calibration.service import CalibrationService

log = structlog.get_logger(__name__)


class ScheduledJobs:
    """What the scheduler runs; each job logs refusals instead of raising (a job never dies). The
    decision jobs (retrain, experiment, calibration) run only on the replica holding the lease,
    confirmed just before acting; `sync` and `lease` run on every replica."""

    def __init__(self, retrainer: Retrainer, serving: "AdapterService | None" = None,
                 calibration: "CalibrationService | None" = None, lease: Lease | None = None) -> None:
        self.retrainer, self.serving, self.calibration, self.lease = retrainer, serving, calibration, lease

    async def _leads(self, job: str) -> bool:
        if self.lease is not None and not await self.lease.confirm():
            return False
        metrics.SCHEDULED_JOBS.labels(job).inc()
        return True

    async def keep_lease(self) -> None:
        if self.lease is not None:
            await self.lease.tick()

    async def retrain(self) -> None:
        """Start a run if one is due (too few new labels → nothing happens)."""
        if not await self._leads("retrain"):
            return
        try:
            run = await self.retrainer.start("schedule", "scheduler")
            log.info("retrain.scheduled_run", run_id=run.id, status=run.status)
        except RunRefused as exc:
            log.info("retrain.not_started", reason=exc.code, detail=str(exc))
        except RegistryError as exc:
            log.warning("retrain.registry_error", detail=str(exc))

    async def evaluate_experiment(self) -> None:
        """Apply the decision rule and act (promote / retire / keep collecting)."""
        if not await self._leads("experiment"):
            return
        try:
            result = await self.serving.evaluate("scheduler")
            log.info("experiment.evaluated", experiment_id=result["experiment_id"], action=result["action"],
                     reason=result["reason"])
        except RegistryError as exc:  # e.g. an admin changed the registry at the same moment
            log.warning("experiment.evaluation_refused", detail=str(exc))

    async def refit_calibrators(self) -> None:
        """Refit the served variants' calibrators on their reviewers' verdicts (where enough exist)."""
        if not await self._leads("calibration"):
            return
        split = self.serving.chat.split
        variants = [v for v in (split.champion, split.challenger) if v]
        await self.calibration.refit_all(variants)
        await self.serving.reconcile()

    async def sync(self) -> None:
        """Serving follows the registry, including changes made by the CLI or another process."""
        await self.serving.reconcile()


async def retrain_anchor(retrainer: Retrainer) -> datetime:
    """Where the retraining interval's grid starts: the newest run's creation, else now."""
    runs = await retrainer.runs.list(limit=1)
    return as_utc(runs[0].created_at) if runs else datetime.now(timezone.utc)


def make_scheduler(settings: Settings, jobs: ScheduledJobs, anchor: datetime | None = None) -> AsyncIOScheduler:
    """The scheduler with the enabled jobs added (not started)."""
    cfg, exp = settings.retraining, settings.experiment
    scheduler = AsyncIOScheduler()
    common = {"replace_existing": True, "coalesce": True, "max_instances": 1}
    if cfg.enabled:
        trigger = (CronTrigger.from_crontab(cfg.cron) if cfg.cron
                   else IntervalTrigger(hours=cfg.interval_hours, start_date=anchor))
        scheduler.add_job(jobs.retrain, trigger, id="retrain", name="retraining cycle", misfire_grace_time=3600,
                          **common)
    if jobs.serving is not None and exp.enabled:
        scheduler.add_job(jobs.evaluate_experiment, IntervalTrigger(seconds=exp.evaluate_interval_s),
                          id="experiment", name="experiment decision",
                          misfire_grace_time=int(exp.evaluate_interval_s) + 60, **common)
    if jobs.serving is not None and jobs.calibration is not None and settings.calibration.enabled:
        scheduler.add_job(jobs.refit_calibrators, IntervalTrigger(hours=settings.calibration.refit_interval_hours),
                          id="calibration", name="calibrator refit on reviewers' verdicts", **common)
    if jobs.lease is not None:
        scheduler.add_job(jobs.keep_lease, IntervalTrigger(seconds=settings.server.scheduler_renew_s), id="lease",
                          name="scheduler lease (one leader among replicas)", **common)
    if jobs.serving is not None:
        scheduler.add_job(jobs.sync, IntervalTrigger(seconds=exp.sync_interval_s), id="sync",
                          name="serving follows the registry", **common)
    return scheduler


def schedule_bootstrap(scheduler: AsyncIOScheduler, settings: Settings) -> datetime:
    """Move the retraining slot to `bootstrap_delay_minutes` from now (no champion yet)."""
    first = datetime.now(timezone.utc) + timedelta(minutes=settings.retraining.bootstrap_delay_minutes)
    scheduler.modify_job("retrain", next_run_time=first)
    log.info("retrain.bootstrap_scheduled", at=first.isoformat(timespec="seconds"))
    return first
