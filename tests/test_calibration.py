"""Calibrated confidence: fitting (scikit-learn on the raw signals), the flag threshold's targets,
the formula as fallback, serving scoring with a variant's active calibrator (real app, tiny model,
real SQLite), the refit on reviewers' verdicts through the API, and the audit sample's rates."""

from __future__ import annotations

import random
import re

import numpy as np
import pytest

from gateway.app import create_app
from gateway.calibration.calibrator import (
    FEATURES,
    Calibrator,
    NotEnoughLabels,
    choose_threshold,
    features,
    fit,
    mode_of,
    summary,
)
from gateway.chat.confidence import score
from gateway.chat.routing import Route, Split
from gateway.core.settings import ConfidenceSettings, load_settings
from tests.conftest import ready_client

KEYS = [{"name": "app", "role": "client", "key": "k-client"},
        {"name": "r1", "role": "reviewer", "key": "k-r1"},
        {"name": "boss", "role": "admin", "key": "k-admin"}]
H = {k["name"]: {"Authorization": f"Bearer {k['key']}"} for k in KEYS}


def synthetic(n: int, seed: int = 0) -> list[tuple[dict, bool]]:
    """Answers whose goodness depends on retrieval similarity and copying the entry, plus noise:
    a calibrator must find that; the mean log-prob carries no signal here (as FINDINGS measured)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        top = rng.uniform(0.2, 0.95)
        overlap = min(1.0, max(0.0, top + rng.gauss(0, 0.15)))
        good = rng.random() < 1 / (1 + np.exp(-(8 * (top - 0.6) + 3 * (overlap - 0.6))))
        parts = {"mean_logprob": rng.uniform(-1.5, -0.1), "min_logprob": rng.uniform(-8, -1),
                 "mean_entropy": rng.uniform(0.2, 2.0), "tokens": rng.randint(5, 90), "truncated": False,
                 "looping": False, "top_similarity": top, "second_similarity": top - rng.uniform(0, 0.2),
                 "entry_overlap": overlap, "formula": rng.random()}
        rows.append((parts, good))
    return rows


def test_fit_learns_the_signal_and_beats_an_uninformative_formula():
    rows = synthetic(400)
    result = fit(rows, c=1.0, rule="bad_recall", target=0.8, formula=[p["formula"] for p, _ in rows])
    cv = result.metrics["cross_validated"]
    assert cv["auroc"] > 0.8 and result.metrics["formula"]["auroc"] < 0.65  # the formula here is noise
    assert cv["brier"] < result.metrics["formula"]["brier"]
    assert cv["bad_recall"] >= 0.8  # the threshold was chosen for that target, on held-out scores
    assert sum(b["n"] for b in cv["reliability"]) == 400
    # stored as plain numbers and read back: the same predictions
    again = Calibrator.from_params(result.calibrator.params())
    fresh = synthetic(20, seed=1)
    assert [again.predict(p) for p, _ in fresh] == [result.calibrator.predict(p) for p, _ in fresh]
    assert all(0 < result.calibrator.predict(p) < 1 for p, _ in fresh)
    assert result.calibrator.predict({**fresh[0][0], "top_similarity": 0.95, "entry_overlap": 1.0}) > \
        result.calibrator.predict({**fresh[0][0], "top_similarity": 0.25, "entry_overlap": 0.1})


def synthetic_modes(n: int, seed: int = 0) -> list[tuple[dict, bool]]:
    """Half the answers with retrieval (good when the top entry is similar: mostly good), half
    without (good when the model is sure of its tokens): the signals that matter differ by mode."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        logprob = rng.uniform(-1.5, -0.1)
        parts = {"mean_logprob": logprob, "min_logprob": rng.uniform(-8, -1), "mean_entropy": rng.uniform(0.2, 2.0),
                 "tokens": rng.randint(5, 90), "truncated": False, "looping": False, "formula": rng.random()}
        if i % 2 == 0:
            top = rng.uniform(0.5, 0.95)
            parts.update(top_similarity=top, second_similarity=top - rng.uniform(0, 0.2),
                         entry_overlap=rng.uniform(0.3, 1.0))
            good = rng.random() < 1 / (1 + np.exp(-14 * (top - 0.6)))
        else:
            good = rng.random() < 1 / (1 + np.exp(-5 * (logprob + 1.0)))
        rows.append((parts, good))
    return rows


