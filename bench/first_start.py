"""First start, as a newcomer meets it: `tellerloop serve` on an empty data dir with the embedded
model and the demo FAQ (what `make serve` does), timed to `/ready`, then the newcomer's first
questions. Reports the variant that answered (the shipped champion, `data/adapters/bootstrap`),
the answers, their confidence, and the shipped adapter's offline quality from its manifest. The
baseline, in the same run: the same start with the shipped adapter switched off (the base model
answers, as before the adapter was shipped).

    .venv/bin/python bench/first_start.py

Writes bench/results/first_start.{md,json}. ~3 minutes (two starts, each converting the model and
ingesting the FAQ).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
QUESTIONS = ["How do I block my lost card?", "What is the minimum balance for a savings account?",
             "Can I get a duplicate statement?"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(shipped: bool) -> dict:
    data = Path(tempfile.mkdtemp(prefix="tellerloop-first-"))
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TELLERLOOP_RETRAINING__ENABLED": "false",
           "TELLERLOOP_RETRAINING__SHIPPED_ADAPTER": "data/adapters/bootstrap" if shipped else ""}
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", "serve", "--port", str(port), "--data-dir", str(data)],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        while True:
            if proc.poll() is not None:
                raise SystemExit("the server exited")
            try:
                if httpx.get(f"{base}/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        ready_s = time.perf_counter() - started
        answers = []
        for q in QUESTIONS:
            r = httpx.post(f"{base}/v1/chat/completions", headers={"Authorization": "Bearer dev-client-key"}, timeout=120,
                           json={"model": "tellerloop", "max_tokens": 96, "messages": [{"role": "user", "content": q}]})
            body = r.json()
            answers.append({"question": q, "variant": body["variant"], "answer": body["choices"][0]["message"]["content"],
                            "confidence": body["confidence"], "flagged": body["flagged"]})
        return {"shipped": shipped, "ready_s": round(ready_s, 1), "answers": answers}
    finally:
        proc.terminate()
        proc.wait(60)
        shutil.rmtree(data, ignore_errors=True)


def main() -> None:
    manifest = json.loads((ROOT / "data/adapters/bootstrap/manifest.json").read_text())
    runs = [start(True), start(False)]
    ev = manifest["metrics"]["evaluation"]
    lines = ["| start | time to /ready | question | variant | confidence | flagged | answer |",
             "| --- | ---: | --- | --- | ---: | --- | --- |"]
    for run in runs:
        for a in run["answers"]:
            text = a["answer"].replace("\n", " ").replace("|", "/")
            lines.append(f"| {'shipped adapter' if run['shipped'] else 'without (baseline)'} | {run['ready_s']} s | "
                         f"{a['question']} | {a['variant']} | {a['confidence']:.2f} | {a['flagged']} | "
                         f"{text[:160]}{'…' if len(text) > 160 else ''} |")
    quality = (f"Shipped v0001 on the frozen split (manifest, 100 held-out FAQ questions): similarity "
               f"{ev['candidate']['rag']['similarity_mean']:.3f} with retrieval "
               f"(base {ev['baseline']['rag']['similarity_mean']:.3f}), "
               f"{ev['candidate']['no_rag']['similarity_mean']:.3f} without "
               f"(base {ev['baseline']['no_rag']['similarity_mean']:.3f}).")
    text = "\n".join(lines) + "\n\n" + quality
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "first_start.md").write_text(
        "# First start from an empty data dir (`bench/first_start.py`)\n\nEmbedded model and demo FAQ, "
        "scheduler off; the baseline is the same start with `retraining.shipped_adapter = \"\"`.\n\n" + text + "\n")
    (RESULTS / "first_start.json").write_text(json.dumps(runs, indent=1))
    print(text)


if __name__ == "__main__":
    main()
