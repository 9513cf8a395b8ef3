"""A/B experiments in the database: the running experiment, each arm's online metrics read from the
exchange log (exchanges, feedback, staff flags per routing unit: the experiments' read model), the
observation streams of the anytime rule (audit verdicts and first thumbs per customer, in arrival
order), and the serving decisions (promote, retire, rollback) recorded with their evidence.

Everything here works on the database and the adapter registry, never on the engine, so the
gateway, its scheduled job, the trainer process and the CLI share it; the gateway then makes
serving match the registry (`AdapterService.reconcile`). The rule itself is `statistics.decide`.
"""

from __future__ import annotations

import structlog
from sqlalchemy import case, func, select, update
from sqlalchemy.ext.asyncio import async_sessionmaker

from gateway.adapters.models import Adapter
from gateway.adapters.registry import AdapterRegistry, RegistryError
from gateway.core import metrics
from gateway.core.settings import Settings
from gateway.exchanges.models import UNANSWERED, Exchange
from gateway.experiments.models import Decision, Experiment
from gateway.experiments.statistics import (
    Arm,
    Streams,
    age_days,
    aggregate,
    block_sizes,
    decide,
    refresh_gauges,
)
from gateway.review.models import Feedback, Flag, ReviewItem
from gateway.store.base import as_utc, iso_utc, utcnow

log = structlog.get_logger(__name__)
BASE = "base"  # the champion's name when no adapter is champion


