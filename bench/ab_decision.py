"""How the A/B decision rule behaves: error rates and ratings needed, by simulation.

Synthetic customers are routed to the challenger with `experiment.challenger_share`, and every
exchange is rated thumbs-up with its arm's true rate. The real `retraining.experiments.decide` is
applied every `--every` ratings (the scheduled job's looks) until it promotes or retires, or the
horizon runs out. Baseline, measured in the same run: a fixed-horizon test that looks once, when
the horizon is reached, with the same threshold. Rows report P(promote), P(retire), P(no decision)
and the median number of ratings to the decision; the ratio column is ratings needed by the
sequential rule / by the fixed-horizon test (< 1: the rule decides sooner).

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

from gateway.settings import ExperimentSettings, load_settings  # noqa: E402
from retraining.experiments import Arm, decide  # noqa: E402

SCENARIOS = [("A/A (no difference)", 0.70, 0.70), ("challenger +10 pts", 0.70, 0.80),
             ("challenger +5 pts", 0.70, 0.75), ("challenger −5 pts", 0.70, 0.65),
             ("challenger −10 pts", 0.70, 0.60)]


def simulate(cfg: ExperimentSettings, p_champion: float, p_challenger: float, horizon: int, every: int,
             reps: int, sequential: bool, rng: np.random.Generator) -> dict:
    outcomes, needed = {"promote": 0, "retire": 0, "none": 0}, []
    for _ in range(reps):
        arm = rng.random(horizon) < cfg.challenger_share  # True → challenger
        up = rng.random(horizon) < np.where(arm, p_challenger, p_champion)
        looks = range(every, horizon + 1, every) if sequential else [horizon]
        decided = "none"
        for n in looks:
            b_n, b_up = int(arm[:n].sum()), int((up[:n] & arm[:n]).sum())
            a_n, a_up = n - b_n, int((up[:n] & ~arm[:n]).sum())
            verdict = decide(cfg, Arm("champion", "champion", a_n, a_n, a_up), Arm("challenger", "challenger", b_n, b_n, b_up),
                             age_days=0.0)
            if verdict.action in ("promote", "retire"):
                decided = verdict.action
                needed.append(n)
                break
        outcomes[decided] += 1
    return {**{k: v / reps for k, v in outcomes.items()},
            "median_ratings": float(np.median(needed)) if needed else None}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--horizon", type=int, default=6000, help="rated exchanges (both arms) before giving up")
    ap.add_argument("--every", type=int, default=100, help="ratings between two looks of the scheduled job")
    ap.add_argument("--min-samples", type=int, help="default: the shipped experiment.min_samples")
    ap.add_argument("--promote-probability", type=float, help="default: the shipped experiment.promote_probability")
    ap.add_argument("--out", default="bench/results/ab_decision.md")
    args = ap.parse_args()
    cfg = load_settings().experiment  # config/default.toml's values, unless overridden here
    if args.min_samples:
        cfg = cfg.model_copy(update={"min_samples": args.min_samples})
    if args.promote_probability:
        cfg = cfg.model_copy(update={"promote_probability": args.promote_probability})
    rng = np.random.default_rng(7)
    rows, started = [], time.perf_counter()
    for name, pa, pb in SCENARIOS:
        seq = simulate(cfg, pa, pb, args.horizon, args.every, args.reps, True, rng)
        fixed = simulate(cfg, pa, pb, args.horizon, args.every, args.reps, False, rng)
        ratio = (seq["median_ratings"] / fixed["median_ratings"]
                 if seq["median_ratings"] and fixed["median_ratings"] else None)
        rows.append({"scenario": name, "champion": pa, "challenger": pb, "sequential": seq, "fixed_horizon": fixed,
                     "ratio": ratio})
        print(name, json.dumps(rows[-1]), flush=True)
    lines = [
        "# A/B decision rule, simulated",
        "",
        f"Settings: challenger_share {cfg.challenger_share}, min_samples {cfg.min_samples} rated per arm, "
        f"promote_probability {cfg.promote_probability}. {args.reps} simulated experiments per row; the rule looks "
        f"every {args.every} ratings; horizon {args.horizon} ratings (both arms). Baseline: one look at the horizon. "
        f"Run time {time.perf_counter() - started:.0f} s.",
        "",
        "| scenario | thumbs-up champion → challenger | rule: promote | retire | undecided | median ratings | "
        "fixed: promote | retire | undecided | ratings | ratings ratio (rule / fixed) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        s, f = r["sequential"], r["fixed_horizon"]
        ratio = f"{r['ratio']:.2f}" if r["ratio"] else "–"
        lines.append(
            f"| {r['scenario']} | {r['champion']:.2f} → {r['challenger']:.2f} | {s['promote']:.1%} | {s['retire']:.1%} | "
            f"{s['none']:.1%} | {s['median_ratings'] or '–'} | {f['promote']:.1%} | {f['retire']:.1%} | {f['none']:.1%} | "
            f"{f['median_ratings'] or '–'} | {ratio} |")
    out = Path(args.out)
    out.write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
