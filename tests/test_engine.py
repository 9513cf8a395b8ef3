"""The local engine on a tiny random-weight model: batching correctness, limits, cancellation."""

import asyncio

import pytest

from gateway.engine.base import (
    ContextLengthExceeded,
    EngineOverloaded,
    Finished,
    GenerationRequest,
    SamplingParams,
    TokenEvent,
)
from gateway.engine.local import LocalEngine

QUESTIONS = [
    "How do I reset my password?",
    "What are the fees for an international wire transfer to Germany?",
    "hi",
    "My card was stolen yesterday evening while I was travelling, what now?",
    "Can I open a joint savings account online?",
    "Explain compound interest",
]


@pytest.fixture(scope="module")
async def engine(tiny_model_dir):
    eng = LocalEngine(str(tiny_model_dir), dtype="float32", max_batch=4, max_queue=32, max_context_tokens=512)
    await eng.start()
    yield eng
    await eng.stop()


async def run(engine, content, **params):
    params.setdefault("max_tokens", 24)
    stream = await engine.submit(GenerationRequest("t", [{"role": "user", "content": content}], SamplingParams(**params)))
    events = [e async for e in stream]
    tokens = [e for e in events if isinstance(e, TokenEvent)]
    fin = events[-1]
    assert isinstance(fin, Finished)
    return "".join(e.text for e in events), tokens, fin


async def test_concurrent_requests_match_sequential_ones(engine):
    """Continuous batching must not mix sequences: greedy outputs equal one-at-a-time outputs,
    even with more requests than batch slots (some join a running batch mid-flight)."""
    sequential = [await run(engine, q, max_tokens=10 + 3 * i) for i, q in enumerate(QUESTIONS)]
    concurrent = await asyncio.gather(*[run(engine, q, max_tokens=10 + 3 * i) for i, q in enumerate(QUESTIONS)])
    for (s_text, s_tok, s_fin), (c_text, c_tok, c_fin) in zip(sequential, concurrent):
        assert [t.token_id for t in c_tok] == [t.token_id for t in s_tok]
        assert c_text == s_text
        assert c_fin.completion_tokens == s_fin.completion_tokens
    assert len({t for t, _, _ in sequential}) > 1


async def test_max_tokens_and_logprobs(engine):
    text, tokens, fin = await run(engine, "hello", max_tokens=7, top_logprobs=3)
    assert fin.finish_reason in {"length", "stop"}
    assert len(tokens) == fin.completion_tokens <= 7
    for t in tokens:
        assert t.logprob <= 0
        assert len(t.top_logprobs) == 3
        assert t.top_logprobs[0][1] >= t.logprob  # the chosen token cannot beat the best one


async def test_stop_string_truncates(engine):
    text, _, _ = await run(engine, "hello", max_tokens=30)
    assert len(text) > 4
    stop = text[3:5]
    cut, _, fin = await run(engine, "hello", max_tokens=30, stop=(stop,))
    assert fin.finish_reason == "stop"
    assert stop not in cut and text.startswith(cut)


async def test_seeded_sampling_is_reproducible(engine):
    a, _, _ = await run(engine, "hello", temperature=1.0, seed=7)
    b, _, _ = await run(engine, "hello", temperature=1.0, seed=7)
    c, _, _ = await run(engine, "hello", temperature=1.0, seed=8, top_p=0.9)
    assert a == b
    assert isinstance(c, str)


async def test_context_limit_is_enforced_before_generation(engine):
    with pytest.raises(ContextLengthExceeded, match="maximum context length is 512"):
        await engine.submit(GenerationRequest("t", [{"role": "user", "content": "word " * 600}], SamplingParams(max_tokens=8)))
    with pytest.raises(ContextLengthExceeded):
        await engine.submit(GenerationRequest("t", [{"role": "user", "content": "hi"}], SamplingParams(max_tokens=600)))


