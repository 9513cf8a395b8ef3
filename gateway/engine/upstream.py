"""The `openai` backend: an OpenAI-compatible upstream server generates (vLLM first, or another
tellerloop gateway), behind the same narrow interface as the in-process engine.

Chat requests are streamed through with `logprobs` requested, and each streamed token becomes the
same `TokenEvent` the local engine emits, so confidence, logging, review and routing do not know
which backend answered. An upstream that sends no log-probabilities yields events with
`logprob=None`, and the exchange's confidence is then recorded as unavailable, not as 0.

Adapters are addressed upstream by `model` name, as vLLM serves LoRA adapters. `load_adapter`
registers a version with vLLM's dynamic LoRA API (`POST /v1/load_lora_adapter`, enabled upstream
by `VLLM_ALLOW_RUNTIME_LORA_UPDATING=True` and `--enable-lora`), from the path the upstream reads
the adapter store at (`engine.upstream_adapter_dir`). Versions are immutable (sealed by sha256),
so a name the upstream already lists is the same adapter and is not loaded again: replicas and
the trainer share one upstream without reloading each other's versions. A health task polls
`/v1/models`: that is readiness (`/ready` fails while the upstream is unreachable), and it
re-registers every wanted version an upstream restart forgot. Unloading waits for this
process's requests on the version to finish, as the local engine does.

Errors are mapped, never hung on: unreachable → `EngineUnavailable` (503 + Retry-After), the
upstream's 400 → `EngineRejected` (relayed as a 400), 404 → `UnknownAdapter`, 429/503 →
`EngineOverloaded`, a stream that breaks or stalls past `engine.upstream_read_timeout_s` →
`EngineFailure`. Timeouts and pool limits come from the settings (httpx).
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from pathlib import Path
from typing import AsyncIterator

import httpx
import structlog

from gateway.core import metrics
from gateway.core.security import safe_url
from gateway.core.settings import EngineSettings
from gateway.engine.base import (
    EngineFailure,
    EngineOverloaded,
    EngineRejected,
    EngineUnavailable,
    Finished,
    GenerationRequest,
    TokenEvent,
    UnknownAdapter,
)

log = structlog.get_logger(__name__)

BASE = "base"


def _message(response: httpx.Response) -> str:
    """The upstream's error message (OpenAI's `{"error": {"message"}}`, FastAPI's `detail`, or text)."""
    try:
        body = response.json()
    except ValueError:
        return response.text.strip()[:500] or f"HTTP {response.status_code}"
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])[:500]
        for key in ("message", "detail"):
            if body.get(key):
                return str(body[key])[:500]
    return str(body)[:500]