def per_mode_check(calibrator: Calibrator, rows: list[tuple[dict, bool]], mode: str) -> dict:
    mine = [(p, y) for p, y in rows if mode_of(p) == mode]
    return summary([calibrator.predict(p) for p, _ in mine], [y for _, y in mine],
                   [calibrator.threshold_for(p) for p, _ in mine])


def test_per_mode_models_hold_the_flag_target_in_each_mode():
    rows, fresh = synthetic_modes(400), synthetic_modes(400, seed=1)
    pooled = fit(rows, c=1.0, rule="bad_recall", target=0.8, per_mode=False).calibrator
    result = fit(rows, c=1.0, rule="bad_recall", target=0.8, per_mode=True)
    split = result.calibrator
    assert set(split.modes) == {"rag", "no_rag"} and not pooled.modes
    assert result.metrics["modes"]["rag"]["own_model"] and result.metrics["modes"]["rag"]["n"] == 200
    assert split.thresholds()["rag"] != split.thresholds()["no_rag"]
    # on answers it never saw: the pooled threshold misses many bad answers with retrieval and
    # over-flags those without; one threshold per mode catches about the target in each
    pooled_rag, split_rag = per_mode_check(pooled, fresh, "rag"), per_mode_check(split, fresh, "rag")
    assert pooled_rag["bad_recall"] < 0.7 <= split_rag["bad_recall"] <= 0.95
    assert 0.7 <= per_mode_check(split, fresh, "no_rag")["bad_recall"] <= 0.95 < \
        per_mode_check(pooled, fresh, "no_rag")["bad_recall"]
    assert split_rag["auroc"] > pooled_rag["auroc"]
    # stored and read back: the same scores and thresholds in both modes
    again = Calibrator.from_params(split.params())
    assert [again.predict(p) for p, _ in fresh] == [split.predict(p) for p, _ in fresh]
    assert [again.threshold_for(p) for p, _ in fresh] == [split.threshold_for(p) for p, _ in fresh]


def test_a_mode_without_enough_labels_uses_the_pooled_model():
    rows = synthetic_modes(400)
    rows = [(p, True if mode_of(p) == "no_rag" else y) for p, y in rows]  # no bad answer without retrieval
    result = fit(rows, c=1.0, rule="bad_recall", target=0.8, per_mode=True)
    cal = result.calibrator
    assert set(cal.modes) == {"rag"} and not result.metrics["modes"]["no_rag"]["own_model"]
    bare = next(p for p, _ in rows if mode_of(p) == "no_rag")
    assert cal.threshold_for(bare) == cal.threshold == cal.thresholds()["no_rag"]
    # a row stored before per-mode fits (no "modes") still loads, and scores with the pooled model
    old = {k: v for k, v in cal.params().items() if k != "modes"}
    legacy = Calibrator.from_params(old)
    assert not legacy.modes and legacy.predict(bare) == cal.predict(bare)
    with pytest.raises(ValueError, match="mode 'sometimes'"):
        Calibrator.from_params({**cal.params(), "modes": {"sometimes": cal.modes["rag"]}})
    # a row this version cannot score with is refused at load (serving skips it), never at predict time
    for broken in ({"modes": ["rag"]}, {"modes": {"rag": {**cal.modes["rag"], "coef": [1.0]}}},
                   {"modes": {"rag": {**cal.modes["rag"], "threshold": "high"}}}, {"mean": cal.mean[:-1]},
                   {"scale": [0.0] * len(FEATURES)}, {"intercept": float("nan")}):
        with pytest.raises(ValueError):
            Calibrator.from_params({**cal.params(), **broken})


def test_threshold_rules():
    scores = [i / 100 for i in range(100)]
    labels = [i >= 30 for i in range(100)]  # the 30 lowest are bad
    t = choose_threshold(scores, labels, "bad_recall", 0.8)
    assert sum(s < t for s, y in zip(scores, labels) if not y) == 24  # 80 % of 30
    t = choose_threshold(scores, labels, "review_share", 0.1)
    assert sum(s < t for s in scores) == 10


