"""Training-run records: one active run at a time (enforced by a unique index, so the CLI and every
gateway see each other's runs), their progress, metrics, log path and trainer pid."""

from __future__ import annotations

import socket
from pathlib import Path

import structlog
from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import async_sessionmaker

from gateway.adapters.registry import AdapterRegistry, RegistryError
from gateway.core.settings import Settings
from gateway.runs.models import TrainingRun
from gateway.store.base import utcnow
from gateway.store.db import is_row_id


def host_id() -> str:
    """This machine, as a run's `host`: its hostname (a container's own) and the kernel's boot id, so
    a pid recorded before a reboot is not mistaken for a live process after it."""
    boot = Path("/proc/sys/kernel/random/boot_id")
    try:
        boot_id = boot.read_text().strip()[:36]
    except OSError:
        boot_id = "-"
    return f"{socket.gethostname()}/{boot_id}"

log = structlog.get_logger(__name__)
ACTIVE_RUN = ("queued", "running", "trained")  # trained: the parent is putting the adapter in service
TERMINAL_RUN = ("succeeded", "failed")


class RunActive(RegistryError):
    """The database already holds an active run (the one-active-run index refused another)."""


def run_dir(settings: Settings, run_id: int) -> Path:
    return settings.storage.data_dir / "runs" / str(run_id)


class RunStore:
    def __init__(self, sessions: async_sessionmaker) -> None:
        self._sessions = sessions

    async def create(self, trigger: str, requested_by: str, overrides: dict, watermark: int) -> TrainingRun:
        """A new queued run; RunActive when another run holds the active slot (any process)."""
        try:
            async with self._sessions() as session, session.begin():
                run = TrainingRun(status="queued", trigger=trigger, requested_by=requested_by, overrides=overrides,
                                  label_watermark=watermark, progress={}, metrics={}, created_at=utcnow(),
                                  active_slot=1, host=host_id())
                session.add(run)
        except IntegrityError:
            active = await self.active()
            which = f"run {active[0].id} is already {active[0].status}" if active else "another run is active"
            raise RunActive(f"{which}; one run at a time") from None
        return run

    async def get(self, run_id: int) -> TrainingRun | None:
        if not is_row_id(run_id):
            return None
        async with self._sessions() as session:
            return await session.get(TrainingRun, run_id)

    async def list(self, limit: int = 50) -> list[TrainingRun]:
        async with self._sessions() as session:
            return list(await session.scalars(select(TrainingRun).order_by(TrainingRun.id.desc()).limit(limit)))

    async def update(self, run_id: int, **fields: object) -> None:
        """Change a run; a terminal status also gives up the active slot."""
        if fields.get("status") in TERMINAL_RUN:
            fields["active_slot"] = None
        async with self._sessions() as session, session.begin():
            await session.execute(update(TrainingRun).where(TrainingRun.id == run_id).values(**fields))

    async def active(self) -> list[TrainingRun]:
        async with self._sessions() as session:
            return list(await session.scalars(select(TrainingRun).where(TrainingRun.status.in_(ACTIVE_RUN))))

    async def last_watermark(self) -> int:
        """Resolved-label count when the last run that got going started (failed runs do not count)."""
        async with self._sessions() as session:
            value = await session.scalar(select(TrainingRun.label_watermark)
                                         .where(TrainingRun.status.in_(("running", "trained", "succeeded")))
                                         .order_by(TrainingRun.id.desc()).limit(1))
            return value or 0


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
