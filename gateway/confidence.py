"""Confidence of a generated answer, in 0..1.

Formula (v1, before calibration on reviewers' verdicts exists):

    token_prob  = exp(mean log-prob of the generated tokens)   # geometric-mean token probability
    confidence  = token_prob
                  × truncation_penalty   if the answer ran into max_tokens
                  × loop_penalty         if some word 4-gram occurs 3+ times

Why: the geometric mean is the per-token perplexity inverted, so it does not shrink with answer
length the way a product of probabilities would, and it stays in 0..1. FINDINGS.md shows log-probs
alone separate good from bad answers only weakly (AUROC 0.52-0.66) while answers that hit the
token cap or loop are mostly bad, so those two observable failure modes scale the score down.
All parts are stored with the exchange so the formula can be recalibrated later.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import asdict, dataclass

_WORD = re.compile(r"\w+")


@dataclass(frozen=True)
class Confidence:
    score: float
    token_prob: float
    mean_logprob: float | None
    min_logprob: float | None
    truncated: bool
    looping: bool

    def parts(self) -> dict:
        return asdict(self)


def is_looping(text: str, n: int = 4, repeats: int = 3) -> bool:
    """True when some word n-gram occurs at least `repeats` times (FINDINGS' loop measure)."""
    words = [w.lower() for w in _WORD.findall(text)]
    grams = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
    return bool(grams) and max(grams.values()) >= repeats


def score(
    logprobs: list[float],
    text: str,
    finish_reason: str,
    *,
    truncation_penalty: float,
    loop_penalty: float,
) -> Confidence:
    if not logprobs or not text.strip():
        return Confidence(0.0, 0.0, None, None, finish_reason == "length", False)
    mean = sum(logprobs) / len(logprobs)
    token_prob = math.exp(mean)
    truncated = finish_reason == "length"
    looping = is_looping(text)
    value = token_prob
    if truncated:
        value *= truncation_penalty
    if looping:
        value *= loop_penalty
    return Confidence(
        score=round(min(1.0, max(0.0, value)), 6),
        token_prob=round(token_prob, 6),
        mean_logprob=round(mean, 6),
        min_logprob=round(min(logprobs), 6),
        truncated=truncated,
        looping=looping,
    )
