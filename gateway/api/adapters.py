"""Adapter versions (registry, manual promotion) and retraining runs."""

from __future__ import annotations

from typing import Literal

from litestar import Controller, Request, get, post
from litestar.di import NamedDependency
from litestar.params import FromPath, JSONBody
from pydantic import BaseModel, ConfigDict, Field

from gateway.adapters import AdapterService
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
