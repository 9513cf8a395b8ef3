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
    assert engine.stats() == {"queued": 0, "active": 0}


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
    from gateway.rag.embeddings import Embedder

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
