"""A/B experiments: each arm's online metrics from the exchange log, the decision rule, and the
serving decisions (promote, retire, rollback) recorded with their evidence.

Everything here works on the database and the adapter registry, never on the engine, so the
gateway, its scheduled job and the CLI share it; the gateway then makes serving match the
registry (`AdapterService.reconcile`).

The rule (`decide`), with `experiment.*` settings. The unit is the customer (the routing unit:
the request's `user`, else its session; a request with neither is its own unit), because one
customer's ratings are not independent of each other — counting a chatty customer's twenty
thumbs as twenty samples overstates the evidence:
- Each rated customer contributes the share of their rated exchanges that got a thumbs-up; per
  arm, the satisfaction rate has a Beta(1 + Σ shares, 1 + rated customers − Σ shares) posterior
  (uniform prior). p = P(challenger's rate > champion's) (exact for whole counts, else by
  quantile integration).
- Guardrail on staff flags, per customer (a customer counts once if any of their exchanges was
  flagged): once both arms have `min_samples` customers, the challenger is retired when
  P(challenger flagged more) ≥ `guardrail_probability` AND at least `guardrail_min_flags` of its
  customers were flagged AND the flag rates differ by at least `guardrail_min_difference` — one
  flag is never enough (bench/ab_decision.py simulates it).
- Until both arms have `min_samples` rated customers: keep collecting.
- Then p ≥ `promote_probability` promotes the challenger (the champion is retired, kept for
  rollback); p ≤ 1 − `promote_probability` retires the challenger; otherwise keep collecting.
- Past `max_days` without a decision the challenger is retired (inconclusive: the champion stays).
Looking repeatedly at a running test inflates error rates; the minimum sample and a high threshold
keep that in check, and every decision stores its evidence so it can be audited.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import structlog
from scipy import special, stats
from sqlalchemy import case, func, select, update
from sqlalchemy.ext.asyncio import async_sessionmaker

from gateway import metrics
from gateway.settings import ExperimentSettings, Settings
from gateway.store.models import (Adapter, Decision, Exchange, Experiment, Feedback, Flag, as_utc, iso_utc,
                                  utcnow)
from retraining.registry import AdapterRegistry, RegistryError

log = structlog.get_logger(__name__)
BASE = "base"  # the champion's name when no adapter is champion


# ---- statistics ------------------------------------------------------------------------------------
def prob_better(a_yes: float, a_no: float, b_yes: float, b_no: float) -> float:
    """P(θ_b > θ_a) for independent Beta(1 + yes, 1 + no) posteriors. Whole counts: exactly (a
    finite sum over b's successes; see Evan Miller, "Formulas for Bayesian A/B testing").
    Fractional counts (per-customer shares): E[F_a(θ_b)] by midpoint integration over b's quantiles."""
    alpha_a, beta_a, alpha_b, beta_b = a_yes + 1, a_no + 1, b_yes + 1, b_no + 1
    if float(alpha_b).is_integer():
        i = np.arange(int(alpha_b), dtype=float)
        terms = (special.betaln(alpha_a + i, beta_a + beta_b) - np.log(beta_b + i)
                 - special.betaln(1 + i, beta_b) - special.betaln(alpha_a, beta_a))
        return float(min(1.0, max(0.0, np.exp(special.logsumexp(terms)))))
    u = (np.arange(4000) + 0.5) / 4000
    return float(np.mean(stats.beta.cdf(stats.beta.ppf(u, alpha_b, beta_b), alpha_a, beta_a)))


def interval(yes: int, no: int, level: float = 0.95) -> tuple[float, float]:
    """Equal-tailed credible interval of a Beta(1 + yes, 1 + no) posterior."""
    low, high = stats.beta.ppf([(1 - level) / 2, (1 + level) / 2], yes + 1, no + 1)
    return float(low), float(high)


@dataclass
class Arm:
    """One arm's numbers over the experiment's exchanges (cancelled ones excluded): raw exchange
    counts for display, per-customer aggregates for the rule."""

    variant: str
    role: str  # champion | challenger
    exchanges: int = 0
    rated: int = 0
    thumbs_up: int = 0
    staff_flagged: int = 0  # exchanges with at least one staff flag
    low_confidence: int = 0  # exchanges flagged for review by their confidence score
    mean_confidence: float | None = None
    mean_latency_ms: float | None = None
    customers: int = 0  # routing units that reached this arm
    rated_customers: int = 0  # ...of them with at least one rating
    satisfied: float = 0.0  # Σ over rated customers of their thumbs-up share
    flagged_customers: int = 0  # customers with at least one staff-flagged exchange

    @classmethod
    def of_ratings(cls, variant: str, role: str, rated: int, thumbs_up: int, exchanges: int | None = None,
                   staff_flagged: int = 0) -> "Arm":
        """An arm where every exchange is a different customer (one rating each)."""
        n = rated if exchanges is None else exchanges
        return cls(variant, role, n, rated, thumbs_up, staff_flagged, customers=n, rated_customers=rated,
                   satisfied=float(thumbs_up), flagged_customers=staff_flagged)

    @property
    def thumbs_up_rate(self) -> float | None:
        return self.thumbs_up / self.rated if self.rated else None

    @property
    def satisfaction_rate(self) -> float | None:
        return self.satisfied / self.rated_customers if self.rated_customers else None

    @property
    def flag_rate(self) -> float | None:
        return self.staff_flagged / self.exchanges if self.exchanges else None

    @property
    def customer_flag_rate(self) -> float | None:
        return self.flagged_customers / self.customers if self.customers else None

    def as_dict(self) -> dict:
        up_low, up_high = interval(self.thumbs_up, self.rated - self.thumbs_up)
        flag_low, flag_high = interval(self.staff_flagged, self.exchanges - self.staff_flagged)
        sat_low, sat_high = interval(self.satisfied, self.rated_customers - self.satisfied)
        return {**asdict(self), "thumbs_up_rate": self.thumbs_up_rate, "thumbs_up_interval": [up_low, up_high],
                "satisfaction_rate": self.satisfaction_rate, "satisfaction_interval": [sat_low, sat_high],
                "flag_rate": self.flag_rate, "flag_interval": [flag_low, flag_high],
                "customer_flag_rate": self.customer_flag_rate,
                "low_confidence_rate": self.low_confidence / self.exchanges if self.exchanges else None}


def aggregate(variant: str, role: str, units: list[tuple]) -> Arm:
    """An arm from per-unit rows (exchanges, rated, thumbs-up, staff-flagged exchanges, low-confidence
    exchanges, Σ confidence, Σ latency)."""
    arm = Arm(variant, role)
    conf = latency = 0.0
    for exchanges, rated, up, flagged, low, sum_conf, sum_latency in units:
        arm.exchanges += exchanges
        arm.rated += rated
        arm.thumbs_up += up
        arm.staff_flagged += flagged
        arm.low_confidence += low
        conf += sum_conf or 0.0
        latency += sum_latency or 0.0
        arm.customers += 1
        if rated:
            arm.rated_customers += 1
            arm.satisfied += up / rated
        arm.flagged_customers += flagged > 0
    if arm.exchanges:
        arm.mean_confidence, arm.mean_latency_ms = conf / arm.exchanges, latency / arm.exchanges
    return arm


@dataclass
class Verdict:
    action: str  # promote | retire | continue
    reason: str
    evidence: dict = field(default_factory=dict)


def decide(cfg: ExperimentSettings, champion: Arm, challenger: Arm, age_days: float) -> Verdict:
    """The stated rule (module docstring). Pure: the same numbers always give the same verdict."""
    p = prob_better(champion.satisfied, champion.rated_customers - champion.satisfied,
                    challenger.satisfied, challenger.rated_customers - challenger.satisfied)
    p_flags = prob_better(champion.flagged_customers, champion.customers - champion.flagged_customers,
                          challenger.flagged_customers, challenger.customers - challenger.flagged_customers)
    evidence = {"arms": [champion.as_dict(), challenger.as_dict()], "unit": "customer",
                "p_challenger_better": p, "p_challenger_flagged_more": p_flags, "age_days": round(age_days, 4),
                "rule": {"min_samples": cfg.min_samples, "promote_probability": cfg.promote_probability,
                         "guardrail_probability": cfg.guardrail_probability,
                         "guardrail_min_flags": cfg.guardrail_min_flags,
                         "guardrail_min_difference": cfg.guardrail_min_difference, "max_days": cfg.max_days}}
    n = cfg.min_samples
    if (min(champion.customers, challenger.customers) >= n and p_flags >= cfg.guardrail_probability
            and challenger.flagged_customers >= cfg.guardrail_min_flags
            and challenger.customer_flag_rate - champion.customer_flag_rate >= cfg.guardrail_min_difference):
        return Verdict("retire", f"flag guardrail: P(challenger flagged more often) = {p_flags:.3f} ≥ "
                       f"{cfg.guardrail_probability}, {challenger.flagged_customers} flagged customers "
                       f"({challenger.customer_flag_rate:.1%} vs {champion.customer_flag_rate:.1%})", evidence)
    rates = (f"satisfied customers {challenger.satisfied:g}/{challenger.rated_customers} vs "
             f"{champion.satisfied:g}/{champion.rated_customers} (thumbs-up {challenger.thumbs_up}/{challenger.rated} "
             f"vs {champion.thumbs_up}/{champion.rated}), P(challenger better) = {p:.3f}")
    smaller = min(champion.rated_customers, challenger.rated_customers)
    if smaller >= n:
        if p >= cfg.promote_probability:
            return Verdict("promote", f"challenger better: {rates} ≥ {cfg.promote_probability}", evidence)
        if p <= 1 - cfg.promote_probability:
            return Verdict("retire", f"challenger worse: {rates} ≤ {1 - cfg.promote_probability:.3f}", evidence)
    if age_days >= cfg.max_days:
        return Verdict("retire", f"inconclusive after {age_days:.1f} days ({rates}); the champion stays", evidence)
    if smaller < n:
        return Verdict("continue", f"collecting: {smaller}/{n} rated customers in the smaller arm ({rates})", evidence)
    return Verdict("continue", f"undecided: {rates}", evidence)


def age_days(exp: Experiment) -> float:
    return (utcnow() - as_utc(exp.started_at)).total_seconds() / 86400


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
        """Both arms, aggregated per routing unit (an exchange without one is its own unit)."""
        staff = select(Flag.exchange_id).distinct().subquery()
        unit = func.coalesce(Exchange.routing_unit, Exchange.id)
        query = (
            select(Exchange.variant, unit, func.count(Exchange.id), func.count(Feedback.id),
                   func.sum(case((Feedback.rating == "up", 1), else_=0)), func.count(staff.c.exchange_id),
                   func.sum(case((Exchange.flagged, 1), else_=0)), func.sum(Exchange.confidence),
                   func.sum(Exchange.latency_ms))
            .outerjoin(Feedback, Feedback.exchange_id == Exchange.id)
            .outerjoin(staff, staff.c.exchange_id == Exchange.id)
            .where(Exchange.experiment_id == exp.id, Exchange.finish_reason != "cancelled")
            .group_by(Exchange.variant, unit))
        units: dict[str, list[tuple]] = {}
        async with self._sessions() as session:
            for r in await session.execute(query):
                units.setdefault(r[0], []).append((int(r[2]), int(r[3]), int(r[4] or 0), int(r[5]), int(r[6] or 0),
                                                   r[7], r[8]))
        return (aggregate(exp.champion, "champion", units.get(exp.champion, [])),
                aggregate(exp.challenger, "challenger", units.get(exp.challenger, [])))

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
        verdict = decide(self.cfg, champion, challenger, age_days(exp))
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
        counts = lambda e: [(a["exchanges"], a["rated"], a["staff_flagged"]) for a in e.get("arms", [])]  # noqa: E731
        return counts(last[0].evidence) != counts(evidence)


def refresh_gauges(evidence: dict) -> None:
    for arm in evidence.get("arms", []):
        for name in ("exchanges", "rated", "thumbs_up_rate", "flag_rate", "mean_confidence", "mean_latency_ms"):
            value = arm.get(name)
            if value is not None:
                metrics.ARM.labels(arm["variant"], arm["role"], name).set(value)
    metrics.P_BETTER.set(evidence.get("p_challenger_better", 0.0))


def experiment_dict(exp: Experiment) -> dict:
    return {"id": exp.id, "champion": exp.champion, "challenger": exp.challenger, "challenger_share": exp.share,
            "status": exp.status, "reason": exp.reason, "started_at": iso_utc(exp.started_at),
            "ended_at": iso_utc(exp.ended_at)}


def decision_dict(d: Decision) -> dict:
    return {"id": d.id, "experiment_id": d.experiment_id, "action": d.action, "version": d.version,
            "champion_before": d.champion_before, "champion_after": d.champion_after, "actor": d.actor,
            "automatic": d.automatic, "reason": d.reason, "evidence": d.evidence, "at": iso_utc(d.created_at)}
