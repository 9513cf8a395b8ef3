"""float32 projections with their weights reordered once for oneDNN ("prepacked").

A decode step multiplies a few dozen rows by every weight matrix. `nn.Linear` hands that to MKL's
sgemm, which reads the row-major weight as it lies, every step; oneDNN's inner-product primitive
can instead take the weight already reordered into the blocked layout its AVX2/AVX-512 kernel
walks (`torch.ops.mkldnn._reorder_linear_weight`, the weight prepacking `torch.compile`'s CPU
freezing pass does), so a step only streams it. Measured on a 2-core AMD EPYC (AVX2) in one
process, same rounds (bench/results/packed_linear.md): a decode step of SmolLM2-135M with an
adapter 1.37x faster at 16 rows and 1.24x at 64, the 49k-word head 2.1x at 16 rows; one row
(memory-bound) and a step carrying a 512-token prompt chunk are unchanged within noise (1.02x,
0.93x). oneDNN's result for a row also does not depend on the other rows of the batch (checked in
tests/test_engine.py), so float32's batched = alone guarantee holds.

Only float32: oneDNN's bf16 reorder needs AVX512-BF16-class CPUs, where bf16-mixed already runs
its matmuls in oneDNN. The layout is tuned for a row count (`engine.prepack_rows`: 32; 16 and 32 measured
alike at 16 rows, 1.35x and 1.37x, 64 lower at 1.22x; at 64 rows 32 was best, 1.24x).
"""

from __future__ import annotations

import torch
from torch import nn


def packing_available() -> bool:
    return bool(torch.backends.mkldnn.is_available())


class PackedLinear(nn.Module):
    """`nn.Linear` in float32 with its weight in oneDNN's blocked layout (same result per row)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, rows_hint: int) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        # a buffer, not a parameter: an opaque oneDNN tensor (its bytes still count in weight_bytes)
        self.register_buffer("packed", torch.ops.mkldnn._reorder_linear_weight(weight.detach().float(), rows_hint),
                             persistent=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().float(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


def pack_linears(model: nn.Module, rows_hint: int) -> int:
    """Replace every float32 `nn.Linear` of the decoder layers and the output head with a
    `PackedLinear`; returns how many. A head tied to the embedding gets its own packed copy (the
    embedding lookup keeps the plain matrix): one more vocabulary matrix of memory for the head's
    3x."""
    count = 0
    for parent in [*model.model.layers.modules(), model]:
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and child.weight.dtype == torch.float32:
                setattr(parent, name, PackedLinear(child.weight, child.bias, rows_hint))
                count += 1
    return count
