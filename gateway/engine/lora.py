"""Many LoRA adapters over one shared base model, served in one batch.

Every served version is a handful of small matrices (A: r × in, B: out × r per target layer, a few
MB), not a merged copy of the model. Each target `nn.Linear` of the base is wrapped once in a
`BatchedLoraLinear`; before a forward pass the engine tells the wrappers which tokens (of which
sequences) belong to which adapter (`LoraBank.route`), and each wrapper adds `scale · B·A·x` for
those tokens only, one group per adapter in the batch, on top of the shared base projection. This is the technique of
punica / S-LoRA / vLLM's LoRA path (`vllm/lora/ops/torch_ops/lora_ops.py` gathers per-row A/B
matrices; with the one to three versions an A/B test serves, grouping rows per adapter does the
same work with plain matmuls and no per-row weight copies).

An adapter names PEFT's modules (`self_attn.q_proj`, ...); where the engine has stacked sibling
projections into one (`fused.py`: q/k/v, gate/up), the adapter's pairs for them are stacked the same
way, one A of r·m rows and a block-diagonal B, so the group costs two small matmuls, not 2·m.

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
from gateway.engine.fused import FusedLinear, member_of
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
class AdapterWeights:
    """An adapter read from disk, ready to install: engine module name → (A, scale·B), where the
    members of a stacked projection share one entry; `modules` counts the adapter's own target
    modules as PEFT names them (q, k and v three times)."""

    rank: int
    modules: int
    deltas: dict[str, tuple[torch.Tensor, torch.Tensor]]


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
    def read(self, name: str, path: str | Path) -> AdapterWeights:
        """Read and validate an adapter folder (no model state changes)."""
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
        stacked: dict[str, list[tuple[int, int, torch.Tensor, torch.Tensor]]] = {}  # fused module → its members' pairs
        for module, parts in pairs.items():
            if set(parts) != {"lora_A", "lora_B"}:
                raise AdapterFormatError(f"{path}: {module} lacks lora_A or lora_B")
            a, b = parts["lora_A"], parts["lora_B"] * scale
            fused = member_of(self.model, module)  # q/k/v or gate/up: columns of one stacked projection (fused.py)
            target_name = fused[0] if fused else module
            try:
                target = self.model.get_submodule(target_name)
            except AttributeError:
                raise AdapterFormatError(f"{path}: the base model has no layer {module!r}") from None
            base = target.base if isinstance(target, BatchedLoraLinear) else target
            out_features = fused[2] - fused[1] if fused else getattr(base, "out_features", None)
            if (not isinstance(base, (nn.Linear, PackedLinear, FusedLinear)) or a.shape[1] != base.in_features
                    or b.shape[0] != out_features or a.shape[0] != b.shape[1]):
                raise AdapterFormatError(f"{path}: {module} does not match the base model's shapes")
            if fused:
                stacked.setdefault(target_name, []).append((fused[1], fused[2], a, b))
            else:
                deltas[module] = (a.to(self._dtype).contiguous(), b.to(self._dtype).contiguous())
        for target_name, members in stacked.items():
            deltas[target_name] = _stack(members, self.model.get_submodule(target_name), self._dtype)
        if not deltas:
            raise AdapterFormatError(f"{path}: the adapter holds no LoRA weights")
        return AdapterWeights(rank, len(pairs), deltas)

    def add(self, name: str, path: str | Path, weights: AdapterWeights) -> LoadedAdapter:
        """Install deltas read by `read` (call on the thread that runs forward passes, or between them)."""
        for module, delta in weights.deltas.items():
            wrapper = self._wrapped.get(module)
            if wrapper is None:
                parent_name, _, child = module.rpartition(".")
                parent = self.model.get_submodule(parent_name)
                wrapper = BatchedLoraLinear(getattr(parent, child), self.routing)
                setattr(parent, child, wrapper)
                self._wrapped[module] = wrapper
            wrapper.deltas[name] = delta
        nbytes = sum(t.numel() * t.element_size() for pair in weights.deltas.values() for t in pair)
        info = LoadedAdapter(name, str(path), weights.rank, weights.modules, nbytes)
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


def _stack(members: list[tuple[int, int, torch.Tensor, torch.Tensor]], target: nn.Module,
           dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """One (A, scale·B) pair for a fused projection from its members' pairs: the members' A stacked
    (r·m rows: one matmul reads the input once) and a block-diagonal B that writes each member's
    output columns only (a member the adapter does not touch keeps zero rows)."""
    out_features = getattr(target, "base", target).out_features
    members.sort(key=lambda m: m[0])
    a = torch.cat([m[2] for m in members])
    b = torch.zeros(out_features, a.shape[0], dtype=members[0][3].dtype)
    col = 0
    for start, end, _, member_b in members:
        b[start:end, col : col + member_b.shape[1]] = member_b
        col += member_b.shape[1]
    return a.to(dtype).contiguous(), b.to(dtype).contiguous()


def _index(tokens: list[int], total: int) -> torch.Tensor | slice | None:
    """None for every token, a slice for a contiguous run (the engine orders rows by variant), else
    an index tensor."""
    if len(tokens) == total:
        return None
    if tokens[-1] - tokens[0] + 1 == len(tokens):
        return slice(tokens[0], tokens[-1] + 1)
    return torch.tensor(tokens, dtype=torch.long)
