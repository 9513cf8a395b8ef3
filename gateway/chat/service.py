"""Chat service: request → prompt → engine → confidence → durable exchange row → response.

The controller only parses and authorises; everything about a completion happens here, so the
stream and non-stream paths share one `_Run` that accumulates tokens and writes the log row.
The row is committed before the non-stream body is returned and before a stream's `[DONE]`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import random
import socket
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import AsyncIterator, Awaitable, Callable, TypeVar

import structlog

from gateway.calibration.calibrator import Calibrator
from gateway.chat.confidence import score as score_confidence
from gateway.chat.prompting import (
    CannedAnswer,
    build_messages,
    is_no_match,
    retrieval_query,
    retrieve,
    sampling_params,
)
from gateway.chat.protocol import ChatCompletion, ChatCompletionRequest, error_body
from gateway.chat.routing import (
    PinNotAllowed,
    Route,
    Split,
    UnknownModel,
    resolve_variant,
)
from gateway.core import metrics
from gateway.core.errors import (
    GenerationFailed,
    InvalidRequest,
    NotFound,
    PermissionDenied,
    TooManyRequests,
    Unavailable,
)
from gateway.core.security import ROLE_RANK, CustomerIds, Principal
from gateway.core.settings import Settings
from gateway.engine.base import (
    ContextLengthExceeded,
    Engine,
    EngineFailure,
    EngineOverloaded,
    EngineRejected,
    EngineUnavailable,
    Finished,
    GenerationRequest,
    SamplingParams,
    TokenEvent,
    TokenStream,
    UnknownAdapter,
)
from gateway.exchanges.models import STREAMING, Exchange
from gateway.exchanges.repository import ExchangeRepository
from gateway.knowledge.store import KnowledgeBase
from gateway.review.repository import ReviewRepository

log = structlog.get_logger(__name__)
T = TypeVar("T")


async def sse_events(payloads: AsyncIterator[str]) -> AsyncIterator[bytes]:
    """Server-sent-event framing (`data: …` and a blank line, CRLF as litestar writes it) of payloads
    that hold no line break (JSON from `json.dumps`, or `[DONE]`)."""
    async with contextlib.aclosing(payloads):  # a client gone mid-stream closes the chat's stream at once
        async for payload in payloads:
            yield f"data: {payload}\r\n\r\n".encode()


@dataclass
class _Run:
    """One completion in progress: what was asked and what has come back so far."""

    exchange_id: str
    request: ChatCompletionRequest
    principal: Principal
    route: Route
    messages: list[dict[str, str]]
    params: SamplingParams
    stream: TokenStream
    started: float
    created: int
    sources: list[dict] | None = None  # None: retrieval did not run
    # ok | unavailable (asked for, the knowledge base failed) | no_match (answered with the fallback) | None
    retrieval: str | None = None
    stored_query: str | None = None  # what retrieval searched, scrubbed once for every write
    top_similarity: float | None = None
    retrieval_signals: dict = field(default_factory=dict)  # rival, question_match (confidence signals)
    retrieval_ms: float | None = None
    first_token_at: float | None = None
    text: str = ""
    logprobs: list[float] = field(default_factory=list)
    entropies: list[float | None] = field(default_factory=list)
    tokens: list[TokenEvent] = field(default_factory=list)
    finished: Finished | None = None
    logprobs_missing: bool = False  # the engine streamed tokens without log-probabilities
    error: str | None = None  # why generation failed (finish_reason "error")
    opened: bool = False  # a streaming row exists (finalise it rather than insert)
    stored_messages: list[dict[str, str]] = field(default_factory=list)  # scrubbed once, for every write
    stored_conversation: list[dict[str, str]] | None = None  # the earlier turns as the client sent them, scrubbed
    stored_stop: list[str] = field(default_factory=list)

    def add(self, event: TokenEvent | Finished) -> None:
        if isinstance(event, Finished):
            self.finished = event
            self.text += event.text
            return
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        self.text += event.text
        if event.logprob is None:
            self.logprobs_missing = True
        else:
            self.logprobs.append(event.logprob)
            self.entropies.append(event.entropy)
        if self.request.logprobs:
            self.tokens.append(event)


class _Pending:
    """The stream of a run whose submit is still in flight (`_start` swaps in the real one)."""

    def __aiter__(self):  # noqa: ANN204
        raise RuntimeError("the engine call has not finished")

    async def aclose(self) -> None:
        return None


_PENDING = _Pending()


class ChatService:
    def __init__(self, settings: Settings, engine: Engine, exchanges: ExchangeRepository, reviews: ReviewRepository,
                 customers: CustomerIds, kb: KnowledgeBase | None = None) -> None:
        self.settings = settings
        self.engine = engine
        self.exchanges = exchanges
        self.reviews = reviews  # a low-confidence answer is queued in the same transaction as its row
        self.customers = customers  # `user` and session ids are stored and routed as keyed hashes only
        self.scrubber = settings.pii.scrubber()
        self._in_flight: Counter[str] = Counter()  # generations per API key (limits.concurrent_generations)
        self.served_by = f"{socket.gethostname()}:{settings.server.port}"  # whose unfinished streams are whose
        self.kb = kb
        self.split = Split()  # set by AdapterService.reconcile from the registry: champion, challenger, share
        self.calibrators: dict[str, Calibrator] = {}  # variant → its active calibrator (set by reconcile too)
        self._draw = random.Random()  # the audit sample's draws

    @property
    def default_variant(self) -> str:
        return self.split.champion

    def audit_rate(self, route: Route) -> float:
        """The probability that an answer on this route is drawn for audit. `review.audit_share` of all
        answers; during an experiment stratified by arm — each arm gets half of the audits whatever its
        traffic share — so the smaller challenger arm is measured as precisely as the champion."""
        share = self.settings.review.audit_share
        s = self.split.share
        if route.experiment_id is None or not 0 < s < 1:
            return share
        arm = s if route.variant == self.split.challenger else 1 - s
        return min(1.0, share / (2 * arm))

    # ---- preparation: everything that can fail with a 4xx happens before generation ---------
    def _validate(self, req: ChatCompletionRequest, principal: Principal,
                  session: str | None) -> tuple[Route, list[dict[str, str]], SamplingParams]:
        cfg = self.settings.model
        if len(req.messages) > cfg.max_messages:
            raise InvalidRequest(f"Too many messages: {len(req.messages)} > {cfg.max_messages}", param="messages")
        for i, m in enumerate(req.messages):
            if len(m.content) > cfg.max_message_chars:
                raise InvalidRequest(f"Message {i} is {len(m.content)} characters; the limit is {cfg.max_message_chars}",
                                     param=f"messages.{i}.content", code="context_length_exceeded")
        max_tokens = req.requested_max_tokens or cfg.default_max_tokens
        if max_tokens > cfg.max_tokens_limit:
            raise InvalidRequest(f"max_tokens is too large: {max_tokens}. This server allows at most "
                                 f"{cfg.max_tokens_limit}.", param="max_tokens")
        may_pin = ROLE_RANK[principal.role] >= ROLE_RANK[self.settings.experiment.pin_min_role]
        try:
            route = resolve_variant(req.model, cfg.name, self.engine.variants(), self.split,
                                    unit=self._customer(req.user, session), may_pin=may_pin)
        except UnknownModel as exc:
            raise NotFound(str(exc), param="model", code="model_not_found") from None
        except PinNotAllowed:
            raise PermissionDenied(f"Pinning the model version '{req.model}' needs the "
                           f"'{self.settings.experiment.pin_min_role}' role (experiment.pin_min_role); key "
                           f"'{principal.name}' has '{principal.role}'. Send model '{cfg.name}'.",
                           param="model", code="permission_denied") from None
        if req.rag_top_k is not None and req.rag_top_k > self.settings.rag.max_top_k:
            raise InvalidRequest(f"rag_top_k may be at most {self.settings.rag.max_top_k}", param="rag_top_k")
        messages = [
            {"role": "system" if m.role == "developer" else m.role, "content": m.content} for m in req.messages
        ]
        params = sampling_params(
            self.settings, max_tokens, temperature=req.temperature, top_p=req.top_p, stop=req.stop_list,
            seed=req.seed, top_logprobs=(req.top_logprobs or 0) if req.logprobs else 0,
            repetition_penalty=req.repetition_penalty,
        )
        return route, messages, params

    def _customer(self, user: str | None, session: str | None) -> str | None:
        """The routing unit: the customer's keyed id, else the session's, else none (a fresh draw)."""
        return self.customers.key(user) if user else self.customers.key(session, kind="session")

    async def start(self, req: ChatCompletionRequest, principal: Principal, session: str | None = None) -> _Run:
        """`session`: the routing unit when the request names no `user` (experiment.session_header).
        The cheap refusals (loading, the key's limit, a full queue) come before any embedding or
        tokenising. The run holds one of its key's generation slots until `finish` gives it back."""
        refused = self.engine.unready()
        if refused is not None:  # loading, or an upstream engine that is down
            metrics.REJECTED.labels("loading" if refused[0] == "model_loading" else "engine_unavailable").inc()
            raise Unavailable(refused[1], code=refused[0], retry_after=self.settings.engine.retry_after_s)
        limit = self.settings.limits.concurrent_generations
        if limit and self._in_flight[principal.name] >= limit:
            metrics.REJECTED.labels("key_limit").inc()
            raise TooManyRequests(f"API key '{principal.name}' already has {limit} generations in flight "
                                  "(limits.concurrent_generations); retry when one finishes.",
                                  code="too_many_generations", retry_after=self.settings.engine.retry_after_s)
        await self.exchanges.check()  # after a database failure: refuse at once rather than answer unrecorded
        if self.engine.stats().get("queued", 0) >= self.settings.engine.max_queue:
            metrics.REJECTED.labels("overloaded").inc()
            raise Unavailable("The server is at capacity; retry shortly.", code="overloaded",
                              retry_after=self.settings.engine.retry_after_s)
        self._in_flight[principal.name] += 1
        try:
            return await self._start(req, principal, session)
        except BaseException:
            self.finish_slot(principal)
            raise

    def finish_slot(self, principal: Principal) -> None:
        self._in_flight[principal.name] -= 1
        if self._in_flight[principal.name] <= 0:
            del self._in_flight[principal.name]

    async def _start(self, req: ChatCompletionRequest, principal: Principal, session: str | None) -> _Run:
        route, messages, params = self._validate(req, principal, session)
        variant = route.variant
        exchange_id = uuid.uuid4().hex
        started = time.perf_counter()
        use_rag = self.settings.rag.enabled_by_default if req.rag is None else req.rag
        hits, top, first, retrieval_ms, retrieval_failed, query = None, None, None, None, False, None
        signals: dict = {}
        if use_rag:
            if self.kb is None:
                raise Unavailable("The knowledge base is not available yet; retry shortly or send \"rag\": false.",
                               code="knowledge_base_unavailable",
                               retry_after=self.settings.engine.retry_after_s)
            query = retrieval_query(messages, self.settings.rag.query_turns)
            try:
                found = await retrieve(self.settings, self.kb, query, req.rag_top_k or self.settings.rag.top_k)
                hits, top, first, retrieval_ms = found.hits, found.top, found.first, found.ms
                signals = found.signals()
                metrics.RETRIEVAL_SECONDS.observe(retrieval_ms / 1000)
            except Exception as exc:  # noqa: BLE001 - a knowledge base that is down degrades the answer, not the chat
                log.warning("retrieval.unavailable", error_type=type(exc).__name__)
                metrics.RETRIEVAL_FAILURES.inc()
                retrieval_failed = True
        no_match = hits is not None and is_no_match(self.settings, first)
        turns = [m for m in messages if m["role"] != "system"]  # the conversation as the client sent it
        scrubbed = self.scrubber.scrub_conversation(turns) if len(turns) > 1 else []
        # the earlier turns; where scrubbing had to merge the turns into one, that one scrubbed message
        conversation = (scrubbed[:-1] if len(scrubbed) == len(turns) else scrubbed) or None
        messages = build_messages(self.settings, messages, hits)
        request = GenerationRequest(exchange_id, messages, params, adapter=None if variant == "base" else variant)
        structlog.contextvars.bind_contextvars(exchange_id=exchange_id, variant=variant)
        if no_match:  # nothing to answer from: the configured fallback, not an invented answer
            await self._engine_call(self.engine.check, request)  # the same refusals as a generated answer
            metrics.FALLBACKS.inc()
        run = _Run(exchange_id, req, principal, route, messages, params,
                   CannedAnswer(self.settings.rag.fallback_answer) if no_match else _PENDING, started, int(time.time()),
                   sources=None if hits is None else [h.as_source() for h in hits],
                   top_similarity=top,
                   retrieval_signals=signals,
                   retrieval_ms=retrieval_ms,
                   retrieval=None if not use_rag else "unavailable" if retrieval_failed
                   else "no_match" if no_match else "ok",
                   stored_query=None if query is None else self.scrubber.scrub(query),
                   stored_messages=self.scrubber.scrub_messages(messages),
                   stored_conversation=conversation,
                   stored_stop=[self.scrubber.scrub(s) for s in params.stop])
        # submitted now, awaited after a stream's row is written: the row's write overlaps the
        # engine's answer to the submit (an upstream's response headers, a network round trip)
        submitted = None if no_match else asyncio.ensure_future(self._engine_call(self.engine.submit, request))
        try:
            if req.stream:  # the row exists before the first token: a stream the client saw is never missing
                await self.exchanges.open(self._row(run, streaming=True))  # StorageUnavailable → 503
                run.opened = True
            if submitted is not None:
                run.stream = await submitted
        except BaseException:  # refused (4xx/503), the row not written, or cancelled: nothing is left behind
            await asyncio.shield(self._abandon(run, submitted))
            raise
        if route.experiment_id is not None:
            metrics.ROUTED.labels(variant, "challenger" if variant == self.split.challenger else "champion").inc()
        return run

    async def _abandon(self, run: _Run, submitted: asyncio.Future | None) -> None:
        """Give back what a start that failed holds: the engine call (cancelled, or the stream it
        already returned closed), and the stream's row (a refused request leaves no exchange)."""
        if submitted is None:
            await run.stream.aclose()
        else:
            submitted.cancel()  # no-op if it has finished
            try:
                opened = await submitted
            except BaseException:  # noqa: BLE001 - cancelled or refused: nothing was opened
                opened = None
            if opened is not None:
                await opened.aclose()
        if run.opened:
            try:
                await self.exchanges.discard(run.exchange_id)
            except Exception:  # noqa: BLE001 - the refusal is the answer; the gateway's restart settles the row
                log.warning("exchange.discard_failed")

    async def _engine_call(self, call: Callable[[GenerationRequest], Awaitable[T]], request: GenerationRequest) -> T:
        """`engine.submit` or `engine.check`, its refusals as domain errors (4xx/503)."""
        try:
            return await call(request)
        except ContextLengthExceeded as exc:
            metrics.REJECTED.labels("context_length").inc()
            raise InvalidRequest(str(exc), param="messages", code="context_length_exceeded") from None
        except EngineOverloaded as exc:
            metrics.REJECTED.labels("overloaded").inc()
            raise Unavailable(str(exc), code="overloaded",
                           retry_after=self.settings.engine.retry_after_s) from None
        except UnknownAdapter as exc:
            raise NotFound(str(exc), param="model", code="model_not_found") from None
        except EngineRejected as exc:  # an upstream engine's 400, relayed
            metrics.REJECTED.labels("engine_rejected").inc()
            raise InvalidRequest(str(exc), param="messages" if exc.code == "context_length_exceeded" else None,
                                 code=exc.code) from None
        except EngineUnavailable as exc:
            metrics.REJECTED.labels("engine_unavailable").inc()
            raise Unavailable(str(exc), code="upstream_unavailable",
                              retry_after=self.settings.engine.retry_after_s) from None

    # ---- non-streaming ------------------------------------------------------------------------
    async def complete(self, run: _Run) -> ChatCompletion:
        metrics.IN_FLIGHT.inc()
        try:
            async for event in run.stream:
                run.add(event)
        except EngineFailure as exc:
            self._failed(run, exc)
            await self._record_quietly(run)  # the failure is on the record, then the client hears of it
            raise GenerationFailed(str(exc), code="generation_failed") from None
        finally:
            metrics.IN_FLIGHT.dec()
            self.finish_slot(run.principal)
        row = await self._record(run)
        message: dict = {"role": "assistant", "content": run.text}
        choice: dict = {"index": 0, "message": message, "finish_reason": run.finished.finish_reason,
                        "logprobs": None}
        if run.request.logprobs:
            choice["logprobs"] = {"content": self._logprob_items(run)}
        return ChatCompletion.model_validate({
            "id": f"chatcmpl-{run.exchange_id}",
            "object": "chat.completion",
            "created": run.created,
            "model": run.request.model,
            "choices": [choice],
            "usage": self._usage(run),
            **self._extras(row),
        })

    # ---- streaming ----------------------------------------------------------------------------
    async def stream(self, run: _Run) -> AsyncIterator[str]:
        """SSE `data:` payloads; the last content chunk carries the extras, then `[DONE]`."""
        base = {"id": f"chatcmpl-{run.exchange_id}", "object": "chat.completion.chunk",
                "created": run.created, "model": run.request.model}
        metrics.IN_FLIGHT.inc()
        completed = False
        try:
            yield json.dumps({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                    "logprobs": None, "finish_reason": None}]})
            try:
                async for event in run.stream:
                    run.add(event)
                    text = event.text
                    if not text and not (isinstance(event, TokenEvent) and run.request.logprobs):
                        continue
                    choice: dict = {"index": 0, "delta": {"content": text}, "logprobs": None, "finish_reason": None}
                    if run.request.logprobs and isinstance(event, TokenEvent) and event.logprob is not None:
                        choice["logprobs"] = {"content": [self._logprob_item(event)]}
                    yield json.dumps({**base, "choices": [choice]})
            except EngineFailure as exc:
                self._failed(run, exc)
                await self._record_quietly(run)
                yield json.dumps(error_body(500, str(exc), code="generation_failed"))
                return
            try:
                row = await self._record(run)
            except Exception:  # noqa: BLE001 - the client must not see [DONE] for an unlogged exchange
                log.exception("exchange.write_failed")
                yield json.dumps(error_body(503, "The exchange could not be recorded; please retry."))
                return
            completed = True
            yield json.dumps({**base, "choices": [{"index": 0, "delta": {}, "logprobs": None,
                                                   "finish_reason": run.finished.finish_reason}],
                              "usage": self._usage(run), **self._extras(row)})
            yield "[DONE]"
        finally:
            metrics.IN_FLIGHT.dec()
            self.finish_slot(run.principal)
            if not completed and run.finished is None:
                # Client went away mid-stream: stop generating and still keep an audit row.
                await run.stream.aclose()
                run.finished = Finished("cancelled", 0, len(run.logprobs))
                await asyncio.shield(self._record_quietly(run))

    # ---- logging ------------------------------------------------------------------------------
    @staticmethod
    def _failed(run: _Run, exc: Exception) -> None:
        run.error = str(exc)[:2000]
        run.finished = Finished("error", 0, len(run.logprobs))

    def _row(self, run: _Run, streaming: bool = False) -> Exchange:
        """The exchange as stored: PII-scrubbed, the customer id keyed; while streaming, the answer
        and its scores are placeholders that `_record` overwrites."""
        fin = run.finished if not streaming else Finished(STREAMING, 0, 0)
        now = datetime.now(timezone.utc)
        p = run.params
        return Exchange(
            id=run.exchange_id,
            created_at=datetime.fromtimestamp(run.created, timezone.utc),
            completed_at=now,
            api_key_name=run.principal.name,
            user=self.customers.key(run.request.user),
            model_requested=run.request.model,
            variant=run.route.variant,
            messages=run.stored_messages,
            conversation=run.stored_conversation,
            answer="" if streaming else self.scrubber.scrub(run.text),
            finish_reason=fin.finish_reason,
            error=run.error,
            served_by=self.served_by,
            stream=run.request.stream,
            rag=run.retrieval is not None,
            retrieval=run.retrieval,
            retrieval_query=run.stored_query,
            sources=run.sources or [],
            retrieval_ms=run.retrieval_ms,
            params={"max_tokens": p.max_tokens, "temperature": p.temperature, "top_p": p.top_p,
                    "stop": run.stored_stop, "seed": p.seed,
                    "repetition_penalty": p.repetition_penalty, "no_repeat_ngram_size": p.no_repeat_ngram_size},
            prompt_tokens=fin.prompt_tokens,
            completion_tokens=fin.completion_tokens,
            ttft_ms=None,
            latency_ms=0.0,
            confidence=0.0,
            confidence_parts={},
            flagged=False,
            experiment_id=run.route.experiment_id,
            routing_unit=run.route.unit,
        )

    async def _record(self, run: _Run) -> Exchange:
        done = time.perf_counter()
        fin = run.finished
        calibrator = self.calibrators.get(run.route.variant) if self.settings.calibration.enabled else None
        conf = score_confidence(run.logprobs, run.text, fin.finish_reason, self.settings.confidence,
                                top_similarity=run.top_similarity, sources=run.sources, entropies=run.entropies,
                                **run.retrieval_signals,
                                calibrator=calibrator)
        score, parts = conf.score, conf.parts()
        threshold = calibrator.threshold_for(parts) if calibrator else self.settings.review.confidence_threshold
        if run.logprobs_missing and not run.logprobs:
            # an upstream that streams no log-probabilities: the score is unknown, not 0 (which would
            # flag every answer); the exchange is still logged, and audits still sample it
            score = None
            parts = {"unavailable": "the engine reported no token log-probabilities",
                     "top_similarity": conf.top_similarity, "truncated": conf.truncated, "looping": conf.looping}
            metrics.CONFIDENCE_UNAVAILABLE.inc()
        flagged = (score is not None and score < threshold) or run.retrieval == "no_match"  # a fallback: review
        ttft_ms = None if run.first_token_at is None else (run.first_token_at - run.started) * 1000
        row = self._row(run)
        row.ttft_ms, row.latency_ms = ttft_ms, (done - run.started) * 1000
        row.confidence, row.confidence_parts, row.flagged = score, parts, flagged
        # a cancelled or failed answer is not an answer to review; every answer may be drawn for audit,
        # independently of its score, so audit verdicts estimate each variant's quality without bias
        answered = fin.finish_reason not in ("cancelled", "error")
        rate = self.audit_rate(run.route) if answered else 0.0
        audit_rate = rate if rate > 0 and self._draw.random() < rate else None
        enqueue = answered and (flagged or audit_rate is not None)
        write = self.exchanges.finalise if run.opened else self.exchanges.add
        await write(row, functools.partial(self.reviews.enqueue_in, low_confidence=flagged, audit_rate=audit_rate)
                    if enqueue else None)
        if enqueue and flagged:
            metrics.ENQUEUED.labels("low_confidence").inc()
        if audit_rate is not None:
            metrics.ENQUEUED.labels("audit").inc()
        stream_label = str(run.request.stream).lower()
        if ttft_ms is not None:
            metrics.TTFT.labels(run.route.variant, stream_label).observe(ttft_ms / 1000)
        metrics.GENERATION_SECONDS.labels(run.route.variant, stream_label).observe(done - run.started)
        metrics.TOKENS.labels(run.route.variant).inc(fin.completion_tokens)
        metrics.PROMPT_TOKENS.labels(run.route.variant).inc(fin.prompt_tokens)
        metrics.EXCHANGES.labels(run.route.variant, fin.finish_reason, str(flagged).lower()).inc()
        if score is not None:
            metrics.CONFIDENCE.labels(run.route.variant).observe(score)
        log.info("exchange.logged", variant=run.route.variant, finish_reason=fin.finish_reason,
                 completion_tokens=fin.completion_tokens, confidence=score, flagged=flagged,
                 latency_ms=round(row.latency_ms, 1))
        return row

    async def _record_quietly(self, run: _Run) -> None:
        try:
            await self._record(run)
        except Exception:  # noqa: BLE001
            log.exception("exchange.write_failed", finish_reason=run.finished.finish_reason)

    # ---- response pieces ----------------------------------------------------------------------
    @staticmethod
    def _usage(run: _Run) -> dict:
        fin = run.finished
        return {"prompt_tokens": fin.prompt_tokens, "completion_tokens": fin.completion_tokens,
                "total_tokens": fin.prompt_tokens + fin.completion_tokens}

    @staticmethod
    def _extras(row: Exchange) -> dict:
        extras = {"exchange_id": row.id, "confidence": row.confidence, "flagged": row.flagged,
                  "variant": row.variant, "sources": row.sources}
        if row.retrieval is not None:
            extras["retrieval"] = row.retrieval
        if row.retrieval == "no_match":
            extras["fallback"] = True
        return extras

    @staticmethod
    def _logprob_item(event: TokenEvent) -> dict:
        return {
            "token": event.token,
            "logprob": event.logprob,
            "bytes": list(event.token.encode()),
            "top_logprobs": [{"token": t, "logprob": lp, "bytes": list(t.encode())} for t, lp in event.top_logprobs],
        }

    def _logprob_items(self, run: _Run) -> list[dict]:
        return [self._logprob_item(event) for event in run.tokens if event.logprob is not None]
