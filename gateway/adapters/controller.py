"""Adapter versions: the registry's view, manual promotion, retirement, rollback, pinning.

Manual actions always win over the experiment: they end it (or restart it against the new
champion) and are recorded as decisions like the automatic ones."""

from __future__ import annotations

from litestar import Controller, Request, get, post
from litestar.di import NamedDependency
from litestar.params import FromPath

from gateway.adapters.schemas import AdapterDetail, AdapterList, RollbackResult
from gateway.adapters.service import AdapterService
from gateway.api.auth import require


class AdaptersController(Controller):
    path = "/v1/adapters"
    tags = ["adapters"]

    @get("/", guards=[require("reviewer")], summary="Adapter versions: state, lineage, gate results")
    async def list_adapters(self, adapter_service: NamedDependency[AdapterService]) -> AdapterList:
        return AdapterList.model_validate({"object": "list", "default_variant": adapter_service.chat.default_variant,
                                           "data": await adapter_service.list()})

    @get("/{version:str}", guards=[require("reviewer")], summary="One version with its metrics and files")
    async def get_adapter(self, version: FromPath[str], adapter_service: NamedDependency[AdapterService]) -> AdapterDetail:
        return AdapterDetail.model_validate(await adapter_service.describe(version))

    @post("/{version:str}/promote", guards=[require("admin")], status_code=200,
          summary="Make a version the champion (hot: no restart, no dropped request)")
    async def promote(self, request: Request, version: FromPath[str],
                      adapter_service: NamedDependency[AdapterService]) -> AdapterDetail:
        return AdapterDetail.model_validate(await adapter_service.promote(version, request.user.name))

    @post("/{version:str}/retire", guards=[require("admin")], status_code=200,
          summary="Stop serving a challenger or candidate (ends its experiment)")
    async def retire(self, request: Request, version: FromPath[str],
                     adapter_service: NamedDependency[AdapterService]) -> AdapterDetail:
        return AdapterDetail.model_validate(await adapter_service.retire(version, request.user.name))

    @post("/{version:str}/load", guards=[require("admin")], status_code=200,
          summary="Keep a version loaded for pinned requests (model: \"<version>\")")
    async def load(self, version: FromPath[str], adapter_service: NamedDependency[AdapterService]) -> AdapterDetail:
        return AdapterDetail.model_validate(await adapter_service.pin(version, keep=True))

    @post("/{version:str}/unload", guards=[require("admin")], status_code=200,
          summary="Stop keeping a pinned version loaded (in-flight requests finish on it)")
    async def unload(self, version: FromPath[str], adapter_service: NamedDependency[AdapterService]) -> AdapterDetail:
        return AdapterDetail.model_validate(await adapter_service.pin(version, keep=False))

    @post("/rollback", guards=[require("admin")], status_code=200,
          summary="The champion goes back to the one it replaced (or the base model); hot")
    async def rollback(self, request: Request, adapter_service: NamedDependency[AdapterService]) -> RollbackResult:
        return RollbackResult.model_validate(await adapter_service.rollback(request.user.name))