async def test_closing_the_stream_cancels_generation(engine):
    stream = await engine.submit(GenerationRequest("t", [{"role": "user", "content": "hi"}], SamplingParams(max_tokens=400)))
    first = await stream.__anext__()
    assert isinstance(first, TokenEvent)
    await stream.aclose()
    for _ in range(100):
        if engine.stats()["active"] == 0:
            break
        await asyncio.sleep(0.05)
    stats = engine.stats()
    assert (stats["queued"], stats["active"], stats["kv_cache_bytes"]) == (0, 0, 0)  # the slots are freed too


async def test_full_queue_is_refused(tiny_model_dir):
    eng = LocalEngine(str(tiny_model_dir), dtype="float32", max_batch=1, max_queue=1)
    await eng.start()
    try:
        req = GenerationRequest("t", [{"role": "user", "content": "hi"}], SamplingParams(max_tokens=200))
        running = await eng.submit(req)
        await running.__anext__()  # admitted: occupies the single batch slot
        waiting = await eng.submit(req)  # fills the queue
        with pytest.raises(EngineOverloaded):
            await eng.submit(req)
        await running.aclose()
        await waiting.aclose()
    finally:
        await eng.stop()


async def test_concurrent_model_loads_do_not_corrupt_weights(tiny_model_dir):
    """The gateway loads the chat model and the embedder on two threads at start. transformers'
    loading is not thread-safe; unserialised, this produced garbage tokens after a few loads."""
    from gateway.knowledge.embeddings import Embedder

    req = GenerationRequest("t", [{"role": "user", "content": "hello"}], SamplingParams(max_tokens=4))
    outputs = []
    for _ in range(3):
        eng = LocalEngine(str(tiny_model_dir), dtype="float32", max_context_tokens=512)
        await asyncio.gather(eng.start(), asyncio.to_thread(lambda: Embedder().embed(["hi"])))
        try:
            outputs.append([(e.token_id, round(e.logprob, 4)) async for e in await eng.submit(req) if isinstance(e, TokenEvent)])
        finally:
            await eng.stop()
    assert outputs[0] and outputs == [outputs[0]] * 3


# ---- many adapters in one batch -------------------------------------------------------------

def _save_adapter(model_dir, target, seed: int, **lora) -> str:
    """A PEFT LoRA adapter with random, visibly non-zero weights on every attention projection."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    config = dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], init_lora_weights=False)
    peft = get_peft_model(base, LoraConfig(**{**config, **lora}))
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.mul_(0.3)
    peft.save_pretrained(target)
    return str(target)


@pytest.fixture(scope="module")
def tiny_adapters(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {
        "a1": _save_adapter(tiny_model_dir, root / "a1", 1),
        "a2": _save_adapter(tiny_model_dir, root / "a2", 2, use_rslora=True),
    }


@pytest.fixture
async def lora_engine(tiny_model_dir, tiny_adapters):
    eng = LocalEngine(str(tiny_model_dir), dtype="float32", max_batch=8, max_queue=32, max_context_tokens=512)
    await eng.start()
    for name, path in tiny_adapters.items():
        await eng.load_adapter(name, path)
    yield eng
    await eng.stop()


async def run_on(engine, adapter, content, max_tokens=16):
    request = GenerationRequest("t", [{"role": "user", "content": content}], SamplingParams(max_tokens=max_tokens), adapter=adapter)
    events = [e async for e in await engine.submit(request)]
    return [e.token_id for e in events if isinstance(e, TokenEvent)], [e.logprob for e in events if isinstance(e, TokenEvent)]


async def test_adapter_answers_match_peft(lora_engine, tiny_model_dir, tiny_adapters):
    """Each unmerged adapter served from the shared base gives PEFT's own greedy answer (the
    reference implementation), so the scaling (alpha/r, rsLoRA) and the target layers are right."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    for name, path in tiny_adapters.items():
        ours, logprobs = await run_on(lora_engine, name, QUESTIONS[1], max_tokens=12)
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), path).eval()
        ids = lora_engine.encode([{"role": "user", "content": QUESTIONS[1]}])
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, eos_token_id=None)
        reference = out[0, len(ids):].tolist()
        assert ours == reference[: len(ours)] and len(ours) >= 1
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, -1].float()
        first = float(torch.log_softmax(logits, -1)[reference[0]])
        assert logprobs[0] == pytest.approx(first, abs=1e-4)