def test_too_few_labels_and_foreign_params_are_refused():
    rows = synthetic(40)
    only_good = [(p, True) for p, _ in rows]
    with pytest.raises(NotEnoughLabels, match="at least 5 of each"):
        fit(only_good, c=1.0, rule="bad_recall", target=0.8)
    params = fit(rows, c=1.0, rule="bad_recall", target=0.8).calibrator.params()
    with pytest.raises(ValueError, match="do not match"):
        Calibrator.from_params({**params, "features": ["mean_logprob"]})


def test_missing_signals_have_neutral_values():
    vector = features({"mean_logprob": None, "top_similarity": None})
    assert len(vector) == len(FEATURES) and vector[FEATURES.index("rag")] == 0.0
    assert vector[FEATURES.index("top_similarity")] == 0.0 and vector[FEATURES.index("entry_overlap")] == 0.0
    assert vector[FEATURES.index("question_match")] == 0.0
    plain_text_entry = features({"mean_logprob": -0.1, "top_similarity": 0.7, "question_match": None})
    assert plain_text_entry[FEATURES.index("question_match")] == 0.7  # no question of its own: the chunk's similarity


def test_score_keeps_the_formula_and_applies_a_calibrator():
    cfg = ConfidenceSettings()
    sources = [{"score": 0.9, "answer": "Call us on the number on your card to block it."},
               {"score": 0.5, "text": "Opening hours"}]
    plain = score([-0.2, -0.4], "Call us to block it.", "stop", cfg, top_similarity=0.9, sources=sources,
                  entropies=[0.5, 1.5])
    assert plain.score == plain.formula and plain.calibrator is None
    assert plain.mean_entropy == 1.0 and plain.tokens == 2 and plain.second_similarity == 0.5
    assert plain.entry_overlap == 1.0  # every word of the answer is in the entry
    signals = score([-0.2, -0.4], "Call us to block it.", "stop", cfg, top_similarity=0.9, sources=sources[:1],
                    rival=0.6, question_match=0.8)
    assert signals.second_similarity == 0.6 and signals.question_match == 0.8  # the retrieval's own signals win
    calibrator = fit(synthetic(200), c=1.0, rule="bad_recall", target=0.8).calibrator
    calibrator.id = 7
    calibrated = score([-0.2, -0.4], "Call us to block it.", "stop", cfg, top_similarity=0.9, sources=sources,
                       entropies=[0.5, 1.5], calibrator=calibrator)
    assert calibrated.formula == plain.formula and calibrated.calibrator == 7
    assert calibrated.score == round(calibrator.predict(plain.parts()), 6)


def test_audit_rate_is_stratified_by_arm():
    from gateway.chat.service import ChatService

    settings = load_settings(None, review={"audit_share": 0.05})
    chat = ChatService.__new__(ChatService)
    chat.settings = settings
    chat.split = Split("v0001", "v0002", 0.2, 3)
    champion = chat.audit_rate(Route("v0001", experiment_id=3))
    challenger = chat.audit_rate(Route("v0002", experiment_id=3))
    assert champion * 0.8 == pytest.approx(challenger * 0.2)  # as many audits from each arm
    assert champion * 0.8 + challenger * 0.2 == pytest.approx(0.05)  # and 5 % of traffic in all
    assert chat.audit_rate(Route("v0001")) == 0.05  # outside an experiment: the plain share


async def _client(make_settings, tiny_model_dir, **sections):
    settings = make_settings(tiny_model_dir, model={"max_context_tokens": 512, "max_tokens_limit": 64},
                             rag={"enabled_by_default": False}, auth={"keys": KEYS},
                             **sections)
    return settings, create_app(settings)


def ask(i: int) -> dict:
    """Sampled, so the tiny random model answers words (greedy, it answers only newlines)."""
    return {"model": "tellerloop", "messages": [{"role": "user", "content": f"Question number {i}?"}],
            "max_tokens": 6, "temperature": 1.0, "seed": i}


