"""One scheduler among replicas: a lease row in the shared database.

Several gateway processes on one PostgreSQL serve together; the scheduled *decisions* (start a
retraining run, apply the experiment's rule, refit calibrators) must happen once, not once per
replica. Each replica's scheduler runs the `lease` job every `server.scheduler_renew_s`: the holder
extends the lease, the others take it only once it has expired (`server.scheduler_lease_s`). Both
are single conditional UPDATEs, atomic on SQLite and PostgreSQL alike, so two replicas can never
both acquire it. A decision job confirms the lease (renews it, by holder *and* fencing token) just
before acting: a leader that was paused past its expiry finds the token moved and stands down,
instead of acting on a lease it lost. A replica that stops gracefully releases the lease, so
another takes over at its next tick instead of after the expiry.

Retraining runs are additionally one-at-a-time in the database (`training_runs.active_slot`), so
even a CLI run beside the leader cannot start a second one. Replicas compare their own clocks with
the stored expiry: clock skew between hosts must stay well under the lease time (NTP).
"""

from __future__ import annotations

import os
import time
import uuid

import structlog
from sqlalchemy import or_, select, update
from sqlalchemy.ext.asyncio import async_sessionmaker

from gateway.core import metrics
from gateway.runs.models import SchedulerLease
from gateway.runs.repository import host_id
from gateway.store.base import utcnow

log = structlog.get_logger(__name__)

NAME = "scheduler"


def replica_id(port: int) -> str:
    """This process, recognisably: its host (as runs record it), port, pid and a random suffix (a
    restarted pid is new)."""
    return f"{host_id()}:{port}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class Lease:
    def __init__(self, sessions: async_sessionmaker, holder: str, lease_s: float) -> None:
        self.sessions, self.holder, self.lease_s = sessions, holder, lease_s
        self.token: int | None = None  # the fencing token while held

    @property
    def held(self) -> bool:
        return self.token is not None

    async def tick(self) -> bool:
        """Renew the lease if held, else take it if it has expired; True while this replica leads."""
        was = self.held
        try:
            now = await self._renew() if self.held else await self._acquire()
        except Exception:  # noqa: BLE001 - a database that does not answer: lead nothing until it does
            log.exception("lease.tick_failed")
            now = False
        if not now:
            self.token = None
        if now != was:
            log.info("lease.acquired" if now else "lease.lost", holder=self.holder, token=self.token)
        metrics.SCHEDULER_LEADER.set(1 if now else 0)
        return now

    async def confirm(self) -> bool:
        """Before a decision: still the holder, with the same token (renewing the lease)? A replica
        that does not hold it takes it here if it is free, so a slot that fires while the leader is
        being replaced is not skipped by everyone."""
        return await self.tick()

    async def _acquire(self) -> bool:
        now = time.time()
        async with self.sessions() as s, s.begin():
            result = await s.execute(
                update(SchedulerLease)
                .where(SchedulerLease.name == NAME,
                       or_(SchedulerLease.holder.is_(None), SchedulerLease.expires_epoch < now,
                           SchedulerLease.holder == self.holder))  # ours still: retaken after a failed tick
                .values(holder=self.holder, token=SchedulerLease.token + 1, expires_epoch=now + self.lease_s,
                        acquired_at=utcnow()))
            if result.rowcount != 1:
                return False
            self.token = (await s.execute(select(SchedulerLease.token).where(SchedulerLease.name == NAME))).scalar_one()
        return True

    async def _renew(self) -> bool:
        async with self.sessions() as s, s.begin():
            result = await s.execute(
                update(SchedulerLease)
                .where(SchedulerLease.name == NAME, SchedulerLease.holder == self.holder,
                       SchedulerLease.token == self.token)
                .values(expires_epoch=time.time() + self.lease_s))
            return result.rowcount == 1

    async def release(self) -> None:
        """On a graceful stop: another replica takes over at its next tick."""
        if not self.held:
            return
        try:
            async with self.sessions() as s, s.begin():
                await s.execute(update(SchedulerLease)
                                .where(SchedulerLease.name == NAME, SchedulerLease.holder == self.holder,
                                       SchedulerLease.token == self.token)
                                .values(holder=None, expires_epoch=0.0))
            log.info("lease.released", holder=self.holder, token=self.token)
        except Exception:  # noqa: BLE001 - it expires anyway
            log.exception("lease.release_failed")
        self.token = None
        metrics.SCHEDULER_LEADER.set(0)
