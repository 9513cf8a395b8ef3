"""A/B testing: routing, the decision rule, the experiment API and its decisions, manual promote /
retire / rollback (API and CLI), and a promotion while 16 streams are in flight. Tiny random-weight
model here; the real-model simulation is in test_e2e_real.py."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import numpy as np
import pytest

from gateway.app import create_app
from gateway.chat.routing import (
    PinNotAllowed,
    Split,
    UnknownModel,
    bucket,
    choose,
    resolve_variant,
)
from gateway.core.settings import ExperimentSettings
from gateway.experiments.statistics import (
    Arm,
    Streams,
    aggregate,
    block_sizes,
    decide,
    differences,
    interval,
    log_wealth,
    prob_better,
)
from tests.conftest import (
    ROOT,
    fresh_postgres_database,
    make_adapter,
    ready_client,
    served_client,
)

ADMIN = {"Authorization": "Bearer dev-admin-key"}
REVIEWER = {"Authorization": "Bearer dev-reviewer-key"}
CLIENT = {"Authorization": "Bearer dev-client-key"}


# ---- routing --------------------------------------------------------------------------------------
def test_split_is_sticky_and_close_to_the_share_over_10k_users():
    split = Split("v0001", "v0002", 0.2, experiment_id=7)
    users = [f"user-{i}" for i in range(10_000)]
    first = [choose(split, u).variant for u in users]
    assert first == [choose(split, u).variant for u in users]  # sticky: the same user, the same variant
    share = first.count("v0002") / len(users)
    assert abs(share - 0.2) < 0.015, share  # 3 standard errors at n=10k is ±0.012
    assert all(choose(split, u).experiment_id == 7 for u in users[:10])
    # A new experiment draws afresh (salted by its id), still at the configured share.
    again = [choose(Split("v0001", "v0002", 0.2, experiment_id=8), u).variant for u in users]
    assert again != first and abs(again.count("v0002") / len(users) - 0.2) < 0.015
    assert 0 <= bucket(1, "x") < 1
    # No experiment, or share 0: everyone gets the champion, and nothing is attributed to an experiment.
    assert {choose(Split("v0001"), u) for u in users[:50]} == {choose(Split("v0001"), "x")}
    assert choose(Split("v0001", "v0002", 0.0, 3), "u").variant == "v0001"
    # No routing unit: a fresh draw per request (not sticky, still the share).
    draws = [choose(split, None).variant for _ in range(2000)]
    assert 0.15 < draws.count("v0002") / 2000 < 0.25


def test_pinning_needs_permission_and_unknown_names_fail():
    served = ["base", "v0001", "v0002"]
    split = Split("v0001", "v0002", 0.5, 1)
    assert resolve_variant("v0002", "tellerloop", served, split, may_pin=True).pinned
    with pytest.raises(PinNotAllowed):
        resolve_variant("v0002", "tellerloop", served, split, "u", may_pin=False)
    with pytest.raises(UnknownModel, match="Use 'tellerloop'.$"):  # a client is not told version names
        resolve_variant("v0009", "tellerloop", served, split, may_pin=False)
    with pytest.raises(UnknownModel, match="v0002"):
        resolve_variant("v0009", "tellerloop", served, split, may_pin=True)


# ---- statistics and the rule ----------------------------------------------------------------------
def test_prob_better_matches_monte_carlo_and_is_symmetric():
    rng = np.random.default_rng(0)
    for a_yes, a_no, b_yes, b_no in [(10, 10, 10, 10), (30, 20, 40, 10), (3, 50, 1, 60), (120, 80, 100, 100)]:
        exact = prob_better(a_yes, a_no, b_yes, b_no)
        sampled = np.mean(rng.beta(b_yes + 1, b_no + 1, 200_000) > rng.beta(a_yes + 1, a_no + 1, 200_000))
        assert abs(exact - sampled) < 0.005, (exact, sampled)
        assert abs(exact + prob_better(b_yes, b_no, a_yes, a_no) - 1) < 1e-9
    assert prob_better(10, 10, 10, 10) == pytest.approx(0.5)
    low, high = interval(80, 20)
    assert low < 0.8 < high and high - low < 0.2


def _arms(up_a, rated_a, up_b, rated_b, flags_a=0, flags_b=0, n=None):
    """Arms where every rating comes from a different customer."""
    n = n or max(rated_a, rated_b)
    return (Arm.of_ratings("v0001", "champion", rated_a, up_a, n, flags_a),
            Arm.of_ratings("v0002", "challenger", rated_b, up_b, n, flags_b))


def test_decision_rule():
    cfg = ExperimentSettings(rule="bayes", min_samples=50, promote_probability=0.95, guardrail_probability=0.95,
                             max_days=14)
    # Too few ratings in one arm: keep collecting, however good it looks.
    verdict = decide(cfg, *_arms(20, 60, 45, 49), age_days=1)
    assert verdict.action == "continue" and "49/50" in verdict.reason
    better = decide(cfg, *_arms(30, 60, 50, 60), age_days=1)
    assert better.action == "promote" and better.evidence["p_challenger_better"] >= 0.95
    worse = decide(cfg, *_arms(50, 60, 30, 60), age_days=1)
    assert worse.action == "retire" and worse.evidence["p_challenger_better"] <= 0.05
    close = decide(cfg, *_arms(40, 60, 42, 60), age_days=1)
    assert close.action == "continue" and "undecided" in close.reason
    assert decide(cfg, *_arms(40, 60, 42, 60), age_days=15).action == "retire"  # inconclusive at max_days
    # Guardrail: a better thumbs-up rate does not save a challenger staff flag much more often.
    flagged = decide(cfg, *_arms(30, 60, 50, 60, flags_a=1, flags_b=12, n=100), age_days=1)
    assert flagged.action == "retire" and "guardrail" in flagged.reason
    arms = better.evidence["arms"]
    assert arms[1]["thumbs_up_rate"] == pytest.approx(50 / 60) and len(arms[1]["thumbs_up_interval"]) == 2
    assert better.evidence["rule"]["min_samples"] == 50


def test_decision_counts_customers_not_ratings():
    cfg = ExperimentSettings(rule="bayes", min_samples=50, promote_probability=0.95, guardrail_probability=0.95)
    # 10 enthusiastic customers rating 50 times each look like 500 thumbs-up when ratings are units...
    champion = aggregate("v0001", "champion", [(1, 1, 1 if i % 2 else 0, 0, 0, 0.5, 10.0) for i in range(100)])
    fans = [(50, 50, 50, 0, 0, 25.0, 500.0)] * 10
    others = [(1, 1, 1 if i % 2 else 0, 0, 0, 0.5, 10.0) for i in range(90)]
    challenger = aggregate("v0002", "challenger", fans + others)
    assert challenger.rated == 590 and challenger.thumbs_up == 545 and challenger.rated_customers == 100
    assert challenger.satisfied == pytest.approx(10 + 45)
    as_ratings = decide(cfg, Arm.of_ratings("v0001", "champion", 100, 50),
                        Arm.of_ratings("v0002", "challenger", 590, 545), age_days=1)
    assert as_ratings.action == "promote"
    # ...but per customer the challenger satisfied 55 of 100 against 50 of 100: not enough evidence.
    verdict = decide(cfg, champion, challenger, age_days=1)
    assert verdict.action == "continue" and verdict.evidence["unit"] == "customer"
    assert 0.6 < verdict.evidence["p_challenger_better"] < 0.95


def test_prob_better_with_fractional_counts_matches_monte_carlo():
    rng = np.random.default_rng(1)
    for counts in [(10.5, 9.5, 12.25, 7.75), (40.0, 60.0, 45.5, 54.5), (3.3, 50.7, 1.2, 60.8)]:
        a_yes, a_no, b_yes, b_no = counts
        sampled = np.mean(rng.beta(b_yes + 1, b_no + 1, 200_000) > rng.beta(a_yes + 1, a_no + 1, 200_000))
        assert abs(prob_better(*counts) - sampled) < 0.005


def test_flag_guardrail_needs_enough_flags_and_a_rate_difference():
    cfg = ExperimentSettings(min_samples=200, guardrail_probability=0.95, guardrail_min_flags=5,
                             guardrail_min_difference=0.01)
    # One flag on 200 challenger customers vs none on 800: P ≈ 0.96, yet one flag is not evidence.
    one_flag = decide(cfg, Arm.of_ratings("v0001", "champion", 0, 0, 800, 0),
                      Arm.of_ratings("v0002", "challenger", 0, 0, 200, 1), age_days=1)
    assert one_flag.evidence["p_challenger_flagged_more"] >= 0.95 and one_flag.action == "continue"
    many = decide(cfg, Arm.of_ratings("v0001", "champion", 0, 0, 800, 4),
                  Arm.of_ratings("v0002", "challenger", 0, 0, 200, 12), age_days=1)
    assert many.action == "retire" and "guardrail" in many.reason
    loose = cfg.model_copy(update={"guardrail_min_flags": 1, "guardrail_min_difference": 0.0})
    assert decide(loose, Arm.of_ratings("v0001", "champion", 0, 0, 800, 0),
                  Arm.of_ratings("v0002", "challenger", 0, 0, 200, 1), age_days=1).action == "retire"


# ---- the anytime-valid rule (e-processes) -----------------------------------------------------------
ARMS = (Arm("v0001", "champion"), Arm("v0002", "challenger"))


def _bernoulli(rng, p: float, shape) -> np.ndarray:
    return (rng.random(shape) < p).astype(int)


@pytest.mark.parametrize("p, block, max_bet", [(0.7, (1, 1), 0.5), (0.7, (4, 1), 0.5), (0.5, (1, 1), 0.9),
                                               (0.3, (1, 3), 0.25)])
def test_e_process_keeps_alpha_under_continuous_monitoring(p, block, max_bet):
    """400 A/A experiments looked at after every block: the share that *ever* reaches 1/α (either way)
    stays within α plus three binomial standard errors (Ville's inequality)."""
    rng = np.random.default_rng(11)
    reps, blocks, alpha = 400, 1500, 0.05
    champion = _bernoulli(rng, p, (reps, blocks * block[0])).reshape(reps, blocks, block[0]).mean(axis=2)
    challenger = _bernoulli(rng, p, (reps, blocks * block[1])).reshape(reps, blocks, block[1]).mean(axis=2)
    up, down = log_wealth(challenger - champion, max_bet)
    tolerance = alpha + 3 * np.sqrt(alpha * (1 - alpha) / reps)
    for path in (up, down):
        ever = float((path.max(axis=1) >= np.log(1 / alpha)).mean())
        assert ever <= tolerance, (ever, tolerance)
    assert np.all(np.exp(up) > 0) and np.all(np.diff(up[:, :1]) == 0)  # wealth stays positive; the first bet is 0


def test_combined_e_value_keeps_alpha_under_continuous_monitoring():
    """Audit and thumbs streams of equal arms, both growing, every prefix evaluated by `decide` itself on
    the first 40 experiments and by the vectorised path on all 400: promotions within the same bound."""
    cfg = ExperimentSettings()
    rng = np.random.default_rng(12)
    reps, n, alpha = 400, 1200, cfg.alpha
    audit = [_bernoulli(rng, 0.8, (reps, n)) for _ in range(2)]  # champion, challenger
    thumbs = [_bernoulli(rng, 0.7, (reps, n)) for _ in range(2)]
    a_up, _ = log_wealth(audit[1] - audit[0], cfg.max_bet)
    t_up, _ = log_wealth(thumbs[1] - thumbs[0], cfg.max_bet)
    combined = cfg.audit_weight * np.exp(a_up) + (1 - cfg.audit_weight) * np.exp(t_up)
    ever = (combined >= 1 / alpha).any(axis=1)
    assert ever.mean() <= alpha + 3 * np.sqrt(alpha * (1 - alpha) / reps), ever.mean()
    for r in range(40):  # decide() sees exactly these numbers at every look
        for t in (50, 300, n):
            streams = Streams(audit[0][r, :t].tolist(), audit[1][r, :t].tolist(),
                              thumbs[0][r, :t].tolist(), thumbs[1][r, :t].tolist())
            e = decide(cfg, *ARMS, age_days=1, streams=streams).evidence["anytime"]
            assert e["combined"]["better"] == pytest.approx(combined[r, t - 1], rel=1e-9)


def _looks(cfg, champion: float, challenger: float, n: int, seed: int, every: int = 25) -> list:
    """decide() every `every` pairs of both streams until it acts; all verdicts seen."""
    rng = np.random.default_rng(seed)
    data = [_bernoulli(rng, q, n).tolist() for q in (champion, challenger, champion, challenger)]
    verdicts = []
    for t in range(every, n + 1, every):
        verdict = decide(cfg, *ARMS, age_days=1, streams=Streams(*(d[:t] for d in data)))
        verdicts.append(verdict)
        if verdict.action != "continue":
            break
    return verdicts


def test_anytime_rule_promotes_a_clearly_better_challenger_and_retires_a_worse_one():
    cfg = ExperimentSettings()
    assert cfg.rule == "anytime"
    for seed in range(5):
        better = _looks(cfg, 0.6, 0.8, 600, seed)
        assert better[-1].action == "promote", better[-1].reason
        assert all(v.action == "continue" for v in better[:-1])
        assert "anytime-valid" in better[-1].reason and better[-1].evidence["anytime"]["combined"]["better"] >= 20
        worse = _looks(cfg, 0.8, 0.6, 600, seed)
        assert worse[-1].action == "retire" and "worse" in worse[-1].reason
        assert not any(v.action == "promote" for v in worse)
    # Equal arms, still undecided at max_days: retired as inconclusive, the champion stays.
    rng = np.random.default_rng(3)
    same = Streams(*(_bernoulli(rng, 0.7, 200).tolist() for _ in range(4)))
    assert decide(cfg, *ARMS, age_days=1, streams=same).action == "continue"
    late = decide(cfg, *ARMS, age_days=15, streams=same)
    assert late.action == "retire" and "inconclusive" in late.reason
    # No data at all: every e-value is 1, nothing happens.
    empty = decide(cfg, *ARMS, age_days=1)
    assert empty.action == "continue" and empty.evidence["anytime"]["combined"] == {"better": 1.0, "worse": 1.0}


def test_anytime_evidence_records_every_e_value_and_setting():
    cfg = ExperimentSettings(alpha=0.01, audit_weight=0.25, max_bet=0.4)
    streams = Streams(audit_champion=[0, 1] * 20, audit_challenger=[1] * 30, thumbs_champion=[1, 0, 1, 1] * 25,
                      thumbs_challenger=[1, 1, 0] * 8, thumbs_block=(4, 1))
    e = decide(cfg, *ARMS, age_days=1, streams=streams).evidence["anytime"]
    assert e["threshold"] == pytest.approx(100) and e["alpha"] == 0.01 and e["audit_weight"] == 0.25
    assert e["betting"]["max_bet"] == 0.4 and e["betting"]["method"] == "aGRAPA" and e["betting"]["prior_second_moment"] > 0
    assert e["audit"]["pairs"] == 30 and e["audit"]["observations"] == [40, 30] and e["audit"]["block"] == [1, 1]
    assert e["thumbs"]["pairs"] == 24 and e["thumbs"]["block"] == [4, 1]  # 100 champion ratings = 25 blocks of 4
    for direction in ("better", "worse"):
        assert e["combined"][direction] == pytest.approx(
            0.25 * e["audit"][f"e_{direction}"] + 0.75 * e["thumbs"][f"e_{direction}"])
    assert e["audit"]["e_better"] > 1 >= e["audit"]["e_worse"]  # the challenger's audits were all approved
    json.dumps(e)  # stored with the decision as JSON


def test_blocks_pair_observations_at_the_traffic_ratio():
    assert block_sizes(0.8, 0.2) == (4, 1) and block_sizes(0.5, 0.5) == (1, 1) and block_sizes(0.2, 0.8) == (1, 4)
    assert block_sizes(0.8 * 0.05, 0.2 * 0.2) == (1, 1)  # audits stratified to equal counts per arm
    assert block_sizes(0, 1) == (1, 1) and block_sizes(0.999, 0.001) == (50, 1)
    d = differences([1, 1, 0, 0, 1, 0, 0, 0, 1], [1, 0, 1], (4, 1))  # 9 champion, 3 challenger → 2 blocks
    assert d.tolist() == [0.5, -0.25]
    assert differences([1, 0, 1], [0, 0, 1, 1, 1, 1], (1, 2)).tolist() == [-1.0, 1.0, 0.0]
    assert len(differences([], [1, 1], (1, 1))) == 0


def test_guardrail_still_retires_a_flagged_challenger_under_the_anytime_rule():
    cfg = ExperimentSettings(min_samples=200, guardrail_probability=0.95, guardrail_min_flags=5,
                             guardrail_min_difference=0.01)
    glowing = Streams([0] * 300, [1] * 300, [0] * 300, [1] * 300)  # would promote at once
    champion = Arm.of_ratings("v0001", "champion", 0, 0, 800, 4)
    assert decide(cfg, champion, Arm.of_ratings("v0002", "challenger", 0, 0, 200, 0), 1, glowing).action == "promote"
    flagged = decide(cfg, champion, Arm.of_ratings("v0002", "challenger", 0, 0, 200, 12), 1, glowing)
    assert flagged.action == "retire" and "guardrail" in flagged.reason
    assert flagged.evidence["anytime"]["combined"]["better"] >= 20  # the evidence shows what it overrode
    # The streams the repository attaches to the arms are the default input.
    champion.streams = glowing
    assert decide(cfg, champion, Arm.of_ratings("v0002", "challenger", 0, 0, 200, 0), 1).action == "promote"
    assert "streams" not in champion.as_dict()


async def test_repository_builds_the_streams_from_audits_and_first_ratings(make_settings):
    """Real rows on SQLite: audits (earliest audited exchange per customer, counted once resolved, in
    order of resolution) and first ratings per customer, cancelled and foreign exchanges left out."""
    from datetime import datetime, timedelta, timezone

    from gateway.adapters.registry import AdapterRegistry
    from gateway.core.runtime import open_database
    from gateway.exchanges.models import Exchange
    from gateway.experiments.models import Experiment
    from gateway.experiments.repository import Experiments
    from gateway.review.models import Feedback, ReviewItem

    settings = make_settings()
    t0 = datetime(2025, 3, 1, 9, tzinfo=timezone.utc)
    at = lambda minutes: t0 + timedelta(minutes=minutes)  # noqa: E731
    async with open_database(settings) as sessions:
        async with sessions() as session, session.begin():
            exp = Experiment(champion="v0001", challenger="v0002", share=0.2, status="running", started_at=t0)
            session.add(exp)
            await session.flush()
            n = 0

            def exchange(variant, unit, minute, finish="stop", experiment=exp.id):
                nonlocal n
                n += 1
                row = Exchange(id=f"ex{n:03d}", created_at=at(minute), completed_at=at(minute), api_key_name="k",
                               user=None, model_requested="tellerloop", variant=variant, messages=[], answer="a",
                               finish_reason=finish, stream=False, rag=False, sources=[], params={}, prompt_tokens=1,
                               completion_tokens=1, ttft_ms=1, latency_ms=1, confidence=0.9, confidence_parts={},
                               flagged=False, experiment_id=experiment, routing_unit=unit)
                session.add(row)
                return row

            def rate(ex, rating, minute):
                session.add(Feedback(exchange_id=ex.id, api_key_name="k", user=None, rating=rating,
                                     created_at=at(minute), updated_at=at(minute + 100)))

            def audit(ex, resolution, resolved_minute, rate_=0.05, status="resolved", is_audit=True):
                session.add(ReviewItem(exchange_id=ex.id, status=status, confidence=0.9, required_labels=2,
                                       created_at=ex.created_at, created_epoch=ex.created_at.timestamp(),
                                       updated_at=ex.created_at, resolution=resolution if status == "resolved" else None,
                                       resolved_at=at(resolved_minute) if status == "resolved" else None,
                                       audit=is_audit, audit_rate=rate_))

            # Thumbs: customer A's first rating is "down" (a later "up" on another exchange is not counted);
            # B rates "up"; a cancelled exchange's rating and another experiment's are ignored.
            a1, a2 = exchange("v0001", "A", 1), exchange("v0001", "A", 2)
            rate(a2, "down", 3)
            rate(a1, "up", 5)
            b1 = exchange("v0001", "B", 4)
            rate(b1, "up", 4)
            rate(exchange("v0001", "C", 6, finish="cancelled"), "up", 7)
            rate(exchange("v0001", "D", 6, experiment=exp.id + 1), "up", 7)
            x1 = exchange("v0002", "X", 2)
            rate(x1, "up", 8)
            y1 = exchange("v0002", None, 9)  # no routing unit: its own customer
            rate(y1, "down", 10)
            # Audits: X's earliest audited exchange (x1) counts, though x2's verdict came first; a signal
            # item (not audit) and an open audit do not count; order = resolution time.
            x2 = exchange("v0002", "X", 3)
            audit(x1, "approve", 50, rate_=0.2)
            audit(x2, "reject", 20, rate_=0.2)
            audit(y1, "correct", 30, rate_=0.2)
            audit(a1, "correct", 40)
            audit(b1, "approve", 10)
            audit(a2, "approve", 5, is_audit=False)
            audit(exchange("v0001", "E", 8), None, 0, status="open")
        registry = AdapterRegistry(sessions, settings.storage.data_dir)
        repo = Experiments(settings, sessions, registry)
        streams = await repo.streams(exp)
        assert streams.thumbs_champion == [0, 1] and streams.thumbs_challenger == [1, 0]
        assert streams.audit_champion == [1, 0]  # b1 approved (minute 10), then a1 corrected (minute 40)
        assert streams.audit_challenger == [0, 1]  # y1 corrected (30), x1 approved (50); x2 not X's earliest
        assert streams.thumbs_block == (4, 1) and streams.audit_block == (1, 1)  # 0.8·0.05 : 0.2·0.2
        champion, challenger = await repo.arms(exp)
        assert champion.streams == challenger.streams == streams
        evidence = decide(settings.experiment, champion, challenger, age_days=0.1).evidence["anytime"]
        assert evidence["audit"]["pairs"] == 2 and evidence["thumbs"]["pairs"] == 0  # 2 champion ratings < a block


# ---- the gateway: experiment API, decisions, manual actions ------------------------------------------
@pytest.fixture
async def ab_gateway(make_settings, tiny_model_dir):
    """The previous (bayes) rule with a small minimum, so a few scripted customers decide."""
    settings = make_settings(tiny_model_dir, experiment={"rule": "bayes", "min_samples": 8, "challenger_share": 0.5})
    await make_adapter(settings, tiny_model_dir, "champion", seed=1)
    await make_adapter(settings, tiny_model_dir, "challenger", seed=2)
    app = create_app(settings)
    async with ready_client(app, settings) as c:
        yield c


async def _chat(c, user: str, headers=CLIENT, model="tellerloop", **extra):
    r = await c.post("/v1/chat/completions", headers=headers, json={
        "model": model, "messages": [{"role": "user", "content": f"hello from {user}"}], "max_tokens": 3,
        "rag": False, "user": user, **extra})
    assert r.status_code == 200, r.text
    return r


async def _rate_until(c, good: str, per_arm: int) -> dict[str, int]:
    """Scripted customers: each chats once, then rates thumbs-up iff `good` served them."""
    rated = {"v0001": 0, "v0002": 0, "v0003": 0}
    i = 0
    while min(rated[v] for v in ("v0001", "v0002")) < per_arm and i < 400:
        i += 1
        body = (await _chat(c, f"customer-{i}")).json()
        rating = "up" if body["variant"] == good else "down"
        r = await c.post(f"/v1/exchanges/{body['exchange_id']}/feedback", headers=CLIENT,
                         json={"rating": rating, "user": f"customer-{i}"})
        assert r.status_code == 200, r.text
        rated[body["variant"]] += 1
    return rated


async def test_experiment_promotes_the_better_arm_then_rollback_and_manual_actions(ab_gateway):
    c = ab_gateway
    overview = (await c.get("/v1/experiments", headers=REVIEWER)).json()
    assert overview["routing"] == {"champion": "v0001", "challenger": "v0002", "challenger_share": 0.5,
                                   "experiment_id": 1, "enabled": True, "sticky_by": ["user", "X-Session-Id"]}
    current = overview["current"]
    assert current["status"] == "running" and [a["variant"] for a in current["arms"]] == ["v0001", "v0002"]
    listing = {a["version"]: a for a in (await c.get("/v1/adapters", headers=REVIEWER)).json()["data"]}
    assert listing["v0001"]["traffic_share"] == 0.5 and listing["v0002"]["weight_bytes"] > 0

    # Sticky: the same customer keeps one variant; the header names it too.
    first = await _chat(c, "alice")
    assert first.headers["x-variant"] == first.json()["variant"]
    assert {(await _chat(c, "alice")).json()["variant"] for _ in range(3)} == {first.json()["variant"]}
    # Pinning: reviewers may, clients may not (403 with the rule), unknown names are 404.
    assert (await _chat(c, "x", headers=REVIEWER, model="v0002")).json()["variant"] == "v0002"
    denied = await c.post("/v1/chat/completions", headers=CLIENT, json={
        "model": "v0002", "messages": [{"role": "user", "content": "hi"}]})
    assert denied.status_code == 403 and "pin_min_role" in denied.json()["error"]["message"]

    # Not enough evidence: the evaluation keeps collecting and records why.
    r = await c.post("/v1/experiments/evaluate", headers=ADMIN)
    assert r.status_code == 200 and r.json()["action"] == "continue", r.json()
    assert (await c.post("/v1/experiments/evaluate", headers=REVIEWER)).status_code == 403

    rated = await _rate_until(c, good="v0002", per_arm=8)
    r = (await c.post("/v1/experiments/evaluate", headers=ADMIN)).json()
    assert r["action"] == "promote", (r, rated)
    assert r["evidence"]["p_challenger_better"] >= 0.95
    overview = (await c.get("/v1/experiments", headers=REVIEWER)).json()
    assert overview["routing"]["champion"] == "v0002" and overview["routing"]["challenger"] is None
    assert overview["experiments"][0]["status"] == "promoted"
    promote = overview["decisions"][0]
    assert promote["action"] == "promote" and promote["automatic"] and promote["champion_before"] == "v0001"
    assert promote["evidence"]["arms"][1]["rated"] >= 8
    states = {a["version"]: a["state"] for a in (await c.get("/v1/adapters", headers=ADMIN)).json()["data"]}
    assert states == {"v0001": "retired", "v0002": "champion"}
    assert (await _chat(c, "bob")).json()["variant"] == "v0002"  # hot: no restart
    history = (await c.get("/v1/experiments/1", headers=REVIEWER)).json()
    assert history["timeline"][-1]["challenger"] == 1.0 and history["timeline"][-1]["champion"] == 0.0
    assert [d["action"] for d in history["decisions"]][:2] == ["promote", "continue"]
    metrics = (await c.get("/metrics")).text
    assert 'tellerloop_experiment_arm{arm="challenger",metric="thumbs_up_rate",variant="v0002"} 1.0' in metrics
    assert 'tellerloop_variant_weight_bytes{variant="v0002"}' in metrics
    assert 'tellerloop_serving_decisions_total{action="promote",automatic="true"} 1.0' in metrics

    # Rollback restores the previous champion; a second one walks back to the base model.
    r = await c.post("/v1/adapters/rollback", headers=ADMIN)
    assert r.status_code == 200 and r.json()["champion"] == "v0001" and r.json()["default_variant"] == "v0001"
    assert (await _chat(c, "bob")).json()["variant"] == "v0001"
    assert (await c.post("/v1/adapters/rollback", headers=ADMIN)).json()["champion"] == "base"
    assert (await _chat(c, "bob")).json()["variant"] == "base"
    nothing = await c.post("/v1/adapters/rollback", headers=ADMIN)
    assert nothing.status_code == 409 and nothing.json()["error"]["code"] == "nothing_to_roll_back"
    assert (await c.post("/v1/adapters/rollback", headers=REVIEWER)).status_code == 403

    # Manual promote always wins; retiring the champion is refused with a reason; unknowns are 404.
    assert (await c.post("/v1/adapters/v0002/promote", headers=ADMIN)).json()["state"] == "champion"
    r = await c.post("/v1/adapters/v0002/retire", headers=ADMIN)
    assert r.status_code == 409 and "roll back" in r.json()["error"]["message"]
    assert (await c.post("/v1/adapters/v0042/retire", headers=ADMIN)).status_code == 404
    assert (await c.get("/v1/experiments/99999999999999999999", headers=REVIEWER)).status_code in (400, 404)
    assert (await c.get("/v1/experiments/5", headers=REVIEWER)).status_code == 404
    # Pinned loading: an admin keeps a retired version loaded for pinned requests.
    assert "v0001" not in (await c.get("/v1/models", headers=CLIENT)).text
    r = await c.post("/v1/adapters/v0001/load", headers=ADMIN)
    assert r.status_code == 200 and r.json()["loaded"] and r.json()["pinned_loaded"]
    assert (await _chat(c, "y", headers=ADMIN, model="v0001")).json()["variant"] == "v0001"
    assert (await c.post("/v1/adapters/v0001/unload", headers=ADMIN)).json()["loaded"] is False


async def test_a_worse_challenger_is_retired_and_its_experiment_recorded(ab_gateway):
    c = ab_gateway
    busy = await c.post("/v1/retraining/runs", json={}, headers=ADMIN)
    assert busy.status_code == 409 and busy.json()["error"]["code"] == "experiment_running"  # retraining waits
    await _rate_until(c, good="v0001", per_arm=8)
    r = (await c.post("/v1/experiments/evaluate", headers=ADMIN)).json()
    assert r["action"] == "retire" and r["evidence"]["p_challenger_better"] <= 0.05
    overview = (await c.get("/v1/experiments", headers=ADMIN)).json()
    assert overview["routing"]["challenger"] is None and overview["routing"]["champion"] == "v0001"
    assert overview["experiments"][0]["status"] == "retired"
    assert (await _chat(c, "z")).json()["variant"] == "v0001"
    r = (await c.post("/v1/experiments/evaluate", headers=ADMIN)).json()
    assert r["action"] == "none"
    after = await c.post("/v1/retraining/runs", json={}, headers=ADMIN)
    assert after.json()["error"]["code"] == "not_due"  # decided: only the label count matters again


@pytest.fixture
async def anytime_gateway(make_settings, tiny_model_dir):
    """The shipped (anytime) rule, half the customers on the challenger."""
    settings = make_settings(tiny_model_dir, experiment={"challenger_share": 0.5})
    await make_adapter(settings, tiny_model_dir, "champion", seed=1)
    await make_adapter(settings, tiny_model_dir, "challenger", seed=2)
    app = create_app(settings)
    async with ready_client(app, settings) as c:
        yield c


async def _audit_all(settings, approve: str) -> int:
    """Reviewers audit every answered exchange of experiment 1: `approve`'s answers approved, the other
    arm's corrected. An exchange already queued by a signal has its one item marked as audited."""
    from datetime import timedelta

    from sqlalchemy import select

    from gateway.core.runtime import open_database
    from gateway.exchanges.models import UNANSWERED, Exchange
    from gateway.review.models import ReviewItem
    from gateway.store.base import utcnow

    now = utcnow()
    async with open_database(settings, migrate_schema=False) as sessions:
        async with sessions() as session, session.begin():
            rows = list(await session.execute(
                select(Exchange, ReviewItem).outerjoin(ReviewItem, ReviewItem.exchange_id == Exchange.id)
                .where(Exchange.experiment_id == 1, Exchange.finish_reason.not_in(UNANSWERED))
                .order_by(Exchange.created_at)))
            for i, (ex, item) in enumerate(rows):
                if item is None:
                    item = ReviewItem(exchange_id=ex.id, confidence=ex.confidence, required_labels=2,
                                      created_at=now, created_epoch=now.timestamp(), updated_at=now)
                    session.add(item)
                item.audit, item.audit_rate, item.status = True, 1.0, "resolved"
                item.resolution = "approve" if ex.variant == approve else "correct"
                item.resolved_at = now + timedelta(seconds=i)
    return len(rows)


async def test_anytime_rule_decides_on_audits_and_thumbs_through_the_gateway(anytime_gateway):
    from tests.test_roles_console import csrf

    c = anytime_gateway
    await _rate_until(c, good="v0002", per_arm=12)  # 12 straight wins on thumbs: e-value 25, combined 13
    r = (await c.post("/v1/experiments/evaluate", headers=ADMIN)).json()
    assert r["action"] == "continue" and "thumbs 25 over 12 blocks" in r["reason"], r
    assert await _audit_all(c.settings, approve="v0002") >= 24
    r = (await c.post("/v1/experiments/evaluate", headers=ADMIN)).json()
    assert r["action"] == "promote" and "anytime-valid" in r["reason"], r
    overview = (await c.get("/v1/experiments", headers=REVIEWER)).json()
    assert overview["routing"]["champion"] == "v0002"
    promote, seen = overview["current"]["decisions"][:2]
    e = promote["evidence"]["anytime"]
    assert promote["action"] == "promote" and e["audit"]["pairs"] >= 12 and e["thumbs"]["pairs"] == 12
    assert e["combined"]["better"] >= e["threshold"] == 20 and e["audit"]["e_better"] >= 20 and e["rule"] == "anytime"
    assert seen["action"] == "continue" and seen["evidence"]["anytime"]["combined"]["better"] < 20
    metrics = (await c.get("/metrics")).text
    assert 'tellerloop_experiment_evalue{direction="better"}' in metrics
    page = await c.get("/console/login")
    await c.post("/console/login", data={"key": "dev-reviewer-key", "next": "/console/experiments",
                                         "_csrf_token": csrf(page.text)})
    html = (await c.get("/console/experiments")).text
    assert 'id="e-values"' in html and "over 12 blocks" in html and "anytime-valid" in html


@pytest.fixture
async def served_ab_gateway(make_settings, tiny_model_dir):
    """The A/B set-up behind a real HTTP server, so streams really are in flight."""
    settings = make_settings(tiny_model_dir, experiment={"min_samples": 8, "challenger_share": 0.5})
    await make_adapter(settings, tiny_model_dir, "champion", seed=1)
    await make_adapter(settings, tiny_model_dir, "challenger", seed=2)
    async with served_client(create_app(settings), settings) as c:
        yield c


async def test_promotion_while_16_streams_are_in_flight(served_ab_gateway):
    """Zero failed requests; each stream finishes on the one variant it started on; the promotion
    happens while every one of the 16 is still decoding (each has its first token, none its end);
    the retired champion's weights go once its last stream is done."""
    c = served_ab_gateway
    started = {"n": 0}
    all_started = asyncio.Event()
    promotion_sent = asyncio.Event()

    async def stream(i: int) -> tuple[str, str, bool]:
        variants, first = set(), True
        async with c.stream("POST", "/v1/chat/completions", headers=CLIENT, json={
                "model": "tellerloop", "messages": [{"role": "user", "content": f"tell me a story {i}"}],
                "max_tokens": 160, "stream": True, "rag": False, "user": f"stream-user-{i}"}) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    event = json.loads(line[6:])
                    assert "error" not in event, event
                    if first and event["choices"][0]["delta"].get("content"):
                        first = False
                        started["n"] += 1
                        if started["n"] == 16:
                            all_started.set()
                    if "variant" in event:
                        variants.add(event["variant"])
                elif line == "data: [DONE]":
                    assert len(variants) == 1
                    return variants.pop(), event["exchange_id"], promotion_sent.is_set()
        raise AssertionError("stream ended without [DONE]")

    tasks = [asyncio.create_task(stream(i)) for i in range(16)]
    await asyncio.wait_for(all_started.wait(), 60)
    before = (await c.get("/metrics")).text
    promotion_sent.set()
    promoted = await c.post("/v1/adapters/v0002/promote", headers=ADMIN)
    assert promoted.status_code == 200 and promoted.json()["state"] == "champion"
    results = await asyncio.gather(*tasks)
    assert len(results) == 16
    assert all(ended_after for _, _, ended_after in results)  # all 16 were in flight at the promotion
    served = {v for v, _, _ in results}
    assert served <= {"v0001", "v0002"} and "v0001" in served
    for variant, exchange_id, _ in results:
        row = (await c.get(f"/v1/exchanges/{exchange_id}", headers=REVIEWER)).json()
        assert row["variant"] == variant

    def adapter_bytes(metrics: str) -> float:
        return float(next(line for line in metrics.splitlines()
                          if line.startswith("tellerloop_engine_adapter_bytes ")).split()[-1])
    for _ in range(50):  # v0001's matrices go once its last stream is done
        if adapter_bytes((await c.get("/metrics")).text) < adapter_bytes(before):
            break
        await asyncio.sleep(0.1)
    assert adapter_bytes((await c.get("/metrics")).text) < adapter_bytes(before)
    adapters = {a["version"]: a for a in (await c.get("/v1/adapters", headers=REVIEWER)).json()["data"]}
    assert not adapters["v0001"]["loaded"] and adapters["v0002"]["loaded"] and adapters["v0002"]["default"]
    assert [m["id"] for m in (await c.get("/v1/models", headers=CLIENT)).json()["data"]] == ["tellerloop", "base", "v0002"]


async def test_cli_promote_and_rollback_reach_a_running_gateway(ab_gateway):
    c = ab_gateway
    cfg = c.settings.storage.data_dir

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "gateway.cli", *args, "--data-dir", str(cfg)],
                              cwd=ROOT, capture_output=True, text=True, timeout=120,
                              env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})

    out = cli("promote", "v0002", "--actor", "ops")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["champion"] == "v0002"
    await c.app.state.adapter_service.reconcile()  # what the sync job does every experiment.sync_interval_s
    assert (await _chat(c, "carol")).json()["variant"] == "v0002"
    out = cli("rollback")
    assert out.returncode == 0 and json.loads(out.stdout)["champion"] == "v0001"
    await c.app.state.adapter_service.reconcile()
    assert (await _chat(c, "carol")).json()["variant"] == "v0001"
    status = json.loads(cli("experiments").stdout)
    assert [d["action"] for d in status["decisions"]][:2] == ["rollback", "promote"]
    assert status["decisions"][1]["actor"] == "cli:ops"
    bad = cli("promote", "v0042")
    assert bad.returncode == 2 and "no adapter version 'v0042'" in bad.stderr
    again = cli("promote", "v0001")
    assert again.returncode == 2 and "cannot become 'champion'" in again.stderr


