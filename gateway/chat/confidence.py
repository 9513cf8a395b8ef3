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

Calibrated (v4): the raw signals are kept too — mean/min token log-prob, mean next-token entropy,
length, truncation, looping, the top retrieval similarity and its gap to the best rival candidate,
how well the first-ranked entry's own question matches the query, and how much of the answer's
wording comes from the top retrieved entry — and where the served variant has
a fitted calibrator (`gateway/calibration/calibrator.py`), `score` is its P(good) and `formula`
keeps the v2 value; otherwise `score` is the formula.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import asdict, dataclass, replace

from gateway.calibration.calibrator import Calibrator
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
    formula: float = 0.0  # the v2 formula's value (equal to score when no calibrator applied)
    mean_entropy: float | None = None  # mean next-token entropy (nats); None when the engine gives none
    tokens: int = 0  # completion tokens
    second_similarity: float | None = None  # the best rival candidate's similarity (Search.rival; may exceed the first's)
    entry_overlap: float | None = None  # share of the answer's words found in the top retrieved entry
    question_match: float | None = None  # the retrieval query vs the first-ranked entry's own question
    calibrator: int | None = None  # the calibrator that gave `score` (None: the formula)

    def parts(self) -> dict:
        return asdict(self)


def is_looping(text: str, n: int = 4, repeats: int = 3) -> bool:
    """True when some word n-gram occurs at least `repeats` times (FINDINGS' loop measure)."""
    words = [w.lower() for w in _WORD.findall(text)]
    grams = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
    return bool(grams) and max(grams.values()) >= repeats


def entry_overlap(answer: str, entry: str) -> float:
    """Share of the answer's distinct words that occur in the retrieved entry: an answer copied from
    the entry is 1.0, one invented from nothing near 0."""
    words = {w.lower() for w in _WORD.findall(answer)}
    if not words:
        return 0.0
    return len(words & {w.lower() for w in _WORD.findall(entry)}) / len(words)


def retrieval_part(top_similarity: float, cfg: ConfidenceSettings) -> float:
    span = max(cfg.retrieval_ceiling - cfg.retrieval_floor, 1e-6)
    return min(1.0, max(0.0, (top_similarity - cfg.retrieval_floor) / span))


def score(
    logprobs: list[float],
    text: str,
    finish_reason: str,
    cfg: ConfidenceSettings,
    top_similarity: float | None = None,
    *,
    sources: list[dict] | None = None,
    entropies: list[float | None] | None = None,
    calibrator: Calibrator | None = None,
    rival: float | None = None,
    question_match: float | None = None,
) -> Confidence:
    """`sources`: the retrieved entries as returned to the client (`Hit.as_source()`);
    `entropies`: per-token entropies where the engine reports them; `rival` and `question_match`:
    the retrieval's own signals (`gateway.knowledge.store.Search`). Without a rival, the second
    source's similarity stands in (none at `top_k` 1)."""
    truncated = finish_reason == "length"
    retrieval = None if top_similarity is None else retrieval_part(top_similarity, cfg)
    ranked = sorted((s["score"] for s in sources or []), reverse=True)  # fused order is not by similarity
    second = rival if rival is not None else ranked[1] if len(ranked) > 1 else None
    top_entry = (sources[0].get("answer") or sources[0].get("text") or "") if sources else None
    known = [e for e in entropies or () if e is not None]
    extra = {"mean_entropy": round(sum(known) / len(known), 6) if known else None, "tokens": len(logprobs),
             "second_similarity": None if second is None else round(second, 6),
             "entry_overlap": None if top_entry is None else round(entry_overlap(text, top_entry), 6),
             "question_match": None if question_match is None else round(question_match, 6)}
    mean = sum(logprobs) / len(logprobs) if logprobs else None
    if mean is None or not text.strip():  # no answer is a bad answer, whatever the signals (kept) say
        return Confidence(0.0, 0.0, None if mean is None else round(mean, 6),
                          round(min(logprobs), 6) if logprobs else None, retrieval, top_similarity, truncated,
                          False, **extra)
    token_prob = math.exp(mean)
    looping = is_looping(text)
    value = token_prob if retrieval is None else (1 - cfg.retrieval_weight) * token_prob + cfg.retrieval_weight * retrieval
    if truncated:
        value *= cfg.truncation_penalty
    if looping:
        value *= cfg.loop_penalty
    formula = round(min(1.0, max(0.0, value)), 6)
    conf = Confidence(
        score=formula,
        token_prob=round(token_prob, 6),
        mean_logprob=round(mean, 6),
        min_logprob=round(min(logprobs), 6),
        retrieval=None if retrieval is None else round(retrieval, 6),
        top_similarity=None if top_similarity is None else round(top_similarity, 6),
        truncated=truncated,
        looping=looping,
        formula=formula,
        **extra,
    )
    if calibrator is None:
        return conf
    return replace(conf, score=round(calibrator.predict(conf.parts()), 6), calibrator=calibrator.id)
