"""In-process transformers backend: one continuous batch for every served variant.

One worker thread owns the model. Requests wait in a bounded queue; the worker admits a cohort of
waiting requests (up to `max_batch` sequences in flight) and reads their prompts in chunks of about
`prefill_chunk_tokens` tokens, each chunk in the same forward pass as the running batch's next
token (`slots.StepPlan`): a long prompt never stalls the streams already answering, the weights are
read once per step, and a sequence starts decoding as soon as its own prompt is read. Within a
cohort the shortest prompts are read first, whole, as many as fit in a chunk (`_next_chunk`). Keys and
values live in preallocated slots (`slots.SlotCache`), written in place, so a step costs the same
at token 10 and token 500. All blocking model work stays on the worker thread; the event loop only
awaits per-request queues.

Adapters: one base model; each loaded LoRA version is a few MB of unmerged matrices
(`lora.LoraBank`), and every row of the batch names its variant, so the champion, a challenger
and the base decode together in the same forward pass. Loading or unloading a version never stops
the others (hot swap). Unloading only retires a version: new requests can no longer name it, but
every request already submitted for it (queued or decoding) finishes on it; its matrices go once
none is left.

Text is detokenised incrementally (only the newest tokens are decoded), holding back an incomplete
UTF-8 character and anything that could still become a stop string.
"""

from __future__ import annotations

import asyncio
import os
import queue
import random
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable

import structlog
import torch
from transformers import (  # at import time: lazy imports are not thread-safe
    AutoModelForCausalLM,
    AutoTokenizer,
)

from gateway.core.loading import MODEL_LOAD_LOCK
from gateway.engine.base import (
    ContextLengthExceeded,
    EngineFailure,
    EngineOverloaded,
    Finished,
    GenerationRequest,
    TokenEvent,
    UnknownAdapter,
)
from gateway.engine.lora import LoraBank
from gateway.engine.fused import fuse_projections
from gateway.engine.packed import pack_linears
from gateway.engine.precision import (
    AUTO,
    MIXED,
    mix_precision,
    native_bf16,
    resolve_dtype,
)
from gateway.engine.slots import ATTENTION, SlotCache, StepPlan, forward, llama_parts
from gateway.engine.threads import default_threads, serve_single_threaded, use_threads_here

log = structlog.get_logger(__name__)

# `model.dtype` → the dtype the model is loaded in (and of its KV slots); "bf16-mixed" loads bfloat16 and
# then reads the embedding matrix again in float32 for the residual stream and the exact head (`precision.py`)
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, MIXED: torch.bfloat16}


@dataclass(eq=False)
class _Sequence:
    request: GenerationRequest
    prompt_ids: list[int]
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    cancelled: threading.Event = field(default_factory=threading.Event)
    generator: torch.Generator | None = None
    out_ids: list[int] = field(default_factory=list)
    text: str = ""  # decoded answer so far
    emitted: int = 0  # characters of `text` already sent
    prefix_offset: int = 0  # incremental detokenisation window over out_ids
    read_offset: int = 0
    last_token: int = -1  # sampled but not yet fed to the model
    row: int = -1  # its KV slot
    kv_len: int = 0  # tokens in its slot
    share: int = 0  # >0: store the first `share` prompt tokens' KV once read (a shared prefix)
    done: bool = False

    @property
    def variant(self) -> str:
        return self.request.adapter or "base"

    def send(self, event: object) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop is gone (shutdown): nobody is listening
            self.cancelled.set()


