"""Response models of the review and exchange endpoints, for the OpenAPI document (/schema).

Each model mirrors, key for key, a dict that `ReviewService` (gateway/review/service.py) or
`exchange_record` (gateway/exchanges/repository.py) builds; `extra="forbid"` makes a key the model
does not know a validation error, and every field is required, so a key it lacks is one too.
Timestamps are ISO-8601 UTC strings (`iso_utc`), typed `str | None` because `iso_utc` passes None on.

| model                 | endpoint                                                    |
|-----------------------|-------------------------------------------------------------|
| `FeedbackResult`      | POST /v1/exchanges/{exchange_id}/feedback                   |
| `FlagResult`          | POST /v1/exchanges/{exchange_id}/flags                      |
| `ExchangeRecord`      | GET /v1/exchanges/{exchange_id}                             |
| `QueueList`           | GET /v1/review/queue                                        |
| `ReviewItemDetail`    | GET /v1/review/items/{item_id}, POST /v1/review/next (200)  |
| `ClaimResult`         | POST /v1/review/items/{item_id}/claim                       |
| `ReleaseResult`       | DELETE /v1/review/items/{item_id}/claim                     |
| `LabelResult`         | POST /v1/review/items/{item_id}/labels                      |
| `ReviewStats`         | GET /v1/review/stats                                        |
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model

ItemStatus = Literal["open", "escalated", "resolved", "withdrawn"]
Verdict = Literal["approve", "correct", "reject"]
Resolution = Literal["approve", "correct", "reject"]
Rating = Literal["up", "down"]
LabelCategory = Literal["keep", "change", "reject"]
ReasonCode = Literal["escalated", "staff_flag", "thumbs_down", "low_confidence", "audit"]
Role = Literal["client", "reviewer", "admin"]
DraftOutcome = Literal["accepted", "edited", "rejected"]

DRAFT_SOURCE = ("which teacher was asked for a draft ('retrieval', 'openai:<model>'); set with draft null when "
                "it had nothing good enough; null = not asked yet (or review.teacher.kind = 'off')")
DRAFT_SCORE = "retrieval: the knowledge-base entry's similarity to the question (also when under min_similarity)"


# ---- shared nested shapes ---------------------------------------------------------------------
class PriorityReason(BaseModel):
    """Why an item is in the queue (`ReviewService.reasons`)."""

    model_config = ConfigDict(extra="forbid")

    code: ReasonCode
    text: str = Field(description="the reason in words, for the console")


class FeedbackView(BaseModel):
    """A client's rating of an exchange (`ReviewService._feedback_dict`)."""

    model_config = ConfigDict(extra="forbid")

    rating: Rating
    comment: str | None = Field(description="PII-scrubbed")
    created_at: str | None
    updated_at: str | None = Field(description="when the rating was last changed")


class FlagView(BaseModel):
    """A staff member's flag on an exchange (`ReviewService._flag_dict`)."""

    model_config = ConfigDict(extra="forbid")

    flagged_by: str = Field(description="name of the API key that flagged it")
    reason: str = Field(description="PII-scrubbed")
    created_at: str | None


class LabelView(BaseModel):
    """One reviewer's verdict on a review item (`ReviewService._label_dict`)."""

    model_config = ConfigDict(extra="forbid")

    id: int
    reviewer: str = Field(description="name of the reviewer's API key")
    role: Role = Field(description="the reviewer's role when labelling (an admin's label decides an escalated item)")
    verdict: Verdict
    category: LabelCategory = Field(
        description="what the verdict does to the model's answer: keep it, change it, or reject (used for Cohen's kappa)")
    corrected_answer: str | None = Field(description="set only with the verdict 'correct'")
    approved_proposal: int | None = Field(
        description="id of the correction label shown as the proposed answer when this label was given; "
                    "null = the model's own answer was proposed")
    note: str | None
    draft_outcome: DraftOutcome | None = Field(
        description="how this label treated the item's teacher draft: accepted (its answer is the draft), "
                    "edited (a correction close to the draft), rejected (anything else); null = the item had no draft")
    created_at: str | None


class ReviewEventView(BaseModel):
    """One audit-trail entry (`ReviewService._event_dict`)."""

    model_config = ConfigDict(extra="forbid")

    at: str | None
    actor: str = Field(description="API key name, or 'system'")
    action: str = Field(
        description="enqueued, reopened, withdrawn, feedback, flag, claimed, label, escalated, resolved, ...")
    detail: dict[str, Any] = Field(description="action-specific details (reason, rating, verdict, ...)")


class ProposedAnswer(BaseModel):
    """The answer a reviewer is asked to judge: the latest correction, else the model's answer."""

    model_config = ConfigDict(extra="forbid")

    id: int = Field(description="label id of the correction; 0 = the model's answer. Send it back as "
                                "`proposed_answer_id` when labelling")
    text: str
    by: str | None = Field(description="reviewer who wrote the correction; null for the model's answer")


