"""Adapter versions in serving: which are loaded, what the logical model name routes to (champion,
or champion and challenger while an experiment runs), manual promotion, retirement, rollback,
pinning, the decision rule applied now, and the adapter views.

Serving follows the registry: every change goes to the database first (`gateway/experiments/repository.py`),
then `reconcile()` makes the engine and the split match it — loading what should serve, retiring
what should not (in-flight requests finish on the version they started with). The gateway also
reconciles every `experiment.sync_interval_s`, which picks up changes made by the CLI.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import structlog

from gateway.adapters.models import Adapter
from gateway.adapters.registry import AdapterCorrupt, AdapterRegistry, RegistryError
from gateway.calibration.repository import Calibrators
from gateway.chat.routing import Split
from gateway.chat.service import ChatService
from gateway.core import metrics
from gateway.core.errors import Conflict, InvalidRequest, NotFound
from gateway.core.settings import Settings
from gateway.engine.base import Engine
from gateway.experiments.repository import BASE, Experiments, decision_dict
from gateway.store.base import iso_utc

log = structlog.get_logger(__name__)


class AdapterService:
    def __init__(self, settings: Settings, engine: Engine, chat: ChatService, registry: AdapterRegistry,
                 experiments: Experiments) -> None:
        self.settings, self.engine, self.chat = settings, engine, chat
        self.registry, self.experiments = registry, experiments
        self._lock = asyncio.Lock()  # one serving change at a time (API, console, scheduled jobs)
        self.pinned: set[str] = set()  # extra versions an admin asked to keep loaded (for `model: "<version>"`)
        # adapters loaded by name from a path through the vLLM-compatible admin API (`/v1/load_lora_adapter`):
        # outside the registry, kept until unloaded or the process stops, as vLLM keeps them
        self.external: dict[str, str] = {}
        self.calibrators = Calibrators(registry.sessions)

    # ---- serving -----------------------------------------------------------------------------
    async def reconcile(self) -> Split:
        """Load the champion and the challenger, route the logical name, retire the rest."""
        async with self._lock:
            return await self._reconcile()

    async def _reconcile(self) -> Split:
        for _ in range(3):  # again after a challenger was refused (it leaves the experiment)
            split = await self._reconcile_once()
            if split is not None:
                return split
        return self.chat.split

    async def _reconcile_once(self) -> Split | None:
        experiment = await self.experiments.sync()
        adapters = {a.version: a for a in await self.registry.list()}
        champion = next((v for v, a in adapters.items() if a.state == "champion"), BASE)
        challenger = experiment.challenger if experiment else None
        for version in (champion, challenger, *sorted(self.pinned)):
            if version in (None, BASE) or version in self.engine.variants():
                continue
            try:
                folder = await self.registry.verify(version)
                await self.engine.load_adapter(version, str(folder))
                log.info("adapter.serving", version=version, state=adapters[version].state)
            except (AdapterCorrupt, RegistryError, OSError, ValueError) as exc:
                log.error("adapter.refused", version=version, reason=str(exc))
                metrics.ADAPTER_REFUSALS.inc()
                if version in self.pinned:
                    self.pinned.discard(version)
                    continue
                if version == challenger:  # a challenger that cannot load leaves the experiment
                    await self.experiments.retire(version, "gateway", True, f"refused at load: {exc}")
                    return None
                champion = BASE  # never serve garbage: the base model answers until this is fixed
        wanted = {BASE, champion, challenger, *self.pinned, *self.external}
        for version in self.engine.variants():
            if version not in wanted:
                await self.engine.unload_adapter(version)
                log.info("adapter.retired_from_serving", version=version)
        split = Split(champion, challenger, experiment.share if experiment else 0.0,
                      experiment.id if experiment else None)
        if split != self.chat.split:
            log.info("routing.changed", champion=champion, challenger=challenger, share=split.share,
                     experiment_id=split.experiment_id)
        self.chat.split = split
        self.chat.calibrators = await self.calibrators.active()  # refits (scheduled, trainer, CLI) arrive here
        metrics.ADAPTER_MEMORY.clear()  # retired variants leave the gauge
        for variant, size in self.engine.weight_bytes().items():
            metrics.ADAPTER_MEMORY.labels(variant).set(size)
        return split

    async def promote(self, version: str, actor: str) -> dict:
        return await self._decide(version, actor, self.experiments.promote)

    async def retire(self, version: str, actor: str) -> dict:
        return await self._decide(version, actor, self.experiments.retire)

    async def _decide(self, version: str, actor: str, action) -> dict:  # noqa: ANN001
        """A manual decision on one version: recorded, then served (hot), or a 409 saying why not."""
        await self._known(version)
        async with self._lock:
            try:
                await action(version, actor)
            except AdapterCorrupt as exc:
                raise Conflict(str(exc), code="adapter_corrupt") from None
            except RegistryError as exc:
                raise Conflict(str(exc), code="illegal_transition") from None
            finally:
                await self._reconcile()
        return await self.describe(version)

    async def rollback(self, actor: str) -> dict:
        async with self._lock:
            try:
                restored = await self.experiments.rollback(actor)
            except AdapterCorrupt as exc:
                raise Conflict(f"cannot roll back: {exc}", code="adapter_corrupt") from None
            except RegistryError as exc:
                raise Conflict(str(exc), code="nothing_to_roll_back") from None
            finally:
                await self._reconcile()
        return {"champion": restored, "default_variant": self.chat.default_variant,
                "decision": decision_dict((await self.experiments.decisions(limit=1))[0])}

    async def evaluate(self, actor: str) -> dict:
        """The decision rule, applied now (the scheduled job, `POST /v1/experiments/evaluate`)."""
        async with self._lock:
            try:
                return await self.experiments.evaluate(actor)
            finally:
                await self._reconcile()

    async def pin(self, version: str, keep: bool) -> dict:
        """Keep a version loaded beside the champion and challenger (or stop), for pinned requests."""
        adapter = await self._known(version)
        if keep and adapter.state in ("training", "failed"):
            raise Conflict(f"{version} is '{adapter.state}': there is nothing to load", code="illegal_transition")
        if keep:
            try:
                await self.registry.verify(version)
            except AdapterCorrupt as exc:
                metrics.ADAPTER_REFUSALS.inc()
                raise Conflict(str(exc), code="adapter_corrupt") from None
            self.pinned.add(version)
        else:
            self.pinned.discard(version)
        async with self._lock:
            await self._reconcile()
        return await self.describe(version)

    # ---- the vLLM-compatible dynamic LoRA API ------------------------------------------------
    async def load_external(self, name: str, path: str, inplace: bool = False) -> str:
        """Serve the LoRA folder at `path` as model `name` (vLLM's `POST /v1/load_lora_adapter`), so a
        gateway in front of this one (`engine.backend = "openai"`) can register its versions here."""
        if name in (BASE, self.settings.model.name):
            raise InvalidRequest(f"'{name}' is this server's base or logical model name; choose another lora_name",
                                 param="lora_name")
        if await self.registry.get(name) is not None:
            raise Conflict(f"'{name}' is a version of this gateway's own registry; POST /v1/adapters/{name}/load "
                           "serves it", code="registry_version")
        folder = Path(path)
        if not (folder / "adapter_config.json").is_file():
            raise InvalidRequest(f"No adapter found at '{path}': a PEFT LoRA folder with adapter_config.json "
                                 "readable by this server is needed", param="lora_path")
        async with self._lock:
            if (name in self.external and not inplace) or (name not in self.external and name in self.engine.variants()):
                raise InvalidRequest(f"The lora adapter '{name}' has already been loaded. If you want to load the "
                                     "adapter in place, set 'load_inplace' to True.", param="lora_name")
            try:
                await self.engine.load_adapter(name, str(folder))
            except (OSError, ValueError) as exc:
                metrics.ADAPTER_REFUSALS.inc()
                raise InvalidRequest(f"The adapter at '{path}' cannot be served: {exc}", param="lora_path") from None
            self.external[name] = str(folder)
        log.info("adapter.external_loaded", name=name, path=str(folder))
        return f"Success: LoRA adapter '{name}' added successfully."

    async def unload_external(self, name: str) -> str:
        """vLLM's `POST /v1/unload_lora_adapter`: requests already running on it finish on it."""
        async with self._lock:
            if self.external.pop(name, None) is None:
                raise NotFound(f"The lora adapter '{name}' cannot be found.", param="lora_name", code="not_found")
            await self.engine.unload_adapter(name)
        log.info("adapter.external_unloaded", name=name)
        return f"Success: LoRA adapter '{name}' removed successfully."

    async def _known(self, version: str) -> Adapter:
        adapter = await self.registry.get(version[:20])
        if adapter is None:
            raise NotFound(f"No adapter version '{version[:20]}'", param="version", code="not_found")
        return adapter

    # ---- read --------------------------------------------------------------------------------
    async def list(self) -> list[dict]:
        weights = self.engine.weight_bytes()
        return [self._summary(a, weights) for a in await self.registry.list()]

    async def describe(self, version: str) -> dict:
        adapter = await self._known(version)
        return {**self._summary(adapter, self.engine.weight_bytes()), "metrics": adapter.metrics,
                "config": adapter.config, "files": adapter.files}

    def split_dict(self) -> dict:
        split = self.chat.split
        return {"champion": split.champion, "challenger": split.challenger, "challenger_share": split.share,
                "experiment_id": split.experiment_id, "enabled": self.settings.experiment.enabled,
                "sticky_by": ["user", self.settings.experiment.session_header]}

    def _summary(self, a: Adapter, weights: dict[str, int] | None = None) -> dict:
        gate = (a.metrics or {}).get("gate") or {}
        return {"version": a.version, "state": a.state, "parent": a.parent,
                "initialised_from": (a.config or {}).get("initialised_from"), "run_id": a.run_id,
                "base_model": a.base_model, "dataset_hash": a.dataset_hash, "label_count": a.label_count,
                "train_examples": a.train_examples, "reason": a.reason, "gate": gate.get("checks"),
                "loaded": a.version in self.engine.variants(),
                "weight_bytes": (weights or {}).get(a.version),
                "pinned_loaded": a.version in self.pinned,
                "default": self.chat.default_variant == a.version,
                "traffic_share": self._share(a.version),
                "created_at": iso_utc(a.created_at), "updated_at": iso_utc(a.updated_at)}

    def _share(self, version: str) -> float:
        split = self.chat.split
        if version == split.challenger:
            return split.share
        return (1.0 - split.share if split.challenger else 1.0) if version == split.champion else 0.0
