"""In-process transformers backend with continuous batching.

One worker thread owns the model. Requests wait in a bounded queue; between decode steps the
worker admits waiting requests (up to `max_batch` sequences in flight), prefills them, and merges
their KV cache into the running batch by left-padding, so a new request never waits for the whole
batch to finish and finished sequences leave at once (no decode slots wasted on padding).
Position ids are derived from the attention mask, so left padding changes no real token's position.
All blocking model work stays on the worker thread; the event loop only awaits per-request queues.

Adapters: each loaded LoRA version is merged into its own copy of the base weights (PEFT
`merge_and_unload`), so it decodes as fast as the base model; every variant has its own running
batch ("lane") and the worker steps the lanes in turn. Loading or unloading a version never stops
the others (hot swap). Unloading only retires a version: new requests can no longer name it, but
every request already submitted for it (queued or decoding) finishes on it; the worker frees its
weights once none is left.
"""

from __future__ import annotations

import asyncio
import queue
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import structlog
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer  # at import time: lazy imports are not thread-safe

from gateway.loading import MODEL_LOAD_LOCK
from gateway.engine.base import (
    ContextLengthExceeded,
    EngineFailure,
    EngineOverloaded,
    Finished,
    GenerationRequest,
    TokenEvent,
    UnknownAdapter,
)

log = structlog.get_logger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(eq=False)
class _Sequence:
    request: GenerationRequest
    prompt_ids: list[int]
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    cancelled: threading.Event = field(default_factory=threading.Event)
    generator: torch.Generator | None = None
    out_ids: list[int] = field(default_factory=list)
    emitted: int = 0  # characters of decoded text already sent
    last_token: int = -1  # sampled but not yet fed to the model
    done: bool = False

    def send(self, event: object) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop is gone (shutdown): nobody is listening
            self.cancelled.set()


@dataclass(eq=False)
class _Lane:
    """The running batch of one variant."""

    model: object
    batch: list[_Sequence] = field(default_factory=list)
    cache: object = None
    mask: torch.Tensor | None = None


class LocalTokenStream:
    """Async iterator over one sequence's events; closing it cancels the generation."""

    def __init__(self, seq: _Sequence) -> None:
        self._seq = seq
        self._finished = False

    def __aiter__(self) -> "LocalTokenStream":
        return self

    async def __anext__(self) -> TokenEvent | Finished:
        if self._finished:
            raise StopAsyncIteration
        try:
            event = await self._seq.events.get()
        except BaseException:
            self._seq.cancelled.set()
            raise
        if isinstance(event, BaseException):
            self._finished = True
            raise event
        if isinstance(event, Finished):
            self._finished = True
        return event

    async def aclose(self) -> None:
        self._seq.cancelled.set()
        self._finished = True