async def test_console_experiments_page_and_admin_actions(ab_gateway):
    from tests.test_roles_console import csrf

    c = ab_gateway
    await _rate_until(c, good="v0002", per_arm=3)

    async def sign_in(key):
        page = await c.get("/console/login")
        r = await c.post("/console/login", data={"key": key, "next": "/console/experiments", "_csrf_token": csrf(page.text)})
        assert r.status_code in (200, 303)

    await sign_in("dev-reviewer-key")
    page = await c.get("/console/experiments")
    assert page.status_code == 200
    html = page.text
    assert "Experiment 1: v0002 vs v0001" in html and 'id="arms"' in html and "P(challenger better)" in html
    assert "<polyline" in html and 'points="' in html and "Evaluate now" not in html  # reviewers only look
    r = await c.post("/console/experiments/evaluate", data={"_csrf_token": csrf(html)})
    assert r.status_code == 403 and "Only admins" in r.text
    await c.post("/console/logout", data={"_csrf_token": csrf(html)})

    await sign_in("dev-admin-key")
    html = (await c.get("/console/experiments")).text
    assert "Evaluate now" in html and "Promote v0002" in html
    r = await c.post("/console/experiments/evaluate", data={"_csrf_token": csrf(html)}, follow_redirects=True)
    assert r.status_code == 200 and "Evaluated: continue" in r.text  # 3 < min_samples
    assert 'id="e-values"' in r.text  # the recorded evaluation's e-values, whichever rule decides
    r = await c.post("/console/experiments/promote", data={"version": "v0002", "_csrf_token": csrf(html)},
                     follow_redirects=True)
    assert "v0002 is now champion" in r.text and "promote" in r.text
    r = await c.post("/console/experiments/retire", data={"version": "v0099", "_csrf_token": csrf(r.text)})
    assert r.status_code == 404 and "No adapter version" in r.text
    r = await c.post("/console/experiments/explode", data={"_csrf_token": csrf(r.text)})
    assert r.status_code == 404
    assert (await c.post("/console/experiments/evaluate", data={})).status_code == 403  # no CSRF token


