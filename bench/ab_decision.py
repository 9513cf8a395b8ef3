"""How the A/B decision rules behave under continuous monitoring: error rates and time to a decision.

Synthetic customers arrive one by one (`--per-day` a day, for `--days`: the horizon) and are routed
to the challenger with `experiment.challenger_share`. Customers differ: each has their own propensity,
drawn from Beta around their arm's true rate (concentration `--kappa`), and has 1 + Geometric
exchanges (mean `--mean-ratings`), every one rated (the existing customer model; `--rated-share` < 1
lets only that share of customers rate). Two tables: 3 exchanges per customer on average (the existing
model) and exactly 1, where the bayes rule's Beta posterior is exactly the right model (with several
ratings per customer it overstates the noise of a customer's satisfaction share, which hides some of
the peeking). Staff flag every exchange with the same small probability
in both arms (`--flag-rate`) except in the guardrail row, so any other guardrail retirement is a
false alarm. Audits: each exchange is drawn for review with probability `--audit-share` on the
champion and `--audit-share` × champion share / challenger share (capped at 1) on the challenger, so
both arms get as many audits in expectation; a verdict is "approved" with the customer's own
propensity, so a customer's audits and thumbs are correlated (the worst case for combining them).
(The gateway's sampler, `ChatService.audit_rate`, audits `review.audit_share` of all answers, half per
arm: at a 20 % share that is `--audit-share 0.03125` here.)
As in the repository, the anytime rule takes one audit (the earliest) and one rating (the first)
per customer; verdicts are taken as arriving with their customer (no review lag).

The real `gateway.experiments.statistics.decide` is applied every `--every` customers (the scheduled
job's looks, here ~35 min apart at 2,000 customers a day) until it promotes or retires, or the horizon
runs out, for two rules on the same simulated customers in the same run:
  * bayes (the previous rule, the baseline): thumbs only, Beta posteriors per customer, the shipped
    `min_samples` and `promote_probability`;
  * anytime (the shipped rule): e-processes on audit verdicts and first thumbs, combined, ≥ 1/α.
Both keep the same staff-flag guardrail. The rules' statistics are screened vectorised over all looks
(exact e-values from the same functions; a normal approximation of P(better) with a margin), and
`decide()` itself makes every decision at the screened looks. `max_days` is left out (age 0): a run
still undecided at the horizon is counted as undecided (the shipped job would retire it as
inconclusive). Rows: P(promote), P(retire) (of which by the guardrail), P(undecided), median days to
a decision.

`--sweep` instead tabulates the anytime rule over a grid of max_bet × audit_weight × BET_PRIOR (A/A and
+5 points, vectorised e-values only; every customer rating, and one in ten) →
bench/results/ab_decision_sweep.md: how the defaults were chosen.

Usage: python bench/ab_decision.py [--reps 500] [--days 14] [--per-day 2000] [--sweep]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from scipy import special

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway.core.settings import ExperimentSettings, load_settings  # noqa: E402
from gateway.experiments import statistics  # noqa: E402
from gateway.experiments.statistics import (  # noqa: E402
    Arm,
    Streams,
    block_sizes,
    decide,
    differences,
    log_wealth,
)

# (name, true rate champion, challenger, challenger's flag rate as a multiple of the champion's)
SCENARIOS = [("A/A (no difference)", 0.70, 0.70, 1), ("challenger +5 pts", 0.70, 0.75, 1),
             ("challenger +10 pts", 0.70, 0.80, 1), ("challenger −5 pts", 0.70, 0.65, 1),
             ("challenger −10 pts", 0.70, 0.60, 1), ("equal quality, challenger flagged 5× as often", 0.70, 0.70, 5)]


def customers(n: int, share: float, p_a: float, p_b: float, args, flag_multiple: float,
              rng: np.random.Generator) -> dict:
    on_b = rng.random(n) < share
    p = np.where(on_b, p_b, p_a)
    propensity = rng.beta(args.kappa * p, args.kappa * (1 - p))
    k = rng.geometric(1 / args.mean_ratings, n) if args.mean_ratings > 1 else np.ones(n, dtype=int)
    rated = rng.random(n) < args.rated_share if args.rated_share < 1 else np.ones(n, dtype=bool)
    ups = np.where(rated, rng.binomial(k, propensity), 0)
    first = rng.random(n) * k < ups  # the first rating: up with probability ups / k (ratings exchangeable)
    flags = rng.binomial(k, np.where(on_b, args.flag_rate * flag_multiple, args.flag_rate))
    audit_rate = np.where(on_b, min(1.0, args.audit_share * (1 - share) / share), args.audit_share)
    audited = rng.binomial(k, audit_rate) > 0
    verdict = rng.random(n) < propensity  # the customer's earliest audited exchange: approved?
    return {"b": on_b, "k": k, "rated": rated, "ups": ups, "first": first, "flags": flags, "audited": audited,
            "verdict": verdict, "audit_rate": (args.audit_share, float(audit_rate[on_b][0]) if on_b.any() else 1.0)}


class Run:
    """One simulated experiment: everything the rules need at any look (a number of customers)."""

    def __init__(self, c: dict, share: float, looks: np.ndarray) -> None:
        self.c, self.looks = c, looks
        b, k, rated = c["b"], c["k"], c["rated"]
        self.cum = {}
        for role, mask in (("champion", ~b), ("challenger", b)):
            m = mask.astype(float)
            self.cum[role] = {name: np.concatenate([[0.0], np.cumsum(v * m)]) for name, v in {
                "customers": np.ones_like(m), "rated_customers": rated.astype(float), "exchanges": k.astype(float),
                "rated": (k * rated).astype(float), "thumbs_up": c["ups"].astype(float),
                "satisfied": np.where(rated, c["ups"] / k, 0.0), "staff_flagged": c["flags"].astype(float),
                "flagged_customers": (c["flags"] > 0).astype(float)}.items()}
        rate_a, rate_b = c["audit_rate"]
        self.blocks = {"thumbs": block_sizes(1 - share, share),
                       "audit": block_sizes((1 - share) * rate_a, share * rate_b)}
        self.obs, self.done = {}, {}
        for name, select, value in (("thumbs", rated, c["first"]), ("audit", c["audited"], c["verdict"])):
            pos_a, pos_b = np.flatnonzero(select & ~b), np.flatnonzero(select & b)
            self.obs[name] = (value[pos_a].astype(int), value[pos_b].astype(int), pos_a, pos_b)
            m, q = self.blocks[name]
            n = min(len(pos_a) // m, len(pos_b) // q)
            # block t is complete once its last champion and last challenger observation arrived
            ends = np.maximum(pos_a[m - 1:n * m:m], pos_b[q - 1:n * q:q]) + 1 if n else np.zeros(0, int)
            self.done[name] = np.searchsorted(ends, looks, side="right")  # complete blocks at each look

    def counts(self, role: str, name: str) -> np.ndarray:
        return self.cum[role][name][self.looks]

    def arms(self, n: int) -> tuple[Arm, Arm]:
        out = []
        for role in ("champion", "challenger"):
            v = {name: self.cum[role][name][n] for name in self.cum[role]}
            out.append(Arm(role, role, int(v["exchanges"]), int(v["rated"]), int(v["thumbs_up"]), int(v["staff_flagged"]),
                           customers=int(v["customers"]), rated_customers=int(v["rated_customers"]),
                           satisfied=float(v["satisfied"]), flagged_customers=int(v["flagged_customers"])))
        return out[0], out[1]

    def streams(self, n: int) -> Streams:
        lists = {}
        for name in ("thumbs", "audit"):
            va, vb, pa, pb = self.obs[name]
            lists[f"{name}_champion"] = va[:np.searchsorted(pa, n)].tolist()
            lists[f"{name}_challenger"] = vb[:np.searchsorted(pb, n)].tolist()
        return Streams(**lists, audit_block=self.blocks["audit"], thumbs_block=self.blocks["thumbs"])

    def log_e(self, name: str, max_bet: float, prior: float = statistics.BET_PRIOR) -> tuple[np.ndarray, np.ndarray]:
        """log e-values (better, worse) of one stream at every look."""
        va, vb, _, _ = self.obs[name]
        d = differences(va, vb, self.blocks[name])
        if not len(d):
            return np.zeros(len(self.looks)), np.zeros(len(self.looks))
        up, down = log_wealth(d, max_bet, prior)
        up, down = np.concatenate([[0.0], up]), np.concatenate([[0.0], down])
        return up[self.done[name]], down[self.done[name]]

    def combined(self, cfg: ExperimentSettings, prior: float = statistics.BET_PRIOR) -> tuple[np.ndarray, np.ndarray]:
        (au, ad), (tu, td) = self.log_e("audit", cfg.max_bet, prior), self.log_e("thumbs", cfg.max_bet, prior)
        w = cfg.audit_weight
        return w * np.exp(au) + (1 - w) * np.exp(tu), w * np.exp(ad) + (1 - w) * np.exp(td)

    def guardrail_candidates(self, cfg: ExperimentSettings) -> np.ndarray:
        """Looks where the guardrail's deterministic conditions hold (its probability `decide` checks)."""
        ca, cb = self.counts("champion", "customers"), self.counts("challenger", "customers")
        fa, fb = self.counts("champion", "flagged_customers"), self.counts("challenger", "flagged_customers")
        with np.errstate(divide="ignore", invalid="ignore"):
            diff = np.where(cb > 0, fb / cb, 0) - np.where(ca > 0, fa / ca, 0)
        return ((np.minimum(ca, cb) >= cfg.min_samples) & (fb >= cfg.guardrail_min_flags)
                & (diff >= cfg.guardrail_min_difference))

    def bayes_candidates(self, cfg: ExperimentSettings) -> np.ndarray:
        """Looks where P(better) is within 0.01 of a threshold by the normal approximation of the Beta posteriors."""
        moments = []
        for role in ("champion", "challenger"):
            s, n = self.counts(role, "satisfied"), self.counts(role, "rated_customers")
            a, b = 1 + s, 1 + n - s
            moments.append((a / (a + b), a * b / ((a + b) ** 2 * (a + b + 1)), n))
        (ma, va, na), (mb, vb, nb) = moments
        p = special.ndtr((mb - ma) / np.sqrt(va + vb))
        margin = cfg.promote_probability - 0.01  # the approximation is within 0.005 of prob_better there
        return (np.minimum(na, nb) >= cfg.min_samples) & ((p >= margin) | (p <= 1 - margin))