@dataclass(eq=False)
class _Cohort:
    """Sequences whose prompts are read together, in consecutive slot rows from `first_row`, most
    unread prompt tokens first: rows whose prompt is fully read form a suffix and start decoding
    where they are, and later chunks run on the remaining prefix."""

    seqs: list[_Sequence]
    first_row: int
    reading: int = 0  # rows (a prefix) still reading their prompt


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
    """transformers model with unmerged LoRA variants, served from a worker thread."""

    def __init__(
        self,
        model: str | Callable[[], str],
        *,
        dtype: str = AUTO,
        max_context_tokens: int = 2048,
        max_batch: int = 8,
        max_queue: int = 64,
        torch_threads: int = 0,
        prepack_rows: int = 32,
        prefill_chunk_tokens: int = 512,
        kv_block_tokens: int = 64,
        prefix_cache_entries: int = 8,
        prefix_min_tokens: int = 32,
    ) -> None:
        self.name = "local"
        self._model_source = model  # a path, or a callable resolving one (e.g. the one-time GGUF conversion)
        self.model_path = model if isinstance(model, str) else ""
        self.max_context_tokens = max_context_tokens
        self.requested_dtype = dtype
        self.dtype = resolve_dtype(dtype)  # "auto": bf16-mixed where the CPU multiplies bf16 in hardware, else float32
        self._dtype = _DTYPES[self.dtype]  # of the weights and the KV cache (bf16-mixed: not of the residual stream)
        self._mixed = self.dtype == MIXED
        self._max_batch = max_batch
        self._chunk_tokens = prefill_chunk_tokens
        self._kv_block = kv_block_tokens
        self._prefix_entries = prefix_cache_entries
        self._prefix_min = prefix_min_tokens
        self._prefixes: OrderedDict[tuple[str, tuple[int, ...]], object] = OrderedDict()  # LRU
        self._last_prompt: dict[str, list[int]] = {}
        self._prefix_hits = 0
        self._stale_variants: set[str] = set()
        self._pending: queue.Queue[_Sequence] = queue.Queue(maxsize=max_queue)
        self._threads = torch_threads or default_threads()  # the worker thread's OpenMP threads
        # one multi-threaded OpenMP team in the process, the worker's (threads.py): from here on every
        # other thread, the loader and the knowledge base's embedders included, computes on one
        serve_single_threaded()
        self._prepack_rows = prepack_rows
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self.model = None
        self.tokenizer = None
        self._bank: LoraBank | None = None
        self._retiring: set[str] = set()  # unloaded, freed once no submitted request needs them
        self._adapters_lock = threading.Lock()  # submit's check-and-enqueue vs the worker's freeing
        self._model_lock = threading.Lock()  # installing adapter matrices vs a forward pass
        self._cache: SlotCache | None = None
        self._running: list[_Sequence] = []
        self._cohort: _Cohort | None = None
        self._steps = 0
        self._step_seconds = 0.0
        self._tokens = 0  # prompt + generated tokens through the model

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

    def unready(self) -> tuple[str, str] | None:
        return None if self.ready else ("model_loading", "The model is still loading; retry shortly.")

    @property
    def adapter_paths(self) -> dict[str, str]:
        return {name: a.path for name, a in self._bank.adapters.items()} if self._bank else {}

    def variants(self) -> list[str]:
        loaded = set(self._bank.adapters) if self._bank else set()
        return ["base", *sorted(loaded - self._retiring)]

    def weight_bytes(self) -> dict[str, int]:
        """Memory held for each served variant: the base model's weights, and each adapter's own
        LoRA matrices (adapters share the base)."""
        if self.model is None or self._bank is None:
            return {}
        sizes = {"base": sum(t.numel() * t.element_size() for t in (*self.model.parameters(), *self.model.buffers()))}
        sizes.update({n: a.nbytes for n, a in self._bank.adapters.items() if n not in self._retiring})
        return sizes

    async def load_adapter(self, name: str, path: str) -> None:
        """Load a LoRA adapter folder as variant `name` (unmerged, next to the others)."""
        if name == "base":
            raise ValueError("'base' is reserved for the base model")
        with self._adapters_lock:
            if name in self._retiring and self.adapter_paths.get(name) == str(path):
                self._retiring.discard(name)  # still in memory: serve it again
                return
        await asyncio.to_thread(self._load_adapter, name, str(path))

    async def unload_adapter(self, name: str) -> bool:
        """Stop routing new requests to `name`; its matrices go once its last request finishes."""
        with self._adapters_lock:
            if self._bank is None or name not in self._bank.adapters or name in self._retiring:
                return False
            self._retiring.add(name)
        if self._thread is None or not self._thread.is_alive():
            self._free_retired(set())
        return True

    def _free_retired(self, busy: set[str]) -> None:
        """Drop retired versions no running sequence (`busy`) and no queued request still needs."""
        if not self._retiring:
            return
        with self._adapters_lock, self._pending.mutex:
            waiting = {seq.variant for seq in self._pending.queue}
            for name in list(self._retiring):
                if name not in busy and name not in waiting:
                    self._retiring.discard(name)
                    self._stale_variants.add(name)
                    with self._model_lock:
                        self._bank.remove(name)
                    log.info("engine.adapter_freed", adapter=name)

    def _load_adapter(self, name: str, path: str) -> None:
        started = time.perf_counter()
        deltas = self._bank.read(name, path)  # reads and validates files; no model change yet
        with self._adapters_lock, self._model_lock:
            if name in self._bank.adapters:
                self._bank.remove(name)  # reloading a name replaces its matrices
            self._stale_variants.add(name)
            info = self._bank.add(name, path, deltas)
            self._retiring.discard(name)
        log.info("engine.adapter_loaded", adapter=name, rank=info.rank, modules=info.modules,
                 bytes=info.nbytes, seconds=round(time.perf_counter() - started, 3))

    def stats(self) -> dict[str, int]:
        cache = self._cache
        kv = cache.nbytes() if cache is not None else 0
        resident = sum(a.nbytes for a in self._bank.adapters.values()) if self._bank else 0
        return {"queued": self._pending.qsize(), "active": len(self._in_flight()), "kv_cache_bytes": kv,
                "steps": self._steps, "step_ms": int(self._step_seconds * 1000), "tokens": self._tokens,
                "prefix_hits": self._prefix_hits,
                "adapter_bytes": resident}  # every adapter in memory, retired ones still draining included

    def _load(self) -> None:
        if not self.model_path:
            self.model_path = self._model_source()
        started = time.perf_counter()
        with MODEL_LOAD_LOCK:
            self.tokenizer = AutoTokenizer.from_pretrained(self.model_path, local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(
                self.model_path, dtype=self._dtype, local_files_only=True, attn_implementation=ATTENTION
            )
        llama_parts(model)
        parameters = sum(p.numel() for p in model.parameters())
        if self._mixed:
            mix_precision(model, self.model_path)
        fused = fuse_projections(model)  # q/k/v and gate/up as one matrix each (fused.py)
        packed = pack_linears(model, self._prepack_rows) if self._prepack_rows else 0
        if self._dtype == torch.bfloat16 and not native_bf16():
            log.warning("engine.bf16_emulated", dtype=MIXED if self._mixed else "bfloat16",
                        hint="this CPU lacks AVX512-BF16 and AMX: bf16 matmuls are emulated, ~3x slower than float32; use model.dtype = \"auto\" or \"float32\"")
        self.model = model.eval()
        self._bank = LoraBank(self.model)
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
            dtype=self.dtype,
            requested_dtype=self.requested_dtype,
            seconds=round(time.perf_counter() - started, 2),
            parameters=parameters,
            fused_projections=fused,
            prepacked_linears=packed,
        )

    # ---- request side (event loop) ---------------------------------------------------------
    def encode(self, messages: list[dict[str, str]]) -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _serves(self, adapter: str | None) -> bool:
        return adapter in (None, "base") or (self._bank is not None and adapter in self._bank.adapters)

    async def check(self, request: GenerationRequest) -> list[int]:
        """The prompt's token ids, if the request could be generated (else the refusal `submit` gives)."""
        if not self._serves(request.adapter):
            raise UnknownAdapter(f"adapter {request.adapter!r} is not loaded")
        prompt_ids = await asyncio.to_thread(self.encode, request.messages)
        limit = self.max_context_tokens
        if len(prompt_ids) + request.params.max_tokens > limit:
            raise ContextLengthExceeded(len(prompt_ids), request.params.max_tokens, limit)
        return prompt_ids

    async def submit(self, request: GenerationRequest) -> LocalTokenStream:
        """A request for a retiring version is still accepted: it was routed there before the swap."""
        prompt_ids = await self.check(request)
        seed = request.params.seed
        generator = None
        if request.params.temperature > 0:
            generator = torch.Generator().manual_seed(seed if seed is not None else random.getrandbits(63))
        seq = _Sequence(request, prompt_ids, asyncio.get_running_loop(), asyncio.Queue(), generator=generator)
        with self._adapters_lock:  # so the worker cannot free the adapter between the check and the put
            if not self._serves(request.adapter):
                raise UnknownAdapter(f"adapter {request.adapter!r} is not loaded")
            try:
                self._pending.put_nowait(seq)
            except queue.Full:
                raise EngineOverloaded("the generation queue is full; retry shortly") from None
        return LocalTokenStream(seq)

    # ---- worker thread ---------------------------------------------------------------------
    def _run(self) -> None:
        if not use_threads_here(self._threads):
            log.warning("engine.worker_threads_not_set", wanted=self._threads, got=torch.get_num_threads())
        config = self.model.config
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self._cache = SlotCache(config.num_hidden_layers, config.num_key_value_heads, head_dim, self._dtype,
                                max_rows=self._max_batch, block_tokens=self._kv_block)
        with torch.inference_mode():
            while not self._stopping.is_set():
                self._free_retired({seq.variant for seq in self._in_flight()})  # a retired adapter's matrices go once it has drained
                if self._cohort is None:
                    self._admit()
                if self._cohort is None and not self._running:
                    continue
                try:
                    with self._model_lock:
                        started = time.perf_counter()
                        self._step()
                        self._steps += 1
                        self._step_seconds += time.perf_counter() - started
                except Exception as exc:  # noqa: BLE001 - never let the worker die
                    log.exception("engine.step_failed")
                    self._fail_all(exc)
        for seq in self._in_flight():
            if not seq.done:
                seq.send(Finished("cancelled", len(seq.prompt_ids), len(seq.out_ids)))

    def _in_flight(self) -> list[_Sequence]:
        """Running sequences and those still reading their prompt (also read by stats() off-thread)."""
        cohort = self._cohort
        return list(self._running) + (cohort.seqs[: cohort.reading] if cohort is not None else [])

    def _fail_all(self, exc: Exception) -> None:
        for seq in self._in_flight():
            if not seq.done:
                seq.done = True
                seq.send(EngineFailure(f"generation failed: {type(exc).__name__}"))
            self._cache.release(seq.row)
        self._running, self._cohort = [], None

    def _admit(self) -> None:
        """Form the next prefill cohort from waiting requests (blocks briefly when idle)."""
        newcomers: list[_Sequence] = []
        room = self._max_batch - len(self._running)
        while len(newcomers) < room:
            try:
                idle = not (self._running or newcomers)
                seq = self._pending.get(timeout=0.05) if idle else self._pending.get_nowait()
            except queue.Empty:
                break
            if seq.cancelled.is_set():
                seq.send(Finished("cancelled", len(seq.prompt_ids), 0))
                continue
            if not self._serves(seq.request.adapter):  # unloaded between submit and admission
                seq.send(EngineFailure(f"adapter {seq.request.adapter!r} was unloaded"))
                continue
            newcomers.append(seq)
        if newcomers:
            try:
                with self._model_lock:  # a (re)loaded adapter cannot slip between the purge and the lookup
                    self._purge_prefixes()
                    self._admit_cohort(newcomers)
            except Exception as exc:  # noqa: BLE001 - never let the worker die; nobody waits in silence
                log.exception("engine.admit_failed")
                for seq in newcomers:
                    self._cache.release(seq.row)
                    seq.done = True
                    seq.send(EngineFailure(f"generation failed: {type(exc).__name__}"))
                self._cohort = None

    def _admit_cohort(self, newcomers: list[_Sequence]) -> None:
        pairs = [(seq, self._shared_prefix(seq)) for seq in newcomers]
        pairs.sort(key=lambda pair: len(pair[0].prompt_ids) - pair[1][0], reverse=True)  # most unread first
        first = self._cache.allocate(len(pairs))
        for i, (seq, (tokens, prefix)) in enumerate(pairs):
            seq.row = first + i
            if prefix is not None:
                self._cache.write_prefix(seq.row, prefix)  # its shared prompt prefix is not recomputed
                seq.kv_len = tokens
        self._cohort = _Cohort([seq for seq, _ in pairs], first, reading=len(pairs))

    # ---- shared prompt prefixes (the system prompt every request repeats) --------------------
    def _shared_prefix(self, seq: _Sequence) -> tuple[int, object]:
        """The longest stored prefix of `seq`'s prompt for its variant: (tokens, KV) or (0, None).
        Otherwise, if its prompt shares at least `prefix_min_tokens` leading tokens with the last
        prompt of that variant, mark that prefix to be stored once this prompt has been read."""
        if not self._prefix_entries:
            return 0, None
        ids = seq.prompt_ids
        matches = [key for key in self._prefixes
                   if key[0] == seq.variant and len(key[1]) < len(ids) and tuple(ids[: len(key[1])]) == key[1]]
        if matches:
            key = max(matches, key=lambda k: len(k[1]))
            self._prefixes.move_to_end(key)
            self._prefix_hits += 1
            return len(key[1]), self._prefixes[key]
        last = self._last_prompt.get(seq.variant)
        self._last_prompt[seq.variant] = ids
        if last is not None:
            common = min(len(os.path.commonprefix([last, ids])), len(ids) - 1)
            if common >= self._prefix_min:
                seq.share = common
        return 0, None

    def _purge_prefixes(self) -> None:
        """Forget stored prefixes of variants whose weights changed (reloaded or freed)."""
        with self._adapters_lock:
            stale, self._stale_variants = self._stale_variants, set()
        if stale:
            for key in [k for k in self._prefixes if k[0] in stale]:
                del self._prefixes[key]
            for variant in stale:
                self._last_prompt.pop(variant, None)

    def _remember_prefix(self, seq: _Sequence) -> None:
        if seq.share and seq.kv_len >= seq.share:
            key = (seq.variant, tuple(seq.prompt_ids[: seq.share]))
            if key not in self._prefixes:
                self._prefixes[key] = self._cache.read_prefix(seq.row, seq.share)
                while len(self._prefixes) > self._prefix_entries:
                    self._prefixes.popitem(last=False)
            seq.share = 0

    def _step(self) -> None:
        """One forward pass: the next token of every running sequence plus, if a cohort is being
        admitted, the next chunk of its prompts."""
        running, cohort = self._running, self._cohort
        running.sort(key=lambda seq: seq.variant)  # each adapter's tokens form one contiguous run (lora.py)
        nd = len(running)
        ids = [seq.last_token for seq in running]
        variants = [seq.variant for seq in running]
        plan = StepPlan(self._cache, torch.tensor([s.row for s in running], dtype=torch.long),
                        torch.tensor([s.kv_len for s in running], dtype=torch.long))
        pick = list(range(nd))
        ending: list[_Sequence] = []
        if cohort is not None:
            reading, tokens = self._next_chunk(cohort)
            plan.chunk_row = cohort.first_row + cohort.reading - len(reading)
            plan.chunk_rows, plan.chunk_tokens = len(reading), tokens
            plan.chunk_starts = torch.tensor([seq.kv_len for seq in reading], dtype=torch.long)
            for i, seq in enumerate(reading):
                part = seq.prompt_ids[seq.kv_len : seq.kv_len + tokens]
                ids.extend(part)
                ids.extend([self._pad_id] * (tokens - len(part)))
                variants.extend([seq.variant] * tokens)
                seq.kv_len += len(part)
                if seq.kv_len == len(seq.prompt_ids):
                    ending.append(seq)
                    pick.append(nd + i * tokens + len(part) - 1)
        self._bank.route(variants)
        self._tokens += plan.tokens
        logits = forward(self.model, plan, torch.tensor(ids, dtype=torch.long), torch.tensor(pick, dtype=torch.long))
        for seq in running:
            seq.kv_len += 1
        for seq in reading if cohort is not None else ():
            self._remember_prefix(seq)
        self._sample(running + ending, logits)
        if ending:
            cohort.reading -= len(ending)  # a suffix of the reading rows: they decode in place from now on
            running.extend(ending)
            if cohort.reading == 0:
                self._cohort = None
        for i in reversed(range(len(running))):
            seq = running[i]
            if seq.cancelled.is_set() and not seq.done:
                self._finish(seq, "cancelled")
            if seq.done:
                self._cache.release(seq.row)
                running[i] = running[-1]
                running.pop()

    def _next_chunk(self, cohort: _Cohort) -> tuple[list[_Sequence], int]:
        rows = cohort.seqs[: cohort.reading]
        count, tokens = next_chunk([len(seq.prompt_ids) - seq.kv_len for seq in rows], self._chunk_tokens)
        return rows[-count:], tokens

    def _sample(self, seqs: list[_Sequence], logits: torch.Tensor) -> None:
        logprobs = torch.log_softmax(logits, dim=-1)
        entropies = torch.special.entr(logprobs.exp()).sum(-1).tolist()  # a confidence signal, one op per step
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
            self._emit(seq, token, logprobs[row], entropies[row])

    def _detokenize(self, seq: _Sequence, final: bool = False) -> None:
        """Append the text of the newest tokens to `seq.text`, decoding only a short window (the
        tokens since the last complete character, plus the previous ones for spacing). An
        incomplete UTF-8 character waits for its next token unless this is the end."""
        decode = self.tokenizer.decode
        ids = seq.out_ids
        before = decode(ids[seq.prefix_offset : seq.read_offset], skip_special_tokens=True)
        after = decode(ids[seq.prefix_offset :], skip_special_tokens=True)
        if len(after) > len(before) and (final or not after.endswith("\ufffd")):
            seq.text += after[len(before) :]
            seq.prefix_offset, seq.read_offset = seq.read_offset, len(ids)

    def _emit(self, seq: _Sequence, token: int, logprobs: torch.Tensor, entropy: float | None = None) -> None:
        params = seq.request.params
        self._detokenize(seq)
        text = seq.text
        finish = None
        if params.stop:
            start = max(0, seq.emitted - max(len(s) for s in params.stop))
            hits = [i for i in (text.find(s, start) for s in params.stop) if i >= 0]
            if hits:
                text, finish = text[: min(hits)], "stop"
        if finish is None and len(seq.out_ids) >= params.max_tokens:
            finish = "length"
            self._detokenize(seq, final=True)
            text = seq.text
        safe = len(text)
        if finish is None and params.stop:  # hold back what could be the start of a stop string
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
                entropy=None if entropy is None else round(entropy, 5),
            )
        )
        seq.emitted = safe
        if finish is not None:
            self._finish(seq, finish, remainder=text[seq.emitted :])

    def _finish(self, seq: _Sequence, reason: str, remainder: str | None = None) -> None:
        if remainder is None:
            if reason == "cancelled":
                remainder = ""
            else:
                self._detokenize(seq, final=True)
                remainder = seq.text[seq.emitted :]
        seq.done = True
        seq.send(Finished(reason, len(seq.prompt_ids), len(seq.out_ids), text=remainder))


def next_chunk(unread: list[int], budget: int) -> tuple[int, int]:
    """Which prompts of a cohort the next step reads: (how many, counted from the end; tokens
    each). `unread` is the reading rows' unread prompt tokens, most first (the cohort's order), so
    the fewest are at the end: as many of those as can be read to the end within `budget` tokens
    (each reads as many as the longest of them; shorter ones are padded), or, if even the shortest
    does not fit, the next `budget` tokens of it.

    Shortest-first gives the median newcomer of a burst its first token after one step instead of
    after the whole burst's prompts (every row read a slice of its prompt in every step before),
    for the same prompt tokens per step."""
    take = 0
    for count in range(1, len(unread) + 1):
        if count * unread[-count] > budget:  # unread[-count]: the most in the last `count`
            break
        take = count
    if take == 0:
        return 1, min(budget, unread[-1])
    return take, unread[-take]


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
