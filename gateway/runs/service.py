"""Retraining runs as the admin API sees them: start one now, list them, one with its log tail."""

from __future__ import annotations

from pathlib import Path

from gateway.core.errors import Conflict, NotFound
from gateway.runs.control import Retrainer
from gateway.runs.models import TrainingRun
from gateway.store.base import iso_utc


class RunService:
    def __init__(self, retrainer: Retrainer) -> None:
        self.retrainer = retrainer

    async def start_run(self, actor: str, overrides: dict, force: bool) -> dict:
        run = await self.retrainer.start("manual", actor, overrides, force=force)  # RunRefused is a Conflict
        if run.status == "failed":  # the dataset could not be built: nothing was trained
            raise Conflict(f"Run {run.id} failed before training: {run.error}", code="dataset_failed")
        return self.run_dict(run)

    async def runs(self) -> list[dict]:
        return [self.run_dict(r, tail=0) for r in await self.retrainer.runs.list()]

    async def run(self, run_id: int) -> dict:
        run = await self.retrainer.runs.get(run_id)
        if run is None:
            raise NotFound(f"No retraining run {run_id}", param="run_id", code="not_found")
        return self.run_dict(run)

    @staticmethod
    def run_dict(run: TrainingRun, tail: int = 30) -> dict:
        lines: list[str] = []
        if tail and run.log_path and Path(run.log_path).is_file():
            lines = Path(run.log_path).read_text(errors="replace").splitlines()[-tail:]
        return {"id": run.id, "status": run.status, "trigger": run.trigger, "requested_by": run.requested_by,
                "overrides": run.overrides, "adapter_version": run.adapter_version, "dataset_hash": run.dataset_hash,
                "progress": run.progress, "metrics": run.metrics, "error": run.error,
                "created_at": iso_utc(run.created_at), "started_at": iso_utc(run.started_at),
                "finished_at": iso_utc(run.finished_at), "log_tail": lines}