def decide_run(run: Run, cfg: ExperimentSettings, candidates: np.ndarray, check: np.ndarray | None = None) -> dict:
    """`decide()` at each screened look in order until it acts. `check`: looks where the vectorised
    e-values cross, so `decide()` must act there (a guard that the screen and the rule agree)."""
    for i in np.flatnonzero(candidates):
        n = int(run.looks[i])
        verdict = decide(cfg, *run.arms(n), age_days=0.0, streams=run.streams(n) if cfg.rule == "anytime" else Streams())
        if verdict.action in ("promote", "retire"):
            return {"action": verdict.action, "guardrail": "guardrail" in verdict.reason, "customers": n}
        if check is not None and check[i]:
            raise AssertionError(f"the screen says an e-value crossed at {n} customers, decide() says {verdict.reason}")
    return {"action": "none", "guardrail": False, "customers": None}


def summarise(outcomes: list[dict], per_day: int) -> dict:
    reps = len(outcomes)
    decided = [o["customers"] for o in outcomes if o["customers"] is not None]
    return {"promote": sum(o["action"] == "promote" for o in outcomes) / reps,
            "retire": sum(o["action"] == "retire" for o in outcomes) / reps,
            "guardrail": sum(o["guardrail"] for o in outcomes) / reps,
            "undecided": sum(o["action"] == "none" for o in outcomes) / reps,
            "median_days": float(np.median(decided)) / per_day if decided else None,
            "median_customers": float(np.median(decided)) if decided else None}


