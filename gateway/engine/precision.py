"""`model.dtype = "bf16-mixed"`: the decoder's projections in bfloat16, everything else in float32.

A decode step on this CPU streams every weight once; the seven projections of each decoder layer
(q/k/v/o, gate/up/down) are ~80 % of the bytes. Stored in bfloat16 they are half the bytes, and the
matmul runs on the CPU's AVX512-BF16 dot products (oneDNN accumulates in float32). What plain
`bfloat16` also rounds — the residual stream summed over 30 layers, the norms, attention, the KV
cache and the output head — stays float32 here, and that is where most of plain bf16's answer
changes came from (bench/results/dtype_quality-v0001*.md: the greedy answers that stay identical to
float32's, bf16 vs bf16-mixed). Each projection rounds its input to bfloat16 and returns float32.
LoRA deltas (`lora.BatchedLoraLinear`) stay float32 on the float32 input. The output head is read in
bf16 too, with the leading logits recomputed in float32 (`Bf16Head`).

An option, not the default: measured it keeps float32's answers and is 1.25-1.35x faster with
retrieval, but no faster on short prompts, and the float32 load before the conversion raises the
peak RSS (docs/benchmarks.md, "Answer quality and speed by dtype").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

MIXED = "bf16-mixed"


class Bf16Linear(nn.Linear):
    """`nn.Linear` holding its weight in bfloat16; float32 in, float32 out."""

    def __init__(self, base: nn.Linear) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = nn.Parameter(base.weight.detach().to(torch.bfloat16), requires_grad=False)
        self.bias = None if base.bias is None else nn.Parameter(base.bias.detach().to(torch.bfloat16),
                                                                requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(torch.bfloat16), self.weight, self.bias).to(x.dtype)


class Bf16Head(nn.Module):
    """The output head read in bfloat16, with the leading logits recomputed exactly.

    A float32 head streams the whole vocabulary matrix (113 MB for SmolLM2-135M) for every decoding
    row; in bfloat16 it is half the bytes. Greedy decoding and the reported log-probs care about the
    few largest logits, and those are the ones bf16 rounding would reorder, so each row's `exact_top`
    highest bf16 logits are recomputed in float32 from the float32 weights (a gather of that many
    rows) and written back: the argmax is float32's whenever it is among them; the others keep their
    bf16 value (softmax normalisation, sampling)."""

    def __init__(self, base: nn.Linear, exact_top: int = 16) -> None:
        super().__init__()
        self.exact = base.weight  # float32, shared with the embeddings when the model ties them
        self.weight16 = nn.Parameter(base.weight.detach().to(torch.bfloat16), requires_grad=False)
        self.exact_top = exact_top

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = F.linear(x.to(torch.bfloat16), self.weight16).float()
        top = logits.topk(min(self.exact_top, logits.shape[-1]), dim=-1).indices  # [..., k]
        exact = torch.einsum("...d,...kd->...k", x.float(), self.exact[top])
        return logits.scatter_(-1, top, exact)


def bf16_projections(model: nn.Module) -> None:
    """Swap every `nn.Linear` inside the decoder layers for a `Bf16Linear`, and the output head for a
    `Bf16Head` (the embeddings stay float32)."""
    for layer in model.model.layers:
        for parent in list(layer.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is nn.Linear:
                    setattr(parent, name, Bf16Linear(child))
    if type(model.lm_head) is nn.Linear:
        model.lm_head = Bf16Head(model.lm_head)
