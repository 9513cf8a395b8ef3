"""Shared fixtures.

- `real_model_dir`: the embedded SmolLM2 converted once (GGUF → safetensors), cached in
  `.cache/test-models` so repeated local runs skip the ~30 s conversion; a clean clone converts.
- `tiny_model_dir`: a random-weight 2-layer Llama with SmolLM2's real tokenizer and chat template,
  for fast plumbing tests.
- `make_settings`: settings on a temporary data dir.
- `serve`: starts a real `tellerloop serve` process and waits until /ready.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
import time
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("TELLERLOOP_TEST_CACHE", ROOT / ".cache" / "test-models"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Two defaults that would make other tests' queues and registries depend on chance or on the shipped
# adapter: the random audit sample and the first-start registration. Their own tests set them.
os.environ.setdefault("TELLERLOOP_REVIEW__AUDIT_SHARE", "0")
os.environ.setdefault("TELLERLOOP_RETRAINING__SHIPPED_ADAPTER", "")


@pytest.fixture(scope="session")
def real_model_dir() -> Path:
    from gateway.engine.model_files import convert_embedded

    return convert_embedded(CACHE)


@pytest.fixture(scope="session")
def tiny_model_dir(real_model_dir: Path) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    target = CACHE / "tiny-llama-v1"
    if (target / "model.safetensors").is_file():
        return target
    tokenizer = AutoTokenizer.from_pretrained(real_model_dir)
    torch.manual_seed(1234)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    tmp = CACHE / ".tiny-llama.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target


@pytest.fixture(scope="session")
def faq_chroma_dir(tmp_path_factory) -> Path:
    """A data dir whose embedded Chroma holds the demo FAQ, ingested once per session (~25 s)."""
    from gateway.core.settings import load_settings
    from gateway.knowledge.embeddings import Embedder
    from gateway.knowledge.store import KnowledgeBase

    data_dir = tmp_path_factory.mktemp("faq-kb")
    kb = KnowledgeBase(load_settings().rag, data_dir, Embedder())
    result = kb.ingest_bytes("faq.csv", (ROOT / "data" / "bank_faq" / "faq.csv").read_bytes())
    assert result.chunks == result.added == 1039
    del kb
    return data_dir / "chroma"


def seed_knowledge(data_dir: Path, faq_chroma_dir: Path) -> None:
    shutil.copytree(faq_chroma_dir, data_dir / "chroma")


@pytest.fixture
def make_settings(tmp_path: Path):
    """Settings on a fresh data dir. The demo FAQ is not auto-ingested (slow) unless a test asks."""
    from gateway.core.settings import load_settings

    def _make(model_dir: Path | str = "", **sections):
        sections.setdefault("storage", {})
        sections["storage"].setdefault("data_dir", str(tmp_path / "var"))
        sections.setdefault("model", {})
        sections["model"].setdefault("base", str(model_dir))
        sections.setdefault("logging", {}).setdefault("json", True)
        sections.setdefault("rag", {}).setdefault("demo_data", "")
        sections.setdefault("retraining", {}).setdefault("enabled", False)  # tests start the scheduler themselves
        return load_settings(None, **sections)

    return _make


@asynccontextmanager
async def ready_client(app, settings):
    """Litestar's in-process test client, once the app reports ready (model loaded in the background)."""
    from litestar.testing import AsyncTestClient

    async with AsyncTestClient(app) as c:
        for _ in range(300):
            if (await c.get("/ready")).status_code == 200:
                break
            await asyncio.sleep(0.1)
        assert (await c.get("/ready")).status_code == 200, (await c.get("/ready")).text
        c.settings, c.app = settings, app
        yield c