class PriorityParts(BaseModel):
    """The priority formula term by term (`priority_parts`); the terms sum to `priority`."""

    model_config = ConfigDict(extra="forbid")

    confidence: float = Field(description="weight_confidence × (1 − confidence)")
    low_confidence: float = Field(description="weight_low_confidence if the answer was below the threshold")
    thumbs_down: float = Field(description="weight_thumbs_down if the customer gave a thumbs-down")
    flags: float = Field(description="weight_flag × number of staff flags")
    escalated: float = Field(description="weight_escalated if reviewers disagreed")
    audit: float = Field(description="weight_audit if the random audit sample drew it")
    age: float = Field(description="weight_age_per_hour × hours waiting")


# ---- exchanges --------------------------------------------------------------------------------
class ExchangeMessage(BaseModel):
    """One prompt message as logged (PII-scrubbed; a client's 'developer' role is logged as 'system')."""

    model_config = ConfigDict(extra="forbid")

    role: str = Field(description="system, user or assistant")
    content: str


class TokenUsage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt_tokens: int
    completion_tokens: int


class ExchangeLog(BaseModel):
    """The logged record of one exchange (`exchange_record`), as embedded in a review item."""

    model_config = ConfigDict(extra="forbid")

    id: str
    created_at: str | None
    completed_at: str | None
    api_key_name: str
    user: str | None = Field(description="the `user` sent with the chat request (PII-scrubbed), if any")
    model: str = Field(description="the model name the client requested")
    variant: str = Field(description="what served it: 'base' or an adapter version")
    messages: list[ExchangeMessage] = Field(description="the prompt as sent to the model (system prompt and "
                                                        "retrieved context included)")
    conversation: list[ExchangeMessage] | None = Field(
        None, description="the turns before the customer's last message, as the client sent them (PII-scrubbed); "
                          "null for a single question. The prompt may carry them differently (rag.history)")
    answer: str
    finish_reason: str = Field(description="streaming (still answering), stop, length, cancelled or error")
    error: str | None = Field(description="why an `error` exchange failed")
    stream: bool
    rag: bool = Field(description="whether retrieval was asked for")
    retrieval: str | None = Field(description="ok, unavailable (answered without the knowledge base), no_match "
                                              "(nothing relevant retrieved: answered with rag.fallback_answer), "
                                              "or null (not asked)")
    retrieval_query: str | None = Field(None, description="what was searched: the last user message, or the last "
                                                          "rag.query_turns user turns of a conversation")
    retrieval_ms: float | None
    sources: list[dict[str, Any]] = Field(
        description="retrieved knowledge-base entries: id, text, score, plus whichever of source, title, "
                    "category, question, answer the entry has")
    params: dict[str, Any] = Field(description="sampling parameters (max_tokens, temperature, top_p, stop, seed, ...)")
    usage: TokenUsage
    ttft_ms: float | None = Field(description="time to first token")
    latency_ms: float
    confidence: float | None = Field(description="0..1; null: not scored (the engine reported no log-probabilities)")
    confidence_parts: dict[str, Any] = Field(
        description="the confidence formula's parts (token_prob, mean_logprob, retrieval, truncated, looping, ...)")
    flagged: bool = Field(description="confidence was below review.confidence_threshold")


class ExchangeReviewItem(BaseModel):
    """The review item of an exchange, as GET /v1/exchanges/{id} shows it."""

    model_config = ConfigDict(extra="forbid")

    id: int
    status: ItemStatus
    resolution: Resolution | None
    resolved_answer: str | None = Field(description="the answer the review settled on; null if rejected or unresolved")
    reasons: list[PriorityReason]


class ExchangeRecord(ExchangeLog):
    """GET /v1/exchanges/{id}: the logged record plus its review signals (`exchange_signals`)."""

    model_config = ConfigDict(extra="forbid")

    feedback: list[FeedbackView] = Field(description="the client's rating (at most one)")
    flags: list[FlagView]
    review_item: ExchangeReviewItem | None = Field(description="null if the exchange was never queued")
    reviews: list[LabelView] = Field(description="the review item's labels, oldest first")


class FeedbackResult(BaseModel):
    """POST /v1/exchanges/{id}/feedback."""

    model_config = ConfigDict(extra="forbid")

    exchange_id: str
    rating: Rating
    comment: str | None = Field(description="PII-scrubbed")
    created_at: str | None
    updated_at: str | None = Field(description="when the rating was last changed")
    review_item_id: int | None = Field(
        description="the exchange's review item; null if there is none or it was withdrawn (thumbs-up)")


