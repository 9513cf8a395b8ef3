"""Several replicas, one scheduler: the lease (gateway/runs/lease.py).

The semantics on SQLite with two leases in one process (fast), then real gateway processes on the
CI's PostgreSQL and one `chroma run` server: one leader, a follower that runs no decision job,
the leader killed → the follower takes over within the lease time; the CLI ingests while both
serve and both answer from it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx

from gateway.core.runtime import open_database
from gateway.runs.lease import Lease
from tests.conftest import ROOT, ChromaServer, fresh_postgres_database, start_server

REVIEWER = {"Authorization": "Bearer dev-reviewer-key"}


async def test_one_holder_at_a_time_and_a_lost_lease_stays_lost(make_settings):
    settings = make_settings()
    async with open_database(settings) as sessions:
        first, second = Lease(sessions, "replica-1", 0.5), Lease(sessions, "replica-2", 0.5)
        assert await first.tick() and first.held
        assert not await second.tick()  # held and not expired
        assert await first.confirm()  # renewed by the holder
        token = first.token
        time.sleep(0.6)  # the holder paused past its expiry...
        assert await second.tick() and second.token == token + 1  # ...another takes over with a new token
        assert not await first.confirm() and not first.held  # and the old holder finds out before acting
        assert not await first.tick()
        await second.release()
        assert await first.tick()  # released: taken at once, no expiry wait


async def test_a_run_on_another_host_is_left_to_that_host(make_settings):
    """A trainer's pid means something only on its own host: a replica that starts (or starts a run)
    must not fail another replica's or training host's live run because that pid is not alive here."""
    from gateway.runs.control import Retrainer

    settings = make_settings()
    async with open_database(settings) as sessions:
        retrainer = Retrainer(settings, sessions, kb=lambda: None)
        run = await retrainer.runs.create("schedule", "scheduler", {}, 0)
        await retrainer.runs.update(run.id, status="running", pid=2**22 + 12345, host="gateway-2/another-boot")
        assert await retrainer.mark_interrupted() == 0
        assert (await retrainer.runs.get(run.id)).status == "running"
        await retrainer.runs.update(run.id, host=None)  # a row from before hosts were recorded: judged by pid here
        assert await retrainer.mark_interrupted() == 1
        assert (await retrainer.runs.get(run.id)).status == "failed"


def leader(server) -> bool:  # noqa: ANN001
    return httpx.get(f"{server.base_url}/ready", timeout=5).json()["checks"]["scheduler_leader"]


def jobs_run(server, job: str) -> float:  # noqa: ANN001
    text = httpx.get(f"{server.base_url}/metrics", timeout=5).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("tellerloop_scheduled_jobs_total{") and f'job="{job}"' in line)


def eventually(check, timeout: float = 40.0):  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.25)


async def test_two_replicas_share_one_scheduler_and_one_knowledge_base(tmp_path, tiny_model_dir):
    chroma = ChromaServer(tmp_path / "chroma")
    chroma.start()
    try:
        async with fresh_postgres_database("replicas") as url:
            config = (f'[model]\nbase = "{tiny_model_dir}"\n[storage]\ndatabase_url = "{url}"\n'
                      '[server]\nscheduler_lease_s = 3.0\nscheduler_renew_s = 0.5\n'
                      f'[rag]\nchroma_url = "{chroma.url}"\ndemo_data = ""\nlexical_refresh_s = 0.2\n'
                      '[retraining]\nenabled = true\nbootstrap = false\nshipped_adapter = ""\n'
                      '[experiment]\nevaluate_interval_s = 1\nsync_interval_s = 1\n')
            replicas = []
            for name in ("r1", "r2"):
                (tmp_path / name).mkdir()
                replicas.append(start_server(tmp_path / name, config))
            try:
                eventually(lambda: sum(leader(r) for r in replicas) == 1)
                time.sleep(3)  # a few decision slots
                boss = next(r for r in replicas if leader(r))
                other = next(r for r in replicas if r is not boss)
                assert sum(leader(r) for r in replicas) == 1
                assert jobs_run(boss, "experiment") >= 1 and jobs_run(other, "experiment") == 0

                # the CLI ingests into the shared Chroma server while both serve: both answer from it
                doc = tmp_path / "opening-hours.md"
                doc.write_text("# Branch opening hours\n\nOur Zurbaran branch opens at 07:45 on Saturdays.\n")
                cli = subprocess.run([sys.executable, "-m", "gateway.cli", "kb", "ingest", str(doc),
                                      "--config", str(tmp_path / "r1" / "test.toml"),
                                      "--data-dir", str(tmp_path / "cli")],
                                     cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True,
                                     text=True, timeout=300)
                assert cli.returncode == 0, cli.stderr[-2000:]
                for r in replicas:
                    eventually(lambda r=r: any(
                        "Zurbaran" in hit["text"] for hit in httpx.get(
                            f"{r.base_url}/v1/knowledge/search", params={"q": "Zurbaran branch Saturday", "k": 3},
                            headers=REVIEWER, timeout=30).json()["results"]))

                # the leader dies without a word: the follower leads within the lease time
                boss.proc.send_signal(signal.SIGKILL)
                boss.proc.wait(10)
                eventually(lambda: leader(other), timeout=20)
                before = jobs_run(other, "experiment")
                eventually(lambda: jobs_run(other, "experiment") > before)
            finally:
                for r in replicas:
                    r.stop()
    finally:
        chroma.stop()
