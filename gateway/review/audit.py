"""What the audit sample says about each variant: its share of good answers, without the queue's bias.

Why: every other review item is there because something doubted the answer (a low score, a
thumbs-down, a flag), so their verdicts say little about the answers nobody doubted. Audit items
are drawn at random from *all* answers, with a probability stored on the item (`audit_rate`), so
their verdicts estimate a variant's share of good answers without that bias (approve = good,
correct/reject = bad, as for the calibrator).

The rate is not constant: an experiment stratifies audits by arm (each arm gets half the audits
whatever its traffic share), so a variant's rate changes when an experiment starts or ends, and
changes with the share. A plain mean would over-count the periods audited more densely, so each
verdict is weighted by 1 / audit_rate (the Hájek estimator: Σ w·good / Σ w). The interval is
Wilson's score interval at the weighted share with Kish's effective sample size
n_eff = (Σ w)² / Σ w², which is the usual Wilson interval when every rate is the same.
"""

from __future__ import annotations

import math
from statistics import NormalDist
from typing import Sequence

from gateway.review.models import GOOD_RESOLUTIONS


def wilson(share: float, n: float, confidence: float) -> tuple[float, float]:
    """Wilson's score interval for a proportion `share` observed on `n` (possibly fractional) trials."""
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    denominator = 1 + z * z / n
    centre = (share + z * z / (2 * n)) / denominator
    half = z * math.sqrt(share * (1 - share) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def estimate(verdicts: Sequence[tuple[float, bool]], confidence: float) -> dict:
    """`verdicts`: (audit_rate, good) of one variant's resolved audit items. The weighted share of
    good answers, its interval, the unweighted share beside it, and the effective sample size."""
    if not verdicts:
        return {"resolved": 0, "good": 0, "share_good": None, "low": None, "high": None,
                "share_good_unweighted": None, "n_effective": 0.0}
    weights = [1.0 / rate for rate, _ in verdicts]
    total = sum(weights)
    share = sum(w for w, (_, good) in zip(weights, verdicts) if good) / total
    n_effective = total * total / sum(w * w for w in weights)
    low, high = wilson(share, n_effective, confidence)
    good = sum(1 for _, g in verdicts if g)
    return {"resolved": len(verdicts), "good": good, "share_good": round(share, 4), "low": round(low, 4),
            "high": round(high, 4), "share_good_unweighted": round(good / len(verdicts), 4),
            "n_effective": round(n_effective, 2)}


def estimates(items: Sequence[tuple[str, float, str, str | None]], confidence: float) -> list[dict]:
    """`items`: (variant, audit_rate, status, resolution) of every audit item. Per variant: how many
    were drawn, how many are resolved, and the estimate from the resolved ones."""
    by_variant: dict[str, list[tuple[float, str, str | None]]] = {}
    for variant, rate, status, resolution in items:
        by_variant.setdefault(variant, []).append((rate, status, resolution))
    out = []
    for variant, rows in sorted(by_variant.items()):
        resolved = [(rate, resolution in GOOD_RESOLUTIONS) for rate, status, resolution in rows
                    if status == "resolved" and resolution is not None and rate]
        out.append({"variant": variant, "audited": len(rows), "confidence": confidence,
                    **estimate(resolved, confidence)})
    return out
