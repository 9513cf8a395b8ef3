"""Serving throughput and latency: the tellerloop gateway against llama.cpp and transformers' own
server, over real HTTP, in one run.

Every system gets the same prompts (Banking77 customer utterances, data/banking77/), the same
system prompt, greedy decoding, at most 64 new tokens, through a streaming OpenAI client, at 1, 4,
16 and 64 concurrent streams (each stream sends its requests back to back). Per level: aggregate
completion tokens per second, time to first token (TTFT) p50/p99, inter-token latency (ITL)
p50/p99, errors; per system: peak RSS of the server process (VmHWM).

Systems (each a fresh server process, started and stopped here):
  * `tellerloop`   - `tellerloop serve` with the shipped defaults (`model.dtype = "auto"`: bf16-mixed on a
                     CPU with bf16 instructions, else float32 with prepacked weights; logging, confidence, PII
                     scrubbing, review queue all on), retrieval off in the "plain" scenario
  * `llama.cpp`    - `llama-server -np <max streams> -cb -t <cores>` on the GGUF the product ships
                     (Q4_1), built from the llama-cpp-python sdist's vendored source for this
                     CPU's instruction sets (AMX off: the Intel VMs here trap it); cached under .cache/bench/
  * `hf-serve-cb`  - `transformers serve --continuous-batching` on the same converted model
                     (`--hf-dtype auto`: bfloat16 where the CPU has bf16 instructions, else
                     float32: the dtype the gateway's default computes in)
  * `before`       - the gateway at an earlier git ref (`--before REF`), the same-run baseline
  * `tellerloop-fp32`, `tellerloop-bf16`, `tellerloop-bf16-mixed` - the gateway with that
                     `model.dtype` (bench/dtype_quality.py: what each costs in answer quality)
  * `tellerloop-fp32-mkl` - float32 with plain `nn.Linear`s (MKL; `engine.prepack_rows = 0`): the
                     float32 engine before prepacking (gateway/engine/packed.py)
Peers are baselines only, never part of the product.

Scenarios: "plain" (system prompt + question) and "rag" (the gateway retrieves from the demo FAQ
itself; the peers are sent the very messages it builds: system prompt with the retrieved entry),
so prefill cost is compared like for like. Also the gateway's own overhead: `max_tokens=1`
requests, server time not spent in the model.

    .venv/bin/python bench/serve.py                      # everything (~40 min on 2 cores)
    .venv/bin/python bench/serve.py --systems tellerloop --levels 1,16 --scenarios plain
Writes bench/results/serve.json, serve.md and serve.png.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results"
CACHE = ROOT / ".cache" / "bench"
PROMPTS_CSV = ROOT / "data" / "banking77" / "train.csv"
MAX_TOKENS = 64
LLAMA_CPP_SDIST = "llama-cpp-python==0.3.36"
BENCH_KEY = "bench-admin-key"


# ---- prompts --------------------------------------------------------------------------------
def load_prompts(n: int) -> list[str]:
    """`n` utterances spread over the file (it is sorted by intent), in a fixed order."""
    with PROMPTS_CSV.open() as f:
        rows = [row["text"] for row in csv.DictReader(f)]
    step = max(1, len(rows) // n)
    return rows[::step][:n]


def plain_messages(settings, questions: list[str]) -> list[list[dict]]:  # noqa: ANN001
    return [[{"role": "system", "content": settings.model.system_prompt}, {"role": "user", "content": q}]
            for q in questions]


def rag_messages(settings, questions: list[str]) -> list[list[dict]]:  # noqa: ANN001
    """The messages the gateway itself builds with retrieval on (same KB, same settings)."""
    from gateway.chat.prompting import build_messages, retrieve
    from gateway.core.runtime import build_knowledge_base

    kb = build_knowledge_base(settings)  # ingests the demo FAQ on first use, as `serve` does

    async def one(q: str) -> list[dict]:
        hits, *_ = await retrieve(settings, kb, q, settings.rag.top_k)
        return build_messages(settings, [{"role": "user", "content": q}], hits)

    async def all_() -> list[list[dict]]:
        return [await one(q) for q in questions]

    return asyncio.run(all_())


# ---- servers --------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    name: str
    base_url: str
    model: str
    proc: subprocess.Popen
    log: Path
    headers: dict = field(default_factory=dict)

    def peak_rss(self) -> int:
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
        return 0

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def wait_until(url: str, proc: subprocess.Popen, log: Path, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} not ready after {timeout} s")


# the gateway with the shipped defaults ("tellerloop") or with these overrides of its config
GATEWAY_VARIANTS = {
    "tellerloop-fp32": '[model]\ndtype = "float32"\n',
    "tellerloop-fp32-mkl": '[model]\ndtype = "float32"\n[engine]\nprepack_rows = 0\n',  # plain nn.Linear (MKL)
    "tellerloop-bf16": '[model]\ndtype = "bfloat16"\n',
    "tellerloop-bf16-mixed": '[model]\ndtype = "bf16-mixed"\n',
}


def start_gateway(work: Path, rag: bool, extra_toml: str = "", root: Path = ROOT) -> Server:
    port = free_port()
    config = work / "bench.toml"
    unlimited = "[limits]\nrequests_per_minute = 0\nconcurrent_generations = 0\n" if root == ROOT else ""  # older commits lack it
    config.write_text(
        "[retraining]\nenabled = false\n" + unlimited +
        f"[rag]\nenabled_by_default = {'true' if rag else 'false'}\n"
        # every request generates, as the peers do with the same messages: most Banking77 utterances are
        # outside the demo FAQ, and the fallback would answer ~60 % of them without the model
        + ("fallback = false\n" if rag else "") +
        f'[[auth.keys]]\nname = "bench"\nrole = "admin"\nkey = "{BENCH_KEY}"\n{extra_toml}'
    )
    log = work / f"tellerloop-{port}.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "serve", "--config", str(config), "--port", str(port),
         "--data-dir", str(work / "var")],
        cwd=root, env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(root)}, stdout=log.open("w"),
        stderr=subprocess.STDOUT,
    )
    server = Server("tellerloop", f"http://127.0.0.1:{port}", "tellerloop", proc, log,
                    {"Authorization": f"Bearer {BENCH_KEY}"})
    wait_until(f"{server.base_url}/ready", proc, log)
    return server


def cpu_flags() -> set[str]:
    try:
        line = next(x for x in Path("/proc/cpuinfo").read_text().splitlines() if x.startswith("flags"))
        return set(line.split(":", 1)[1].split())
    except (OSError, StopIteration):
        return set()


def cpu_name() -> str:
    try:
        line = next(x for x in Path("/proc/cpuinfo").read_text().splitlines() if x.startswith("model name"))
        return line.split(":", 1)[1].strip()
    except (OSError, StopIteration):
        return platform.machine()


def llama_cpu_flags() -> list[str]:
    """ggml's instruction sets for this CPU. Not GGML_NATIVE: on the Intel VMs here it would pick the
    AMX kernels, which the VM traps (SIGILL); and not a fixed AVX-512 set: an AVX2-only CPU (the AMD
    EPYC machines here) dies on those."""
    have = cpu_flags()
    wanted = {"AVX": "avx", "AVX2": "avx2", "FMA": "fma", "F16C": "f16c", "AVX512": "avx512f",
              "AVX512_VNNI": "avx512_vnni", "AVX512_BF16": "avx512_bf16"}
    return [f"-DGGML_{option}={'ON' if flag in have else 'OFF'}" for option, flag in wanted.items()]


def build_llama_server() -> Path | None:
    """llama-server from the llama-cpp-python sdist's vendored llama.cpp (cached per instruction
    set). None if it fails."""
    isa = "-".join(f.split("=")[0].removeprefix("-DGGML_").lower() for f in llama_cpu_flags() if f.endswith("=ON"))
    folder = CACHE / ("llama.cpp-" + LLAMA_CPP_SDIST.split("==")[1] + "-" + isa)
    target = folder / "llama-server"
    if target.is_file():
        return target
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                            LLAMA_CPP_SDIST, "-d", tmp], check=True, capture_output=True)
            sdist = next(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
            with tarfile.open(sdist) as tar:
                tar.extractall(tmp, filter="data")
            source = next(Path(tmp).glob("llama_cpp_python-*/vendor/llama.cpp"))
            flags = ["-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=OFF", *llama_cpu_flags(),
                     "-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF", "-DLLAMA_CURL=OFF",
                     "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=ON"]
            print("building llama-server (10-20 min on 2 cores) ...", flush=True)
            subprocess.run(["cmake", "-S", str(source), "-B", str(source / "build"), *flags], check=True,
                           capture_output=True)
            subprocess.run(["cmake", "--build", str(source / "build"), "--target", "llama-server",
                            "-j", str(os.cpu_count() or 2)], check=True, capture_output=True)
            shutil.rmtree(folder, ignore_errors=True)
            shutil.copytree(source / "build" / "bin", folder, symlinks=True)  # the binary and its .so files
        except (subprocess.CalledProcessError, StopIteration, OSError) as exc:
            print(f"llama-server build failed, skipping llama.cpp: {exc}", flush=True)
            return None
    return target


def start_llama_server(binary: Path, work: Path, parallel: int) -> Server:
    from gateway.engine.model_files import embedded_gguf_path

    port = free_port()
    log = work / f"llama-server-{port}.log"
    proc = subprocess.Popen(
        [str(binary), "-m", str(embedded_gguf_path()), "--host", "127.0.0.1", "--port", str(port),
         "-np", str(parallel), "-cb", "-t", str(os.cpu_count() or 2), "-c", str(2048 * parallel),
         "--no-webui"],
        env={**os.environ, "LD_LIBRARY_PATH": str(binary.parent)}, stdout=log.open("w"), stderr=subprocess.STDOUT,
    )
    server = Server("llama.cpp", f"http://127.0.0.1:{port}", "smollm2", proc, log)
    wait_until(f"{server.base_url}/health", proc, log)
    return server


def start_hf_serve(model_dir: Path, work: Path, dtype: str) -> Server:
    port = free_port()
    log = work / f"hf-serve-{port}.log"
    exe = Path(sys.executable).with_name("transformers")
    proc = subprocess.Popen(
        [str(exe), "serve", "--continuous-batching", "--host", "127.0.0.1", "--port", str(port),
         "--dtype", dtype, "--cb-num-blocks", "256", "--device", "cpu"],
        env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=log.open("w"), stderr=subprocess.STDOUT,
    )
    server = Server("hf-serve-cb", f"http://127.0.0.1:{port}", str(model_dir), proc, log)
    wait_until(f"{server.base_url}/health", proc, log)
    return server


# ---- load generator -------------------------------------------------------------------------
@dataclass
class Result:
    tokens: int = 0
    ttft: float | None = None
    gaps: list[float] = field(default_factory=list)
    error: str | None = None


async def one_request(client: httpx.AsyncClient, server: Server, messages: list[dict], max_tokens: int,
                      extra: dict) -> Result:
    body = {"model": server.model, "messages": messages, "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}, **extra}
    result = Result()
    started = last = time.perf_counter()
    chunks = 0
    try:
        async with client.stream("POST", f"{server.base_url}/v1/chat/completions", json=body,
                                  headers=server.headers) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if event.get("usage"):
                    result.tokens = event["usage"].get("completion_tokens") or result.tokens
                for choice in event.get("choices") or []:
                    if (choice.get("delta") or {}).get("content"):
                        now = time.perf_counter()
                        if result.ttft is None:
                            result.ttft = now - started
                        else:
                            result.gaps.append(now - last)
                        last = now
                        chunks += 1
    except httpx.HTTPError as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    result.tokens = result.tokens or chunks
    return result


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


async def run_level(server: Server, prompts: list[list[dict]], streams: int, per_stream: int,
                    max_tokens: int = MAX_TOKENS, extra: dict | None = None) -> dict:
    limits = httpx.Limits(max_connections=streams + 4, max_keepalive_connections=streams + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600), limits=limits) as client:
        async def worker(w: int) -> list[Result]:
            out = []
            for i in range(per_stream):
                out.append(await one_request(client, server, prompts[(w * per_stream + i) % len(prompts)],
                                             max_tokens, extra or {}))
            return out

        started = time.perf_counter()
        results = [r for rs in await asyncio.gather(*[worker(w) for w in range(streams)]) for r in rs]
        wall = time.perf_counter() - started
    ok = [r for r in results if r.error is None]
    ttfts = [r.ttft for r in ok if r.ttft is not None]
    gaps = [g for r in ok for g in r.gaps]
    errors = [r.error for r in results if r.error]
    return {
        "streams": streams, "requests": len(results), "errors": len(errors), "first_error": errors[0] if errors else None,
        "tokens": sum(r.tokens for r in ok), "seconds": round(wall, 2),
        "tok_s": round(sum(r.tokens for r in ok) / wall, 1),
        "ttft_p50": pct(ttfts, 0.5), "ttft_p99": pct(ttfts, 0.99),
        "itl_p50": pct(gaps, 0.5), "itl_p99": pct(gaps, 0.99),
    }


def measure(server: Server, prompts: list[list[dict]], levels: list[int], per_stream: int) -> list[dict]:
    asyncio.run(run_level(server, prompts, 2, 1, max_tokens=8))  # warm-up
    rows = []
    for streams in levels:
        row = asyncio.run(run_level(server, prompts, streams, per_stream))
        print(f"  {server.name:12s} {streams:3d} streams: {row['tok_s']:7.1f} tok/s, TTFT p50 "
              f"{row['ttft_p50'] or 0:.2f} s, errors {row['errors']}", flush=True)
        rows.append(row)
    return rows


def gateway_overhead(server: Server, prompts: list[list[dict]], n: int = 24) -> dict:
    """max_tokens=1, one at a time: the client's request → response time against the time the
    gateway's chat service measured around the engine (`ttft_ms` in the exchange record: submit →
    first token). The difference is what HTTP, auth, validation, PII scrubbing, the exchange write
    and serialisation add to every request."""
    async def go() -> dict:
        async with httpx.AsyncClient(timeout=60) as client:
            totals, model = [], []
            for i in range(n):
                body = {"model": server.model, "messages": prompts[i % len(prompts)], "max_tokens": 1, "temperature": 0}
                t0 = time.perf_counter()
                r = await client.post(f"{server.base_url}/v1/chat/completions", json=body, headers=server.headers)
                totals.append(time.perf_counter() - t0)
                exchange = r.headers.get("x-exchange-id")
                if exchange:
                    row = (await client.get(f"{server.base_url}/v1/exchanges/{exchange}", headers=server.headers)).json()
                    if row.get("ttft_ms") is not None:
                        model.append(row["ttft_ms"] / 1000)
            total, engine = statistics.median(totals), statistics.median(model) if model else None
            return {"requests": n, "total_p50_ms": round(1000 * total, 1),
                    "model_p50_ms": round(1000 * engine, 1) if engine is not None else None,
                    "overhead_p50_ms": round(1000 * (total - engine), 1) if engine is not None else None}

    return asyncio.run(go())


# ---- report ---------------------------------------------------------------------------------
def fmt(v: float | None, unit: str = "s") -> str:
    if v is None:
        return "–"
    return f"{v:.2f} {unit}" if unit == "s" else f"{v * 1000:.0f} ms"


def report(data: dict) -> str:
    lines = [
        "# Serving: tellerloop vs llama.cpp vs transformers serve",
        "",
        f"{data['machine']}; {data['date']}. Banking77 utterances, greedy, max {MAX_TOKENS} new tokens, streaming "
        f"clients, {data['per_stream']} requests per stream back to back; each system a fresh server; "
        f"transformers serve in {data.get('hf_dtype', 'float32')}. "
        "Ratios are against the peers measured in this same run.",
        "",
    ]
    for scenario, systems in data["scenarios"].items():
        lines += [f"## {scenario}", "",
                  "| system | streams | tok/s | TTFT p50 | TTFT p99 | ITL p50 | ITL p99 | errors | peak RSS |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for name, entry in systems.items():
            if "skipped" in entry:
                lines.append(f"| {name} | – | skipped: {entry['skipped']} | | | | | | |")
                continue
            for row in entry["levels"]:
                lines.append(
                    f"| {name} | {row['streams']} | {row['tok_s']:.1f} | {fmt(row['ttft_p50'])} | {fmt(row['ttft_p99'])} | "
                    f"{fmt(row['itl_p50'], 'ms')} | {fmt(row['itl_p99'], 'ms')} | {row['errors']} | "
                    f"{entry['peak_rss'] / 2**30:.2f} GB |")
        ours = systems.get("tellerloop", {}).get("levels", [])
        for peer in ("before", "llama.cpp", "hf-serve-cb", *GATEWAY_VARIANTS):
            theirs = {r["streams"]: r for r in systems.get(peer, {}).get("levels", [])}
            ratios = [f"{r['streams']}: {r['tok_s'] / theirs[r['streams']]['tok_s']:.2f}×" for r in ours
                      if r["streams"] in theirs and theirs[r["streams"]]["tok_s"]]
            if ratios:
                lines.append(f"\ntellerloop / {peer} throughput by streams: " + ", ".join(ratios))
        lines.append("")
    if data.get("overhead"):
        o = data["overhead"]
        lines += ["## Gateway overhead (max_tokens=1, one request at a time)", "",
                  f"Request → response p50 {o['total_p50_ms']} ms; submit → first token inside the gateway "
                  f"(exchange record `ttft_ms`) p50 {o['model_p50_ms']} ms; everything else (HTTP, auth, "
                  f"validation, PII scrubbing, the exchange write, serialisation) ≈ {o['overhead_p50_ms']} ms.", ""]
    return "\n".join(lines)


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scenarios = list(data["scenarios"])
    fig, axes = plt.subplots(1, len(scenarios), figsize=(6 * len(scenarios), 4), squeeze=False)
    for ax, scenario in zip(axes[0], scenarios):
        for name, entry in data["scenarios"][scenario].items():
            levels = entry.get("levels") or []
            if levels:
                ax.plot([r["streams"] for r in levels], [r["tok_s"] for r in levels], marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent streams")
        ax.set_ylabel("aggregate tokens / s")
        ax.set_title(f"{scenario} (max {MAX_TOKENS} new tokens, greedy)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--systems", default="tellerloop,tellerloop-fp32-mkl,llama.cpp,hf-serve-cb")
    parser.add_argument("--scenarios", default="plain,rag")
    parser.add_argument("--levels", default="1,4,16,64")
    parser.add_argument("--per-stream", type=int, default=2)
    parser.add_argument("--hf-dtype", default="auto", help="transformers serve's dtype; auto: the one the gateway's "
                        "model.dtype = auto computes in on this CPU (bfloat16 where it multiplies bf16 natively, else float32)")
    parser.add_argument("--extra-toml", default="", help="appended to the gateway's config (e.g. engine overrides)")
    parser.add_argument("--before", default="", help="git ref of an earlier engine, served as system 'before' "
                        "(checked out into a temporary worktree) — the same-run baseline for the engine rebuild")
    parser.add_argument("--out", default=str(RESULTS / "serve"))
    args = parser.parse_args()

    from gateway.core.settings import load_settings
    from gateway.engine.model_files import convert_embedded

    if args.hf_dtype == "auto":
        from gateway.engine.precision import native_bf16

        args.hf_dtype = "bfloat16" if native_bf16() else "float32"
    systems = args.systems.split(",")
    levels = [int(x) for x in args.levels.split(",")]
    questions = load_prompts(max(levels) * args.per_stream)
    work = Path(tempfile.mkdtemp(prefix="tellerloop-serve-"))
    settings = load_settings(None, storage={"data_dir": str(work / "var")})
    model_dir = convert_embedded(work / "var" / "models")
    prompts = {"plain": plain_messages(settings, questions)}
    if "rag" in args.scenarios:
        prompts["rag"] = rag_messages(settings, questions)
    llama = build_llama_server() if "llama.cpp" in systems else None
    before_root = work / "before"
    if "before" in systems:
        subprocess.run(["git", "worktree", "add", "--detach", str(before_root), args.before], cwd=ROOT, check=True,
                       capture_output=True)

    data = {"machine": f"{cpu_name()}, {platform.machine()}, {os.cpu_count()} cores", "date": time.strftime("%Y-%m-%d"),
            "per_stream": args.per_stream, "levels": levels, "scenarios": {}, "extra_toml": args.extra_toml,
            "hf_dtype": args.hf_dtype}
    for scenario in args.scenarios.split(","):
        results = data["scenarios"][scenario] = {}
        for name in systems:
            print(f"[{scenario}] {name}", flush=True)
            try:
                if name == "tellerloop" or name in GATEWAY_VARIANTS:
                    extra = args.extra_toml + "\n" + GATEWAY_VARIANTS.get(name, "")
                    server = start_gateway(work, rag=scenario == "rag", extra_toml=extra)
                    server.name = name
                    sent = prompts["plain"]  # with retrieval on, the gateway adds the context itself
                elif name == "before":
                    server = start_gateway(work, rag=scenario == "rag", extra_toml=args.extra_toml, root=before_root)
                    server.name, sent = name, prompts["plain"]
                elif name == "llama.cpp":
                    if llama is None:
                        results[name] = {"skipped": "llama-server build failed"}
                        continue
                    server, sent = start_llama_server(llama, work, max(levels)), prompts[scenario]
                elif name == "hf-serve-cb":
                    server, sent = start_hf_serve(model_dir, work, args.hf_dtype), prompts[scenario]
                else:
                    raise SystemExit(f"unknown system {name!r}")
            except (RuntimeError, TimeoutError) as exc:
                results[name] = {"skipped": str(exc).splitlines()[0][:200]}
                print(f"  skipped: {exc}", flush=True)
                continue
            try:
                results[name] = {"levels": measure(server, sent, levels, args.per_stream)}
                if name == "tellerloop" and scenario == "plain":
                    data["overhead"] = gateway_overhead(server, sent)
                results[name]["peak_rss"] = server.peak_rss()  # read before the process exits
            finally:
                server.stop()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(data, indent=1))
    out.with_suffix(".md").write_text(report(data) + "\n")
    try:
        plot(data, out.with_suffix(".png"))
    except ImportError:
        print("matplotlib not installed: no plot", flush=True)
    print(report(data))
    if "before" in systems:
        subprocess.run(["git", "worktree", "remove", "--force", str(before_root)], cwd=ROOT, capture_output=True)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
