"""Prometheus metrics beyond Litestar's per-request ones (which the PrometheusPlugin middleware adds).

Defined once at import so several app instances in one process (tests) share the registry.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120)

TTFT = Histogram(
    "tellerloop_time_to_first_token_seconds", "Time from request to first generated token",
    ["variant", "stream"], buckets=_LATENCY_BUCKETS,
)
GENERATION_SECONDS = Histogram(
    "tellerloop_generation_seconds", "Time from request to the end of generation",
    ["variant", "stream"], buckets=_LATENCY_BUCKETS,
)
TOKENS = Counter("tellerloop_generated_tokens_total", "Completion tokens generated", ["variant"])
PROMPT_TOKENS = Counter("tellerloop_prompt_tokens_total", "Prompt tokens processed", ["variant"])
EXCHANGES = Counter(
    "tellerloop_exchanges_total", "Logged exchanges", ["variant", "finish_reason", "flagged"]
)
CONFIDENCE = Histogram(
    "tellerloop_confidence", "Confidence score of logged exchanges", ["variant"],
    buckets=tuple(i / 10 for i in range(1, 11)),
)
IN_FLIGHT = Gauge("tellerloop_inflight_requests", "Chat completions being generated")
REJECTED = Counter("tellerloop_rejected_requests_total", "Chat requests refused before generation", ["reason"])
ENGINE_QUEUED = Gauge("tellerloop_engine_queued", "Requests waiting for a generation slot")
ENGINE_ACTIVE = Gauge("tellerloop_engine_active_sequences", "Sequences in the running batch")
ENGINE_STEPS = Gauge("tellerloop_engine_steps_total", "Forward passes the engine ran (a counter, read from the engine)")
ENGINE_STEP_SECONDS = Gauge("tellerloop_engine_step_seconds_total", "Seconds spent in forward passes (a counter, read from the engine)")
ENGINE_TOKENS = Gauge("tellerloop_engine_tokens_total", "Tokens through the model: prompt and generated (a counter, read from the engine)")
ENGINE_PREFIX_HITS = Gauge("tellerloop_engine_prefix_hits_total", "Requests whose shared prompt prefix was copied, not recomputed (a counter)")
ENGINE_ADAPTER_BYTES = Gauge("tellerloop_engine_adapter_bytes", "LoRA matrices in memory, retired versions still finishing requests included")
ENGINE_DTYPE = Gauge("tellerloop_engine_dtype", "1 for the compute dtype the local engine runs (model.dtype resolved: auto → bf16-mixed or float32)",
                     ["dtype"])
ENGINE_KV_BYTES = Gauge("tellerloop_engine_kv_cache_bytes", "Memory held by the running batch's key/value slots")
RETRIEVAL_FAILURES = Counter("tellerloop_retrieval_failures_total", "Chats answered without retrieval: the knowledge base failed")
SCHEDULER_LEADER = Gauge("tellerloop_scheduler_leader",
                         "1 while this replica holds the scheduler lease (runs retraining, experiment and calibration jobs)")
SCHEDULED_JOBS = Counter("tellerloop_scheduled_jobs_total", "Scheduled decision jobs this replica ran (as the leader)",
                         ["job"])
UPSTREAM_UP = Gauge("tellerloop_upstream_up", "engine.backend openai: 1 while the upstream answers /v1/models")
UPSTREAM_ERRORS = Counter("tellerloop_upstream_errors_total",
                          "engine.backend openai: failed upstream calls (connect, pool, stalled, stream, "
                          "adapter_load, or the upstream's HTTP status)", ["kind"])
CONFIDENCE_UNAVAILABLE = Counter("tellerloop_confidence_unavailable_total",
                                 "Answers whose engine reported no token log-probabilities (confidence not scored)")
FALLBACKS = Counter("tellerloop_fallback_answers_total",
                    "Chats answered with rag.fallback_answer: no retrieved entry was relevant enough")
RETRIEVAL_SECONDS = Histogram(
    "tellerloop_retrieval_seconds", "Knowledge-base search time (embedding + vector query)",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2),
)
KB_CHUNKS = Gauge("tellerloop_knowledge_chunks", "Chunks in the knowledge base collection")
FEEDBACK = Counter("tellerloop_feedback_total", "Customer ratings received (changes count again)", ["rating"])
FLAGS = Counter("tellerloop_staff_flags_total", "Staff flags raised")
ENQUEUED = Counter("tellerloop_review_enqueued_total", "Exchanges put in the review queue when served", ["reason"])
LABELS = Counter("tellerloop_review_labels_total", "Review labels submitted", ["verdict"])
RESOLVED = Counter("tellerloop_review_resolved_total", "Review items resolved", ["resolution"])
REVIEW_ITEMS = Gauge("tellerloop_review_items", "Review items by status (refreshed on every review action)", ["status"])
ROUTED = Counter("tellerloop_experiment_routed_total", "Requests the A/B split routed, by variant and arm",
                 ["variant", "arm"])
ADAPTER_MEMORY = Gauge("tellerloop_variant_weight_bytes", "Weight memory per served variant (base: the model; an adapter: its own LoRA matrices)",
                       ["variant"])
ARM = Gauge("tellerloop_experiment_arm", "Running experiment's online metrics per arm (refreshed on evaluation)",
            ["variant", "arm", "metric"])
P_BETTER = Gauge("tellerloop_experiment_probability_better",
                 "P(challenger's thumbs-up rate > champion's) at the last evaluation")
EVALUE = Gauge("tellerloop_experiment_evalue",
               "Combined e-value of the running experiment at the last evaluation (challenger better / worse)",
               ["direction"])
RUNS = Counter("tellerloop_retraining_runs_total", "Retraining runs ended, by outcome (this gateway's runs)", ["status"])
ADAPTER_REFUSALS = Counter("tellerloop_adapter_refusals_total", "Adapter versions refused at load (bad checksum, bad files)")
DECISIONS = Counter("tellerloop_serving_decisions_total", "Promote / retire / rollback decisions", ["action", "automatic"])