def simulate(scenario: tuple, old: ExperimentSettings, new: ExperimentSettings, args, seed: int) -> dict:
    _, p_a, p_b, flag_multiple = scenario
    rng = np.random.default_rng(seed)
    horizon = args.days * args.per_day
    looks = np.arange(args.every, horizon + 1, args.every)
    results: dict[str, list] = {"bayes": [], "anytime": []}
    for _ in range(args.reps):
        run = Run(customers(horizon, new.challenger_share, p_a, p_b, args, flag_multiple, rng), new.challenger_share, looks)
        guard = run.guardrail_candidates(new)
        results["bayes"].append(decide_run(run, old, run.bayes_candidates(old) | guard))
        better, worse = run.combined(new)
        crossed = (better >= 1 / new.alpha) | (worse >= 1 / new.alpha)
        results["anytime"].append(decide_run(run, new, crossed | guard, check=crossed))
    return {rule: summarise(outcomes, args.per_day) for rule, outcomes in results.items()}


def sweep(new: ExperimentSettings, args) -> list[str]:
    """The anytime rule over a grid of settings, A/A and +5 points, vectorised e-values (promotion
    only, no guardrail), with every customer rating (`--rated-share`) and with one in ten."""
    horizon = args.days * args.per_day
    looks = np.arange(args.every, horizon + 1, args.every)
    bets, weights, priors, shares = (0.25, 0.5, 0.75), (0.0, 0.25, 0.5, 0.75, 1.0), (1.0, 10.0), (args.rated_share, 0.1)
    grid = [(bet, w, prior) for bet in bets for w in weights for prior in priors]
    first: dict[tuple, list] = {}  # (share, scenario, setting) → customers at promotion (None: never)
    for share in shares:
        sim = argparse.Namespace(**{**vars(args), "rated_share": share})
        for label, p_b, seed in (("A/A", 0.70, 100), ("+5", 0.75, 101)):
            rng = np.random.default_rng(seed)
            for _ in range(args.reps):
                run = Run(customers(horizon, new.challenger_share, 0.70, p_b, sim, 1, rng), new.challenger_share, looks)
                logs = {(name, bet, prior): run.log_e(name, bet, prior)[0] for name in ("audit", "thumbs")
                        for bet in bets for prior in priors}
                for bet, w, prior in grid:
                    better = w * np.exp(logs["audit", bet, prior]) + (1 - w) * np.exp(logs["thumbs", bet, prior])
                    hit = better >= 1 / new.alpha
                    first.setdefault((share, label, (bet, w, prior)), []).append(
                        int(looks[np.argmax(hit)]) if hit.any() else None)
    head = " | ".join(f"{share:.0%} rate: A/A promoted | +5 pts promoted | +5 median days" for share in shares)
    lines = ["# A/B anytime rule: settings sweep", "",
             f"{args.reps} simulated experiments per cell, the same customers for every setting; horizon {args.days} days × "
             f"{args.per_day:,} customers/day, a look every {args.every} customers, α = {new.alpha}, challenger share "
             f"{new.challenger_share}, audit share {args.audit_share}; promotion only (the e-value of 'better'), no "
             f"guardrail. Two customer models: {shares[0]:.0%} of customers rate (the bench's default) and 10 % do.",
             "", f"| max_bet | audit_weight | bet prior | {head} |", "|---" * (3 + 3 * len(shares)) + "|"]
    for setting in grid:
        cells = []
        for share in shares:
            aa, plus = first[share, "A/A", setting], first[share, "+5", setting]
            decided = [n for n in plus if n is not None]
            days = f"{np.median(decided) / args.per_day:.1f}" if decided else "–"
            cells.append(f"{sum(n is not None for n in aa) / len(aa):.1%} | {len(decided) / len(plus):.1%} | {days}")
        lines.append(f"| {setting[0]} | {setting[1]} | {setting[2]:g} | {' | '.join(cells)} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=500)
    ap.add_argument("--days", type=int, default=14, help="horizon in days (the shipped max_days)")
    ap.add_argument("--per-day", type=int, default=2000, help="customers a day, both arms")
    ap.add_argument("--every", type=int, default=50, help="customers between two looks of the scheduled job")
    ap.add_argument("--kappa", type=float, default=4.0, help="Beta concentration of customers' propensities")
    ap.add_argument("--mean-ratings", type=float, nargs="+", default=[3.0, 1.0],
                    help="mean exchanges (all rated) per customer: one table each (the sweep uses the first)")
    ap.add_argument("--rated-share", type=float, default=1.0, help="share of customers who rate at all")
    ap.add_argument("--flag-rate", type=float, default=0.003, help="staff flags per exchange, both arms")
    ap.add_argument("--audit-share", type=float, default=0.05, help="champion exchanges drawn for audit")
    ap.add_argument("--max-bet", type=float, help="override experiment.max_bet")
    ap.add_argument("--alpha", type=float, help="override experiment.alpha")
    ap.add_argument("--audit-weight", type=float, help="override experiment.audit_weight")
    ap.add_argument("--sweep", action="store_true", help="tabulate the anytime rule's settings instead")
    ap.add_argument("--out", default="bench/results/ab_decision.md")
    args = ap.parse_args()
    cfg = load_settings().experiment  # config/default.toml's values
    overrides = {k: v for k, v in {"max_bet": args.max_bet, "alpha": args.alpha, "audit_weight": args.audit_weight}.items()
                 if v is not None}
    new = cfg.model_copy(update={"rule": "anytime", **overrides})
    old = cfg.model_copy(update={"rule": "bayes"})
    started = time.perf_counter()
    if args.sweep:
        lines = sweep(new, argparse.Namespace(**{**vars(args), "mean_ratings": args.mean_ratings[0]}))
        lines += ["", f"Run time {time.perf_counter() - started:.0f} s."]
        out = Path(args.out).with_name("ab_decision_sweep.md")
        out.write_text("\n".join(lines) + "\n")
        print("\n".join(lines))
        return
    horizon = args.days * args.per_day
    audit_chal = min(1.0, args.audit_share * (1 - new.challenger_share) / new.challenger_share)
    lines = [
        "# A/B decision rule under continuous monitoring, simulated",
        "",
        f"Horizon {args.days} days × {args.per_day:,} customers/day = {horizon:,} customers "
        f"({new.challenger_share:.0%} on the challenger); a look every {args.every} customers "
        f"({args.every / args.per_day * 24 * 60:.0f} min of traffic). {args.reps} simulated experiments per row, the same "
        f"customers for both rules. Customers: Beta(κ={args.kappa}) propensities, {args.rated_share:.0%} of them rating; "
        f"staff flags on {args.flag_rate:.1%} of exchanges in both arms except the last row; audits on "
        f"{args.audit_share:.0%} of champion exchanges and {audit_chal:.0%} of challenger ones (equal counts per arm), "
        f"verdicts with the customer's propensity. Rates: the arm's mean propensity (thumbs-up and approved audits alike).",
        "",
        f"Settings: bayes (old, thumbs only) min_samples {old.min_samples}, promote_probability {old.promote_probability}; "
        f"anytime (new) α = {new.alpha} (threshold {1 / new.alpha:g}), audit_weight {new.audit_weight}, max_bet "
        f"{new.max_bet}, aGRAPA bet prior {statistics.BET_PRIOR:g}; both: guardrail P ≥ {new.guardrail_probability} with "
        f"≥ {new.guardrail_min_flags} flagged customers and ≥ {new.guardrail_min_difference:.0%} difference.",
    ]

    def cells(r: dict) -> str:
        days = f"{r['median_days']:.1f}" if r["median_days"] is not None else "–"
        return f"{r['promote']:.1%} | {r['retire']:.1%} ({r['guardrail']:.1%}) | {r['undecided']:.1%} | {days}"

    results = []
    for mean_ratings in args.mean_ratings:
        sim = argparse.Namespace(**{**vars(args), "mean_ratings": mean_ratings})
        lines += ["", f"## {mean_ratings:g} exchange{'s' if mean_ratings != 1 else ''} (all rated) per customer"
                  + (" on average" if mean_ratings > 1 else ""), "",
                  f"| scenario | rate champion → challenger | bayes (old): promote | retire (guardrail) | undecided at "
                  f"{args.days} d | median days | anytime (new): promote | retire (guardrail) | undecided at {args.days} d "
                  f"| median days |", "|---|---|---|---|---|---|---|---|---|---|"]
        for i, scenario in enumerate(SCENARIOS):
            result = simulate(scenario, old, new, sim, seed=100 + i)
            results.append({"mean_ratings": mean_ratings, "scenario": scenario[0], "champion": scenario[1],
                            "challenger": scenario[2], **result})
            print(mean_ratings, scenario[0], json.dumps(result), flush=True)
            lines.append(f"| {scenario[0]} | {scenario[1]:.2f} → {scenario[2]:.2f} | {cells(result['bayes'])} | "
                         f"{cells(result['anytime'])} |")
    lines += ["", f"Run time {time.perf_counter() - started:.0f} s."]
    out = Path(args.out)
    out.write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps({"args": vars(args), "rows": results}, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
