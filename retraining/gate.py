"""The offline gate: may a candidate adapter go in front of customers?

The candidate and the baseline (the champion, or the base model) answer the same questions; each
question gives one paired difference of answer similarity to the reference. Per question set:

* mean difference, a two-sided bootstrap interval of it (`gate_confidence`, percentile method,
  `gate_bootstrap_samples` resamples, fixed seed), and a sign test (wins vs losses, ties dropped);
* the frozen split with retrieval (serving's default path, the primary check) passes when the
  interval's lower bound is at least `−gate_margin` (non-inferiority) and the mean difference at
  least `gate_min_improvement`; without retrieval, non-inferiority alone, within `gate_no_rag_margin`
  (wider: answers without retrieval vary far more from one adapter to the next, so an equal
  candidate's interval there is wider than `gate_margin`);
* the forgetting probe (seed questions training uses) passes when the lower bound is at least
  `−forgetting_margin`: a candidate that learned the new reviews but lost what the champion knew
  about the seed Q&A is refused even if the frozen split looks fine.

All checks must pass. The decision (intervals included) is stored on the run and the adapter.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import binomtest, bootstrap

from gateway.core.settings import RetrainingSettings

TIE = 1e-6  # |difference| below this is a tie for the sign test


def paired(candidate: list[float], baseline: list[float], confidence: float, samples: int, seed: int = 0) -> dict:
    """Mean paired difference (candidate − baseline), its bootstrap interval and a sign test."""
    if len(candidate) != len(baseline) or not candidate:
        raise ValueError("paired comparison needs two equally long, non-empty lists")
    diffs = np.asarray(candidate, dtype=float) - np.asarray(baseline, dtype=float)
    mean = float(diffs.mean())
    if len(diffs) < 2 or np.ptp(diffs) == 0:
        low = high = mean
    else:
        ci = bootstrap((diffs,), np.mean, confidence_level=confidence, n_resamples=samples, method="percentile",
                       rng=np.random.default_rng(seed)).confidence_interval
        low, high = float(ci.low), float(ci.high)
    wins, losses = int((diffs > TIE).sum()), int((diffs < -TIE).sum())
    sign_p = float(binomtest(wins, wins + losses, 0.5).pvalue) if wins + losses else 1.0
    return {"n": len(diffs), "candidate_mean": round(float(np.mean(candidate)), 4),
            "baseline_mean": round(float(np.mean(baseline)), 4), "mean_difference": round(mean, 4),
            "interval": [round(low, 4), round(high, 4)], "confidence": confidence,
            "wins": wins, "losses": losses, "ties": len(diffs) - wins - losses, "sign_test_p": round(sign_p, 4)}


def decide(cfg: RetrainingSettings, comparisons: dict[str, dict], baseline_name: str) -> dict:
    """`comparisons`: "rag"/"no_rag" (frozen split) and optionally "forgetting", each from `paired`."""
    checks = {}
    for name, comp in comparisons.items():
        low, mean = comp["interval"][0], comp["mean_difference"]
        if name == "forgetting":
            passed = low >= -cfg.forgetting_margin
            rule = f"lower bound {low:+.3f} ≥ −{cfg.forgetting_margin}"
        elif name == "no_rag":
            passed = low >= -cfg.gate_no_rag_margin
            rule = f"lower bound {low:+.3f} ≥ −{cfg.gate_no_rag_margin}"
        else:
            passed = low >= -cfg.gate_margin and mean >= cfg.gate_min_improvement
            rule = f"lower bound {low:+.3f} ≥ −{cfg.gate_margin} and mean {mean:+.3f} ≥ {cfg.gate_min_improvement:+}"
        checks[name] = {**comp, "passed": passed, "rule": rule}
    passed = bool(checks) and all(c["passed"] for c in checks.values())
    detail = "; ".join(f"{name}: {c['candidate_mean']:.3f} vs {c['baseline_mean']:.3f}, Δ {c['mean_difference']:+.3f} "
                       f"[{c['interval'][0]:+.3f}, {c['interval'][1]:+.3f}]{'' if c['passed'] else ' FAILED'}"
                       for name, c in checks.items())
    reason = (f"passed the offline gate against {baseline_name} ({detail})" if passed else
              f"refused by the offline gate against {baseline_name} ({detail})")
    return {"passed": passed, "reason": reason, "checks": checks, "baseline_version": baseline_name}
