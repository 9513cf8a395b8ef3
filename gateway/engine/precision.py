"""`model.dtype = "bf16-mixed"`: bfloat16 compute, with a float32 residual stream and an exact head.

A decode step on this CPU streams every weight once, so halving the weight bytes (bfloat16, run on
the CPU's AVX512-BF16 dot products with float32 accumulation in oneDNN) is the largest speed lever
there is. Plain `bfloat16` also rounds the two things greedy answers are most sensitive to:

* the residual stream, the running sum every layer adds to (30 roundings of the sum for
  SmolLM2-135M), and
* the output head's logits, where a rounding reorders near-tied candidates for the next token.

Here those two stay float32 and everything else is bfloat16, the split llama.cpp makes too (f32
activations, low-precision weights and KV): the model is loaded in bfloat16; the embedding matrix is
read again in float32 from the checkpoint, so the residual stream starts and stays float32 (each
layer's bf16 output is added to it in float32); each layer's norms hand bf16 to the attention and
MLP blocks (`Bf16Out`), whose projections, rotary tables, attention, KV slots and LoRA deltas are
bf16; the final norm runs on the float32 stream, and `Bf16Head` reads the head in bf16 and
recomputes each row's leading logits in float32 from the float32 matrix (the final norm's weight is
float32 too).

The float32 model is never materialised: the peak memory is the bf16 model plus one float32
vocabulary matrix (two for a model with an untied head). The speed rests on the CPU's bf16 dot
products (AVX512-BF16 or AMX); without them oneDNN emulates bf16 and `float32` may be faster
(`LocalEngine` logs `engine.bf16_emulated`). Measured on an AVX2-only AMD EPYC, a bf16 matmul of
a 16-row decode step runs at a third of float32's speed, so `model.dtype = "auto"` (the default)
takes this layout only where the CPU has the bf16 instructions, and `float32` elsewhere.
"""

from __future__ import annotations

import json
from pathlib import Path

import structlog
import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from torch import nn

log = structlog.get_logger(__name__)

MIXED = "bf16-mixed"
AUTO = "auto"


def native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AVX512-BF16 or AMX); without, oneDNN
    emulates it through float32 and a bf16 model is slower than a float32 one."""
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def resolve_dtype(name: str) -> str:
    """`model.dtype` as the engine will run it: "auto" is bf16-mixed on a CPU with bf16 instructions
    and float32 elsewhere (docs/benchmarks.md, "Answer quality and speed by dtype"); any other name
    is taken as asked."""
    if name != AUTO:
        return name
    return MIXED if native_bf16() else "float32"


class Bf16Out(nn.Module):
    """A norm whose output is handed on in bfloat16 (it reads the float32 residual stream)."""

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.norm = norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x).to(torch.bfloat16)


class Bf16Head(nn.Module):
    """The output head read in bfloat16, with the leading logits recomputed exactly.

    A float32 head streams the whole vocabulary matrix (113 MB for SmolLM2-135M) for every decoding
    row; in bfloat16 it is half the bytes. Greedy decoding and the reported log-probs care about the
    few largest logits, and those are the ones bf16 rounding would reorder, so each row's `exact_top`
    highest bf16 logits are recomputed in float32 from the float32 weights (a gather of that many
    rows) and written back: the argmax is float32's whenever it is among them; the others keep their
    bf16 value (softmax normalisation, sampling)."""

    def __init__(self, weight16: torch.Tensor, exact: torch.Tensor, *, tied: bool, exact_top: int = 20) -> None:
        super().__init__()
        # the bf16 copy is a buffer, so the model's parameter count stays the checkpoint's
        self.register_buffer("weight16", weight16.detach().to(torch.bfloat16), persistent=False)
        if tied:  # float32 [vocab, hidden]: the embedding matrix itself, a parameter there
            self.exact = exact
        else:  # the head's own float32 matrix
            self.exact = nn.Parameter(exact, requires_grad=False)
        self.exact_top = exact_top  # the API's largest top_logprobs (20) are exact too
        self._matmul = F.linear  # or oneDNN's prepacked matmul, once `pack` has run

    def pack(self, rows_hint: int) -> None:
        """Hold the bf16 copy in oneDNN's blocked layout instead (packed.py; no second copy)."""
        from gateway.engine.packed import linear_packed, prepack  # packed.py imports this module

        self.weight16 = prepack(self.weight16, rows_hint)
        self._matmul = linear_packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self._matmul(x.to(torch.bfloat16), self.weight16).float()
        top = logits.topk(min(self.exact_top, logits.shape[-1]), dim=-1).indices  # [..., k]
        exact = torch.einsum("...d,...kd->...k", x.float(), self.exact[top])
        return logits.scatter_(-1, top, exact)


def read_float32(model_dir: str | Path, name: str, loaded: torch.Tensor) -> torch.Tensor:
    """Tensor `name` of the checkpoint as float32, read from its safetensors file(s); where there are
    none (a `.bin` checkpoint) or the name is not there, the loaded bf16 tensor upcast (logged: the
    stream then starts from bf16-rounded values)."""
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    try:
        file = model_dir / (json.loads(index.read_text())["weight_map"][name] if index.exists() else "model.safetensors")
        with safe_open(str(file), framework="pt") as f:
            return f.get_tensor(name).float()
    except (OSError, KeyError, ValueError, SafetensorError) as exc:
        log.warning("engine.float32_weight_unavailable", tensor=name, model=str(model_dir), reason=str(exc)[:200])
        return loaded.detach().float()


def mix_precision(model: nn.Module, model_dir: str | Path) -> None:
    """Turn a Llama-layout model loaded in bfloat16 into the mixed layout described above."""
    inner = model.model
    for layer in inner.layers:  # exactly two pre-norms per layer (Llama, Qwen2, Mistral; not Gemma, OLMo2)
        norms = {name for name, child in layer.named_children() if "norm" in name.lower()}
        if norms != {"input_layernorm", "post_attention_layernorm"}:
            raise ValueError(f"model.dtype = \"{MIXED}\" needs the Llama pre-norm layer; {type(layer).__name__} has "
                             f"{sorted(norms)}: use \"float32\" or \"bfloat16\"")
    tied = model.lm_head.weight is inner.embed_tokens.weight
    embed = read_float32(model_dir, "model.embed_tokens.weight", inner.embed_tokens.weight)
    exact = embed if tied else read_float32(model_dir, "lm_head.weight", model.lm_head.weight)
    weight16 = model.lm_head.weight
    inner.embed_tokens.weight = nn.Parameter(embed, requires_grad=False)
    # the final norm scales the float32 stream right before the head: its weight in float32 too
    inner.norm.weight = nn.Parameter(read_float32(model_dir, "model.norm.weight", inner.norm.weight), requires_grad=False)
    model.lm_head = Bf16Head(weight16, exact, tied=tied)
    for layer in inner.layers:
        layer.input_layernorm = Bf16Out(layer.input_layernorm)
        layer.post_attention_layernorm = Bf16Out(layer.post_attention_layernorm)
