"""Adapter versions in serving: which are loaded, which one the logical model name means, manual
promotion, and retraining runs. The registry and the trainer live in `retraining/`; this service
connects them to the running engine (hot: loading a version never stops the others)."""

from __future__ import annotations

from pathlib import Path

import structlog

from gateway.chat import ChatService
from gateway.engine.base import Engine
from gateway.errors import ApiError
from gateway.settings import Settings
from gateway.store.models import Adapter, TrainingRun, iso_utc
from retraining.jobs import Retrainer, RunRefused
from retraining.registry import AdapterCorrupt, RegistryError

log = structlog.get_logger(__name__)
SERVED_STATES = ("champion", "challenger")


class AdapterService:
    def __init__(self, settings: Settings, engine: Engine, chat: ChatService, retrainer: Retrainer) -> None:
        self.settings, self.engine, self.chat, self.retrainer = settings, engine, chat, retrainer
        self.registry = retrainer.registry

    # ---- serving -----------------------------------------------------------------------------
    async def load(self, adapter: Adapter) -> None:
        """Verify checksums, load into the engine, and route the logical name to a champion."""
        folder = await self.registry.verify(adapter.version)
        if adapter.version not in self.engine.variants():
            await self.engine.load_adapter(adapter.version, str(folder))
        if adapter.state == "champion":
            self.chat.default_variant = adapter.version
        log.info("adapter.serving", version=adapter.version, state=adapter.state)

    async def load_served(self) -> None:
        """At start-up: the champion and any challenger. A corrupt one is refused and logged; the
        gateway serves without it rather than serving garbage."""
        for adapter in await self.registry.list():
            if adapter.state in SERVED_STATES:
                try:
                    await self.load(adapter)
                except (AdapterCorrupt, RegistryError, OSError, ValueError) as exc:
                    log.error("adapter.refused", version=adapter.version, reason=str(exc))

    async def promote(self, version: str, actor: str) -> dict:
        adapter = await self.registry.get(version)
        if adapter is None:
            raise ApiError(404, f"No adapter version '{version[:20]}'", param="version", code="not_found")
        try:
            await self.registry.verify(version)
            adapter = await self.registry.transition(version, "champion", reason=f"promoted by {actor}")
            await self.load(adapter)
        except AdapterCorrupt as exc:
            raise ApiError(409, str(exc), code="adapter_corrupt") from None
        except RegistryError as exc:
            raise ApiError(409, str(exc), code="illegal_transition") from None
        return await self.describe(version)

    # ---- read --------------------------------------------------------------------------------
    async def list(self) -> list[dict]:
        return [self._summary(a) for a in await self.registry.list()]

    async def describe(self, version: str) -> dict:
        adapter = await self.registry.get(version)
        if adapter is None:
            raise ApiError(404, f"No adapter version '{version[:20]}'", param="version", code="not_found")
        return {**self._summary(adapter), "metrics": adapter.metrics, "config": adapter.config, "files": adapter.files}

    def _summary(self, a: Adapter) -> dict:
        gate = (a.metrics or {}).get("gate") or {}
        return {"version": a.version, "state": a.state, "parent": a.parent, "run_id": a.run_id,
                "base_model": a.base_model, "dataset_hash": a.dataset_hash, "label_count": a.label_count,
                "train_examples": a.train_examples, "reason": a.reason, "gate": gate.get("checks"),
                "loaded": a.version in self.engine.variants(),
                "default": self.chat.default_variant == a.version,
                "created_at": iso_utc(a.created_at), "updated_at": iso_utc(a.updated_at)}

    # ---- retraining runs ---------------------------------------------------------------------
    async def start_run(self, actor: str, overrides: dict, force: bool) -> dict:
        try:
            run = await self.retrainer.start("manual", actor, overrides, force=force)
        except RunRefused as exc:
            raise ApiError(409, str(exc), code=exc.code) from None
        if run.status == "failed":  # the dataset could not be built: nothing was trained
            raise ApiError(409, f"Run {run.id} failed before training: {run.error}", code="dataset_failed")
        return self.run_dict(run)

    async def runs(self) -> list[dict]:
        return [self.run_dict(r, tail=0) for r in await self.retrainer.runs.list()]

    async def run(self, run_id: int) -> dict:
        run = await self.retrainer.runs.get(run_id)
        if run is None:
            raise ApiError(404, f"No retraining run {run_id}", param="run_id", code="not_found")
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