@asynccontextmanager
async def served_client(app, settings):
    """The app behind a real uvicorn server in this event loop, with a real HTTP client: responses
    stream chunk by chunk (the in-process test transports buffer a whole response first), so a test
    can act while streams are provably in flight."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    task = asyncio.create_task(server.serve())
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=120) as c:
            for _ in range(600):
                try:
                    if (await c.get("/ready")).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                await asyncio.sleep(0.1)
            assert (await c.get("/ready")).status_code == 200
            c.settings, c.app = settings, app
            yield c
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 60)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(base_url: str, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(f"{base_url}/ready", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise TimeoutError("server did not become ready")


class Server:
    def __init__(self, base_url: str, proc: subprocess.Popen, log_path: Path, data_dir: Path) -> None:
        self.base_url, self.proc, self.log_path, self.data_dir = base_url, proc, log_path, data_dir

    def log(self) -> str:
        return self.log_path.read_text()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def start_server(tmp: Path, config_toml: str, extra_env: dict | None = None, port: int | None = None) -> Server:
    port = port or free_port()
    cfg = tmp / "test.toml"
    cfg.write_text(config_toml)
    log_path = tmp / f"server-{port}-{time.monotonic_ns()}.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(extra_env or {})}
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "serve", "--config", str(cfg), "--port", str(port),
         "--data-dir", str(tmp / "var")],
        cwd=ROOT, env=env, stdout=log_path.open("w"), stderr=subprocess.STDOUT,
    )
    server = Server(f"http://127.0.0.1:{port}", proc, log_path, tmp / "var")
    try:
        wait_ready(server.base_url, proc)
    except Exception:
        server.stop()
        raise RuntimeError(f"server failed to start:\n{log_path.read_text()[-4000:]}")
    return server


@pytest.fixture(scope="session")
def real_server(tmp_path_factory, real_model_dir: Path, faq_chroma_dir: Path):
    """One real gateway process on the real SmolLM2, with the demo FAQ knowledge base, for all
    end-to-end tests (the FAQ is pre-ingested by copying the session's Chroma dir, which is what
    the server's own first-start ingestion would produce, only faster)."""
    tmp = tmp_path_factory.mktemp("real-server")
    seed_knowledge(tmp / "var", faq_chroma_dir)
    server = start_server(tmp, f'[model]\nbase = "{real_model_dir}"\n[retraining]\nenabled = false\n')
    yield server
    server.stop()


def pytest_terminal_summary(terminalreporter, exitstatus, config):  # noqa: ANN001
    skipped = terminalreporter.stats.get("skipped", [])
    pg = [r for r in skipped if "POSTGRES" in str(r.longrepr)]
    if pg:
        terminalreporter.write_sep("!", f"{len(pg)} PostgreSQL test(s) SKIPPED: set TELLERLOOP_TEST_POSTGRES_URL", red=True)
    browser = [r for r in skipped if "BROWSER" in str(r.longrepr)]
    if browser:
        terminalreporter.write_sep("!", f"{len(browser)} browser test(s) SKIPPED: install Debian chromium", red=True)


# ---- adapters without training ------------------------------------------------------------------
async def make_adapter(settings, model_dir: Path, state: str, seed: int) -> str:
    """A real PEFT LoRA adapter on `model_dir` with random (non-zero) weights, registered and sealed
    like a trained one, then moved to `state` (candidate | challenger | champion). Serving, routing
    and promotion do not care how good it is; the tests script the quality through feedback."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from gateway.adapters.registry import AdapterRegistry
    from gateway.core.runtime import open_database
    from gateway.experiments.repository import Experiments

    async with open_database(settings) as sessions:
        registry = AdapterRegistry(sessions, settings.storage.data_dir)
        adapter = await registry.create(run_id=None, base_model=str(model_dir), parent=None, config={"test": True})
        torch.manual_seed(seed)
        base = AutoModelForCausalLM.from_pretrained(model_dir)
        peft = get_peft_model(base, LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                               init_lora_weights=False))
        with torch.no_grad():  # a small, visible change: the tests want working variants, not garbage
            for name, p in peft.named_parameters():
                if "lora_B" in name:
                    p.mul_(0.01)
        peft.save_pretrained(registry.path(adapter.version))
        await registry.seal(adapter.version)
        await registry.transition(adapter.version, "candidate")
        if state == "champion":
            await Experiments(settings, sessions, registry).promote(adapter.version, "test")
        elif state == "challenger":
            await registry.transition(adapter.version, "challenger")
        return adapter.version


PG_URL = os.environ.get("TELLERLOOP_TEST_POSTGRES_URL", "")


@asynccontextmanager
async def fresh_postgres_database(prefix: str):
    """The URL of a new, empty PostgreSQL database, dropped afterwards; skips (loudly, see the
    terminal summary) when TELLERLOOP_TEST_POSTGRES_URL is not set."""
    import uuid

    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import create_async_engine

    if not PG_URL:
        pytest.skip("POSTGRES: set TELLERLOOP_TEST_POSTGRES_URL to run the PostgreSQL tests")
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    admin = create_async_engine(PG_URL, isolation_level="AUTOCOMMIT")
    async with admin.connect() as conn:
        await conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield PG_URL.rsplit("/", 1)[0] + f"/{name}"
    finally:
        async with admin.connect() as conn:
            await conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        await admin.dispose()


class ChromaServer:
    """A real `chroma run` server on a free port, started and stopped by the test."""

    def __init__(self, path: Path) -> None:
        self.path, self.port, self.proc = path, free_port(), None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        chroma = Path(sys.executable).parent / "chroma"
        self.proc = subprocess.Popen([str(chroma), "run", "--path", str(self.path), "--host", "127.0.0.1",
                                      "--port", str(self.port)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/api/v2/heartbeat", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.3)
        raise RuntimeError("chroma server did not start")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(20)
