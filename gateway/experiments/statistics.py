"""The A/B decision rule and its statistics, pure (no database, no engine): the anytime-valid
e-process test (the shipped rule), the previous Bayesian rule (kept as `experiment.rule = "bayes"`,
the baseline of `bench/ab_decision.py`), per-customer arms, and the verdict.

The unit is the customer (the routing unit: the request's `user`, else its session; a request with
neither is its own unit), because one customer's signals are not independent of each other — a
chatty customer's twenty thumbs are not twenty samples.

**The anytime rule** (`rule = "anytime"`, the default). The scheduled job looks every few minutes
and stops at the first look that crosses a threshold — optional stopping. A fixed-sample test
(or a posterior probability) checked that often inflates its error rate; a test martingale does
not: by Ville's inequality a nonnegative supermartingale K with K₀ = 1 satisfies
P(sup_t K_t ≥ 1/α) ≤ α, so "act when K ≥ 1/α" keeps the false-promotion rate ≤ α however often,
and whenever, anyone looks. Construction (testing by betting, Waudby-Smith & Ramdas, "Estimating
means of bounded random variables by betting", JRSS-B 2023; Shafer, "Testing by betting", 2021):
- Two streams of 0/1 observations per arm, each one per customer (`Streams`): *audit* verdicts
  (a random sample of exchanges reviewed: 1 = approved, 0 = corrected or rejected; the customer's
  earliest audited exchange, in order of resolution) and *thumbs* (each rated customer's first rating:
  1 = up, in order of rating). One per customer because a customer's second verdict or rating is
  correlated with the first (the test needs independent units); the earliest audited *exchange*, not
  the earliest verdict, so which one counts cannot depend on how (hence how fast) it was judged —
  the challenger's higher audit rate would otherwise turn review speed into a bias.
- Blocks in arrival order: block t = the t-th challenger observation and the next `m` champion
  observations, where (m champion : 1 challenger) is the expected traffic ratio of that stream
  (4 : 1 at a 20 % share for thumbs; 1 : 1 for audits stratified to equal counts per arm; the other
  way round when the challenger gets more). D_t = x_challenger − mean(champion block) ∈ [−1, 1].
  Pairing in arrival order at the traffic ratio keeps a block's observations close in time (a drift
  in the day's traffic hits both sides of a block alike) and uses every champion observation, not
  just as many as the challenger has. The ratio is a design quantity (share, audit rates), never
  an outcome, so blocks only ever grow by appending: every look sees the same process, further on.
- Under H0⁺ "the challenger is no better" (its mean ≤ the champion's, customers independent),
  E[D_t | past] ≤ 0, so the wealth K⁺_t = Π_{i≤t} (1 + λ_i D_i) with a *predictable* bet
  λ_i ∈ [0, `max_bet`] (`max_bet` < 1, so every factor is > 0) is a test supermartingale.
  The bet is aGRAPA's (ibid., approximate growth-rate adaptive): λ_i = clip(Σ_{j<i} D_j /
  (Σ_{j<i} D_j² + `BET_PRIOR`), 0, `max_bet`) — the running estimate of the Kelly fraction
  E[D]/E[D²], shrunk towards 0 by a prior second moment while there is little data (λ₁ = 0).
  The mirror K⁻ bets on D < 0 (λ from −Σ D) and tests H0⁻ "the challenger is no worse".
- The streams combine as E = w·K_audit + (1 − w)·K_thumbs, w = `audit_weight` fixed in advance. If
  each K is a test supermartingale for the filtration of everything observed (both streams,
  interleaved as they arrive), so is their convex combination, and E⁺ ≥ 1/α promotes with
  probability ≤ α when the challenger is better on neither stream. That asks each stream's next
  block to have conditional mean ≤ 0 given *both* pasts: exact for streams about different
  customers, nearly so here (a customer's audit verdict says a little about the same customer's
  pending rating). A product K_audit·K_thumbs would compound such a correlation; the average only
  dilutes it. `bench/ab_decision.py` gives a customer's audits and thumbs the same propensity — the
  worst case — and measures the equal-challenger rate (2–3 % at α = 5 %).
  E⁺ ≥ 1/α reads "better on at least one stream"; E⁻ ≥ 1/α (retire) "worse on at least one"; if both
  cross at once, the challenger is retired (a bank keeps the champion on conflicting evidence).
- Decisions use the current values at each look (the e-values are stored in the evidence: per
  stream and combined, both directions, blocks per stream, the betting settings and 1/α). No
  minimum sample is needed: with no data E = 1, and each factor is at most 1 + `max_bet`, so a
  promotion on one stream alone needs more than log((1/α − w)/(1 − w)) / log(1 + max_bet) blocks (9
  at the defaults; 14 straight wins in fact, the first bets being small). `min_samples` applies to
  the bayes rule and the guardrail only.

**The bayes rule** (`rule = "bayes"`, the previous one): each rated customer contributes the share of
their rated exchanges that got a thumbs-up; per arm, the satisfaction rate has a Beta(1 + Σ shares,
1 + rated customers − Σ shares) posterior; p = P(challenger's rate > champion's). Once both arms
have `min_samples` rated customers, p ≥ `promote_probability` promotes, p ≤ 1 − it retires. Looked at
every 36 minutes for 14 days it promoted 10 % of equal challengers when customers rate once
(bench/ab_decision.py), not the 1 % its threshold reads as; it is kept as the baseline.

Both rules:
- Guardrail on staff flags, per customer (a customer counts once if any of their exchanges was
  flagged), checked first: once both arms have `min_samples` customers, the challenger is retired
  when P(challenger flagged more) ≥ `guardrail_probability` AND at least `guardrail_min_flags` of
  its customers were flagged AND the flag rates differ by at least `guardrail_min_difference` —
  one flag is never enough.
- Past `max_days` without a decision the challenger is retired (inconclusive: the champion stays).
- Every decision stores its evidence so it can be audited; the same inputs give the same verdict.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, fields

import numpy as np
from scipy import special, stats

from gateway.core import metrics
from gateway.core.settings import ExperimentSettings
from gateway.experiments.models import Experiment
from gateway.store.base import as_utc, utcnow

BET_PRIOR = 10.0  # aGRAPA's prior second moment Σ D² before any data: shrinks early bets (bench/ab_decision.py)
MAX_BLOCK = 50  # at most this many observations of one arm per block (extreme shares)
MAX_LOG_E = 700.0  # e-values are reported up to e^700 (JSON has no infinity)


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


# ---- the anytime-valid test (module docstring) ------------------------------------------------------
def block_sizes(champion_rate: float, challenger_rate: float) -> tuple[int, int]:
    """(champion, challenger) observations per block from the expected rates at which the two arms'
    observations arrive (design quantities: traffic share × sampling rate): 4 : 1 at a 20 % share."""
    if champion_rate <= 0 or challenger_rate <= 0:
        return (1, 1)
    ratio = champion_rate / challenger_rate
    if ratio >= 1:
        return (min(MAX_BLOCK, max(1, round(ratio))), 1)
    return (1, min(MAX_BLOCK, max(1, round(1 / ratio))))


def differences(champion: Sequence[int], challenger: Sequence[int], block: tuple[int, int] = (1, 1)) -> np.ndarray:
    """D_t = mean(challenger block t) − mean(champion block t) over the complete blocks, in arrival order."""
    m, k = max(1, int(block[0])), max(1, int(block[1]))
    n = min(len(champion) // m, len(challenger) // k)
    champ = np.asarray(champion[:n * m], dtype=float).reshape(n, m).mean(axis=1)
    chal = np.asarray(challenger[:n * k], dtype=float).reshape(n, k).mean(axis=1)
    return chal - champ


def log_wealth(d: np.ndarray, max_bet: float, prior: float = BET_PRIOR) -> tuple[np.ndarray, np.ndarray]:
    """log K⁺_t and log K⁻_t for every t along the last axis (batches allowed): the wealth of betting
    on D > 0 and on D < 0 with aGRAPA's predictable fraction, clipped to [0, max_bet]."""
    d = np.asarray(d, dtype=float)
    zero = np.zeros(d.shape[:-1] + (1,))
    s1 = np.concatenate([zero, np.cumsum(d, axis=-1)[..., :-1]], axis=-1)  # Σ_{j<t} D_j: predictable
    s2 = np.concatenate([zero, np.cumsum(d * d, axis=-1)[..., :-1]], axis=-1)
    kelly = s1 / (s2 + prior)
    up = np.cumsum(np.log1p(np.clip(kelly, 0.0, max_bet) * d), axis=-1)
    down = np.cumsum(np.log1p(-np.clip(-kelly, 0.0, max_bet) * d), axis=-1)
    return up, down


