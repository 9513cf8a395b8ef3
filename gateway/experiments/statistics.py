"""The A/B decision rule and its statistics, pure (no database, no engine): exact P(better) under
Beta posteriors, per-customer arms, and the verdict. `bench/ab_decision.py` simulates it.

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
from scipy import special, stats

from gateway.core import metrics
from gateway.core.settings import ExperimentSettings
from gateway.experiments.models import Experiment
from gateway.store.base import as_utc, utcnow


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


def refresh_gauges(evidence: dict) -> None:
    for arm in evidence.get("arms", []):
        for name in ("exchanges", "rated", "thumbs_up_rate", "flag_rate", "mean_confidence", "mean_latency_ms"):
            value = arm.get(name)
            if value is not None:
                metrics.ARM.labels(arm["variant"], arm["role"], name).set(value)
    metrics.P_BETTER.set(evidence.get("p_challenger_better", 0.0))
