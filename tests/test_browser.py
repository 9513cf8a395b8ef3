"""The review console in a real browser: Playwright drives Debian's Chromium (installed by
`make test` when missing) against a real `tellerloop serve` process.

Story (issue 4): a customer thumbs-downs an answer; reviewer 1 signs in, opens the top item and
corrects it; reviewer 2 signs in, opens the top item and approves the correction with the `a`
keyboard shortcut → the item is resolved → `tellerloop export` contains the corrected answer.
Story (issue 6): with a challenger in an experiment, an admin opens the Experiments page (arms,
chart, rule), evaluates it, then promotes the challenger by hand; the decision is listed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.conftest import ROOT, start_server

CHROMIUM = os.environ.get("TELLERLOOP_CHROMIUM", "/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
CORRECTION = "You can freeze your card instantly in the app under Cards, then Freeze card."

pytestmark = pytest.mark.skipif(
    not Path(CHROMIUM).exists(),
    reason=f"BROWSER test SKIPPED: no Chromium at {CHROMIUM} (`make test` installs Debian's chromium)")


@pytest.fixture(scope="module")
def console_server(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("browser")
    server = start_server(tmp, f"""
[model]
base = "{tiny_model_dir}"
max_context_tokens = 512
[rag]
enabled_by_default = false
demo_data = ""
[retraining]
enabled = false
[experiment]
challenger_share = 0.5
sync_interval_s = 1
[[auth.keys]]
name = "shop-app"
role = "client"
key = "dev-client-key"
[[auth.keys]]
name = "alice"
role = "reviewer"
key = "dev-reviewer-key"
[[auth.keys]]
name = "bob"
role = "reviewer"
key = "dev-reviewer2-key"
[[auth.keys]]
name = "carol"
role = "admin"
key = "dev-admin-key"
""")
    server.config = tmp / "test.toml"
    yield server
    server.stop()


async def test_two_reviewers_resolve_a_thumbs_down_in_the_console(console_server, tmp_path):
    from playwright.async_api import async_playwright

    base = console_server.base_url
    client = {"Authorization": "Bearer dev-client-key"}
    async with httpx.AsyncClient(base_url=base, timeout=60) as http:
        r = await http.post("/v1/chat/completions", headers=client, json={
            "model": "tellerloop", "user": "cust-7", "max_tokens": 8,
            "messages": [{"role": "user", "content": "How do I freeze my card?"}]})
        exchange_id = r.json()["exchange_id"]
        r = await http.post(f"/v1/exchanges/{exchange_id}/feedback", headers=client,
                            json={"rating": "down", "user": "cust-7", "comment": "did not help"})
        assert r.status_code == 200, r.text

    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        try:
            # Reviewer 1: sign in, open the top item, correct it.
            alice = await (await browser.new_context()).new_page()
            await alice.goto(f"{base}/console")
            assert "/console/login" in alice.url
            await alice.get_by_label("API key").fill("dev-reviewer-key")
            await alice.get_by_role("button", name="Sign in").click()
            await alice.get_by_text("Signed in as").wait_for()
            top = alice.locator("#queue-rows a").first
            await top.click()
            await alice.get_by_role("heading", name="Why it is here").wait_for()
            assert exchange_id in await alice.content()
            assert await alice.get_by_text("The customer gave a thumbs-down").count() == 1
            await alice.get_by_label("Corrected answer").fill(CORRECTION)
            await alice.get_by_role("button", name="Correct").click()
            await alice.get_by_text("it is now open").wait_for()

            # Reviewer 2 (own browser context = own session): open the top item, approve with "a".
            bob = await (await browser.new_context()).new_page()
            await bob.goto(f"{base}/console/login")
            await bob.get_by_label("API key").fill("dev-reviewer2-key")
            await bob.keyboard.press("Enter")
            await bob.get_by_text("Signed in as").wait_for()
            await bob.locator("#queue-rows a").first.click()
            await bob.locator("#proposal").wait_for()
            assert (await bob.locator("#proposal").inner_text()).strip() == CORRECTION
            await bob.locator("body").click(position={"x": 5, "y": 5})  # focus off any input
            await bob.keyboard.press("a")
            await bob.get_by_text("it is now resolved").wait_for()
            await bob.goto(f"{base}/console/stats")
            assert (await bob.locator("#overall-agreement").inner_text()) == "100%"
            shot_dir = Path(os.environ.get("TELLERLOOP_SCREENSHOTS", tmp_path))
            await bob.screenshot(path=str(shot_dir / "console-stats.png"), full_page=True)
            await alice.goto(f"{base}/console/items/1")
            await alice.screenshot(path=str(shot_dir / "console-item.png"), full_page=True)
        finally:
            await browser.close()

    out = tmp_path / "export.jsonl"
    run = subprocess.run([sys.executable, "-m", "gateway.cli", "export", "--config", str(console_server.config),
                          "--data-dir", str(console_server.data_dir), "--out", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    [line] = [json.loads(x) for x in out.read_text().splitlines()]
    assert line["exchange_id"] == exchange_id and line["resolution"] == "correct"
    assert line["messages"][-1] == {"role": "assistant", "content": CORRECTION}
    assert line["decided_by"] == "consensus:alice,bob"



async def test_admin_decides_an_experiment_in_the_console(console_server, tiny_model_dir, tmp_path):
    import asyncio

    from playwright.async_api import async_playwright

    from gateway.core.settings import load_settings
    from tests.conftest import make_adapter

    base = console_server.base_url
    settings = load_settings(None, storage={"data_dir": str(console_server.data_dir)})
    await make_adapter(settings, tiny_model_dir, "champion", seed=1)
    await make_adapter(settings, tiny_model_dir, "challenger", seed=2)
    client = {"Authorization": "Bearer dev-client-key"}
    async with httpx.AsyncClient(base_url=base, timeout=60) as http:
        for _ in range(60):  # the gateway's sync job picks the new versions up
            routing = (await http.get("/v1/experiments", headers={"Authorization": "Bearer dev-admin-key"})).json()
            if routing["routing"]["challenger"] == "v0002":
                break
            await asyncio.sleep(0.5)
        assert routing["routing"]["challenger"] == "v0002"
        for i in range(12):  # customers who prefer the challenger
            r = await http.post("/v1/chat/completions", headers=client, json={
                "model": "tellerloop", "user": f"ab-{i}", "max_tokens": 3,
                "messages": [{"role": "user", "content": "What are your opening hours?"}]})
            rating = "up" if r.json()["variant"] == "v0002" else "down"
            await http.post(f"/v1/exchanges/{r.json()['exchange_id']}/feedback", headers=client,
                            json={"rating": rating, "user": f"ab-{i}"})

    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        try:
            page = await (await browser.new_context()).new_page()
            await page.goto(f"{base}/console/login")
            await page.get_by_label("API key").fill("dev-admin-key")
            await page.get_by_role("button", name="Sign in").click()
            await page.get_by_role("link", name="Experiments").click()
            await page.get_by_role("heading", name="Experiment 1: v0002 vs v0001").wait_for()
            assert await page.locator("#arms tbody tr").count() == 2
            assert await page.locator("#chart polyline").count() == 2
            assert "P(challenger better)" in await page.content()
            await page.get_by_role("button", name="Evaluate now").click()
            await page.get_by_text("Evaluated: continue").wait_for()  # 12 ratings < min_samples 200
            shot_dir = Path(os.environ.get("TELLERLOOP_SCREENSHOTS", tmp_path))
            await page.screenshot(path=str(shot_dir / "console-experiments.png"), full_page=True)
            await page.get_by_role("button", name="Promote v0002").click()
            await page.get_by_text("v0002 is now champion").wait_for()
            assert "carol" in await page.locator("#decisions").inner_text()
            assert "no challenger is being tested" in await page.locator("#routing").inner_text()
        finally:
            await browser.close()
