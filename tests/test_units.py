"""Pure-function units: confidence, routing without an experiment (A/B: test_experiments; PII: test_pii)."""

import math

import pytest

from gateway.chat.confidence import is_looping, score
from gateway.chat.routing import Route, Split, UnknownModel, resolve_variant
from gateway.core.settings import ConfidenceSettings

CFG = ConfidenceSettings(truncation_penalty=0.5, loop_penalty=0.25, retrieval_weight=0.5,
                         retrieval_floor=0.3, retrieval_ceiling=0.8)


def test_confidence_is_geometric_mean_probability():
    conf = score([math.log(0.5)] * 4, "a short answer", "stop", CFG)
    assert conf.score == pytest.approx(0.5)
    assert conf.token_prob == pytest.approx(0.5)
    assert not conf.truncated and not conf.looping


def test_confidence_penalises_truncation_and_loops():
    lps = [math.log(0.8)] * 10
    base = score(lps, "fine answer here", "stop", CFG).score
    cut = score(lps, "fine answer here", "length", CFG).score
    looped = score(lps, "pay the bill " * 4, "stop", CFG).score
    assert cut == pytest.approx(base * 0.5)
    assert looped == pytest.approx(base * 0.25)


def test_confidence_of_empty_answer_is_zero():
    assert score([], "", "stop", CFG).score == 0.0


def test_retrieval_similarity_is_blended_in():
    lps = [math.log(0.6)] * 5
    assert score(lps, "answer", "stop", CFG).retrieval is None
    strong = score(lps, "answer", "stop", CFG, top_similarity=0.9)
    weak = score(lps, "answer", "stop", CFG, top_similarity=0.2)
    mid = score(lps, "answer", "stop", CFG, top_similarity=0.55)
    assert strong.score == pytest.approx(0.5 * 0.6 + 0.5 * 1.0)
    assert weak.score == pytest.approx(0.5 * 0.6)
    assert mid.retrieval == pytest.approx(0.5) and mid.top_similarity == 0.55


def test_loop_detection():
    assert is_looping("you can you can you can you can")
    assert not is_looping("Please call the branch to block your card.")


def test_routing_without_an_experiment():
    assert resolve_variant("tellerloop", "tellerloop", ["base"], Split()) == Route("base")
    assert resolve_variant("base", "tellerloop", ["base"], Split()) == Route("base", pinned=True)
    with pytest.raises(UnknownModel):
        resolve_variant("gpt-4", "tellerloop", ["base"], Split())


def test_retrieval_query_joins_the_last_user_turns():
    from gateway.chat.prompting import retrieval_query

    convo = [{"role": "system", "content": "s"}, {"role": "user", "content": "How do I get an IVR password?"},
             {"role": "assistant", "content": "By SMS."}, {"role": "user", "content": "and how long does it take?"}]
    assert retrieval_query(convo, 1) == "and how long does it take?"
    assert retrieval_query(convo, 2) == "How do I get an IVR password?\nand how long does it take?"
    assert retrieval_query(convo, 5) == retrieval_query(convo, 2)  # fewer turns than asked: all of them
    assert retrieval_query(convo[:2], 2) == "How do I get an IVR password?"


@pytest.mark.parametrize("history", ["query", "last", "system", "turns"])
def test_how_a_conversation_reaches_the_model_with_retrieval(history):
    """rag.history: the prompt a follow-up is answered from (the entries always in the system prompt)."""
    from gateway.chat.prompting import CONVERSATION_HEADER, build_messages
    from gateway.core.settings import load_settings
    from gateway.knowledge.store import Hit

    settings = load_settings(None, rag={"history": history})
    hit = Hit("1", "Q: IVR?\nA: By SMS.", 0.9, {"kind": "qa", "question": "IVR?", "answer": "By SMS."})
    convo = [{"role": "user", "content": "How do I get an IVR password?"}, {"role": "assistant", "content": "By SMS."},
             {"role": "user", "content": "and how long does it take?"}]
    built = build_messages(settings, convo, [hit])
    system, rest = built[0]["content"], built[1:]
    assert "Question: IVR?" in system
    expected = {
        "query": [{"role": "user", "content": "How do I get an IVR password?\nand how long does it take?"}],
        "last": [{"role": "user", "content": "and how long does it take?"}],
        "system": [{"role": "user", "content": "and how long does it take?"}],
        "turns": convo,
    }[history]
    assert rest == expected
    assert (CONVERSATION_HEADER in system) == (history == "system")
    assert build_messages(settings, convo[:1], [hit])[1:] == convo[:1]  # a single question: as asked
    assert build_messages(settings, convo, None)[1:] == convo  # retrieval off: the turns as sent


def test_training_device_is_explicit_about_cuda():
    import torch

    from retraining.finetune import use_cuda

    assert use_cuda("cpu") is False
    assert use_cuda("auto") is torch.cuda.is_available()
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="torch sees no CUDA device"):
            use_cuda("cuda")


def test_trim_heap_returns_freed_heap_pages_to_the_os():
    """`server.trim_heap`: glibc keeps freed heap memory mapped (the resident size stays as if nothing
    had been freed) until `malloc_trim` hands it back."""
    import sys

    from gateway.core.memory import trim_heap

    def resident() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096

    if not sys.platform.startswith("linux"):
        pytest.skip("reads /proc")
    blocks = [bytearray(64 * 1024) for _ in range(4000)]  # 256 MB in chunks under glibc's mmap threshold
    keep = blocks[-1]  # a live block at the top of the heap: freeing the others cannot shrink it by itself
    del blocks
    held = resident()
    assert trim_heap() is True
    assert resident() < held - 128 * 1024 * 1024
    del keep