class FlagResult(BaseModel):
    """POST /v1/exchanges/{id}/flags."""

    model_config = ConfigDict(extra="forbid")

    exchange_id: str
    flag: FlagView
    review_item_id: int = Field(description="the review item the flag put (or kept) the exchange in")


# ---- queue, items, claims, labels -------------------------------------------------------------
class QueueItem(BaseModel):
    """One entry of GET /v1/review/queue (`ReviewService._summary`)."""

    model_config = ConfigDict(extra="forbid")

    id: int
    exchange_id: str
    status: ItemStatus
    priority: float = Field(description="higher is reviewed first (see priority_parts in the item detail)")
    reasons: list[PriorityReason]
    confidence: float | None = Field(description="null: not scored (the engine reported no log-probabilities)")
    question: str = Field(description="the last user message, trimmed to 280 characters")
    answer: str = Field(description="the model's answer, trimmed to 280 characters")
    created_at: str | None
    waiting_s: int = Field(description="seconds since the item was queued")
    labels: int = Field(description="number of labels so far")
    required_labels: int = Field(description="labels needed (grows by one when the item is escalated)")
    claimed_by: str | None = Field(description="holder of a live claim, if any")
    claimed_until: str | None = Field(description="when that claim expires")
    draft: str | None = Field(description="the teacher's draft answer (PII-scrubbed), trimmed to 280 characters")
    draft_source: str | None = Field(description=DRAFT_SOURCE)
    audit: bool = Field(description="drawn by the random audit sample (review.audit_share), whatever its score: "
                                    "audit verdicts estimate each variant's share of good answers without bias")
    audit_rate: float | None = Field(description="the probability it was drawn with (per variant and arm)")
    draft_score: float | None = Field(description=DRAFT_SCORE)


class QueueList(BaseModel):
    """GET /v1/review/queue."""

    model_config = ConfigDict(extra="forbid")

    object: Literal["list"]
    data: list[QueueItem]


class ReviewItemDetail(BaseModel):
    """GET /v1/review/items/{id} and POST /v1/review/next (`ReviewService.item_detail`).
    The queue summary's keys, with the full question and answer and the labels themselves."""

    model_config = ConfigDict(extra="forbid")

    id: int
    exchange_id: str
    status: ItemStatus
    priority: float = Field(description="the sum of priority_parts")
    reasons: list[PriorityReason]
    confidence: float | None = Field(description="null: not scored (the engine reported no log-probabilities)")
    question: str = Field(description="the last user message, in full")
    answer: str = Field(description="the model's answer, in full")
    created_at: str | None
    waiting_s: int = Field(description="seconds since the item was queued")
    labels: list[LabelView] = Field(description="the labels so far, oldest first")
    required_labels: int = Field(description="labels needed (grows by one when the item is escalated)")
    claimed_by: str | None = Field(description="holder of a live claim, if any")
    claimed_until: str | None = Field(description="when that claim expires")
    priority_parts: PriorityParts
    proposed_answer: ProposedAnswer
    draft: str | None = Field(description="the teacher's draft answer (PII-scrubbed), in full; shown beside the "
                                          "model's answer. To accept it, label 'correct' with it as corrected_answer "
                                          "(or 'approve' when it equals proposed_answer.text)")
    draft_source: str | None = Field(description=DRAFT_SOURCE)
    audit: bool = Field(description="drawn by the random audit sample (review.audit_share), whatever its score: "
                                    "audit verdicts estimate each variant's share of good answers without bias")
    audit_rate: float | None = Field(description="the probability it was drawn with (per variant and arm)")
    draft_score: float | None = Field(description=DRAFT_SCORE)
    resolution: Resolution | None
    resolved_answer: str | None = Field(description="the answer the review settled on; null if rejected or unresolved")
    resolved_at: str | None
    decided_by: str | None = Field(description="'consensus:<reviewers>' or 'admin:<name>'")
    exchange: ExchangeLog
    feedback: FeedbackView | None
    flags: list[FlagView]
    events: list[ReviewEventView] = Field(description="the exchange's audit trail, oldest first")


class ClaimResult(BaseModel):
    """POST /v1/review/items/{id}/claim."""

    model_config = ConfigDict(extra="forbid")

    item_id: int
    claimed_by: str
    claimed_until: str | None = Field(description="when the claim expires (review.claim_ttl_s from now)")


class ReleaseResult(BaseModel):
    """DELETE /v1/review/items/{id}/claim."""

    model_config = ConfigDict(extra="forbid")

    item_id: int
    released: bool = Field(description="always true (no claim to release is a 409)")


class LabelResult(BaseModel):
    """POST /v1/review/items/{id}/labels: the new label and the item after it."""

    model_config = ConfigDict(extra="forbid")

    label: LabelView
    item: ReviewItemDetail


