"""Experiment views: the running (or latest) A/B test with its arms, evidence, what the decision
rule would do now, the timeline for the chart and the decision history. Read-only: decisions that
change serving go through `AdapterService` (it holds the serving lock)."""

from __future__ import annotations

from gateway.adapters.service import AdapterService
from gateway.core.settings import Settings
from gateway.experiments.repository import Experiments, decision_dict, experiment_dict
from gateway.experiments.statistics import age_days, decide, refresh_gauges


class ExperimentService:
    def __init__(self, settings: Settings, experiments: Experiments, serving: AdapterService) -> None:
        self.settings, self.experiments, self.serving = settings, experiments, serving

    async def experiment_view(self, experiment_id: int | None = None) -> dict | None:
        """One experiment (default: the running one, else the latest) with its arms, evidence and decisions."""
        if experiment_id is None:
            exp = await self.experiments.running() or next(iter(await self.experiments.list(1)), None)
        else:
            exp = await self.experiments.get(experiment_id)
        if exp is None:
            return None
        champion, challenger = await self.experiments.arms(exp)
        verdict = decide(self.settings.experiment, champion, challenger, age_days(exp))
        if exp.status == "running":
            refresh_gauges(verdict.evidence)
        return {**experiment_dict(exp), "arms": verdict.evidence["arms"],
                "p_challenger_better": verdict.evidence["p_challenger_better"],
                "p_challenger_flagged_more": verdict.evidence["p_challenger_flagged_more"],
                "rule": verdict.evidence["rule"],
                "would_decide": {"action": verdict.action, "reason": verdict.reason} if exp.status == "running" else None,
                "timeline": await self.experiments.timeline(exp),
                "decisions": [decision_dict(d) for d in await self.experiments.decisions(exp.id, limit=50)]}

    async def experiments_overview(self) -> dict:
        current = await self.experiment_view()
        return {"object": "experiments", "routing": self.serving.split_dict(),
                "current": current,
                "experiments": [experiment_dict(e) for e in await self.experiments.list()],
                "decisions": [decision_dict(d) for d in await self.experiments.decisions(limit=50, include_continue=False)]}