class LocalEngine:
    """transformers (PEFT-ready) model served from a worker thread."""

    def __init__(
        self,
        model: str | Callable[[], str],
        *,
        dtype: str = "bfloat16",
        max_context_tokens: int = 2048,
        max_batch: int = 8,
        max_queue: int = 64,
        torch_threads: int = 0,
    ) -> None:
        self.name = "local"
        self._model_source = model  # a path, or a callable resolving one (e.g. the one-time GGUF conversion)
        self.model_path = model if isinstance(model, str) else ""
        self.max_context_tokens = max_context_tokens
        self._dtype = _DTYPES[dtype]
        self._max_batch = max_batch
        self._pending: queue.Queue[_Sequence] = queue.Queue(maxsize=max_queue)
        self._torch_threads = torch_threads
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._active = 0
        self.model = None
        self.tokenizer = None
        self._adapters: dict[str, object] = {}  # version → merged model
        self._retiring: set[str] = set()  # unloaded, freed once no submitted request needs them
        self._adapters_lock = threading.Lock()  # submit's check-and-enqueue vs the worker's freeing
        self.adapter_paths: dict[str, str] = {}

    # ---- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        await asyncio.to_thread(self._load)
        self._thread = threading.Thread(target=self._run, name="tellerloop-engine", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 30)

    @property
    def ready(self) -> bool:
        return self.model is not None and self._thread is not None and self._thread.is_alive()

    def variants(self) -> list[str]:
        return ["base", *sorted(set(self._adapters) - self._retiring)]

    def weight_bytes(self) -> dict[str, int]:
        """Memory held by each served variant's weights (each adapter is a merged full copy)."""
        models = {"base": self.model, **{k: v for k, v in self._adapters.items() if k not in self._retiring}}
        return {name: sum(t.numel() * t.element_size() for t in (*m.parameters(), *m.buffers()))
                for name, m in models.items() if m is not None}

    async def load_adapter(self, name: str, path: str) -> None:
        """Load a LoRA adapter folder as variant `name` (merged into a fresh copy of the base)."""
        if name == "base":
            raise ValueError("'base' is reserved for the base model")
        with self._adapters_lock:
            if name in self._retiring and self.adapter_paths.get(name) == str(path):
                self._retiring.discard(name)  # still in memory: serve it again
                return
        await asyncio.to_thread(self._load_adapter, name, str(path))

    async def unload_adapter(self, name: str) -> bool:
        """Stop routing new requests to `name`; its weights go once its last request finishes."""
        with self._adapters_lock:
            if name not in self._adapters or name in self._retiring:
                return False
            self._retiring.add(name)
        if self._thread is None or not self._thread.is_alive():
            self._free_retired(set())
        return True

    def _free_retired(self, busy: set[str]) -> None:
        """Drop retired versions no lane (`busy`) and no queued request still needs."""
        if not self._retiring:
            return
        with self._adapters_lock, self._pending.mutex:
            waiting = {seq.request.adapter for seq in self._pending.queue}
            for name in list(self._retiring):
                if name not in busy and name not in waiting:
                    self._retiring.discard(name)
                    self._adapters.pop(name, None)
                    self.adapter_paths.pop(name, None)
                    log.info("engine.adapter_freed", adapter=name)

    def _load_adapter(self, name: str, path: str) -> None:
        started = time.perf_counter()
        with MODEL_LOAD_LOCK:
            base = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=self._dtype, local_files_only=True)
            merged = PeftModel.from_pretrained(base, path).merge_and_unload().eval()
        with self._adapters_lock:
            self._adapters[name] = merged
            self.adapter_paths[name] = path
            self._retiring.discard(name)
        log.info("engine.adapter_loaded", adapter=name, seconds=round(time.perf_counter() - started, 2))

    def stats(self) -> dict[str, int]:
        return {"queued": self._pending.qsize(), "active": self._active}

    def _load(self) -> None:
        if self._torch_threads:
            torch.set_num_threads(self._torch_threads)
        if not self.model_path:
            self.model_path = self._model_source()
        started = time.perf_counter()
        with MODEL_LOAD_LOCK:
            self.tokenizer = AutoTokenizer.from_pretrained(self.model_path, local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=self._dtype, local_files_only=True)
        self.model = model.eval()
        tok = self.tokenizer
        stop_ids = {tok.eos_token_id}
        for special in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>"):
            tid = tok.convert_tokens_to_ids(special)
            if isinstance(tid, int) and tid != tok.unk_token_id:
                stop_ids.add(tid)
        gen_eos = getattr(model.generation_config, "eos_token_id", None)
        stop_ids.update(gen_eos if isinstance(gen_eos, list) else [gen_eos])
        self._stop_ids = {t for t in stop_ids if t is not None}
        self._pad_id = tok.pad_token_id if tok.pad_token_id is not None else min(self._stop_ids)
        log.info(
            "engine.loaded",
            model=self.model_path,
            dtype=str(self._dtype),
            seconds=round(time.perf_counter() - started, 2),
            parameters=sum(p.numel() for p in model.parameters()),
        )

    # ---- request side (event loop) ---------------------------------------------------------
    def encode(self, messages: list[dict[str, str]]) -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    async def submit(self, request: GenerationRequest) -> LocalTokenStream:
        """A request for a retiring version is still accepted: it was routed there before the swap."""
        if request.adapter not in (None, "base") and request.adapter not in self._adapters:
            raise UnknownAdapter(f"adapter {request.adapter!r} is not loaded")
        prompt_ids = await asyncio.to_thread(self.encode, request.messages)
        limit = self.max_context_tokens
        if len(prompt_ids) + request.params.max_tokens > limit:
            raise ContextLengthExceeded(len(prompt_ids), request.params.max_tokens, limit)
        seed = request.params.seed
        generator = None
        if request.params.temperature > 0:
            generator = torch.Generator().manual_seed(seed if seed is not None else random.getrandbits(63))
        seq = _Sequence(request, prompt_ids, asyncio.get_running_loop(), asyncio.Queue(), generator=generator)
        with self._adapters_lock:  # so the worker cannot free the adapter between the check and the put
            if request.adapter not in (None, "base") and request.adapter not in self._adapters:
                raise UnknownAdapter(f"adapter {request.adapter!r} is not loaded")
            try:
                self._pending.put_nowait(seq)
            except queue.Full:
                raise EngineOverloaded("the generation queue is full; retry shortly") from None
        return LocalTokenStream(seq)

    # ---- worker thread ---------------------------------------------------------------------
    def _run(self) -> None:
        lanes: dict[str, _Lane] = {}
        with torch.inference_mode():
            while not self._stopping.is_set():
                self._free_retired(set(lanes))  # a retired adapter's weights go once it has drained
                newcomers = self._admit(sum(len(lane.batch) for lane in lanes.values()))
                if not newcomers and not any(lane.batch for lane in lanes.values()):
                    continue
                arriving: dict[str, list[_Sequence]] = {}
                for seq in newcomers:
                    arriving.setdefault(seq.request.adapter or "base", []).append(seq)
                for variant in list(dict.fromkeys([*lanes, *arriving])):
                    new = arriving.get(variant, [])
                    lane = lanes.get(variant)
                    if lane is None:
                        model = self.model if variant == "base" else self._adapters.get(variant)
                        if model is None:  # unloaded between submit and admission
                            for seq in new:
                                seq.send(EngineFailure(f"adapter {variant!r} was unloaded"))
                            continue
                        lane = lanes[variant] = _Lane(model)
                    self._step(lane, new)
                    if not lane.batch:
                        del lanes[variant]
                self._active = sum(len(lane.batch) for lane in lanes.values())
        for lane in lanes.values():
            for seq in lane.batch:
                seq.send(Finished("cancelled", len(seq.prompt_ids), len(seq.out_ids)))

    def _step(self, lane: _Lane, newcomers: list[_Sequence]) -> None:
        """Prefill newcomers into the lane's batch, or advance the batch by one token."""
        try:
            if newcomers:
                logits, new_cache, new_mask = self._prefill(lane.model, newcomers)
                lane.cache, lane.mask = _merge(lane.cache, lane.mask, new_cache, new_mask)
                lane.batch = lane.batch + newcomers
                self._sample(newcomers, logits)
            elif lane.batch:
                logits, lane.mask = self._decode_step(lane.model, lane.batch, lane.cache, lane.mask)
                self._sample(lane.batch, logits)
        except Exception as exc:  # noqa: BLE001 - never let the worker die
            log.exception("engine.step_failed")
            for seq in lane.batch + newcomers:
                seq.send(EngineFailure(f"generation failed: {type(exc).__name__}"))
            lane.batch, lane.cache, lane.mask = [], None, None
        lane.batch, lane.cache, lane.mask = _drop_finished(lane.batch, lane.cache, lane.mask)

    def _admit(self, active: int) -> list[_Sequence]:
        newcomers: list[_Sequence] = []
        while active + len(newcomers) < self._max_batch:
            try:
                seq = self._pending.get(timeout=0.05) if not (active or newcomers) else self._pending.get_nowait()
            except queue.Empty:
                break
            if seq.cancelled.is_set():
                seq.send(Finished("cancelled", len(seq.prompt_ids), 0))
                continue
            newcomers.append(seq)
        return newcomers

    def _prefill(self, model, seqs: list[_Sequence]):  # noqa: ANN001
        width = max(len(s.prompt_ids) for s in seqs)
        ids = torch.full((len(seqs), width), self._pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for row, seq in enumerate(seqs):
            n = len(seq.prompt_ids)
            ids[row, width - n :] = torch.tensor(seq.prompt_ids)
            mask[row, width - n :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = model(
            input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1
        )
        return out.logits[:, -1, :].float(), out.past_key_values, mask

    def _decode_step(self, model, batch: list[_Sequence], cache, mask: torch.Tensor):  # noqa: ANN001
        ids = torch.tensor([[s.last_token] for s in batch], dtype=torch.long)
        mask = torch.cat([mask, torch.ones((len(batch), 1), dtype=torch.long)], dim=1)
        positions = mask.sum(-1, keepdim=True) - 1
        out = model(
            input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True
        )
        return out.logits[:, -1, :].float(), mask

    def _sample(self, seqs: list[_Sequence], logits: torch.Tensor) -> None:
        logprobs = torch.log_softmax(logits, dim=-1)
        for row, seq in enumerate(seqs):
            if seq.cancelled.is_set():
                self._finish(seq, "cancelled")
                continue
            params = seq.request.params
            row_logits = _apply_repetition_guards(logits[row], seq.out_ids, params)
            token = _choose(row_logits, params.temperature, params.top_p, seq.generator)
            if token in self._stop_ids:
                self._finish(seq, "stop")
                continue
            seq.out_ids.append(token)
            seq.last_token = token
            self._emit(seq, token, logprobs[row])

    def _emit(self, seq: _Sequence, token: int, logprobs: torch.Tensor) -> None:
        params = seq.request.params
        text = self.tokenizer.decode(seq.out_ids, skip_special_tokens=True)
        finish = None
        if params.stop:
            start = max(0, seq.emitted - max(len(s) for s in params.stop))
            hits = [i for i in (text.find(s, start) for s in params.stop) if i >= 0]
            if hits:
                text, finish = text[: min(hits)], "stop"
        if finish is None and len(seq.out_ids) >= params.max_tokens:
            finish = "length"
        safe = len(text)
        if finish is None:
            if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for the rest
                safe = len(text.rstrip("\ufffd"))
            if params.stop:  # hold back what could be the start of a stop string
                safe = min(safe, len(text) - max(len(s) for s in params.stop) + 1)
        safe = max(safe, seq.emitted)
        top: tuple[tuple[str, float], ...] = ()
        if params.top_logprobs:
            values, ids = torch.topk(logprobs, params.top_logprobs)
            top = tuple((self.tokenizer.decode([i]), float(v)) for v, i in zip(values.tolist(), ids.tolist()))
        seq.send(
            TokenEvent(
                token_id=token,
                token=self.tokenizer.decode([token]),
                logprob=float(logprobs[token]),
                text=text[seq.emitted : safe],
                top_logprobs=top,
            )
        )
        seq.emitted = safe
        if finish is not None:
            self._finish(seq, finish, remainder=text[seq.emitted :])

    def _finish(self, seq: _Sequence, reason: str, remainder: str | None = None) -> None:
        if remainder is None:
            remainder = self.tokenizer.decode(seq.out_ids, skip_special_tokens=True)[seq.emitted :]
            if reason == "cancelled":
                remainder = ""
        seq.done = True
        seq.send(Finished(reason, len(seq.prompt_ids), len(seq.out_ids), text=remainder))


def _apply_repetition_guards(logits: torch.Tensor, generated: list[int], params) -> torch.Tensor:  # noqa: ANN001
    """Loop guards over the answer so far (never the prompt, which may hold context to copy).
    Log-probs reported to callers stay those of the unmodified distribution."""
    if not generated or (params.repetition_penalty == 1.0 and not params.no_repeat_ngram_size):
        return logits
    logits = logits.clone()
    if params.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(generated)), dtype=torch.long)
        values = logits[seen]
        logits[seen] = torch.where(values > 0, values / params.repetition_penalty, values * params.repetition_penalty)
    n = params.no_repeat_ngram_size
    if n and len(generated) >= n:
        prefix = tuple(generated[len(generated) - n + 1 :])
        banned = {generated[i + n - 1] for i in range(len(generated) - n + 1) if tuple(generated[i : i + n - 1]) == prefix}
        if banned:
            logits[list(banned)] = float("-inf")
    return logits