class UpstreamEngine:
    """An OpenAI-compatible server as the engine; adapters registered with it by name.

    `release_foreign`: whether unloading a version also unregisters it upstream when another
    process registered it (a gateway following the registry: yes; the trainer, which only borrows
    the upstream for its evaluation: no, it unregisters only what it registered itself)."""

    def __init__(self, cfg: EngineSettings, max_context_tokens: int = 2048, *, release_foreign: bool = True) -> None:
        self.name = "openai"
        self.cfg = cfg
        self.url = cfg.upstream_url.rstrip("/")
        self.max_context_tokens = max_context_tokens
        self.release_foreign = release_foreign
        self._client: httpx.AsyncClient | None = None  # chats
        self._control: httpx.AsyncClient | None = None  # health and adapter calls: never queued behind chats
        self._poller: asyncio.Task | None = None
        self._base_model: str | None = cfg.upstream_model or None
        self._upstream_ids: set[str] = set()  # what its /v1/models listed last (plus what we registered since)
        self._reachable = False
        self._reason = "not started"
        self._wanted: dict[str, str] = {}  # variant → adapter path as the upstream reads it
        self._retiring: set[str] = set()  # unloaded here; unregistered upstream once its requests finish
        self._own: set[str] = set()  # registered by this process (POST answered 200)
        self._active: Counter[str] = Counter()  # this process's streams per variant
        self._lock = asyncio.Lock()  # one adapter change or health round at a time
        self._resync: asyncio.Task | None = None  # an early health round after a 404 for a served name

    # ---- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        """Never fails because the upstream is down: `/ready` says so until the health task reaches it."""
        key = self.cfg.upstream_api_key.get_secret_value()
        common = {"base_url": self.url, "headers": {"Authorization": f"Bearer {key}"} if key else {}}
        self._client = httpx.AsyncClient(
            **common,
            timeout=httpx.Timeout(self.cfg.upstream_read_timeout_s, connect=self.cfg.upstream_connect_timeout_s,
                                  pool=self.cfg.upstream_connect_timeout_s),
            limits=httpx.Limits(max_connections=self.cfg.upstream_max_connections,
                                max_keepalive_connections=self.cfg.upstream_max_connections),
        )
        # loading an adapter can take the upstream a while; the health GET has its own shorter timeout
        self._control = httpx.AsyncClient(**common, timeout=httpx.Timeout(self.cfg.upstream_read_timeout_s,
                                                                          connect=self.cfg.upstream_connect_timeout_s))
        await self.sync()
        self._poller = asyncio.create_task(self._poll(), name="tellerloop-upstream-health")

    async def stop(self) -> None:
        for task in (self._poller, self._resync):
            if task is not None:
                task.cancel()
                try:
                    await task
                except (asyncio.CancelledError, Exception):  # noqa: BLE001
                    pass
        for client in (self._client, self._control):
            if client is not None:
                await client.aclose()
        self._reachable, self._reason = False, "stopped"

    @property
    def ready(self) -> bool:
        return self._reachable and self._base_model is not None

    def unready(self) -> tuple[str, str] | None:
        if self.ready:
            return None
        return ("upstream_unavailable", f"The inference engine upstream ({safe_url(self.url)}) is not available: "
                                        f"{self._reason}. Retry shortly.")

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.upstream_health_interval_s)
            try:
                await self.sync()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the health task must outlive any one failure
                log.exception("upstream.sync_failed")

    def _down(self, reason: str) -> None:
        if self._reachable:
            log.warning("upstream.unreachable", upstream=safe_url(self.url), reason=reason)
        self._reachable, self._reason = False, reason
        metrics.UPSTREAM_UP.set(0)

    async def sync(self) -> None:
        """One health round: list the upstream's models, choose the base model's name, register
        wanted versions it does not list (after its restart), unregister drained retired ones."""
        async with self._lock:
            try:
                response = await self._control.get("/models", timeout=self.cfg.upstream_connect_timeout_s)
            except httpx.HTTPError as exc:
                self._down(f"{type(exc).__name__} at {safe_url(self.url)}/models")
                return
            if response.status_code != 200:
                self._down(f"GET /models answered {response.status_code}: {_message(response)}")
                return
            try:
                models = [m for m in response.json()["data"] if isinstance(m, dict) and m.get("id")]
            except (ValueError, KeyError, TypeError):
                self._down("GET /models did not answer an OpenAI model list")
                return
            ids = {str(m["id"]) for m in models}
            if self.cfg.upstream_model and self.cfg.upstream_model not in ids:
                self._down(f"it does not serve engine.upstream_model {self.cfg.upstream_model!r} "
                           f"(it serves {sorted(ids)})")
                return
            if not self.cfg.upstream_model and self._base_model not in ids:
                if not models:
                    self._down("its /models list is empty")
                    return
                self._base_model = str(models[0]["id"])  # first start, or the upstream came back renamed
                log.info("upstream.base_model", model=self._base_model)
            limit = next((m.get("max_model_len") for m in models if m["id"] == self._base_model), None)
            if isinstance(limit, int) and limit > 0:
                self.max_context_tokens = limit
            was_down = not self._reachable
            self._upstream_ids, self._reachable, self._reason = ids, True, ""
            metrics.UPSTREAM_UP.set(1)
            if was_down:
                log.info("upstream.reachable", upstream=safe_url(self.url), models=len(ids))
            for name, path in list(self._wanted.items()):
                if name not in ids and name not in self._retiring:
                    try:
                        await self._register(name, path)
                    except (ValueError, EngineUnavailable) as exc:
                        log.error("upstream.adapter_register_failed", adapter=name, reason=str(exc))
            for name in list(self._retiring):
                if not self._active[name]:
                    await self._unregister(name)

    # ---- adapters --------------------------------------------------------------------------
    def variants(self) -> list[str]:
        return [BASE, *sorted(set(self._wanted) - self._retiring)]

    def weight_bytes(self) -> dict[str, int]:
        return {}  # the upstream holds the weights; it does not say how much

    def stats(self) -> dict[str, int]:
        return {"queued": 0, "active": sum(self._active.values())}

    def upstream_path(self, path: str) -> str:
        """Where the upstream reads this adapter folder: the same version folder under
        `engine.upstream_adapter_dir` (a shared volume mounted elsewhere), else the same path."""
        if not self.cfg.upstream_adapter_dir:
            return str(path)
        return str(Path(self.cfg.upstream_adapter_dir) / Path(path).name)

    async def load_adapter(self, name: str, path: str) -> None:
        """Register `name` upstream. A refusal (bad path, LoRA not enabled) raises ValueError, as
        a bad local folder does; an unreachable or busy upstream keeps it wanted, and the health
        task registers it when the upstream answers again."""
        if name == BASE:
            raise ValueError("'base' is reserved for the base model")
        upstream = self.upstream_path(path)
        async with self._lock:
            self._wanted[name] = upstream
            self._retiring.discard(name)
            if not self._reachable:
                return
            try:
                await self._register(name, upstream)
            except ValueError:
                self._wanted.pop(name, None)
                raise
            except EngineUnavailable:
                pass

    async def _register(self, name: str, path: str) -> None:
        if name in self._upstream_ids:
            return  # a version is immutable: the name the upstream lists is this adapter
        try:
            response = await self._control.post("/load_lora_adapter", json={"lora_name": name, "lora_path": path})
        except httpx.HTTPError as exc:
            raise EngineUnavailable(f"upstream unreachable while loading adapter {name}: {type(exc).__name__}") from None
        message = _message(response)
        if response.status_code == 200:
            self._own.add(name)
        elif not (response.status_code == 400 and "already been loaded" in message):
            metrics.UPSTREAM_ERRORS.labels("adapter_load").inc()
            if response.status_code in (400, 404, 409, 422):  # the upstream refuses this adapter
                raise ValueError(f"the upstream refused adapter {name} from {path}: HTTP {response.status_code}: "
                                 f"{message}")
            raise EngineUnavailable(f"the upstream could not load adapter {name} now: HTTP {response.status_code}: "
                                    f"{message}")
        self._upstream_ids.add(name)
        log.info("upstream.adapter_loaded", adapter=name, path=path)

    async def unload_adapter(self, name: str) -> bool:
        """Stop routing new requests to `name`; it is unregistered upstream once this process's
        requests on it have finished."""
        async with self._lock:
            if name not in self._wanted or name in self._retiring:
                return False
            self._retiring.add(name)
            if not self._active[name]:
                await self._unregister(name)
            return True

    async def _unregister(self, name: str) -> None:
        if self.release_foreign or name in self._own:
            try:
                response = await self._control.post("/unload_lora_adapter", json={"lora_name": name})
            except httpx.HTTPError:
                return  # still retiring: the health task tries again
            if response.status_code not in (200, 404):
                log.warning("upstream.adapter_unload_refused", adapter=name, status=response.status_code,
                            reason=_message(response))
                return
            self._upstream_ids.discard(name)
            log.info("upstream.adapter_unloaded", adapter=name)
        if name in self._retiring:  # not wanted again meanwhile
            self._retiring.discard(name)
            self._wanted.pop(name, None)
        self._own.discard(name)

    def _forgotten(self, name: str) -> None:
        """The upstream answered 404 for a name we serve: it restarted or another process unloaded
        it. Register it again now rather than at the next health round."""
        self._upstream_ids.discard(name)
        if self._resync is None or self._resync.done():
            self._resync = asyncio.create_task(self.sync())

    # ---- requests --------------------------------------------------------------------------
    def _model(self, adapter: str | None) -> str:
        if adapter in (None, BASE):
            return self._base_model or ""
        return adapter

    async def check(self, request: GenerationRequest) -> None:
        """The refusals known without asking the upstream: not ready, an adapter not served. The
        prompt's length is the upstream's to judge (it owns the tokenizer)."""
        refused = self.unready()
        if refused is not None:
            raise EngineUnavailable(refused[1])
        if request.adapter not in (None, BASE) and request.adapter not in self._wanted:
            raise UnknownAdapter(f"adapter {request.adapter!r} is not loaded")

    def _body(self, request: GenerationRequest) -> dict:
        p = request.params
        body: dict = {"model": self._model(request.adapter), "messages": request.messages, "stream": True,
                      "stream_options": {"include_usage": True}, "max_tokens": p.max_tokens,
                      "temperature": p.temperature, "top_p": p.top_p, "logprobs": True}
        if p.top_logprobs:
            body["top_logprobs"] = p.top_logprobs
        if p.stop:
            body["stop"] = list(p.stop)
        if p.seed is not None:
            body["seed"] = p.seed
        if p.repetition_penalty != 1.0:
            body["repetition_penalty"] = p.repetition_penalty  # vLLM's sampling extension (no_repeat_ngram: none)
        return {**body, **self.cfg.upstream_extra_body}

    async def submit(self, request: GenerationRequest) -> "UpstreamStream":
        """Open the upstream stream and check its status before returning, so every refusal comes
        before anything is generated; the returned stream yields the tokens, closing it closes the
        connection (the upstream stops generating). The request counts as active on its variant
        from before it is sent, so an unload cannot slip in between."""
        await self.check(request)
        variant = request.adapter or BASE
        client_request = self._client.build_request("POST", "/chat/completions", json=self._body(request),
                                                    headers={"X-Request-Id": request.request_id})
        self._active[variant] += 1
        try:
            try:
                response = await self._client.send(client_request, stream=True)
            except httpx.PoolTimeout:
                metrics.UPSTREAM_ERRORS.labels("pool").inc()
                raise EngineOverloaded("every connection to the upstream is busy (engine.upstream_max_connections); "
                                       "retry shortly") from None
            except httpx.HTTPError as exc:
                metrics.UPSTREAM_ERRORS.labels("connect").inc()
                if isinstance(exc, httpx.ConnectError):  # refused: it is down (one slow request is not)
                    self._down(f"{type(exc).__name__} on a chat request")
                raise EngineUnavailable(f"the upstream ({safe_url(self.url)}) did not answer: {type(exc).__name__}") from None
            if response.status_code != 200:
                await response.aread()
                await response.aclose()
                self._refusal(response, request, variant)
        except BaseException:
            self._finished(variant)
            raise
        return UpstreamStream(self, response, variant)

    def _finished(self, variant: str) -> None:
        self._active[variant] -= 1
        if self._active[variant] <= 0:
            del self._active[variant]

    def _refusal(self, response: httpx.Response, request: GenerationRequest, variant: str) -> None:
        status, message = response.status_code, _message(response)
        metrics.UPSTREAM_ERRORS.labels(str(status)).inc()
        if status == 404:
            if variant == BASE or variant in self._wanted:  # ours to serve: the upstream forgot it
                self._forgotten(variant)
                raise EngineUnavailable(f"the upstream does not serve {self._model(request.adapter)!r} right now "
                                        f"({message}); it is being registered again")
            raise UnknownAdapter(f"the upstream does not serve {self._model(request.adapter)!r}: {message}")
        if status in (400, 413, 422):
            code = "context_length_exceeded" if "context" in message.lower() else "invalid_request"
            raise EngineRejected(f"The upstream refused the request: {message}", code)
        if status in (429, 503):
            raise EngineOverloaded(f"the upstream is at capacity (HTTP {status}): {message}")
        log.error("upstream.refused", status=status, reason=message)
        raise EngineUnavailable(f"the upstream answered HTTP {status}: {message}")


