"""Response models of the retraining-run endpoints (`/v1/retraining/runs`): `RunService.run_dict`, key for key."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class Run(BaseModel):
    """One retraining cycle: dataset → train → evaluate → gate."""

    model_config = ConfigDict(extra="forbid")

    id: int
    status: Literal["queued", "running", "trained", "succeeded", "failed"] = Field(
        description="trained: the gateway is putting the adapter in service")
    trigger: Literal["schedule", "manual", "cli", "bootstrap"]
    requested_by: str
    overrides: dict[str, Any] = Field(description="training settings overridden for this run")
    adapter_version: str | None = Field(description="the version it trains; null until the dataset is built")
    dataset_hash: str | None
    progress: dict[str, Any] = Field(description="written by the trainer: phase, steps, losses, ...")
    metrics: dict[str, Any] = Field(description="dataset, training, evaluation and gate results")
    error: str | None
    created_at: str | None
    started_at: str | None
    finished_at: str | None
    log_tail: list[str] = Field(description="the last lines of the trainer's log; empty in the list")


class RunList(BaseModel):
    """GET /v1/retraining/runs: recent runs, newest first."""

    model_config = ConfigDict(extra="forbid")

    object: Literal["list"]
    data: list[Run]