def _choose(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    if temperature <= 0 or generator is None:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        keep = sorted_probs.cumsum(-1) - sorted_probs < top_p  # always keeps the top token
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
    return int(torch.multinomial(probs, 1, generator=generator))


def _merge(cache, mask, new_cache, new_mask):
    """Append newly prefilled sequences to the running batch, left-padding the shorter cache."""
    if cache is None or mask is None or mask.shape[0] == 0:
        return new_cache, new_mask
    width = max(mask.shape[1], new_mask.shape[1])
    mask = torch.cat([_pad_left(mask, width), _pad_left(new_mask, width)], dim=0)
    for old, new in zip(cache.layers, new_cache.layers):
        old.keys = torch.cat([_pad_left(old.keys, width, dim=2), _pad_left(new.keys, width, dim=2)], dim=0)
        old.values = torch.cat([_pad_left(old.values, width, dim=2), _pad_left(new.values, width, dim=2)], dim=0)
    return cache, mask


def _pad_left(t: torch.Tensor, width: int, dim: int = 1) -> torch.Tensor:
    missing = width - t.shape[dim]
    if missing <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([torch.zeros(shape, dtype=t.dtype), t], dim=dim)


def _drop_finished(batch: list[_Sequence], cache, mask):
    """Remove finished rows and any leading columns that are now padding for every row."""
    keep = [i for i, s in enumerate(batch) if not s.done and not s.cancelled.is_set()]
    for i, s in enumerate(batch):
        if i not in keep and not s.done:  # cancelled between steps
            s.done = True
            s.send(Finished("cancelled", len(s.prompt_ids), len(s.out_ids)))
    if len(keep) == len(batch):
        return batch, cache, mask
    if not keep:
        return [], None, None
    index = torch.tensor(keep, dtype=torch.long)
    mask = mask.index_select(0, index)
    first = int((mask.sum(0) > 0).nonzero()[0])
    mask = mask[:, first:]
    for layer in cache.layers:
        layer.keys = layer.keys.index_select(0, index)[:, :, first:, :]
        layer.values = layer.values.index_select(0, index)[:, :, first:, :]
    return [batch[i] for i in keep], cache, mask