@pytest.fixture
async def pg_ab_gateway(make_settings, tiny_model_dir):
    """The same A/B set-up on a fresh PostgreSQL database (the arm aggregates must hold there too)."""
    async with fresh_postgres_database("tellerloop_ab") as url:
        settings = make_settings(tiny_model_dir, experiment={"rule": "bayes", "min_samples": 8, "challenger_share": 0.5},
                                 storage={"database_url": url})
        await make_adapter(settings, tiny_model_dir, "champion", seed=1)
        await make_adapter(settings, tiny_model_dir, "challenger", seed=2)
        app = create_app(settings)
        async with ready_client(app, settings) as c:
            yield c


async def test_experiment_decides_and_rolls_back_on_postgres(pg_ab_gateway):
    c = pg_ab_gateway
    await _rate_until(c, good="v0002", per_arm=8)
    r = (await c.post("/v1/experiments/evaluate", headers=ADMIN)).json()
    assert r["action"] == "promote", r
    arms = r["evidence"]["arms"]
    assert arms[0]["thumbs_up"] == 0 and arms[1]["thumbs_up"] == arms[1]["rated"] >= 8
    assert isinstance(arms[0]["mean_latency_ms"], float) and arms[0]["exchanges"] >= arms[0]["rated"]
    assert (await c.post("/v1/adapters/rollback", headers=ADMIN)).json()["champion"] == "v0001"
    overview = (await c.get("/v1/experiments", headers=REVIEWER)).json()
    assert [d["action"] for d in overview["decisions"][:2]] == ["rollback", "promote"]
    assert overview["current"]["timeline"][-1]["challenger"] == 1.0