# ---- statistics -------------------------------------------------------------------------------
class AgreementSummary(BaseModel):
    """Agreement over co-labelled items; the rates are null when there is nothing to compare."""

    model_config = ConfigDict(extra="forbid")

    items: int = Field(description="label pairs compared")
    percent_agreement: float | None = Field(description="share of pairs whose labels agree (0..1)")
    category_agreement: float | None = Field(description="share of pairs with the same category (keep/change/reject)")
    cohen_kappa: float | None = Field(description="chance-corrected category agreement; null when undefined")


class ReviewerPairAgreement(BaseModel):
    """Agreement between two reviewers."""

    model_config = ConfigDict(extra="forbid")

    reviewers: list[str] = Field(description="the two reviewers, alphabetically")
    items: int = Field(description="label pairs compared")
    percent_agreement: float | None = Field(description="share of pairs whose labels agree (0..1)")
    category_agreement: float | None = Field(description="share of pairs with the same category (keep/change/reject)")
    cohen_kappa: float | None = Field(description="chance-corrected category agreement; null when undefined")


# `from` is a Python keyword, and Litestar dumps models without aliases, so the field is named
# `from` itself (create_model takes it as a plain key) rather than `from_` with an alias.
HistogramBin = create_model(
    "HistogramBin",
    __config__=ConfigDict(extra="forbid"),
    __doc__="One tenth of the confidence range.",
    **{
        "from": (float, Field(description="lower bound (inclusive)")),
        "to": (float, Field(description="upper bound (exclusive; the last bin includes 1.0)")),
        "count": (int, Field(description="exchanges with a confidence in the bin")),
        "flagged": (int, Field(description="of those, how many were flagged for review")),
    },
)


class ConfidenceHistogram(BaseModel):
    model_config = ConfigDict(extra="forbid")

    exchanges: int = Field(description="recent exchanges counted (review.stats_recent_exchanges, cancelled ones left out)")
    threshold: float = Field(description="review.confidence_threshold")
    bins: list[HistogramBin]  # type: ignore[valid-type]


class TeacherSourceStats(BaseModel):
    """One draft source's record: how often it drafted, and what reviewers did with its drafts."""

    model_config = ConfigDict(extra="forbid")

    source: str = Field(description="'retrieval' or 'openai:<model>'")
    asked: int = Field(description="review items the teacher was asked to draft for")
    drafted: int = Field(description="of those, items with a draft (the rest: nothing good enough)")
    shown: int = Field(description="items with a draft that got at least one label")
    labels: int = Field(description="labels given on items with a draft (each judges the draft once)")
    accepted: int = Field(description="labels whose answer is the draft")
    edited: int = Field(description="corrections close to the draft")
    rejected: int = Field(description="labels that neither accepted nor edited the draft")
    accepted_rate: float | None = Field(description="accepted / labels")
    edited_rate: float | None = Field(description="edited / labels")
    rejected_rate: float | None = Field(description="rejected / labels")


class TeacherStats(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Literal["retrieval", "openai", "off"] = Field(description="review.teacher.kind")
    source: str | None = Field(description="the draft source the configured teacher writes; null when off")
    sources: list[TeacherSourceStats] = Field(description="every draft source on record (a changed teacher keeps "
                                                          "its history)")


class AuditEstimate(BaseModel):
    """One variant's share of good answers, estimated from its resolved audit items (gateway/review/audit.py)."""

    model_config = ConfigDict(extra="forbid")

    variant: str
    audited: int = Field(description="audit items drawn for this variant's answers")
    resolved: int = Field(description="of those, resolved (pending ones do not count yet)")
    good: int = Field(description="resolved as approve (the answer stood)")
    share_good: float | None = Field(description="weighted by 1 / audit_rate (Hájek): the share of all the variant's "
                                                 "answers that are good; null before the first resolution")
    low: float | None = Field(description="Wilson interval at `confidence`, on the effective sample size")
    high: float | None
    share_good_unweighted: float | None = Field(description="good / resolved, for comparison")
    n_effective: float = Field(description="Kish's effective sample size of the weighted verdicts")
    confidence: float = Field(description="review.audit_confidence")


class ReviewStats(BaseModel):
    """GET /v1/review/stats."""

    model_config = ConfigDict(extra="forbid")

    items: dict[str, int] = Field(description="review items per status (statuses with no items are left out)")
    labels_by_reviewer: dict[str, dict[str, int]] = Field(description="reviewer → verdict → number of labels")
    overall: AgreementSummary = Field(description="all reviewer pairs pooled")
    pairs: list[ReviewerPairAgreement]
    confidence_histogram: ConfidenceHistogram
    teacher: TeacherStats = Field(description="the teacher's drafts and how reviewers treated them")
    audit: list[AuditEstimate] = Field(description="per variant, the share of good answers the random audit sample "
                                                   "estimates (unbiased, unlike the rest of the queue)")