def e_value(log_k: float) -> float:
    return math.exp(min(log_k, MAX_LOG_E))


@dataclass(frozen=True)
class Streams:
    """Each arm's ordered 0/1 observations (one per customer) for the anytime rule, and the block
    sizes (champion, challenger observations per block) each stream is paired with."""

    audit_champion: Sequence[int] = ()
    audit_challenger: Sequence[int] = ()
    thumbs_champion: Sequence[int] = ()
    thumbs_challenger: Sequence[int] = ()
    audit_block: tuple[int, int] = (1, 1)
    thumbs_block: tuple[int, int] = (1, 1)

    def stream(self, name: str) -> tuple[Sequence[int], Sequence[int], tuple[int, int]]:
        return getattr(self, f"{name}_champion"), getattr(self, f"{name}_challenger"), getattr(self, f"{name}_block")


def stream_evidence(champion: Sequence[int], challenger: Sequence[int], block: tuple[int, int],
                    max_bet: float) -> dict:
    d = differences(champion, challenger, block)
    up, down = log_wealth(d, max_bet) if len(d) else (np.zeros(1), np.zeros(1))
    return {"observations": [len(champion), len(challenger)], "block": list(block), "pairs": len(d),
            "mean_champion": float(np.mean(champion)) if len(champion) else None,
            "mean_challenger": float(np.mean(challenger)) if len(challenger) else None,
            "mean_difference": float(d.mean()) if len(d) else None,
            "e_better": e_value(float(up[-1])), "e_worse": e_value(float(down[-1]))}


