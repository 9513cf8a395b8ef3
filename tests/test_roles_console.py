"""Every endpoint against every role (and no key), and the console's sign-in, CSRF and forms,
in-process with Litestar's test client (the browser test drives the same pages in Chromium)."""

from __future__ import annotations

import re

from tests.test_review import H, add_exchange, client, item_of  # noqa: F401 - fixture re-used

ROLES = ("none", "app", "r1", "boss")  # no key, client, reviewer, admin


def headers(role: str) -> dict:
    return {} if role == "none" else H[role]


async def test_role_matrix(client):  # noqa: F811
    eid = await add_exchange(client, 0.1, user="u")
    item = await item_of(client, eid)
    chat = {"model": "tellerloop", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "rag": False}
    # (method, path, json body, expected status for none / client / reviewer / admin), run in that order.
    matrix = [
        ("GET", "/health", None, (200, 200, 200, 200)),
        ("GET", "/ready", None, (200, 200, 200, 200)),
        ("GET", "/metrics", None, (200, 200, 200, 200)),
        ("GET", "/schema/openapi.json", None, (200, 200, 200, 200)),
        ("GET", "/v1/models", None, (401, 200, 200, 200)),
        ("POST", "/v1/chat/completions", chat, (401, 200, 200, 200)),
        # feedback: only the key (and user) that made the exchange; others get 404, not a hint
        ("POST", f"/v1/exchanges/{eid}/feedback", {"rating": "down", "user": "u"}, (401, 200, 404, 404)),
        ("POST", f"/v1/exchanges/{eid}/flags", {"reason": "check"}, (401, 403, 201, 201)),
        ("GET", f"/v1/exchanges/{eid}", None, (401, 403, 200, 200)),
        ("GET", "/v1/review/queue", None, (401, 403, 200, 200)),
        ("GET", f"/v1/review/items/{item}", None, (401, 403, 200, 200)),
        ("POST", f"/v1/review/items/{item}/claim", None, (401, 403, 200, 409)),
        ("DELETE", f"/v1/review/items/{item}/claim", None, (401, 403, 200, 409)),
        ("POST", f"/v1/review/items/{item}/labels", {"verdict": "reject"}, (401, 403, 201, 201)),
        ("POST", "/v1/review/next", None, (401, 403, 200, 200)),
        ("GET", "/v1/review/stats", None, (401, 403, 200, 200)),
        ("GET", "/v1/review/export", None, (401, 403, 403, 200)),
        ("POST", "/v1/knowledge/documents", {"source": "a.txt", "content": "Opening hours are 9 to 5."},
         (401, 403, 403, 201)),
        ("GET", "/v1/knowledge/search?q=hours", None, (401, 403, 200, 200)),
        ("GET", "/v1/knowledge/stats", None, (401, 403, 200, 200)),
        ("DELETE", "/v1/knowledge/documents?source=a.txt", None, (401, 403, 403, 200)),
    ]
    # /v1/review/next for r1/boss: the chat above (tiny model, never confident) queued a fresh item.
    failures = []
    for method, path, body, expected in matrix:
        for role, status in zip(ROLES, expected):
            r = await client.request(method, path, json=body, headers=headers(role))
            if r.status_code != status:
                failures.append(f"{method} {path} as {role}: {r.status_code} (expected {status}) {r.text[:120]}")
            if r.status_code >= 400:
                assert r.json()["error"]["message"], (method, path, role)
    assert not failures, "\n".join(failures)


def csrf(html: str) -> str:
    return re.search(r'name="_csrf_token" value="([^"]+)"', html).group(1)


async def sign_in(client, key: str, next_url: str = "/console"):  # noqa: F811
    page = await client.get(f"/console/login?next={next_url}")
    return await client.post("/console/login", data={"key": key, "next": next_url, "_csrf_token": csrf(page.text)})