async def test_variants_decode_together_and_match_alone(lora_engine):
    """Base, a1 and a2 requests share one batch; every answer equals the one it gets alone, and the
    adapters really change the answers (otherwise this test could not fail)."""
    plan = [(variant, q) for q in QUESTIONS[:4] for variant in (None, "a1", "a2")]
    alone = [await run_on(lora_engine, v, q) for v, q in plan]
    together = await asyncio.gather(*[run_on(lora_engine, v, q) for v, q in plan])
    assert [t for t, _ in together] == [t for t, _ in alone]
    by_variant = {v: [alone[i][0] for i, (pv, _) in enumerate(plan) if pv == v] for v in (None, "a1", "a2")}
    assert by_variant[None] != by_variant["a1"] and by_variant["a1"] != by_variant["a2"]


async def test_adapters_cost_megabytes_not_a_model_copy(lora_engine):
    sizes = lora_engine.weight_bytes()
    assert set(sizes) == {"base", "a1", "a2"}
    assert 0 < sizes["a1"] < sizes["base"] / 10


async def test_unload_under_load_finishes_in_flight_streams(lora_engine):
    """A request already decoding on a retired version finishes on it, with every token; new
    requests cannot name it once its matrices are gone, after the last one is done (a request routed to
    it just before the swap is still served)."""
    from gateway.engine.base import UnknownAdapter

    alone, _ = await run_on(lora_engine, "a1", QUESTIONS[0], max_tokens=40)
    a1_bytes = lora_engine.weight_bytes()["a1"]
    request = GenerationRequest("t", [{"role": "user", "content": QUESTIONS[0]}], SamplingParams(max_tokens=40), adapter="a1")
    stream = await lora_engine.submit(request)
    first = await stream.__anext__()
    assert isinstance(first, TokenEvent)  # decoding now
    resident = lora_engine.stats()["adapter_bytes"]
    assert await lora_engine.unload_adapter("a1")
    assert lora_engine.variants() == ["base", "a2"] and "a1" not in lora_engine.weight_bytes()
    assert lora_engine.stats()["adapter_bytes"] == resident  # still in memory: a request is decoding on it
    rest = [e async for e in stream]
    assert [first.token_id] + [e.token_id for e in rest if isinstance(e, TokenEvent)] == alone
    for _ in range(100):
        if lora_engine.stats()["adapter_bytes"] < resident:
            break
        await asyncio.sleep(0.02)
    assert lora_engine.stats()["adapter_bytes"] == resident - a1_bytes  # freed once its last request finished
    with pytest.raises(UnknownAdapter):
        await lora_engine.submit(request)


async def test_a_folder_that_is_not_a_lora_adapter_is_refused(lora_engine, tmp_path, tiny_model_dir):
    from gateway.engine.lora import AdapterFormatError

    with pytest.raises(AdapterFormatError, match="not a PEFT adapter"):
        await lora_engine.load_adapter("bad", str(tmp_path))
    dora = _save_adapter(tiny_model_dir, tmp_path / "dora", 3, use_dora=True)
    with pytest.raises(AdapterFormatError, match="DoRA"):
        await lora_engine.load_adapter("dora", dora)
    assert lora_engine.variants() == ["base", "a1", "a2"]