def anytime_evidence(cfg: ExperimentSettings, streams: Streams) -> dict:
    """The e-values per stream and combined, both directions, with everything needed to redo them."""
    per = {name: stream_evidence(*streams.stream(name), cfg.max_bet) for name in ("audit", "thumbs")}
    w = cfg.audit_weight
    combined = {direction: w * per["audit"][f"e_{direction}"] + (1 - w) * per["thumbs"][f"e_{direction}"]
                for direction in ("better", "worse")}
    return {"rule": cfg.rule, "alpha": cfg.alpha, "threshold": 1 / cfg.alpha, "audit_weight": w,
            "betting": {"method": "aGRAPA", "max_bet": cfg.max_bet, "prior_second_moment": BET_PRIOR},
            "combination": "audit_weight·E_audit + (1 − audit_weight)·E_thumbs", **per, "combined": combined}


# ---- arms -------------------------------------------------------------------------------------------
@dataclass
class Arm:
    """One arm's numbers over the experiment's exchanges (cancelled ones excluded): raw exchange
    counts for display, per-customer aggregates for the rule. `streams` (not part of `as_dict`) is
    the experiment's observation streams when the repository read them, so a caller holding only
    the arms decides exactly as the scheduled job does."""

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
    streams: Streams | None = field(default=None, repr=False, compare=False)

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
        own = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "streams"}
        return {**own, "thumbs_up_rate": self.thumbs_up_rate, "thumbs_up_interval": [up_low, up_high],
                "satisfaction_rate": self.satisfaction_rate, "satisfaction_interval": [sat_low, sat_high],
                "flag_rate": self.flag_rate, "flag_interval": [flag_low, flag_high],
                "customer_flag_rate": self.customer_flag_rate,
                "low_confidence_rate": self.low_confidence / self.exchanges if self.exchanges else None}


def aggregate(variant: str, role: str, units: list[tuple]) -> Arm:
    """An arm from per-unit rows (exchanges, rated, thumbs-up, staff-flagged exchanges, low-confidence
    exchanges, Σ confidence, Σ latency, and optionally how many exchanges were scored: an engine
    without log-probabilities leaves confidence unscored, and the mean is over scored ones)."""
    arm = Arm(variant, role)
    conf = latency = 0.0
    scored_total = 0
    for exchanges, rated, up, flagged, low, sum_conf, sum_latency, *scored in units:
        scored_total += scored[0] if scored else exchanges
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
        arm.mean_latency_ms = latency / arm.exchanges
    if scored_total:
        arm.mean_confidence = conf / scored_total
    return arm


