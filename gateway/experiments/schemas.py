"""Response models of the experiment endpoints (`/v1/experiments`): the dicts `ExperimentService` and
`Experiments.evaluate` build, key for key."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from gateway.adapters.schemas import Decision, Routing


class ExperimentRow(BaseModel):
    """One experiment: champion vs challenger."""

    model_config = ConfigDict(extra="forbid")

    id: int
    champion: str = Field(description="a version, or 'base'")
    challenger: str
    challenger_share: float = Field(description="share of routing units (customers) on the challenger")
    status: Literal["running", "promoted", "retired", "ended"]
    reason: str | None = Field(description="why it ended")
    started_at: str | None
    ended_at: str | None


class ArmStats(BaseModel):
    """One arm over the experiment's exchanges (cancelled ones excluded): exchange counts for display,
    per-customer aggregates for the decision rule."""

    model_config = ConfigDict(extra="forbid")

    variant: str
    role: Literal["champion", "challenger"]
    exchanges: int
    rated: int = Field(description="exchanges with a thumbs rating")
    thumbs_up: int
    staff_flagged: int = Field(description="exchanges with at least one staff flag")
    low_confidence: int = Field(description="exchanges flagged for review by their confidence score")
    mean_confidence: float | None
    mean_latency_ms: float | None
    customers: int = Field(description="routing units that reached this arm")
    rated_customers: int = Field(description="customers with at least one rating")
    satisfied: float = Field(description="sum over rated customers of their thumbs-up share")
    flagged_customers: int = Field(description="customers with at least one staff-flagged exchange")
    thumbs_up_rate: float | None
    thumbs_up_interval: list[float] = Field(min_length=2, max_length=2, description="95% credible interval [low, high]")
    satisfaction_rate: float | None = Field(description="satisfied / rated_customers: what the rule compares")
    satisfaction_interval: list[float] = Field(min_length=2, max_length=2,
                                               description="95% credible interval [low, high]")
    flag_rate: float | None = Field(description="staff_flagged / exchanges")
    flag_interval: list[float] = Field(min_length=2, max_length=2, description="95% credible interval [low, high]")
    customer_flag_rate: float | None = Field(description="flagged_customers / customers: what the guardrail compares")
    low_confidence_rate: float | None


class DecisionRule(BaseModel):
    """The decision rule's settings (`experiment.*`)."""

    model_config = ConfigDict(extra="forbid")

    min_samples: int = Field(description="rated customers per arm before any decision on satisfaction")
    promote_probability: float = Field(description="P(challenger better) that promotes; ≤ 1 − this retires")
    guardrail_probability: float = Field(description="P(challenger flagged more) that retires it")
    guardrail_min_flags: int = Field(description="...with at least this many flagged customers on the challenger")
    guardrail_min_difference: float = Field(description="...and customer flag rates this far apart")
    max_days: float = Field(description="no decision by then: the challenger is retired (inconclusive)")


class Evidence(BaseModel):
    """What the decision rule saw."""

    model_config = ConfigDict(extra="forbid")

    arms: list[ArmStats] = Field(description="[champion, challenger]")
    unit: Literal["customer"] = Field(description="the sampling unit of the rule")
    p_challenger_better: float = Field(description="P(challenger's satisfaction rate > champion's)")
    p_challenger_flagged_more: float = Field(description="P(challenger's customer flag rate > champion's)")
    age_days: float
    rule: DecisionRule
    anytime: dict[str, Any] | None = Field(
        None, description="the anytime-valid rule's evidence: e-values for 'better' and 'worse' per stream (audit "
                          "verdicts, first thumbs per customer) and combined, observations, bets, threshold 1/α")


class WouldDecide(BaseModel):
    """What the decision rule would do now."""

    model_config = ConfigDict(extra="forbid")

    action: Literal["promote", "retire", "continue"]
    reason: str


class TimelinePoint(BaseModel):
    """Cumulative thumbs-up rate per arm at one moment of the experiment."""

    model_config = ConfigDict(extra="forbid")

    fraction: float = Field(description="how far into the experiment (0..1]")
    champion: float | None = Field(description="the champion's thumbs-up rate so far; null before a rating")
    challenger: float | None = Field(description="the challenger's thumbs-up rate so far; null before a rating")
    champion_rated: int
    challenger_rated: int


class ExperimentView(ExperimentRow):
    """One experiment with its arms, evidence, timeline and decisions (GET /v1/experiments/{id})."""

    arms: list[ArmStats] = Field(description="[champion, challenger]")
    p_challenger_better: float = Field(description="P(challenger's satisfaction rate > champion's)")
    p_challenger_flagged_more: float = Field(description="P(challenger's customer flag rate > champion's)")
    rule: DecisionRule
    would_decide: WouldDecide | None = Field(description="null unless the experiment is running")
    timeline: list[TimelinePoint]
    decisions: list[Decision] = Field(description="newest first, evaluations included")


class ExperimentsOverview(BaseModel):
    """GET /v1/experiments."""

    model_config = ConfigDict(extra="forbid")

    object: Literal["experiments"]
    routing: Routing
    current: ExperimentView | None = Field(description="the running experiment, else the latest; null if none ever ran")
    experiments: list[ExperimentRow] = Field(description="newest first")
    decisions: list[Decision] = Field(description="serving changes, newest first (evaluations left out)")


class EvaluationResult(BaseModel):
    """POST /v1/experiments/evaluate: the rule's verdict, already acted on."""

    model_config = ConfigDict(extra="forbid")

    experiment_id: int | None = Field(description="null when no experiment is running")
    action: Literal["promote", "retire", "continue", "none"] = Field(description="'none': no experiment is running")
    reason: str
    evidence: Evidence | None = Field(None, description="absent when no experiment is running")