async def test_console_sign_in_csrf_and_access(client):  # noqa: F811
    r = await client.get("/console/stats", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/console/login?next=/console/stats"
    r = await sign_in(client, "k-client")
    assert r.status_code == 401 and "needs a reviewer key" in r.text
    r = await sign_in(client, "wrong")
    assert r.status_code == 401 and "not valid" in r.text
    r = await client.post("/console/login", data={"key": "k-r1"})  # no CSRF token
    assert r.status_code == 403 and r.json()["error"]["code"] == "csrf_failed"
    r = await sign_in(client, "k-r1", "https://evil.example/")  # open redirects are refused
    assert r.status_code == 200 and str(r.url).endswith("/console") and "Signed in as <strong>r1</strong>" in r.text
    assert (await client.get("/console/stats")).status_code == 200
    assert (await client.get("/console/items/424242")).status_code == 404
    assert "Set-Cookie" not in (await client.get("/v1/models", headers=H["app"])).headers  # API: no cookies
    r = await client.post("/console/logout", data={"_csrf_token": csrf((await client.get("/console")).text)})
    assert str(r.url).endswith("/console/login")
    assert (await client.get("/console/stats", follow_redirects=False)).status_code == 303


async def test_console_review_flow_without_javascript(client):  # noqa: F811
    eid = await add_exchange(client, 0.05, answer="The fee is 50 pounds.")
    await sign_in(client, "k-r1")
    queue = await client.get("/console")
    assert "question 0.05" in queue.text and "Confidence 0.05 is below the flag threshold" in queue.text
    item_page = await client.post("/console/next", data={"_csrf_token": csrf(queue.text)})
    assert "/console/items/" in str(item_page.url) and "The fee is 50 pounds." in item_page.text
    item = int(str(item_page.url).rsplit("/", 1)[1])
    token = csrf(item_page.text)
    form = {"_csrf_token": token, "verdict": "correct", "corrected_answer": "The fee is 50 pounds.", "proposed_answer_id": "0"}
    r = await client.post(f"/console/items/{item}/label", data=form)
    assert r.status_code == 400 and "unchanged" in r.text
    form["corrected_answer"] = "There is no fee for this."
    r = await client.post(f"/console/items/{item}/label", data=form)
    assert r.status_code == 200 and f"Saved your label on item {item}: it is now open." in r.text

    client.cookies.clear()
    await sign_in(client, "k-r2")
    page = await client.get(f"/console/items/{item}")
    assert "Proposed correction by <strong>r1</strong>" in page.text and "There is no fee for this." in page.text
    r = await client.post(f"/console/items/{item}/label", data={
        "_csrf_token": csrf(page.text), "verdict": "approve", "proposed_answer_id": re.search(
            r'name="proposed_answer_id" value="(\d+)"', page.text).group(1), "corrected_answer": "ignored"})
    assert f"item {item}: it is now resolved" in r.text
    detail = (await client.get(f"/v1/review/items/{item}", headers=H["r1"])).json()
    assert detail["resolved_answer"] == "There is no fee for this." and detail["decided_by"] == "consensus:r1,r2"
    stats = await client.get("/console/stats")
    assert 'id="overall-agreement">100%' in stats.text and "r1 &amp; r2" in stats.text
    assert "Overall over 1 co-labelled pairs" in stats.text and "built-in method" not in stats.text
    resolved_page = await client.get(f"/console/items/{item}")
    assert "2 of 2 labels" in resolved_page.text and "Resolved: <strong>correct</strong>" in resolved_page.text
    assert eid in (await client.get(f"/console/items/{item}")).text  # audit trail names the exchange


async def test_console_pages_carry_security_headers(make_settings, tiny_model_dir):
    from gateway.app import create_app
    from tests.conftest import ready_client

    settings = make_settings(tiny_model_dir)
    async with ready_client(create_app(settings), settings) as c:
        signed_out = await c.get("/console/login")
        assert (await sign_in(c, "dev-reviewer-key")).status_code in (200, 303)
        for r in (signed_out, await c.get("/console"), await c.get("/console/stats")):
            assert r.status_code == 200, r.url
            assert "frame-ancestors 'none'" in r.headers["content-security-policy"], r.url
            assert r.headers["x-frame-options"] == "DENY" and r.headers["x-content-type-options"] == "nosniff"
            assert r.headers["cache-control"] == "no-store" and r.headers["referrer-policy"] == "no-referrer"


async def test_observability_is_protected_off_loopback(make_settings, tiny_model_dir):
    """A public bind (or observability = "protected"): /metrics and /schema need a reviewer key, /ready
    still answers a load balancer, with its status only; /health stays open."""
    from gateway.app import create_app
    from tests.conftest import ready_client

    settings = make_settings(tiny_model_dir, server={"observability": "protected"})
    async with ready_client(create_app(settings), settings) as c:
        assert (await c.get("/metrics")).status_code == 401
        assert (await c.get("/schema/openapi.json")).status_code == 401
        client = {"Authorization": "Bearer dev-client-key"}
        assert (await c.get("/metrics", headers=client)).status_code == 403
        reviewer = {"Authorization": "Bearer dev-reviewer-key"}
        assert (await c.get("/metrics", headers=reviewer)).status_code == 200
        assert (await c.get("/schema/openapi.json", headers=reviewer)).status_code == 200
        assert (await c.get("/ready")).json() == {"status": "ready"}
        assert (await c.get("/health")).status_code == 200
    settings = make_settings(tiny_model_dir, server={"observability": "auto", "host": "127.0.0.1"})
    assert settings.server.observability_open
    assert not make_settings(tiny_model_dir, server={"observability": "auto", "host": "0.0.0.0"}).server.observability_open


async def test_every_route_in_the_route_table_enforces_its_role(client):  # noqa: F811
    """Generated from the app's route table, so a new endpoint cannot skip it: each /v1 handler's
    role comes from its guards; no key → 401, a lower role → 403, its role and above → neither.
    Bodies are deliberately invalid, so allowed calls stop at validation (nothing is trained)."""
    from litestar.routes import HTTPRoute

    rank = {"client": 1, "reviewer": 2, "admin": 3}
    keys = {"client": H["app"], "reviewer": H["r1"], "admin": H["boss"]}
    checked, failures = 0, []
    for route in client.app.routes:
        if not isinstance(route, HTTPRoute) or not route.path.startswith("/v1/"):
            continue
        path = re.sub(r"\{[^}:]+:int\}", "987654", re.sub(r"\{[^}:]+:str\}", "no-such-thing", route.path))
        for handler in route.route_handlers:
            if set(handler.http_methods) == {"OPTIONS"}:  # Litestar's own CORS preflight handler
                continue
            names = [getattr(g, "func", g).__name__ for g in handler.resolve_guards()]
            roles = [n.removeprefix("require_") for n in names if n.startswith("require_")]
            assert roles, f"{route.path}: no role guard"
            needed = max(rank[r] for r in roles)  # a controller's guard and a stricter handler guard: both apply
            roles = [max(roles, key=rank.get)]
            for method in handler.http_methods:
                body = {"__not_a_field__": 1} if method in ("POST", "PUT", "PATCH") else None
                r = await client.request(method, path, json=body)
                if r.status_code != 401:
                    failures.append(f"{method} {route.path} without a key: {r.status_code}")
                for role, key in keys.items():
                    r = await client.request(method, path, json=body, headers=key)
                    denied = r.status_code == 403
                    if (rank[role] < needed) != denied or r.status_code == 401 or r.status_code >= 500:
                        failures.append(f"{method} {route.path} as {role} (needs {roles[0]}): {r.status_code}")
                checked += 1
    assert checked >= 30 and failures == []