@dataclass
class Verdict:
    action: str  # promote | retire | continue
    reason: str
    evidence: dict = field(default_factory=dict)


def decide(cfg: ExperimentSettings, champion: Arm, challenger: Arm, age_days: float,
           streams: Streams | None = None) -> Verdict:
    """The stated rule (module docstring), `cfg.rule` choosing which. Pure: the same numbers always
    give the same verdict. `streams` defaults to the one the repository attached to the arms, else
    none (every e-value 1). Both rules' evidence holds the e-values."""
    streams = streams if streams is not None else (challenger.streams or champion.streams or Streams())
    p = prob_better(champion.satisfied, champion.rated_customers - champion.satisfied,
                    challenger.satisfied, challenger.rated_customers - challenger.satisfied)
    p_flags = prob_better(champion.flagged_customers, champion.customers - champion.flagged_customers,
                          challenger.flagged_customers, challenger.customers - challenger.flagged_customers)
    anytime = anytime_evidence(cfg, streams)
    evidence = {"arms": [champion.as_dict(), challenger.as_dict()], "unit": "customer",
                "p_challenger_better": p, "p_challenger_flagged_more": p_flags, "age_days": round(age_days, 4),
                "rule": {"min_samples": cfg.min_samples, "promote_probability": cfg.promote_probability,
                         "guardrail_probability": cfg.guardrail_probability,
                         "guardrail_min_flags": cfg.guardrail_min_flags,
                         "guardrail_min_difference": cfg.guardrail_min_difference, "max_days": cfg.max_days},
                "anytime": anytime}
    n = cfg.min_samples
    if (min(champion.customers, challenger.customers) >= n and p_flags >= cfg.guardrail_probability
            and challenger.flagged_customers >= cfg.guardrail_min_flags
            and challenger.customer_flag_rate - champion.customer_flag_rate >= cfg.guardrail_min_difference):
        return Verdict("retire", f"flag guardrail: P(challenger flagged more often) = {p_flags:.3f} ≥ "
                       f"{cfg.guardrail_probability}, {challenger.flagged_customers} flagged customers "
                       f"({challenger.customer_flag_rate:.1%} vs {champion.customer_flag_rate:.1%})", evidence)
    if cfg.rule == "anytime":
        return _decide_anytime(cfg, anytime, age_days, evidence)
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


def _decide_anytime(cfg: ExperimentSettings, e: dict, age_days: float, evidence: dict) -> Verdict:
    threshold, better, worse = e["threshold"], e["combined"]["better"], e["combined"]["worse"]

    def said(direction: str) -> str:
        a, t = e["audit"], e["thumbs"]
        return (f"e-value {e['combined'][direction]:.3g} (audit {a[f'e_{direction}']:.3g} over {a['pairs']} pairs, "
                f"thumbs {t[f'e_{direction}']:.3g} over {t['pairs']} blocks; threshold 1/α = {threshold:g})")

    if worse >= threshold:
        return Verdict("retire", f"challenger worse (anytime-valid, α = {cfg.alpha:g}): {said('worse')}", evidence)
    if better >= threshold:
        return Verdict("promote", f"challenger better (anytime-valid, α = {cfg.alpha:g}): {said('better')}", evidence)
    if age_days >= cfg.max_days:
        return Verdict("retire", f"inconclusive after {age_days:.1f} days (better: {said('better')}; "
                       f"worse: e-value {worse:.3g}); the champion stays", evidence)
    return Verdict("continue", f"collecting: better {said('better')}; worse: e-value {worse:.3g}", evidence)


def age_days(exp: Experiment) -> float:
    return (utcnow() - as_utc(exp.started_at)).total_seconds() / 86400


def refresh_gauges(evidence: dict) -> None:
    for arm in evidence.get("arms", []):
        for name in ("exchanges", "rated", "thumbs_up_rate", "flag_rate", "mean_confidence", "mean_latency_ms"):
            value = arm.get(name)
            if value is not None:
                metrics.ARM.labels(arm["variant"], arm["role"], name).set(value)
    metrics.P_BETTER.set(evidence.get("p_challenger_better", 0.0))
    for direction, value in evidence.get("anytime", {}).get("combined", {}).items():
        metrics.EVALUE.labels(direction).set(value)
