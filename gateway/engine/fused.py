"""Sibling projections that read the same input, run as one matrix.

Each decoder layer of the Llama layout multiplies its attention input by three matrices (q, k, v)
and its MLP input by two (gate, up). Stacked into one matrix per group (`qkv_proj`: q, k and v's
rows; `gate_up_proj`: gate's then up's), a step makes two matmul calls where it made five, with
the same arithmetic for every output column (each column is still one row of the original matrix
dotted with the input), so the results are the same. On a 2-core CPU a decode step is a few
hundred small calls, each paying oneDNN's dispatch and an OpenMP fork/join, and fusing them is
1.2-1.5x on its own with the weights prepacked (docs/benchmarks.md, "Fused and prepacked
projections"); vLLM's `QKVParallelLinear` / `MergedColumnParallelLinear` do the same.

A LoRA adapter still names the original modules (`self_attn.q_proj`, ...): `member_of` finds the
fused projection and the columns a name maps to, and `lora.LoraBank` stacks an adapter's matrices
for the group the same way (one A of r·m rows, one block-diagonal B).
"""

from __future__ import annotations

import torch
from torch import nn

# fused name → the members it replaces, in the order their rows are stacked
GROUPS = {
    "self_attn": {"qkv_proj": ("q_proj", "k_proj", "v_proj")},
    "mlp": {"gate_up_proj": ("gate_proj", "up_proj")},
}


class FusedLinear(nn.Module):
    """Several `nn.Linear`s over the same input as one; `parts` maps each member's name to its
    output columns (start, end). `proj` is the stacked `nn.Linear` (or its prepacked form)."""

    def __init__(self, members: dict[str, nn.Linear]) -> None:
        super().__init__()
        weights = [m.weight.detach() for m in members.values()]
        self.in_features = weights[0].shape[1]
        self.out_features = sum(w.shape[0] for w in weights)
        self.parts: dict[str, tuple[int, int]] = {}
        start = 0
        for name, w in zip(members, weights):
            self.parts[name] = (start, start + w.shape[0])
            start += w.shape[0]
        has_bias = any(m.bias is not None for m in members.values())  # Qwen2: q, k and v carry biases
        self.proj = nn.Linear(self.in_features, self.out_features, bias=has_bias, dtype=weights[0].dtype)
        self.proj.requires_grad_(False)
        self.proj.weight.copy_(torch.cat(weights))
        if has_bias:
            self.proj.bias.copy_(torch.cat([m.bias.detach() if m.bias is not None else torch.zeros(w.shape[0], dtype=w.dtype)
                                            for m, w in zip(members.values(), weights)]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def fuse_projections(model: nn.Module) -> int:
    """Replace each decoder layer's q/k/v and gate/up projections with one `FusedLinear` per group
    (the originals are dropped: no second copy of the weights); returns how many groups."""
    count = 0
    for layer in model.model.layers:
        for block_name, groups in GROUPS.items():
            block = getattr(layer, block_name)
            for fused_name, names in groups.items():
                members = {name: getattr(block, name) for name in names}
                if not all(type(m) is nn.Linear for m in members.values()):
                    raise ValueError(f"{block_name}.{fused_name}: expected plain nn.Linear members, got "
                                     f"{[type(m).__name__ for m in members.values()]}")
                setattr(block, fused_name, FusedLinear(members))
                for name in names:
                    delattr(block, name)
                count += 1
    return count


def member_of(model: nn.Module, module: str) -> tuple[str, int, int] | None:
    """For an original projection's name (`model.layers.3.self_attn.k_proj`), the fused module
    holding it and its output columns: (`model.layers.3.self_attn.qkv_proj`, start, end); None
    if the name is not a fused member."""
    parent_name, _, child = module.rpartition(".")
    block = parent_name.rpartition(".")[2]
    for fused_name, names in GROUPS.get(block, {}).items():
        if child in names:
            try:
                fused = model.get_submodule(f"{parent_name}.{fused_name}")
            except AttributeError:
                return None
            fused = getattr(fused, "base", fused)  # under its LoRA wrapper
            if isinstance(fused, FusedLinear):
                start, end = fused.parts[child]
                return f"{parent_name}.{fused_name}", start, end
    return None
