"""Preallocated KV slots and the fused forward pass that writes into them.

`transformers`' `DynamicCache` grows by concatenation, so every decode step copied the whole
batch's keys and values, and merging a newcomer left-padded and re-copied them again. Here each
sequence owns one row ("slot") of per-layer key/value tensors allocated ahead; its tokens sit at
columns 0..n-1 of its row and a step writes its new columns in place. Rows are handed out from a
free list and never move; the tensors grow in blocks of `block_tokens` columns (a copy every
`block_tokens` tokens, not every step) and are freed when the batch empties.

One step = one forward pass over a flat list of tokens: one token for every decoding row, plus a
chunk of prompt tokens for every row of the cohort being prefilled (vLLM's and Sarathi's mixed
batches: the weights, the dominant memory traffic on a CPU, are read once per step instead of once
for the prefill and again for the decode). Token-wise layers (projections, MLP, norms, LoRA) see
the flat list; the attention function splits it again: decoding rows attend over their own rows'
first `max(len)+1` columns with a mask hiding each row's unused tail (query heads folded onto their
key/value group: grouped-query attention without `repeat_kv` copying every cached key at every
step), the prefill chunk attends causally over its cohort's contiguous block of rows.

`forward` runs the decoder layers' own modules in their order, without the layer's wrappers (Llama
layout: SmolLM2, Llama, Qwen2, Mistral), and writes each step's keys and values into the slots.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
from transformers.models.llama.modeling_llama import rotate_half

ATTENTION = "tellerloop_slots"


@dataclass
class StepPlan:
    """What one forward pass computes: `decode_rows` (one token each, first in the flat list), then
    `chunk_rows` consecutive rows starting at `chunk_row`, each with `chunk_tokens` prompt tokens
    for columns `chunk_starts[i]`.. (rows whose prompt ends earlier carry padding there)."""

    cache: "SlotCache"
    decode_rows: torch.Tensor  # [nd] row indices
    decode_cols: torch.Tensor  # [nd] the column each decoding row writes (its length)
    chunk_row: int = 0
    chunk_rows: int = 0
    chunk_starts: torch.Tensor | None = None  # [chunk_rows] first column each row writes
    chunk_tokens: int = 0
    span: int = 0  # rows 0..span-1 cover every decoding row
    in_order: bool = False  # the decoding rows are exactly 0..span-1, in that order
    decode_mask: torch.Tensor | None = None
    chunk_mask: torch.Tensor | None = None
    write_rows: torch.Tensor | None = None
    write_cols: torch.Tensor | None = None

    @property
    def decode_count(self) -> int:
        return int(self.decode_rows.shape[0])

    @property
    def chunk_end(self) -> int:
        return int(self.chunk_starts.max()) + self.chunk_tokens if self.chunk_rows else 0

    @property
    def tokens(self) -> int:
        return self.decode_count + self.chunk_rows * self.chunk_tokens

    def prepare(self) -> torch.Tensor:
        """Masks and write positions; returns the flat position ids [1, tokens]."""
        nd = self.decode_count
        positions = [self.decode_cols]
        rows, cols = [self.decode_rows], [self.decode_cols]
        if nd:
            self.span = int(self.decode_rows.max()) + 1
            self.in_order = self.span == nd and bool((self.decode_rows == torch.arange(nd)).all())
            width = int(self.decode_cols.max()) + 1
            lengths = torch.zeros(self.span, dtype=torch.long)  # rows that do not decode see column 0 only
            lengths[self.decode_rows] = self.decode_cols
            self.decode_mask = (torch.arange(width)[None, :] <= lengths[:, None])[:, None, None, :]
        if self.chunk_rows:
            t = self.chunk_tokens
            chunk_cols = self.chunk_starts[:, None] + torch.arange(t)[None, :]  # [rows, t]
            positions.append(chunk_cols.reshape(-1))
            rows.append(torch.arange(self.chunk_row, self.chunk_row + self.chunk_rows).repeat_interleave(t))
            cols.append(chunk_cols.reshape(-1))
            end = self.chunk_end
            self.chunk_mask = (torch.arange(end)[None, None, :] <= chunk_cols[:, :, None])[:, None]  # [rows, 1, t, end]
        self.write_rows, self.write_cols = torch.cat(rows), torch.cat(cols)
        return torch.cat(positions)[None, :]


def slot_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, slot_plan=None, **kwargs):  # noqa: ANN001, ARG001
    """query: [1, heads, tokens, d] in the plan's flat order; keys and values come from the plan's
    cache (already holding this step's columns). Returns [1, tokens, heads, d]."""
    plan: StepPlan = slot_plan
    keys, values = plan.cache.keys[module.layer_idx], plan.cache.values[module.layer_idx]
    _, heads, _, d = query.shape
    kv_heads = keys.shape[1]
    q = query[0].transpose(0, 1)  # [tokens, heads, d]
    parts = []
    nd = plan.decode_count
    if nd:
        width = plan.decode_mask.shape[-1]
        rows = plan.decode_rows
        if plan.in_order:  # no scatter needed
            folded = q[:nd]
        else:
            folded = q.new_zeros((plan.span, heads, d))
            folded[rows] = q[:nd]
        folded = folded.reshape(plan.span, kv_heads, heads // kv_heads, d)
        out = F.scaled_dot_product_attention(folded, keys[: plan.span, :, :width], values[: plan.span, :, :width],
                                             attn_mask=plan.decode_mask, scale=scaling)
        out = out.reshape(plan.span, heads, d)
        parts.append(out if plan.in_order else out[rows])
    if plan.chunk_rows:
        n, t, end = plan.chunk_rows, plan.chunk_tokens, plan.chunk_end
        first = plan.chunk_row
        qc = q[nd:].reshape(n, t, heads, d).transpose(1, 2)  # [rows, heads, t, d]
        out = F.scaled_dot_product_attention(qc, keys[first : first + n, :, :end], values[first : first + n, :, :end],
                                             attn_mask=plan.chunk_mask, scale=scaling, enable_gqa=heads != kv_heads)
        parts.append(out.transpose(1, 2).reshape(n * t, heads, d))
    out = parts[0] if len(parts) == 1 else torch.cat(parts)
    return out[None], None


AttentionInterface.register(ATTENTION, slot_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION, sdpa_mask)


class SlotCache:
    """Per-layer key/value rows for up to `max_rows` sequences (`forward` writes each step's keys
    and values in place)."""

    def __init__(self, layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype, *,
                 max_rows: int, block_tokens: int = 128, row_block: int = 8) -> None:
        self.layers, self.kv_heads, self.head_dim, self.dtype = layers, kv_heads, head_dim, dtype
        self.max_rows, self.block_tokens, self.row_block = max_rows, block_tokens, row_block
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.used: set[int] = set()
        self.plan: StepPlan | None = None

    # ---- capacity --------------------------------------------------------------------------
    @property
    def capacity(self) -> tuple[int, int]:
        return (self.keys[0].shape[0], self.keys[0].shape[2]) if self.keys else (0, 0)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    def reserve(self, rows: int, columns: int) -> None:
        """Make room for rows 0..rows-1 and `columns` tokens (grows in blocks; copies only then)."""
        have_rows, have_cols = self.capacity
        if rows <= have_rows and columns <= have_cols:
            return
        new_rows = max(have_rows, min(self.max_rows, -(-rows // self.row_block) * self.row_block), rows)
        new_cols = max(have_cols, -(-columns // self.block_tokens) * self.block_tokens)
        shape = (new_rows, self.kv_heads, new_cols, self.head_dim)
        for store in (self.keys, self.values):
            for i in range(self.layers):
                fresh = torch.zeros(shape, dtype=self.dtype)
                if i < len(store):
                    old = store[i]
                    fresh[: old.shape[0], :, : old.shape[2]] = old
                    store[i] = fresh
                else:
                    store.append(fresh)

    # ---- rows ------------------------------------------------------------------------------
    def allocate(self, count: int) -> int:
        """`count` consecutive free rows (first fit, else after the last used one); returns the first."""
        start, run = 0, 0
        end = max(self.used) + 1 if self.used else 0
        for row in range(end):
            if row in self.used:
                start, run = row + 1, 0
                continue
            run += 1
            if run == count:
                break
        else:
            start = end - run  # a free tail run (possibly empty) continues past the end
        self.used.update(range(start, start + count))
        return start

    def release(self, row: int) -> None:
        self.used.discard(row)
        if not self.used:
            self.keys, self.values = [], []

    # ---- shared prompt prefixes ------------------------------------------------------------
    def read_prefix(self, row: int, tokens: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """A copy of the first `tokens` columns of `row` (a prompt prefix other prompts share)."""
        return ([k[row, :, :tokens].clone() for k in self.keys], [v[row, :, :tokens].clone() for v in self.values])

    def write_prefix(self, row: int, prefix: tuple[list[torch.Tensor], list[torch.Tensor]]) -> None:
        keys, values = prefix
        tokens = keys[0].shape[1]
        self.reserve(row + 1, tokens + 1)
        for layer in range(self.layers):
            self.keys[layer][row, :, :tokens] = keys[layer]
            self.values[layer][row, :, :tokens] = values[layer]


# the attention blocks whose arithmetic `forward` reproduces (no q/k norms, no scaled embeddings)
LLAMA_LAYOUT = {"LlamaAttention", "Qwen2Attention", "MistralAttention"}


def llama_parts(model):  # noqa: ANN001, ANN201
    """The pieces `forward` drives, or a clear error for an architecture it cannot (the projections
    are fused afterwards: `fused.fuse_projections`)."""
    inner = getattr(model, "model", None)
    needed = ("embed_tokens", "layers", "norm", "rotary_emb")
    if (inner is None or not all(hasattr(inner, part) for part in needed) or not hasattr(model, "lm_head")
            or any(type(getattr(layer, "self_attn", None)).__name__ not in LLAMA_LAYOUT for layer in inner.layers)):
        raise ValueError(
            f"the local engine serves decoder-only models with the Llama layout (SmolLM2, Llama, Qwen2, "
            f"Mistral); {type(model).__name__} is not one"
        )
    return inner


def forward(model, plan: StepPlan, ids: torch.Tensor, pick: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
    """Run one step: `ids` [tokens] in the plan's flat order; returns float32 logits for the flat
    token indices in `pick` (the last real token of each row that needs one).

    The decoder layers' own modules (norms, projections with their LoRA wrappers, the MLP's
    activation) run in the order the model's layer `forward` runs them, q/k/v and gate/up each as
    one stacked projection (fused.py), but without the layer's wrappers (checkpointing, deprecated
    keyword handling, the attention-interface dispatch, reshapes to a batch dimension): the same
    logits bit for bit, and a one-row step 1.21× faster, where Python, not the matmuls, is much of
    the time (docs/benchmarks.md, "Lean decoder layers")."""
    cache = plan.cache
    if plan.chunk_rows:
        cache.reserve(plan.chunk_row + plan.chunk_rows, plan.chunk_end)
    if plan.decode_count:
        cache.reserve(int(plan.decode_rows.max()) + 1, int(plan.decode_cols.max()) + 1)
    positions = plan.prepare()
    cache.plan = plan
    inner = model.model
    hidden = inner.embed_tokens(ids[None, :])
    # in the KV dtype: bf16-mixed keeps a float32 residual stream but bf16 attention (precision.py)
    cos, sin = (t.to(cache.dtype)[0, :, None, :] for t in inner.rotary_emb(hidden, position_ids=positions))
    x = hidden[0]  # [tokens, hidden]
    tokens = x.shape[0]
    rows, cols = plan.write_rows, plan.write_cols
    config = model.config
    head_dim = inner.layers[0].self_attn.head_dim
    qkv_split = [config.num_attention_heads * head_dim] + [config.num_key_value_heads * head_dim] * 2
    for i, layer in enumerate(inner.layers):
        attn, mlp = layer.self_attn, layer.mlp
        h = layer.input_layernorm(x)
        # q, k and v from one stacked projection (fused.py); column slices, viewed per head
        q, k, v = (part.unflatten(-1, (-1, head_dim)) for part in attn.qkv_proj(h).split(qkv_split, dim=-1))
        q = q * cos + rotate_half(q) * sin  # apply_rotary_pos_emb's arithmetic, without its kernel-hub wrapper
        k = k * cos + rotate_half(k) * sin
        cache.keys[i][rows, :, cols] = k
        cache.values[i][rows, :, cols] = v
        out, _ = slot_attention(attn, q.transpose(0, 1)[None], None, None, None, scaling=attn.scaling, slot_plan=plan)
        x = x + attn.o_proj(out[0].reshape(tokens, -1))
        gate, up = mlp.gate_up_proj(layer.post_attention_layernorm(x)).chunk(2, dim=-1)
        x = x + mlp.down_proj(mlp.act_fn(gate) * up)  # LlamaMLP's arithmetic on the stacked gate/up
    cache.plan = None
    return model.lm_head(inner.norm(x.index_select(0, pick))).float()