async def test_long_prompts_are_read_in_chunks_while_others_decode(tiny_model_dir):
    """With a prefill chunk far smaller than the prompts, answers are unchanged (chunked prefill is
    exact) and a short request admitted with long ones gets its answer alone-identical too."""
    eng = LocalEngine(str(tiny_model_dir), dtype="float32", max_batch=4, max_queue=32,
                      max_context_tokens=1024, prefill_chunk_tokens=32, kv_block_tokens=16)
    await eng.start()
    try:
        prompts = ["word " * 150 + "end?", "hi", QUESTIONS[3] * 5, QUESTIONS[1]]
        alone = [(await run(eng, p, max_tokens=20))[1] for p in prompts]
        together = await asyncio.gather(*[run(eng, p, max_tokens=20) for p in prompts])
        assert [[t.token_id for t in tok] for _, tok, _ in together] == [[t.token_id for t in tok] for tok in alone]
    finally:
        await eng.stop()


async def test_a_shared_system_prompt_is_read_once_and_answers_do_not_change(tiny_model_dir, tiny_adapters):
    """The KV of a prompt prefix shared with the previous prompt (the system prompt) is stored once
    and copied into later requests' slots, per variant: answers and log-probs are those of an engine
    that recomputes every prompt."""
    system = "You are the bank's assistant. " * 8
    asks = [(v, q) for v in (None, "a1") for q in QUESTIONS[:4]]

    async def answers(engine):
        async def one(variant, question):
            messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
            stream = await engine.submit(GenerationRequest("t", messages, SamplingParams(max_tokens=12), adapter=variant))
            return [(e.token_id, round(e.logprob, 4)) async for e in stream if isinstance(e, TokenEvent)]
        sequential = [await one(v, q) for v, q in asks]
        together = await asyncio.gather(*[one(v, q) for v, q in asks])
        return sequential, list(together)

    results, hits = {}, {}
    for entries in (8, 0):
        eng = LocalEngine(str(tiny_model_dir), dtype="float32", max_batch=8, max_context_tokens=512,
                          prefix_cache_entries=entries, prefix_min_tokens=16)
        await eng.start()
        try:
            await eng.load_adapter("a1", tiny_adapters["a1"])
            results[entries] = await answers(eng)
            hits[entries] = eng.stats()["prefix_hits"]
        finally:
            await eng.stop()
    assert hits[0] == 0 and hits[8] >= 8  # every request after the first of each variant reused it
    assert results[8] == results[0]
    assert results[0][0] == results[0][1]  # and batching changes nothing either


def test_bf16_head_recomputes_the_leading_logits_exactly():
    """The bf16 head's leading logits are float32's own values, so greedy decoding picks float32's
    token; the rest keep their bf16 approximation."""
    import torch

    from gateway.engine.precision import Bf16Head

    torch.manual_seed(0)
    weight, x = torch.randn(5000, 64), torch.randn(3, 64)
    exact = x @ weight.T
    assert Bf16Head(weight, weight, tied=True).exact_top == 20  # the API's largest top_logprobs
    head = Bf16Head(weight, weight, tied=True, exact_top=16)
    logits = head(x)
    assert head.weight16.dtype == torch.bfloat16
    assert torch.equal(logits.argmax(-1), exact.argmax(-1))
    top = torch.nn.functional.linear(x.bfloat16(), weight.bfloat16()).float().topk(16, dim=-1).indices  # recomputed
    assert torch.allclose(logits.gather(-1, top), exact.gather(-1, top), atol=1e-5)
    assert not torch.allclose(logits, exact, atol=1e-5)  # the others are bf16 approximations
    assert torch.allclose(logits, exact, rtol=0.02, atol=0.1)


def test_bf16_mixed_reads_the_float32_embedding_from_the_checkpoint(tiny_model_dir, tmp_path):
    """The float32 residual stream starts from the checkpoint's own float32 values; a checkpoint
    without safetensors files falls back to the loaded bf16 tensor, upcast."""
    import torch
    from transformers import AutoModelForCausalLM

    from gateway.engine.precision import read_float32

    stored = AutoModelForCausalLM.from_pretrained(tiny_model_dir).model.embed_tokens.weight.detach()
    rounded = stored.to(torch.bfloat16)
    assert not torch.equal(rounded.float(), stored)  # the checkpoint holds more than bf16 does
    assert torch.equal(read_float32(tiny_model_dir, "model.embed_tokens.weight", rounded), stored)
    assert torch.equal(read_float32(tmp_path, "model.embed_tokens.weight", rounded), rounded.float())


