"""A/B experiments: routing, arms, evidence, the decision rule now, and its history."""

from __future__ import annotations

from litestar import Controller, Request, get, post
from litestar.di import NamedDependency
from litestar.params import FromPath

from gateway.adapters.service import AdapterService
from gateway.api.auth import require
from gateway.core.errors import NotFound
from gateway.experiments.schemas import (
    EvaluationResult,
    ExperimentsOverview,
    ExperimentView,
)
from gateway.experiments.service import ExperimentService
from gateway.store.db import is_row_id


class ExperimentsController(Controller):
    path = "/v1/experiments"
    tags = ["experiments"]

    @get("/", guards=[require("reviewer")],
         summary="A/B state: routing, the current experiment's arms, metrics, decision rule, history")
    async def overview(self, experiment_service: NamedDependency[ExperimentService]) -> ExperimentsOverview:
        return ExperimentsOverview.model_validate(await experiment_service.experiments_overview())

    @get("/{experiment_id:int}", guards=[require("reviewer")], summary="One experiment with its evidence")
    async def one(self, experiment_id: FromPath[int],
                  experiment_service: NamedDependency[ExperimentService]) -> ExperimentView:
        view = await experiment_service.experiment_view(experiment_id) if is_row_id(experiment_id) else None
        if view is None:
            raise NotFound(f"No experiment {experiment_id}", param="experiment_id", code="not_found")
        return ExperimentView.model_validate(view)

    @post("/evaluate", guards=[require("admin")], status_code=200,
          summary="Apply the decision rule now (what the scheduled job does) and act on it")
    async def evaluate(self, request: Request, adapter_service: NamedDependency[AdapterService]) -> EvaluationResult:
        return EvaluationResult.model_validate(await adapter_service.evaluate(request.user.name))
