"""Projections with their weights reordered once for oneDNN ("prepacked"), float32 and bfloat16.

A decode step multiplies a few dozen rows by every weight matrix. `nn.Linear` hands that to MKL's
sgemm (float32) or to oneDNN with the weight in its plain row-major layout (bfloat16), which oneDNN
then reorders into the blocked layout its AVX2/AVX-512 kernel walks, every call; prepacked
(`torch.ops.mkldnn._reorder_linear_weight`, the weight prepacking `torch.compile`'s CPU freezing
pass does) a step only streams it. Measured:

* float32 on a 2-core AMD EPYC (AVX2) in one process, same rounds (bench/results/packed_linear.md):
  a decode step of SmolLM2-135M with an adapter 1.37x faster at 16 rows and 1.24x at 64, the 49k-word
  head 2.1x at 16 rows; one row (memory-bound) and a step carrying a 512-token prompt chunk unchanged
  within noise (1.02x, 0.93x);
* bfloat16 (bf16-mixed) on a 2-core AMD EPYC with AVX512-BF16, with the fused projections
  (fused.py), the same logits bit for bit: 1.51x / 1.46x / 1.29x / 1.16x at 1 / 4 / 16 / 64 rows
  (docs/benchmarks.md, "Fused and prepacked projections").

oneDNN's result for a row does not depend on the other rows of the batch (checked in
tests/test_engine.py), so float32's batched = alone guarantee holds. bfloat16 is packed only where
the CPU multiplies it in hardware (AVX512-BF16 or AMX): elsewhere oneDNN emulates bf16 and the
engine's `auto` dtype is float32 anyway. The layout is tuned for a row count (`engine.prepack_rows`:
32; float32: 16 and 32 measured alike at 16 rows, 1.35x and 1.37x, 64 lower at 1.22x; at 64 rows 32
was best, 1.24x; bf16: 16 and 64 alike).
"""

from __future__ import annotations

import torch
from torch import nn

from gateway.engine.precision import native_bf16


def packing_available(dtype: torch.dtype) -> bool:
    """Whether weights of `dtype` can be prepacked on this CPU (and pay)."""
    if not torch.backends.mkldnn.is_available():
        return False
    return dtype == torch.float32 or (dtype == torch.bfloat16 and native_bf16())


def prepack(weight: torch.Tensor, rows_hint: int) -> torch.Tensor:
    """`weight` [out, in] in oneDNN's blocked layout (an opaque tensor `linear_packed` reads)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), rows_hint)


def linear_packed(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


class PackedLinear(nn.Module):
    """`nn.Linear` (float32 or bfloat16) with its weight in oneDNN's blocked layout (same result per row)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, rows_hint: int) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        # a buffer, not a parameter: an opaque oneDNN tensor (its bytes still count in weight_bytes)
        self.register_buffer("packed", prepack(weight, rows_hint), persistent=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(weight.dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear_packed(x, self.packed, self.bias)


def pack_linears(model: nn.Module, rows_hint: int) -> int:
    """Replace every `nn.Linear` of the decoder layers (fused ones included) whose dtype can be
    packed here, and the output head, with a `PackedLinear`; returns how many. A float32 head tied
    to the embedding gets its own packed copy (the embedding lookup keeps the plain matrix): one more
    vocabulary matrix of memory for the head's 2-3x. bf16-mixed's head (`precision.Bf16Head`) packs
    its own bf16 copy in place."""
    count = 0
    for parent in [*model.model.layers.modules(), model]:
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and packing_available(child.weight.dtype):
                setattr(parent, name, PackedLinear(child.weight, child.bias, rows_hint))
                count += 1
    pack_head = getattr(model.lm_head, "pack", None)
    if pack_head is not None and packing_available(torch.bfloat16):
        pack_head(rows_hint)
        count += 1
    return count