_DRAINS: set[asyncio.Task] = set()  # finished answers' bodies being read to their end (kept from GC)


class UpstreamStream:
    """One upstream answer as TokenEvents then one Finished. Closing it before the answer is
    complete (also before the first token) closes the connection, which is how an OpenAI-compatible
    server is told to stop. Closing a complete answer reads the rest of its body (normally only the
    chunked terminator) in the background, bounded by `engine.upstream_drain_timeout_s`, so the
    connection goes back to the pool: closed unread, httpx drops it, and every answer paid a new
    TCP connection before its first token (bench/upstream.py's profile)."""

    def __init__(self, engine: UpstreamEngine, response: httpx.Response, variant: str) -> None:
        self._engine, self._response, self._variant = engine, response, variant
        self._lines = response.aiter_lines()
        self._events = self._read()
        self._closed = False
        self._complete = False  # the Finished event was read: the connection may be reused

    def __aiter__(self) -> "UpstreamStream":
        return self

    async def __anext__(self) -> TokenEvent | Finished:
        try:
            return await self._events.__anext__()
        except BaseException:
            await self.aclose()
            raise

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            await self._events.aclose()
            if self._complete:
                task = asyncio.create_task(self._drain(), name="tellerloop-upstream-drain")
                _DRAINS.add(task)
                task.add_done_callback(_DRAINS.discard)
            else:
                await self._response.aclose()
        finally:
            self._engine._finished(self._variant)

    async def _drain(self) -> None:
        try:
            async with asyncio.timeout(self._engine.cfg.upstream_drain_timeout_s):
                async for _ in self._lines:
                    pass
        except (TimeoutError, httpx.HTTPError, httpx.StreamError):
            pass  # an upstream that keeps the body open after [DONE]: the connection is dropped below
        finally:
            await self._response.aclose()

    async def _read(self) -> AsyncIterator[TokenEvent | Finished]:
        finish, usage, tokens = None, {}, 0
        timeout = self._engine.cfg.upstream_read_timeout_s
        try:
            async for line in self._lines:
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                try:
                    chunk = json.loads(data)
                except ValueError:
                    raise EngineFailure("the upstream sent a malformed stream chunk") from None
                if not isinstance(chunk, dict):
                    raise EngineFailure("the upstream sent a malformed stream chunk")
                if isinstance(chunk.get("error"), dict):
                    raise EngineFailure(f"the upstream failed mid-answer: {chunk['error'].get('message', '')}")
                if chunk.get("usage"):
                    usage = chunk["usage"]
                for choice in (chunk.get("choices") or [])[:1]:
                    text = (choice.get("delta") or {}).get("content") or ""
                    items = ((choice.get("logprobs") or {}).get("content")) or []
                    for i, item in enumerate(items):
                        tokens += 1
                        top = tuple((t["token"], float(t["logprob"])) for t in item.get("top_logprobs") or ())
                        yield TokenEvent(-1, item.get("token", ""), float(item["logprob"]),
                                         text if i == len(items) - 1 else "", top_logprobs=top)
                    if text and not items:  # an upstream that ignores `logprobs`
                        tokens += 1
                        yield TokenEvent(-1, text, None, text)
                    if choice.get("finish_reason"):
                        finish = choice["finish_reason"]
        except httpx.ReadTimeout:
            metrics.UPSTREAM_ERRORS.labels("stalled").inc()
            raise EngineFailure(f"the upstream sent nothing for {timeout:g} s (engine.upstream_read_timeout_s)") from None
        except httpx.HTTPError as exc:
            metrics.UPSTREAM_ERRORS.labels("stream").inc()
            raise EngineFailure(f"the upstream stream broke: {type(exc).__name__}") from None
        except (KeyError, TypeError, ValueError) as exc:
            raise EngineFailure(f"the upstream sent a malformed stream chunk ({type(exc).__name__})") from None
        if finish is None:
            raise EngineFailure("the upstream stream ended without finishing the answer")
        if finish in ("abort", "error"):  # vLLM: the request was aborted or failed upstream
            raise EngineFailure(f"the upstream ended the answer with finish_reason {finish!r}")
        self._complete = True
        yield Finished(finish, int(usage.get("prompt_tokens") or 0),
                       int(usage.get("completion_tokens") or tokens))