def test_bf16_mixed_untied_head_and_unsupported_layers(tiny_model_dir, tmp_path):
    """An untied head keeps its own float32 matrix beside the float32 embedding (and the
    parameter count stays the checkpoint's); a layer that is not the Llama pre-norm one is refused with the dtypes that work."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from gateway.engine.precision import mix_precision

    config = LlamaConfig.from_pretrained(tiny_model_dir)
    config.tie_word_embeddings = False
    torch.manual_seed(5)
    untied = LlamaForCausalLM(config)
    torch.nn.init.normal_(untied.model.norm.weight, 1.0, 0.02)  # not bf16-exact, unlike the initial ones
    untied.save_pretrained(tmp_path / "untied")
    stored = AutoModelForCausalLM.from_pretrained(tmp_path / "untied")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "untied", dtype=torch.bfloat16)
    mix_precision(model, tmp_path / "untied")
    assert torch.equal(model.lm_head.exact, stored.lm_head.weight.detach())
    assert torch.equal(model.model.embed_tokens.weight, stored.model.embed_tokens.weight.detach())
    assert model.model.norm.weight.dtype == torch.float32
    assert torch.equal(model.model.norm.weight, stored.model.norm.weight.detach())
    assert model.lm_head.exact.dtype == torch.float32 and model.lm_head.weight16.dtype == torch.bfloat16
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in stored.parameters())

    odd = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)
    odd.model.layers[0].pre_feedforward_layernorm = torch.nn.Identity()
    with pytest.raises(ValueError, match="float32"):
        mix_precision(odd, tiny_model_dir)


def test_prepacked_float32_weights_match_plain_ones_and_ignore_the_rest_of_the_batch():
    """oneDNN's prepacked layout computes what `nn.Linear` does, and a row's result is the same
    bit for bit whatever else shares its step (what float32's batched = alone rests on)."""
    import torch

    from gateway.engine.packed import PackedLinear

    torch.manual_seed(3)
    plain = torch.nn.Linear(96, 200)
    packed = PackedLinear(plain.weight, plain.bias, rows_hint=16)
    x = torch.randn(70, 96)
    with torch.inference_mode():
        out = packed(x)
        assert out.shape == (70, 200) and torch.allclose(out, plain(x), atol=1e-5)
        for rows in (1, 3, 16, 33, 70):
            assert torch.equal(packed(x[:rows]), out[:rows])
            assert torch.equal(packed(x[-rows:]), out[-rows:])
        assert torch.equal(packed(x[None]), out[None])  # [batch, tokens, features] as the layers pass it


async def test_prepacked_engine_answers_like_the_plain_one(tiny_model_dir, tiny_adapters):
    """`engine.prepack_rows = 0` serves with plain `nn.Linear`s; the prepacked default gives the same
    answers (up to a float32 near-tie) and log-probs, with and without an adapter."""
    from transformers import AutoConfig

    packed = LocalEngine(str(tiny_model_dir), dtype="float32", max_batch=4, max_context_tokens=512)
    plain = LocalEngine(str(tiny_model_dir), dtype="float32", max_batch=4, max_context_tokens=512, prepack_rows=0)
    for eng in (packed, plain):
        await eng.start()
        await eng.load_adapter("a1", tiny_adapters["a1"])
    try:
        config = AutoConfig.from_pretrained(tiny_model_dir)  # the prepacked head is its own copy of the tied matrix
        assert packed.weight_bytes()["base"] - plain.weight_bytes()["base"] == config.vocab_size * config.hidden_size * 4
        for variant, question in [(None, QUESTIONS[0]), ("a1", QUESTIONS[1]), ("a1", QUESTIONS[3])]:
            (tokens, logprobs), (ref, ref_logprobs) = [await run_on(e, variant, question) for e in (packed, plain)]
            n = next((i for i, (a, b) in enumerate(zip(tokens, ref)) if a != b), len(tokens))
            assert n >= 1 and logprobs[:n] == pytest.approx(ref_logprobs[:n], abs=1e-3)
    finally:
        await packed.stop()
        await plain.stop()


def test_auto_dtype_is_bf16_mixed_only_on_a_cpu_with_bf16_instructions(monkeypatch, tiny_model_dir):
    """`model.dtype = "auto"` (the default): on a CPU that would emulate bf16 (AVX2 only, where a
    bf16 decode step measured 3x slower than float32) the engine runs float32; with AVX512-BF16 or
    AMX, bf16-mixed. Explicit names are taken as asked."""
    import torch

    from gateway.engine.precision import resolve_dtype

    for avx512_bf16, amx, expected in ((False, False, "float32"), (True, False, "bf16-mixed"), (False, True, "bf16-mixed")):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v)
        assert resolve_dtype("auto") == expected
        assert LocalEngine(str(tiny_model_dir)).dtype == expected
        assert resolve_dtype("bfloat16") == "bfloat16" and resolve_dtype("float32") == "float32"