# ---- experiments and decisions ------------------------------------------------------------------------
class Experiments:
    """The running experiment, its arms, and every serving decision. Shared by the gateway, its
    scheduled job, the trainer process (gate results) and the CLI."""

    def __init__(self, settings: Settings, sessions: async_sessionmaker, registry: AdapterRegistry) -> None:
        self.cfg = settings.experiment
        self._sessions = sessions
        self.registry = registry

    # ---- reads -----------------------------------------------------------------------------------
    async def running(self) -> Experiment | None:
        return next(iter(await self._all_running()), None)

    async def _all_running(self) -> list[Experiment]:
        """Newest first; normally one (`sync` ends any other)."""
        async with self._sessions() as session:
            return list(await session.scalars(select(Experiment).where(Experiment.status == "running")
                                              .order_by(Experiment.id.desc())))

    async def get(self, experiment_id: int) -> Experiment | None:
        async with self._sessions() as session:
            return await session.get(Experiment, experiment_id)

    async def list(self, limit: int = 50) -> list[Experiment]:
        async with self._sessions() as session:
            return list(await session.scalars(select(Experiment).order_by(Experiment.id.desc()).limit(limit)))

    async def decisions(self, experiment_id: int | None = None, limit: int = 100,
                        include_continue: bool = True) -> list[Decision]:
        query = select(Decision).order_by(Decision.id.desc()).limit(limit)
        if experiment_id is not None:
            query = query.where(Decision.experiment_id == experiment_id)
        if not include_continue:
            query = query.where(Decision.action != "continue")
        async with self._sessions() as session:
            return list(await session.scalars(query))

    async def champion_name(self) -> str:
        champion = await self.registry.champion()
        return champion.version if champion else BASE

    async def arms(self, exp: Experiment) -> tuple[Arm, Arm]:
        """Both arms, aggregated per routing unit (an exchange without one is its own unit), with the
        experiment's `Streams` attached to both (so `decide` on the arms alone sees them)."""
        staff = select(Flag.exchange_id).distinct().subquery()
        unit = func.coalesce(Exchange.routing_unit, Exchange.id)
        query = (
            select(Exchange.variant, unit, func.count(Exchange.id), func.count(Feedback.id),
                   func.sum(case((Feedback.rating == "up", 1), else_=0)), func.count(staff.c.exchange_id),
                   func.sum(case((Exchange.flagged, 1), else_=0)), func.sum(Exchange.confidence),
                   func.sum(Exchange.latency_ms), func.count(Exchange.confidence))
            .outerjoin(Feedback, Feedback.exchange_id == Exchange.id)
            .outerjoin(staff, staff.c.exchange_id == Exchange.id)
            .where(Exchange.experiment_id == exp.id, Exchange.finish_reason.not_in(UNANSWERED))
            .group_by(Exchange.variant, unit))
        units: dict[str, list[tuple]] = {}
        async with self._sessions() as session:
            for r in await session.execute(query):
                units.setdefault(r[0], []).append((int(r[2]), int(r[3]), int(r[4] or 0), int(r[5]), int(r[6] or 0),
                                                   r[7], r[8], int(r[9])))
        champion = aggregate(exp.champion, "champion", units.get(exp.champion, []))
        challenger = aggregate(exp.challenger, "challenger", units.get(exp.challenger, []))
        champion.streams = challenger.streams = await self.streams(exp)
        return champion, challenger

    async def streams(self, exp: Experiment) -> Streams:
        """The anytime rule's observations per arm, one per customer (routing unit; an exchange without
        one is its own unit), cancelled / failed / unfinished exchanges excluded as in `arms`:
        - audit: review items drawn by the random audit sample (`audit`), resolved; 1 if the resolution
          is `approve`, else 0 (corrected, rejected). Per customer, the item of their *earliest* audited
          exchange (by the exchange's time, not the verdict's: which of a customer's audits counts must
          not depend on how fast, hence how, it was resolved); it counts once resolved. Ordered by
          `resolved_at`, then item id.
        - thumbs: each customer's first rating (feedback `created_at`, then id); 1 if `up`; in that order.
        Block sizes come from the design: the experiment's share and the audit rate each arm's items were
        drawn with (the earliest audit item per arm), never from outcomes."""
        unit = func.coalesce(Exchange.routing_unit, Exchange.id)
        arms = (exp.champion, exp.challenger)
        answered = (Exchange.experiment_id == exp.id, Exchange.variant.in_(arms),
                    Exchange.finish_reason.not_in(UNANSWERED))
        audit_query = (
            select(Exchange.variant, unit, ReviewItem.status, ReviewItem.resolution, ReviewItem.resolved_at,
                   ReviewItem.id, ReviewItem.audit_rate)
            .join(Exchange, Exchange.id == ReviewItem.exchange_id)
            .where(ReviewItem.audit.is_(True), *answered)
            .order_by(Exchange.created_at, Exchange.id))
        thumbs_query = (
            select(Exchange.variant, unit, Feedback.rating)
            .join(Exchange, Exchange.id == Feedback.exchange_id)
            .where(*answered)
            .order_by(Feedback.created_at, Feedback.id))
        async with self._sessions() as session:
            audit_rows = list(await session.execute(audit_query))
            thumbs_rows = list(await session.execute(thumbs_query))
        seen: set[tuple] = set()
        rates: dict[str, float] = {}
        verdicts = []  # (resolved_at, item id, variant, value) of each customer's earliest audited exchange
        for variant, who, status, resolution, resolved_at, item_id, rate in audit_rows:
            rates.setdefault(variant, rate if rate is not None else 1.0)
            if (variant, who) in seen:
                continue
            seen.add((variant, who))
            if status == "resolved" and resolved_at is not None:
                verdicts.append((as_utc(resolved_at), item_id, variant, int(resolution == "approve")))
        verdicts.sort(key=lambda v: (v[0], v[1]))
        audit = {v: [value for _, _, variant, value in verdicts if variant == v] for v in arms}
        firsts: set[tuple] = set()
        thumbs: dict[str, list[int]] = {v: [] for v in arms}
        for variant, who, rating in thumbs_rows:
            if (variant, who) not in firsts:
                firsts.add((variant, who))
                thumbs[variant].append(int(rating == "up"))
        share = exp.share
        return Streams(audit_champion=audit[exp.champion], audit_challenger=audit[exp.challenger],
                       thumbs_champion=thumbs[exp.champion], thumbs_challenger=thumbs[exp.challenger],
                       audit_block=block_sizes((1 - share) * rates.get(exp.champion, 1.0),
                                               share * rates.get(exp.challenger, 1.0)),
                       thumbs_block=block_sizes(1 - share, share))

    async def timeline(self, exp: Experiment, points: int = 20) -> list[dict]:
        """Cumulative thumbs-up rate per arm at `points` evenly spaced moments of the experiment."""
        async with self._sessions() as session:
            rows = list(await session.execute(
                select(Exchange.created_at, Exchange.variant, Feedback.rating)
                .join(Feedback, Feedback.exchange_id == Exchange.id)
                .where(Exchange.experiment_id == exp.id).order_by(Exchange.created_at)))
        start = as_utc(exp.started_at).timestamp()
        span = max(as_utc(exp.ended_at or utcnow()).timestamp() - start, 1e-6)
        counts = {exp.champion: [0, 0], exp.challenger: [0, 0]}  # variant → [thumbs-up, rated]

        def rate(variant: str) -> float | None:
            up, rated = counts[variant]
            return up / rated if rated else None

        out, index = [], 0
        for k in range(1, points + 1):
            moment = start + span * k / points
            while index < len(rows) and as_utc(rows[index][0]).timestamp() <= moment:
                tally = counts.get(rows[index][1])
                if tally is not None:
                    tally[0] += rows[index][2] == "up"
                    tally[1] += 1
                index += 1
            out.append({"fraction": k / points, "champion": rate(exp.champion), "challenger": rate(exp.challenger),
                        "champion_rated": counts[exp.champion][1], "challenger_rated": counts[exp.challenger][1]})
        return out

    # ---- writes ----------------------------------------------------------------------------------
    async def _record(self, action: str, version: str | None, before: str, after: str, actor: str,
                      automatic: bool, reason: str, evidence: dict | None = None,
                      experiment_id: int | None = None) -> Decision:
        row = Decision(experiment_id=experiment_id, action=action, version=version, champion_before=before,
                       champion_after=after, actor=actor[:100], automatic=automatic, reason=reason,
                       evidence=evidence or {}, created_at=utcnow())
        async with self._sessions() as session, session.begin():
            session.add(row)
        if action != "continue":
            metrics.DECISIONS.labels(action, str(automatic).lower()).inc()
            log.info("experiment.decision", action=action, version=version, champion=after, actor=actor,
                     automatic=automatic, reason=reason)
        return row

    async def _end(self, exp: Experiment | None, status: str, reason: str) -> None:
        if exp is None:
            return
        async with self._sessions() as session, session.begin():
            await session.execute(update(Experiment).where(Experiment.id == exp.id, Experiment.status == "running")
                                  .values(status=status, reason=reason, ended_at=utcnow()))
        log.info("experiment.ended", experiment_id=exp.id, status=status, reason=reason)

    async def sync(self) -> Experiment | None:
        """Make the running experiment match the registry: champion (or base) vs the challenger.
        A change of either arm ends the old experiment and starts a fresh one (fresh counts)."""
        adapters = await self.registry.list()
        challengers = sorted((a for a in adapters if a.state == "challenger"), key=lambda a: a.version)
        for older in challengers[:-1]:  # one challenger at a time: the newest
            await self.registry.transition(older.version, "retired", reason=f"superseded by {challengers[-1].version}")
        challenger = challengers[-1] if challengers else None
        champion = next((a.version for a in adapters if a.state == "champion"), BASE)
        running = await self._all_running()
        for stale in running[1:]:  # e.g. started by another process at the same moment: the newest stays
            await self._end(stale, "ended", "superseded by a newer experiment")
        exp = running[0] if running else None
        if challenger is None or not self.cfg.enabled:
            await self._end(exp, "ended", "no challenger is serving" if challenger is None else "experiments disabled")
            return None
        if exp is not None and (exp.champion, exp.challenger) == (champion, challenger.version):
            return exp
        await self._end(exp, "ended", f"superseded: {challenger.version} vs {champion} now")
        row = Experiment(champion=champion, challenger=challenger.version, share=self.cfg.challenger_share,
                         status="running", started_at=utcnow())
        async with self._sessions() as session, session.begin():
            session.add(row)
        log.info("experiment.started", experiment_id=row.id, champion=champion, challenger=challenger.version,
                 share=row.share)
        return row

    async def promote(self, version: str, actor: str, automatic: bool = False, reason: str | None = None,
                      evidence: dict | None = None) -> Adapter:
        """Make `version` the champion (the old one is retired, kept for rollback)."""
        await self.registry.verify(version)  # never promote files that changed since training
        before = await self.champion_name()
        exp = await self.running()
        reason = reason or f"promoted by {actor}"
        adapter = await self.registry.transition(version, "champion", reason=reason)
        ended_here = exp is not None and exp.challenger == version
        await self._end(exp, "promoted" if ended_here else "ended",
                        reason if ended_here else f"{version} was promoted outside the experiment")
        await self._record("promote", version, before, version, actor, automatic, reason, evidence,
                           exp.id if exp else None)
        return adapter

    async def retire(self, version: str, actor: str, automatic: bool = False, reason: str | None = None,
                     evidence: dict | None = None) -> Adapter:
        """Stop serving a challenger (or candidate); the champion is untouched."""
        adapter = await self.registry.get(version)
        if adapter is None:
            raise RegistryError(f"no adapter version '{version}'")
        if adapter.state == "champion":
            raise RegistryError(f"{version} is the champion; roll back or promote another version instead")
        before = await self.champion_name()
        exp = await self.running()
        reason = reason or f"retired by {actor}"
        adapter = await self.registry.transition(version, "retired", reason=reason)
        ended_here = exp is not None and exp.challenger == version
        if ended_here:
            await self._end(exp, "retired", reason)
        await self._record("retire", version, before, before, actor, automatic, reason, evidence,
                           exp.id if ended_here else None)
        return adapter

    async def rollback(self, actor: str) -> str:
        """The champion goes back to the one it replaced (or the base model); returns that name.
        Repeated rollbacks walk further back along the promotions."""
        current = await self.registry.champion()
        if current is None:
            raise RegistryError("no adapter is champion (the base model serves): nothing to roll back")
        async with self._sessions() as session:
            previous = await session.scalar(
                select(Decision.champion_before).where(Decision.action == "promote",
                                                       Decision.champion_after == current.version)
                .order_by(Decision.id.desc()).limit(1)) or BASE
        reason = f"rolled back by {actor}"
        if previous != BASE:
            await self.registry.verify(previous)
            await self.registry.transition(previous, "champion", reason=f"restored by a rollback ({actor})")
            await self.registry.update(current.version, reason=reason)
        else:
            await self.registry.transition(current.version, "retired", reason=f"{reason}: the base model serves")
        await self._end(await self.running(), "ended", f"the champion was rolled back to {previous}")
        await self._record("rollback", current.version, current.version, previous, actor, False, reason)
        return previous

    async def evaluate(self, actor: str = "scheduler") -> dict:
        """Apply the decision rule to the running experiment and act on it."""
        exp = await self.sync()
        if exp is None:
            return {"experiment_id": None, "action": "none", "reason": "no experiment is running"}
        champion, challenger = await self.arms(exp)
        verdict = decide(self.cfg, champion, challenger, age_days(exp), champion.streams)
        refresh_gauges(verdict.evidence)
        if verdict.action == "promote":
            await self.promote(exp.challenger, actor, True, verdict.reason, verdict.evidence)
        elif verdict.action == "retire":
            await self.retire(exp.challenger, actor, True, verdict.reason, verdict.evidence)
        elif await self._changed_since_last(exp.id, verdict.evidence):
            before = await self.champion_name()
            await self._record("continue", exp.challenger, before, before, actor, True, verdict.reason,
                               verdict.evidence, exp.id)
        return {"experiment_id": exp.id, "action": verdict.action, "reason": verdict.reason,
                "evidence": verdict.evidence}

    async def _changed_since_last(self, experiment_id: int, evidence: dict) -> bool:
        last = await self.decisions(experiment_id, limit=1)
        if not last:
            return True
        counts = lambda e: ([(a["exchanges"], a["rated"], a["staff_flagged"]) for a in e.get("arms", [])],  # noqa: E731
                            [e.get("anytime", {}).get(s, {}).get("observations") for s in ("audit", "thumbs")])
        return counts(last[0].evidence) != counts(evidence)


def experiment_dict(exp: Experiment) -> dict:
    return {"id": exp.id, "champion": exp.champion, "challenger": exp.challenger, "challenger_share": exp.share,
            "status": exp.status, "reason": exp.reason, "started_at": iso_utc(exp.started_at),
            "ended_at": iso_utc(exp.ended_at)}


def decision_dict(d: Decision) -> dict:
    return {"id": d.id, "experiment_id": d.experiment_id, "action": d.action, "version": d.version,
            "champion_before": d.champion_before, "champion_after": d.champion_after, "actor": d.actor,
            "automatic": d.automatic, "reason": d.reason, "evidence": d.evidence, "at": iso_utc(d.created_at)}
