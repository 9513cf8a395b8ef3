"""Adapter versions (registry, manual promotion, retirement, rollback), experiments, retraining runs.

Manual actions always win over the experiment: they end it (or restart it against the new
champion) and are recorded as decisions like the automatic ones."""

from __future__ import annotations

from typing import Literal

from litestar import Controller, Request, get, post
from litestar.di import NamedDependency
from litestar.params import FromPath, JSONBody
from pydantic import BaseModel, ConfigDict, Field

from gateway.adapters import AdapterService
from gateway.errors import ApiError
from gateway.store.db import is_row_id
from gateway.security import require


class RunRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    force: bool = Field(False, description="start even with fewer than retraining.min_new_labels new labels")
    max_steps: int | None = Field(None, ge=1, le=100_000)
    epochs: int | None = Field(None, ge=1, le=50)
    learning_rate: float | None = Field(None, gt=0.0, le=1.0)
    quantization: Literal["4bit", "none"] | None = None
    lora_r: int | None = Field(None, ge=1, le=256)


class AdaptersController(Controller):
    path = "/v1/adapters"
    tags = ["adapters"]

    @get("/", guards=[require("reviewer")], summary="Adapter versions: state, lineage, gate results")
    async def list_adapters(self, adapter_service: NamedDependency[AdapterService]) -> dict:
        return {"object": "list", "default_variant": adapter_service.chat.default_variant,
                "data": await adapter_service.list()}

    @get("/{version:str}", guards=[require("reviewer")], summary="One version with its metrics and files")
    async def get_adapter(self, version: FromPath[str], adapter_service: NamedDependency[AdapterService]) -> dict:
        return await adapter_service.describe(version)

    @post("/{version:str}/promote", guards=[require("admin")], status_code=200,
          summary="Make a version the champion (hot: no restart, no dropped request)")
    async def promote(self, request: Request, version: FromPath[str],
                      adapter_service: NamedDependency[AdapterService]) -> dict:
        return await adapter_service.promote(version, request.user.name)

    @post("/{version:str}/retire", guards=[require("admin")], status_code=200,
          summary="Stop serving a challenger or candidate (ends its experiment)")
    async def retire(self, request: Request, version: FromPath[str],
                     adapter_service: NamedDependency[AdapterService]) -> dict:
        return await adapter_service.retire(version, request.user.name)

    @post("/{version:str}/load", guards=[require("admin")], status_code=200,
          summary="Keep a version loaded for pinned requests (model: \"<version>\")")
    async def load(self, version: FromPath[str], adapter_service: NamedDependency[AdapterService]) -> dict:
        return await adapter_service.pin(version, keep=True)

    @post("/{version:str}/unload", guards=[require("admin")], status_code=200,
          summary="Stop keeping a pinned version loaded (in-flight requests finish on it)")
    async def unload(self, version: FromPath[str], adapter_service: NamedDependency[AdapterService]) -> dict:
        return await adapter_service.pin(version, keep=False)

    @post("/rollback", guards=[require("admin")], status_code=200,
          summary="The champion goes back to the one it replaced (or the base model); hot")
    async def rollback(self, request: Request, adapter_service: NamedDependency[AdapterService]) -> dict:
        return await adapter_service.rollback(request.user.name)


class ExperimentsController(Controller):
    path = "/v1/experiments"
    tags = ["experiments"]

    @get("/", guards=[require("reviewer")],
         summary="A/B state: routing, the current experiment's arms, metrics, decision rule, history")
    async def overview(self, adapter_service: NamedDependency[AdapterService]) -> dict:
        return await adapter_service.experiments_overview()

    @get("/{experiment_id:int}", guards=[require("reviewer")], summary="One experiment with its evidence")
    async def one(self, experiment_id: FromPath[int], adapter_service: NamedDependency[AdapterService]) -> dict:
        view = await adapter_service.experiment_view(experiment_id) if is_row_id(experiment_id) else None
        if view is None:
            raise ApiError(404, f"No experiment {experiment_id}", param="experiment_id", code="not_found")
        return view

    @post("/evaluate", guards=[require("admin")], status_code=200,
          summary="Apply the decision rule now (what the scheduled job does) and act on it")
    async def evaluate(self, request: Request, adapter_service: NamedDependency[AdapterService]) -> dict:
        return await adapter_service.evaluate(request.user.name)


class RetrainingController(Controller):
    path = "/v1/retraining/runs"
    guards = [require("admin")]
    tags = ["retraining"]

    @post("/", status_code=202, summary="Start a retraining cycle now (dataset → train → evaluate → gate)")
    async def start(self, request: Request, data: JSONBody[RunRequest],
                    adapter_service: NamedDependency[AdapterService]) -> dict:
        overrides = data.model_dump(exclude={"force"}, exclude_none=True)
        return await adapter_service.start_run(request.user.name, overrides, data.force)

    @get("/", summary="Recent runs, newest first")
    async def list_runs(self, adapter_service: NamedDependency[AdapterService]) -> dict:
        return {"object": "list", "data": await adapter_service.runs()}

    @get("/{run_id:int}", summary="One run: status, progress, metrics, log tail")
    async def get_run(self, run_id: FromPath[int], adapter_service: NamedDependency[AdapterService]) -> dict:
        return await adapter_service.run(run_id)