async def test_bf16_mixed_keeps_the_residual_stream_float32_and_tracks_float32(tiny_model_dir, tiny_adapters):
    """`bf16-mixed`: the decoder weights and the LoRA matrices in bfloat16 (half float32's bytes),
    the embedding matrix kept float32 (the residual stream and the exact head read it) and the
    layers' output float32 while decoding; base and adapter rows batched track the same rows alone
    and the float32 engine."""
    import torch
    from transformers import AutoModelForCausalLM

    eng = LocalEngine(str(tiny_model_dir), dtype="bf16-mixed", max_batch=8, max_context_tokens=512)
    full = LocalEngine(str(tiny_model_dir), dtype="float32", max_batch=2, max_context_tokens=512)
    await eng.start()
    await full.start()
    try:
        await eng.load_adapter("a1", tiny_adapters["a1"])
        await full.load_adapter("a1", tiny_adapters["a1"])
        sizes, fp32_sizes = eng.weight_bytes(), full.weight_bytes()
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        params = sum(p.numel() for p in model.parameters())
        embed = model.model.embed_tokens.weight.numel()  # tied with the head
        norm = model.model.norm.weight.numel()
        buffers = sum(b.numel() * b.element_size() for b in model.buffers())
        # float32: the weights, plus the output head's own prepacked copy of the (tied) embedding matrix
        assert fp32_sizes["base"] == params * 4 + embed * 4 + buffers
        # bf16 weights; the embedding and the final norm in float32 (+2 bytes each); the head's bf16 copy (+2)
        assert sizes["base"] - buffers == params * 2 + embed * 4 + norm * 2
        assert sizes["a1"] * 2 == fp32_sizes["a1"]  # LoRA matrices in bf16 too

        plan = [(variant, q) for q in QUESTIONS[:4] for variant in (None, "a1")]
        alone = [await run_on(eng, v, q) for v, q in plan]
        together = await asyncio.gather(*[run_on(eng, v, q) for v, q in plan])
        reference = [await run_on(full, v, q) for v, q in plan]
        assert [alone[i][0] for i in (0, 2)] != [alone[i][0] for i in (1, 3)]  # the adapter is applied
        # bf16 kernels block by batch size, so only float32 is exact batched = alone (tested above);
        # here each row agrees batched, alone and with float32 up to where a near-tie first flips
        # (the first token at least), with log-probs within 0.05 over the decoded tokens they share
        for (tokens, logprobs), *others in zip(alone, together, reference):
            for other, other_logprobs in others:
                n = next((i for i, (a, b) in enumerate(zip(tokens, other)) if a != b), len(tokens))
                assert n >= 1 and logprobs[:n] == pytest.approx(other_logprobs[:n], abs=0.05)

        streams = set()  # the residual stream the decoder layers hand on (into the final norm) is float32
        hook = eng.model.model.norm.register_forward_pre_hook(lambda module, args: streams.add(args[0].dtype))
        await run_on(eng, None, QUESTIONS[0], max_tokens=4)
        hook.remove()
        assert streams == {torch.float32}
    finally:
        await eng.stop()
        await full.stop()


