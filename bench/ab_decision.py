"""How the A/B decision rule behaves: error rates and evidence needed, by simulation.

Synthetic customers arrive one by one and are routed to the challenger with
`experiment.challenger_share`. Customers differ: each has their own thumbs-up propensity, drawn
from Beta around their arm's true rate (concentration `--kappa`), and rates 1 + Geometric
exchanges (mean `--mean-ratings`); every exchange is staff-flagged with the same small
probability in both arms (`--flag-rate`), so any guardrail retirement is a false alarm.

The real `gateway.experiments.repository.decide` is applied every `--every` customers (the scheduled job's
looks) until it promotes or retires, or the horizon runs out, in two ways measured in the same run:
  * per rating (the previous rule, the baseline): every rating is its own unit, and the flag
    guardrail fires on probability alone (min flags 1, no minimum difference);
  * per customer (the shipped rule): customers are the unit, and the guardrail needs
    `guardrail_min_flags` flagged customers and a `guardrail_min_difference` rate difference.
Rows report P(promote), P(retire), how many retirements were the guardrail's, and the median number
of ratings to a decision.

Usage: python bench/ab_decision.py [--reps 200] [--out bench/results/ab_decision.md]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway.core.settings import ExperimentSettings, load_settings  # noqa: E402
from gateway.experiments.statistics import Arm, decide  # noqa: E402

# (name, thumbs-up champion, challenger, challenger's flag rate as a multiple of the champion's)
SCENARIOS = [("A/A (no difference)", 0.70, 0.70, 1), ("challenger +10 pts", 0.70, 0.80, 1),
             ("challenger +5 pts", 0.70, 0.75, 1), ("challenger −5 pts", 0.70, 0.65, 1),
             ("challenger −10 pts", 0.70, 0.60, 1), ("equal thumbs, challenger flagged 5× as often", 0.70, 0.70, 5)]


def customers(n: int, share: float, p_a: float, p_b: float, kappa: float, mean_ratings: float, flag_rate: float,
              flag_multiple: float, rng: np.random.Generator) -> dict:
    on_b = rng.random(n) < share
    p = np.where(on_b, p_b, p_a)
    propensity = rng.beta(kappa * p, kappa * (1 - p))
    k = 1 + rng.geometric(1 / mean_ratings, n) - 1 if mean_ratings > 1 else np.ones(n, dtype=int)
    k = np.maximum(k, 1)
    ups = rng.binomial(k, propensity)
    flags = rng.binomial(k, np.where(on_b, flag_rate * flag_multiple, flag_rate))
    return {"b": on_b, "k": k, "ups": ups, "flags": flags}


def arms_at(c: dict, n: int, per_customer: bool) -> tuple[Arm, Arm]:
    out = []
    for role, mask in (("champion", ~c["b"][:n]), ("challenger", c["b"][:n])):
        k, ups, flags = c["k"][:n][mask], c["ups"][:n][mask], c["flags"][:n][mask]
        if per_customer:
            out.append(Arm(role, role, int(k.sum()), int(k.sum()), int(ups.sum()), int(flags.sum()),
                           customers=len(k), rated_customers=len(k), satisfied=float((ups / k).sum()),
                           flagged_customers=int((flags > 0).sum())))
        else:
            out.append(Arm.of_ratings(role, role, int(k.sum()), int(ups.sum()), int(k.sum()), int(flags.sum())))
    return out[0], out[1]


def simulate(cfg: ExperimentSettings, scenario: tuple, args, per_customer: bool, seed: int) -> dict:
    _, p_a, p_b, flag_multiple = scenario
    rng = np.random.default_rng(seed)  # the same customers for both rules
    outcomes, needed, guardrail = {"promote": 0, "retire": 0, "none": 0}, [], 0
    for _ in range(args.reps):
        c = customers(args.horizon, cfg.challenger_share, p_a, p_b, args.kappa, args.mean_ratings, args.flag_rate, flag_multiple, rng)
        decided = "none"
        for n in range(args.every, args.horizon + 1, args.every):
            verdict = decide(cfg, *arms_at(c, n, per_customer), age_days=0.0)
            if verdict.action in ("promote", "retire"):
                decided = verdict.action
                guardrail += "guardrail" in verdict.reason
                needed.append(int(c["k"][:n].sum()))
                break
        outcomes[decided] += 1
    return {**{k: v / args.reps for k, v in outcomes.items()}, "guardrail_retire": guardrail / args.reps,
            "median_ratings": float(np.median(needed)) if needed else None}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--horizon", type=int, default=3000, help="customers (both arms) before giving up")
    ap.add_argument("--every", type=int, default=50, help="customers between two looks of the scheduled job")
    ap.add_argument("--kappa", type=float, default=4.0, help="Beta concentration of customers' propensities")
    ap.add_argument("--mean-ratings", type=float, default=3.0, help="mean ratings per customer")
    ap.add_argument("--flag-rate", type=float, default=0.003, help="staff flags per exchange, both arms")
    ap.add_argument("--out", default="bench/results/ab_decision.md")
    args = ap.parse_args()
    cfg = load_settings().experiment  # config/default.toml's values
    old = cfg.model_copy(update={"guardrail_min_flags": 1, "guardrail_min_difference": 0.0})
    rows, started = [], time.perf_counter()
    for i, scenario in enumerate(SCENARIOS):
        per_rating = simulate(old, scenario, args, per_customer=False, seed=100 + i)
        per_customer = simulate(cfg, scenario, args, per_customer=True, seed=100 + i)
        rows.append({"scenario": scenario[0], "champion": scenario[1], "challenger": scenario[2],
                     "per_rating": per_rating, "per_customer": per_customer})
        print(scenario[0], json.dumps(rows[-1]), flush=True)
    lines = [
        "# A/B decision rule, simulated",
        "",
        f"Settings: challenger_share {cfg.challenger_share}, min_samples {cfg.min_samples}, promote_probability "
        f"{cfg.promote_probability}, guardrail P ≥ {cfg.guardrail_probability} with ≥ {cfg.guardrail_min_flags} "
        f"flagged customers and ≥ {cfg.guardrail_min_difference:.0%} rate difference. {args.reps} simulated "
        f"experiments per row; customers with Beta(κ={args.kappa}) propensities, {args.mean_ratings} ratings each on "
        f"average; staff flags on {args.flag_rate:.1%} of exchanges in both arms (any guardrail retirement is a "
        f"false alarm) except in the last row; a look every {args.every} customers; horizon {args.horizon} customers. "
        f"Baseline, same customers: the previous rule (ratings as units, guardrail on probability alone). "
        f"Run time {time.perf_counter() - started:.0f} s.",
        "",
        "| scenario | thumbs-up champion → challenger | per rating (old): promote | retire (by guardrail) | "
        "median ratings | per customer (new): promote | retire (by guardrail) | median ratings |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        o, n = r["per_rating"], r["per_customer"]
        lines.append(
            f"| {r['scenario']} | {r['champion']:.2f} → {r['challenger']:.2f} | {o['promote']:.1%} | {o['retire']:.1%} "
            f"({o['guardrail_retire']:.1%}) | {o['median_ratings'] or '–'} | {n['promote']:.1%} | {n['retire']:.1%} "
            f"({n['guardrail_retire']:.1%}) | {n['median_ratings'] or '–'} |")
    out = Path(args.out)
    out.write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
