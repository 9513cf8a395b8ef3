"""Many LoRA adapters over one shared base model, served in one batch.

Every served version is a handful of small matrices (A: r × in, B: out × r per target layer, a few
MB), not a merged copy of the model. Each target `nn.Linear` of the base is wrapped once in a
`BatchedLoraLinear`; before a forward pass the engine tells the wrappers which tokens (of which
sequences) belong to which adapter (`LoraBank.route`), and each wrapper adds `scale · B·A·x` for
those tokens only, one group per adapter in the batch, on top of the shared base projection. This is the technique of
punica / S-LoRA / vLLM's LoRA path (`vllm/lora/ops/torch_ops/lora_ops.py` gathers per-row A/B
matrices; with the one to three versions an A/B test serves, grouping rows per adapter does the
same work with plain matmuls and no per-row weight copies).

The adapter files are read with PEFT's own loaders (`PeftConfig.from_pretrained`,
`load_peft_weights`); only plain LoRA is accepted (no DoRA, biases, extra trainable modules or
per-layer rank/alpha patterns), which is exactly what `retraining/train.py` writes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from gateway.core.loading import MODEL_LOAD_LOCK
from gateway.engine.packed import PackedLinear


class AdapterFormatError(ValueError):
    """The folder is not a plain LoRA adapter this engine can serve."""


@dataclass
class RowRouting:
    """Which tokens of the current forward pass use which adapter (shared by every wrapper).
    `groups` maps adapter name → flat token indices (None: every token); base-model tokens are absent."""

    groups: dict[str, torch.Tensor | slice | None] = field(default_factory=dict)


class BatchedLoraLinear(nn.Module):
    """A base linear layer plus any number of LoRA deltas, applied per batch row."""

    def __init__(self, base: nn.Linear, routing: RowRouting) -> None:
        super().__init__()
        self.base = base
        self.routing = routing
        self.deltas: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # name → (A, scale·B)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if not self.routing.groups:
            return out
        flat_x, flat_out = x.reshape(-1, x.shape[-1]), out.view(-1, out.shape[-1])
        for name, tokens in self.routing.groups.items():
            delta = self.deltas.get(name)
            if delta is None:
                continue
            a, b = delta
            if tokens is None:
                flat_out += (flat_x @ a.T) @ b.T
            elif isinstance(tokens, slice):  # a contiguous run of tokens: no gather, no scatter
                flat_out[tokens] += (flat_x[tokens] @ a.T) @ b.T
            else:
                flat_out.index_add_(0, tokens, (flat_x.index_select(0, tokens) @ a.T) @ b.T)
        return out


@dataclass(frozen=True)
class LoadedAdapter:
    name: str
    path: str
    rank: int
    modules: int
    nbytes: int


class LoraBank:
    """The adapters loaded into one base model, and the routing of batch rows to them."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.routing = RowRouting()
        self.adapters: dict[str, LoadedAdapter] = {}
        self._wrapped: dict[str, BatchedLoraLinear] = {}
        self._dtype = next(model.model.layers.parameters()).dtype  # of the projections (bf16-mixed: bf16)

    # ---- loading ---------------------------------------------------------------------------
    def read(self, name: str, path: str | Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Read and validate an adapter folder (no model state changes): module name → (A, scale·B)."""
        # PEFT is imported on the first adapter (≈4.6 s): a server without one starts sooner. Under the
        # lock every `from_pretrained` holds, so no model load runs during the import; the serving
        # threads (forward passes, the tokenizer) import nothing from transformers by then.
        with MODEL_LOAD_LOCK:
            from peft import PeftConfig
            from peft.utils import load_peft_weights
        try:
            config = PeftConfig.from_pretrained(str(path))
        except Exception as exc:  # noqa: BLE001 - PEFT raises several types for a bad folder
            raise AdapterFormatError(f"{path}: not a PEFT adapter folder ({exc})") from None
        if getattr(config, "peft_type", None) is None or str(config.peft_type.value) != "LORA":
            raise AdapterFormatError(f"{path}: only LoRA adapters can be served, not {config.peft_type}")
        unsupported = [
            label for label, present in (
                ("DoRA", getattr(config, "use_dora", False)),
                ("trained biases", getattr(config, "bias", "none") != "none"),
                ("modules_to_save", bool(getattr(config, "modules_to_save", None))),
                ("rank_pattern", bool(getattr(config, "rank_pattern", None))),
                ("alpha_pattern", bool(getattr(config, "alpha_pattern", None))),
            ) if present
        ]
        if unsupported:
            raise AdapterFormatError(f"{path}: unsupported LoRA features: {', '.join(unsupported)}")
        rank = int(config.r)
        scale = config.lora_alpha / (math.sqrt(rank) if getattr(config, "use_rslora", False) else rank)
        weights = load_peft_weights(str(path), device="cpu")
        pairs: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in weights.items():
            for part in ("lora_A", "lora_B"):
                marker = f".{part}."
                if marker in key:
                    module = key.split(marker)[0].removeprefix("base_model.model.")
                    pairs.setdefault(module, {})[part] = tensor
                    break
            else:
                raise AdapterFormatError(f"{path}: unexpected tensor {key!r} in a LoRA adapter")
        deltas = {}
        for module, parts in pairs.items():
            if set(parts) != {"lora_A", "lora_B"}:
                raise AdapterFormatError(f"{path}: {module} lacks lora_A or lora_B")
            try:
                target = self.model.get_submodule(module)
            except AttributeError:
                raise AdapterFormatError(f"{path}: the base model has no layer {module!r}") from None
            base = target.base if isinstance(target, BatchedLoraLinear) else target
            a, b = parts["lora_A"], parts["lora_B"]
            if (not isinstance(base, (nn.Linear, PackedLinear)) or a.shape[1] != base.in_features
                    or b.shape[0] != base.out_features):
                raise AdapterFormatError(f"{path}: {module} does not match the base model's shapes")
            deltas[module] = (a.to(self._dtype).contiguous(), (b * scale).to(self._dtype).contiguous())
        if not deltas:
            raise AdapterFormatError(f"{path}: the adapter holds no LoRA weights")
        return deltas

    def add(self, name: str, path: str | Path, deltas: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> LoadedAdapter:
        """Install deltas read by `read` (call on the thread that runs forward passes, or between them)."""
        for module, delta in deltas.items():
            wrapper = self._wrapped.get(module)
            if wrapper is None:
                parent_name, _, child = module.rpartition(".")
                parent = self.model.get_submodule(parent_name)
                wrapper = BatchedLoraLinear(getattr(parent, child), self.routing)
                setattr(parent, child, wrapper)
                self._wrapped[module] = wrapper
            wrapper.deltas[name] = delta
        nbytes = sum(t.numel() * t.element_size() for pair in deltas.values() for t in pair)
        rank = next(iter(deltas.values()))[0].shape[0]
        info = LoadedAdapter(name, str(path), rank, len(deltas), nbytes)
        self.adapters[name] = info
        return info

    def remove(self, name: str) -> None:
        for wrapper in self._wrapped.values():
            wrapper.deltas.pop(name, None)
        self.adapters.pop(name, None)

    # ---- routing ---------------------------------------------------------------------------
    def route(self, variants: list[str]) -> None:
        """Name each token's variant for the next forward pass (flat order; "base" gets no delta)."""
        groups: dict[str, list[int]] = {}
        for token, variant in enumerate(variants):
            if variant in self.adapters:
                groups.setdefault(variant, []).append(token)
        self.routing.groups = {name: _index(tokens, len(variants)) for name, tokens in groups.items()}


def _index(tokens: list[int], total: int) -> torch.Tensor | slice | None:
    """None for every token, a slice for a contiguous run (the engine orders rows by variant), else
    an index tensor."""
    if len(tokens) == total:
        return None
    if tokens[-1] - tokens[0] + 1 == len(tokens):
        return slice(tokens[0], tokens[-1] + 1)
    return torch.tensor(tokens, dtype=torch.long)