async def test_serving_scores_with_the_active_calibrator(make_settings, tiny_model_dir):
    from gateway.calibration.repository import Calibrators
    from gateway.core.runtime import open_database

    settings, app = await _client(make_settings, tiny_model_dir)
    async with ready_client(app, settings) as c:
        before = (await c.post("/v1/chat/completions", json=ask(0), headers=H["app"])).json()
        record = (await c.get(f"/v1/exchanges/{before['exchange_id']}", headers=H["boss"])).json()
        assert record["confidence_parts"]["calibrator"] is None  # no calibrator yet: the formula scores
        assert record["confidence"] == record["confidence_parts"]["formula"]

        fitted = fit(synthetic(200), c=1.0, rule="bad_recall", target=0.8)
        async with open_database(settings) as sessions:
            row = await Calibrators(sessions).add("base", "calibration_split", fitted, 200, 100)
        await c.app.state.adapter_service.reconcile()  # what the sync job does every experiment.sync_interval_s
        listed = (await c.get("/v1/calibrators", headers=H["boss"])).json()["data"]
        assert [(x["id"], x["variant"], x["active"]) for x in listed] == [(row.id, "base", True)]
        assert (await c.get("/v1/calibrators", headers=H["r1"])).status_code == 403

        after = (await c.post("/v1/chat/completions", json=ask(1), headers=H["app"])).json()
        record = (await c.get(f"/v1/exchanges/{after['exchange_id']}", headers=H["boss"])).json()
        parts = record["confidence_parts"]
        assert parts["calibrator"] == row.id
        assert record["confidence"] == pytest.approx(fitted.calibrator.predict(parts), abs=1e-6)
        assert after["flagged"] == (record["confidence"] < fitted.calibrator.threshold_for(parts))
        assert listed[0]["thresholds"] == {"rag": pytest.approx(fitted.calibrator.modes["rag"]["threshold"], abs=1e-6)}

        page = await c.get("/console/login?next=/console/stats")  # the console's stats page shows it
        token = re.search(r'name="_csrf_token" value="([^"]+)"', page.text).group(1)
        stats = await c.post("/console/login", data={"key": "k-r1", "next": "/console/stats", "_csrf_token": token})
        assert stats.status_code == 200 and f"Calibrator #{row.id}" in stats.text
        assert 'id="calibration-base"' in stats.text and "<svg" in stats.text and "AUROC" in stats.text
        rag_threshold = f'{fitted.calibrator.modes["rag"]["threshold"]:.3f}</strong> with retrieval'
        assert rag_threshold in stats.text and f'{row.threshold:.3f}</strong> otherwise' in stats.text


async def test_refit_on_reviewers_verdicts(make_settings, tiny_model_dir):
    settings, app = await _client(make_settings, tiny_model_dir, review={"required_reviews": 1},
                                  calibration={"min_labels": 12, "min_per_class": 3},
                                  confidence={"retrieval_weight": 0.5})
    async with ready_client(app, settings) as c:
        r = await c.post("/v1/calibrators/refit", json={"variant": "base"}, headers=H["boss"])
        assert r.status_code == 400 and "min_labels = 12" in r.json()["error"]["message"]
        assert (await c.post("/v1/calibrators/refit", json={"variant": "../x"}, headers=H["boss"])).status_code == 400
        assert (await c.post("/v1/calibrators/refit", content=b"{", headers=H["boss"])).status_code == 400
        assert (await c.get("/v1/calibrators/999", headers=H["boss"])).status_code == 404
        assert (await c.get("/v1/calibrators/68662022999868801024", headers=H["boss"])).status_code == 404
        ids = []
        for i in range(14):
            body = (await c.post("/v1/chat/completions", json=ask(i), headers=H["app"])).json()
            ids.append(body["exchange_id"])
            flag = await c.post(f"/v1/exchanges/{body['exchange_id']}/flags", json={"reason": "check"},
                                headers=H["r1"])
            assert flag.status_code == 201
        queue = (await c.get("/v1/review/queue?limit=50", headers=H["boss"])).json()["data"]
        assert len(queue) == 14
        for n, item in enumerate(queue):
            verdict = {"verdict": "approve"} if n % 2 else {"verdict": "reject"}
            assert (await c.post(f"/v1/review/items/{item['id']}/labels", json=verdict,
                                 headers=H["r1"])).status_code == 201
        r = await c.post("/v1/calibrators/refit", json={"variant": "base"}, headers=H["boss"])
        assert r.status_code == 201, r.text
        view = r.json()
        assert view["source"] == "reviews" and view["labels"] == 14 and view["good"] == 7 and view["active"]
        assert {"cross_validated", "formula", "coefficients"} <= set(view["metrics"])
        await c.app.state.adapter_service.reconcile()
        body = (await c.post("/v1/chat/completions", json=ask(99), headers=H["app"])).json()
        record = (await c.get(f"/v1/exchanges/{body['exchange_id']}", headers=H["boss"])).json()
        assert record["confidence_parts"]["calibrator"] == view["id"]


