"""Retraining runs (admin): start one now, list them, inspect one."""

from __future__ import annotations

from typing import Literal

from litestar import Controller, Request, get, post
from litestar.di import NamedDependency
from litestar.params import FromPath, JSONBody
from pydantic import BaseModel, ConfigDict, Field

from gateway.api.auth import require
from gateway.runs.schemas import Run, RunList
from gateway.runs.service import RunService


class RunRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    force: bool = Field(False, description="start even with fewer than retraining.min_new_labels new labels")
    max_steps: int | None = Field(None, ge=1, le=100_000)
    epochs: int | None = Field(None, ge=1, le=50)
    learning_rate: float | None = Field(None, gt=0.0, le=1.0)
    quantization: Literal["4bit", "none"] | None = None
    lora_r: int | None = Field(None, ge=1, le=256)


class RetrainingController(Controller):
    path = "/v1/retraining/runs"
    guards = [require("admin")]
    tags = ["retraining"]

    @post("/", status_code=202, summary="Start a retraining cycle now (dataset → train → evaluate → gate)")
    async def start(self, request: Request, data: JSONBody[RunRequest],
                    run_service: NamedDependency[RunService]) -> Run:
        overrides = data.model_dump(exclude={"force"}, exclude_none=True)
        return Run.model_validate(await run_service.start_run(request.user.name, overrides, data.force))

    @get("/", summary="Recent runs, newest first")
    async def list_runs(self, run_service: NamedDependency[RunService]) -> RunList:
        return RunList.model_validate({"object": "list", "data": await run_service.runs()})

    @get("/{run_id:int}", summary="One run: status, progress, metrics, log tail")
    async def get_run(self, run_id: FromPath[int], run_service: NamedDependency[RunService]) -> Run:
        return Run.model_validate(await run_service.run(run_id))
