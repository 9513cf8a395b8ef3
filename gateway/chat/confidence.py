"""Confidence of a generated answer, in 0..1.

Formula (v2; every part is stored with the exchange so it can be recalibrated later):

    token_prob  = exp(mean log-prob of the generated tokens)      # geometric-mean token probability
    retrieval   = clamp((top_similarity - floor) / (ceiling - floor), 0, 1)   # only when retrieval ran
    base        = token_prob                                       # no retrieval
                = (1 - w) * token_prob + w * retrieval             # retrieval ran (w = retrieval_weight)
    confidence  = base × truncation_penalty (answer hit max_tokens) × loop_penalty (a word 4-gram ×3)

Why: the geometric mean is inverse per-token perplexity, in 0..1 and independent of answer length.
FINDINGS.md: log-probs alone separate good from bad answers weakly (AUROC 0.52-0.66), retrieval
similarity best (0.77), and capped or looping answers are mostly bad - so similarity is blended in
when there is one, and the two observable failure modes scale the score down. `tellerloop eval`
reports the AUROC of the score and of each part, so the weights are checked, not assumed.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import asdict, dataclass

from gateway.core.settings import ConfidenceSettings

_WORD = re.compile(r"\w+")


@dataclass(frozen=True)
class Confidence:
    score: float
    token_prob: float
    mean_logprob: float | None
    min_logprob: float | None
    retrieval: float | None  # the mapped retrieval part (None: retrieval did not run)
    top_similarity: float | None
    truncated: bool
    looping: bool

    def parts(self) -> dict:
        return asdict(self)


def is_looping(text: str, n: int = 4, repeats: int = 3) -> bool:
    """True when some word n-gram occurs at least `repeats` times (FINDINGS' loop measure)."""
    words = [w.lower() for w in _WORD.findall(text)]
    grams = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
    return bool(grams) and max(grams.values()) >= repeats


def retrieval_part(top_similarity: float, cfg: ConfidenceSettings) -> float:
    span = max(cfg.retrieval_ceiling - cfg.retrieval_floor, 1e-6)
    return min(1.0, max(0.0, (top_similarity - cfg.retrieval_floor) / span))


def score(
    logprobs: list[float],
    text: str,
    finish_reason: str,
    cfg: ConfidenceSettings,
    top_similarity: float | None = None,
) -> Confidence:
    truncated = finish_reason == "length"
    retrieval = None if top_similarity is None else retrieval_part(top_similarity, cfg)
    if not logprobs or not text.strip():
        return Confidence(0.0, 0.0, None, None, retrieval, top_similarity, truncated, False)
    mean = sum(logprobs) / len(logprobs)
    token_prob = math.exp(mean)
    looping = is_looping(text)
    value = token_prob if retrieval is None else (1 - cfg.retrieval_weight) * token_prob + cfg.retrieval_weight * retrieval
    if truncated:
        value *= cfg.truncation_penalty
    if looping:
        value *= cfg.loop_penalty
    return Confidence(
        score=round(min(1.0, max(0.0, value)), 6),
        token_prob=round(token_prob, 6),
        mean_logprob=round(mean, 6),
        min_logprob=round(min(logprobs), 6),
        retrieval=None if retrieval is None else round(retrieval, 6),
        top_similarity=None if top_similarity is None else round(top_similarity, 6),
        truncated=truncated,
        looping=looping,
    )