def test_audit_estimate_weights_each_verdict_by_its_draw_probability():
    from scipy.stats import binomtest

    from gateway.review.audit import estimate, estimates

    same = [(0.05, i < 14) for i in range(20)]  # one rate: the plain share and Wilson's interval
    e = estimate(same, 0.95)
    ci = binomtest(14, 20).proportion_ci(0.95, method="wilson")
    assert e["share_good"] == e["share_good_unweighted"] == 0.7 and e["n_effective"] == 20
    assert (e["low"], e["high"]) == (pytest.approx(ci.low, abs=1e-4), pytest.approx(ci.high, abs=1e-4))
    # audited at 50 % while an experiment ran (all good), at 5 % otherwise (all bad): each verdict at
    # 5 % stands for ten times as many answers
    mixed = [(0.5, True)] * 10 + [(0.05, False)] * 10
    e = estimate(mixed, 0.95)
    assert e["share_good_unweighted"] == 0.5 and e["share_good"] == pytest.approx(20 / 220, abs=1e-4)
    assert e["n_effective"] == pytest.approx(220 ** 2 / (10 * 4 + 10 * 400), abs=0.01)
    assert e["low"] < e["share_good"] < e["high"]
    rows = estimates([("v1", 0.1, "resolved", "approve"), ("v1", 0.1, "resolved", "correct"),
                      ("v1", 0.1, "pending", None), ("v2", 0.2, "claimed", None)], 0.9)
    assert [(r["variant"], r["audited"], r["resolved"], r["good"], r["share_good"]) for r in rows] == \
        [("v1", 3, 2, 1, 0.5), ("v2", 1, 0, 0, None)]


async def test_audit_sample_queues_a_share_of_all_answers(make_settings, tiny_model_dir):
    # nothing is doubted (threshold 0): every queued item is the audit sample's
    settings, app = await _client(make_settings, tiny_model_dir, review={"audit_share": 0.5, "confidence_threshold": 0.0,
                                                                         "required_reviews": 1})
    async with ready_client(app, settings) as c:
        for i in range(60):
            assert (await c.post("/v1/chat/completions", json=ask(i), headers=H["app"])).status_code == 200
        queue = (await c.get("/v1/review/queue?limit=100", headers=H["boss"])).json()["data"]
        assert 15 <= len(queue) <= 45  # Binomial(60, 0.5): outside this range once in ~10,000 runs
        item = (await c.get(f"/v1/review/items/{queue[0]['id']}", headers=H["boss"])).json()
        assert item["audit"] is True and item["audit_rate"] == 0.5
        assert [r["code"] for r in item["reasons"]] == ["audit"] and item["priority_parts"]["audit"] == 1.0
        # resolved audit items estimate the variant's share of good answers, on the API and the console
        for n, queued in enumerate(queue[:10]):
            verdict = {"verdict": "approve"} if n < 7 else {"verdict": "reject"}
            assert (await c.post(f"/v1/review/items/{queued['id']}/labels", json=verdict,
                                 headers=H["r1"])).status_code == 201
        stats = (await c.get("/v1/review/stats", headers=H["boss"])).json()
        assert stats["audit"] == [{"variant": "base", "audited": len(queue), "resolved": 10, "good": 7,
                                   "share_good": 0.7, "low": pytest.approx(0.3968, abs=1e-4),
                                   "high": pytest.approx(0.8922, abs=1e-4), "share_good_unweighted": 0.7,
                                   "n_effective": 10.0, "confidence": 0.95}]
        page = await c.get("/console/login?next=/console/stats")
        token = re.search(r'name="_csrf_token" value="([^"]+)"', page.text).group(1)
        html = (await c.post("/console/login", data={"key": "k-r1", "next": "/console/stats",
                                                     "_csrf_token": token})).text
        assert 'id="audit-table"' in html and "<strong>70.0%</strong>" in html and "39.7–89.2% (95%)" in html
