"""Inter-reviewer agreement and consensus: pure functions, no I/O.

* Percent agreement: share of co-labelled items on which two reviewers' labels agree.
* Cohen's kappa: chance-corrected agreement on the label *category* (keep the model's answer /
  change it / reject), κ = (p_o − p_e) / (1 − p_e), with p_e from each rater's own marginals.
  The overall figure pools every reviewer pair's observations (rater A = the alphabetically first).
* Consensus: an item resolves when `required` of its labels agree pairwise.
"""

from __future__ import annotations

from collections import Counter
from itertools import combinations
from typing import Hashable, Iterable, Sequence


def percent_agreement(agree: Iterable[bool]) -> float | None:
    flags = list(agree)
    return sum(flags) / len(flags) if flags else None


def cohen_kappa(observations: Sequence[tuple[Hashable, Hashable]]) -> float | None:
    """Cohen's kappa for (rater A's category, rater B's category) pairs. None when undefined
    (no observations, or both raters always used one and the same category: p_e = 1)."""
    n = len(observations)
    if n == 0:
        return None
    p_o = sum(a == b for a, b in observations) / n
    count_a = Counter(a for a, _ in observations)
    count_b = Counter(b for _, b in observations)
    p_e = sum(count_a[k] * count_b[k] for k in count_a) / (n * n)
    if p_e >= 1.0:
        return None
    return (p_o - p_e) / (1 - p_e)


def consensus_group(label_ids: Sequence[int], agrees: dict[frozenset[int], bool], required: int) -> tuple[int, ...] | None:
    """The first group of `required` labels that all agree pairwise (newest labels preferred), or None."""
    if len(label_ids) < required:
        return None
    if required == 1:
        return (label_ids[-1],)
    for group in combinations(sorted(label_ids, reverse=True), required):
        if all(agrees.get(frozenset(pair), False) for pair in combinations(group, 2)):
            return tuple(sorted(group))
    return None
