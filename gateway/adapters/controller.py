"""Adapter versions: the registry's view, manual promotion, retirement, rollback, pinning.

Manual actions always win over the experiment: they end it (or restart it against the new
champion) and are recorded as decisions like the automatic ones."""

from __future__ import annotations

from litestar import Controller, MediaType, Request, get, post
from litestar.di import NamedDependency
from litestar.params import FromPath, JSONBody

from gateway.adapters.schemas import (
    AdapterDetail,
    AdapterList,
    LoadLoraAdapterRequest,
    RollbackResult,
    UnloadLoraAdapterRequest,
)
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


class DynamicLoraController(Controller):
    """vLLM's dynamic LoRA API, same paths, bodies and answers, so this gateway can be the upstream
    of another (`engine.backend = "openai"`): adapters by name from a path, outside the registry."""

    path = "/v1"
    tags = ["adapters"]

    @post("/load_lora_adapter", guards=[require("admin")], status_code=200, media_type=MediaType.TEXT,
          summary="Serve a LoRA folder as model `lora_name` (vLLM-compatible)")
    async def load_lora_adapter(self, data: JSONBody[LoadLoraAdapterRequest],
                                adapter_service: NamedDependency[AdapterService]) -> str:
        return await adapter_service.load_external(data.lora_name, data.lora_path, data.load_inplace)

    @post("/unload_lora_adapter", guards=[require("admin")], status_code=200, media_type=MediaType.TEXT,
          summary="Stop serving a LoRA loaded by name (vLLM-compatible); running requests finish on it")
    async def unload_lora_adapter(self, data: JSONBody[UnloadLoraAdapterRequest],
                                  adapter_service: NamedDependency[AdapterService]) -> str:
        return await adapter_service.unload_external(data.lora_name)