def test_only_the_engine_thread_computes_on_several_openmp_threads():
    """threads.py: a serving process keeps one multi-threaded OpenMP team (the worker's); every
    other thread computes on one, so libgomp never throttles the worker's spinning. Found through
    torch's own library even where scikit-learn's libgomp copy is loaded too."""
    import re
    import threading

    import sklearn.linear_model  # noqa: F401 - loads scikit-learn's own libgomp
    import torch

    from gateway.engine.threads import default_threads, on_all_cores, serve_single_threaded, use_threads_here

    def counts() -> tuple[int, int]:
        info = torch.__config__.parallel_info()  # of the calling thread
        return torch.get_num_threads(), int(re.search(r"mkl_get_max_threads\(\) : (\d+)", info).group(1))

    def in_thread(fn):
        out = []
        t = threading.Thread(target=lambda: out.append(fn()))
        t.start()
        t.join()
        return out[0]

    try:
        serve_single_threaded()
        assert in_thread(counts) == (1, 1)
        assert in_thread(lambda: (use_threads_here(2), counts())[1]) == (2, 2)
        assert in_thread(counts) == (1, 1)  # the worker's count did not become the default
        everything = default_threads()
        assert in_thread(on_all_cores(counts)) == (everything, everything)  # bulk work on its own thread
    finally:
        torch.set_num_threads(default_threads())


async def test_work_in_its_own_thread_returns_and_raises_and_the_thread_ends():
    import threading

    from gateway.engine.threads import in_own_thread

    def work(x: int) -> int:
        return x * 2

    def fail() -> None:
        raise ValueError("bad input")

    assert await asyncio.wait_for(in_own_thread(work, 21), 10) == 42
    for _ in range(20):  # the error reaches the caller however the threads interleave (never a hang)
        with pytest.raises(ValueError, match="bad input"):
            await asyncio.wait_for(in_own_thread(fail), 10)
    assert not [t for t in threading.enumerate() if t.name in ("work", "fail")]


def test_an_architecture_the_lean_forward_does_not_reproduce_is_refused():
    """slots.forward runs the Llama layout's arithmetic itself; a model whose attention differs
    (Qwen3 normalises q and k) must be refused at load with the reason, not served wrong."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    from gateway.engine.slots import llama_parts

    small = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                 num_attention_heads=4, num_key_value_heads=2)
    assert llama_parts(LlamaForCausalLM(LlamaConfig(**small))) is not None
    with pytest.raises(ValueError, match="Llama layout"):
        llama_parts(Qwen3ForCausalLM(Qwen3Config(head_dim=8, **small)))


def test_a_burst_of_prompts_is_read_shortest_first_whole():
    """`next_chunk` (the cohort's prompts, most unread first): as many of the shortest as fit in the
    chunk budget are read to the end in one step, so most of a burst starts answering after the
    first step; a prompt longer than the budget is read in budget-sized pieces."""
    from gateway.engine.local import next_chunk

    assert next_chunk([30, 30, 30, 30], 64) == (2, 30)  # two whole prompts now, two next step
    assert next_chunk([45] * 16, 512) == (11, 45)
    assert next_chunk([300, 120, 40, 20], 200) == (2, 40)  # 3 x 120 would be 360
    assert next_chunk([300, 120, 40, 20], 400) == (3, 120)  # 20 and 40 padded to 120
    assert next_chunk([900], 512) == (1, 512)
    assert next_chunk([900, 700], 512) == (1, 512)  # the shorter first, in pieces
    assert next_chunk([10], 512) == (1, 10)
