"""Preallocated KV slots and the forward pass that writes into them.

`transformers`' `DynamicCache` grows by concatenation, so every decode step copied the whole
batch's keys and values, and merging a newcomer left-padded and re-copied them again. Here each
running sequence owns one row ("slot") of per-layer key/value tensors allocated ahead; its tokens
sit at columns 0..n-1 of its row, a decode step writes one column per row in place, and the
attention reads a view of the first `max(n)+1` columns with a mask hiding each row's unused tail.
The tensors grow in blocks of `block_tokens` columns (a copy every `block_tokens` steps, not every
step), rows are kept packed (a finished row is replaced by the last one), and everything is freed
when the batch empties.

`forward` runs the model's own decoder layers (Llama layout: SmolLM2, Llama, Qwen2, Mistral) with
positions given per row and a custom attention function: for one query token it folds the query
heads onto their key/value group (grouped-query attention without `repeat_kv`'s copy of every
cached key and value at every step, which transformers' SDPA path makes on CPU whenever a mask is
given).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

ATTENTION = "tellerloop_slots"


def slot_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):  # noqa: ANN001, ARG001
    """SDPA over the slot view. query: [b, heads, t, d]; key/value: [b, kv_heads, width, d];
    attention_mask: bool [b or 1, 1, t, width] (True = attend). Returns [b, t, heads, d]."""
    b, heads, t, d = query.shape
    kv_heads = key.shape[1]
    if t == 1 and heads != kv_heads:
        folded = query.reshape(b, kv_heads, heads // kv_heads, d)
        out = F.scaled_dot_product_attention(folded, key, value, attn_mask=attention_mask, scale=scaling)
        return out.reshape(b, 1, heads, d), None
    out = F.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, scale=scaling, enable_gqa=heads != kv_heads
    )
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTENTION, slot_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION, sdpa_mask)


class SlotCache:
    """Per-layer key/value rows for up to `max_rows` sequences. Duck-types the one method the
    decoder layers call on a cache (`update`)."""

    def __init__(self, layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype, *,
                 max_rows: int, block_tokens: int = 128, row_block: int = 8) -> None:
        self.layers, self.kv_heads, self.head_dim, self.dtype = layers, kv_heads, head_dim, dtype
        self.max_rows, self.block_tokens, self.row_block = max_rows, block_tokens, row_block
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.lengths = torch.zeros(0, dtype=torch.long)  # tokens stored per used row
        self.rows = 0  # used rows: 0..rows-1
        self._write: tuple | None = None  # what the next forward writes where (set by begin_*)

    # ---- capacity --------------------------------------------------------------------------
    @property
    def capacity(self) -> tuple[int, int]:
        return (self.keys[0].shape[0], self.keys[0].shape[2]) if self.keys else (0, 0)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    def reserve(self, rows: int, columns: int) -> None:
        """Make room for `rows` rows of `columns` tokens (grows in blocks; copies only on growth)."""
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
        lengths = torch.zeros(new_rows, dtype=torch.long)
        lengths[: self.lengths.shape[0]] = self.lengths
        self.lengths = lengths

    def clear(self) -> None:
        self.keys, self.values = [], []
        self.lengths = torch.zeros(0, dtype=torch.long)
        self.rows = 0

    # ---- row management --------------------------------------------------------------------
    def add_row(self, source: "SlotCache", row: int) -> int:
        """Copy `source`'s row (a prefilled prompt) into the next free row; returns its index."""
        n = int(source.lengths[row])
        self.reserve(self.rows + 1, n + 1)
        target = self.rows
        for layer in range(self.layers):
            self.keys[layer][target, :, :n] = source.keys[layer][row, :, :n]
            self.values[layer][target, :, :n] = source.values[layer][row, :, :n]
        self.lengths[target] = n
        self.rows += 1
        return target

    def remove_row(self, row: int) -> int | None:
        """Free `row`, moving the last used row into it to keep rows packed. Returns the index of the
        row that moved (it is now `row`), or None when nothing moved."""
        last = self.rows - 1
        moved = None
        if row != last:
            n = int(self.lengths[last])
            for layer in range(self.layers):
                self.keys[layer][row, :, :n] = self.keys[layer][last, :, :n]
                self.values[layer][row, :, :n] = self.values[layer][last, :, :n]
            self.lengths[row] = n
            moved = last
        self.lengths[last] = 0
        self.rows -= 1
        if self.rows == 0:
            self.clear()
        return moved

    # ---- one forward pass ------------------------------------------------------------------
    def begin_decode(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Prepare a one-token step for every used row: returns (positions [rows, 1], mask)."""
        lengths = self.lengths[: self.rows]
        width = int(lengths.max()) + 1
        self.reserve(self.rows, width)
        self._write = ("decode", lengths.clone(), width)
        mask = torch.arange(width)[None, :] <= lengths[:, None]
        return lengths[:, None].clone(), mask[:, None, None, :]

    def begin_chunk(self, rows: int, start: int, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Prepare a prefill chunk: rows 0..rows-1 all write columns start..start+tokens-1 (rows of
        shorter prompts carry padding there, which only padding queries can see). Returns
        (positions [rows, tokens], causal mask [1, 1, tokens, start+tokens])."""
        self.reserve(rows, start + tokens)
        self._write = ("chunk", start, tokens, rows)
        positions = torch.arange(start, start + tokens)[None, :].expand(rows, tokens)
        mask = torch.arange(start + tokens)[None, :] <= torch.arange(start, start + tokens)[:, None]
        return positions, mask[None, None]

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):  # noqa: ANN002, ANN003, ARG002
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        kind = self._write[0]
        if kind == "decode":
            _, lengths, width = self._write
            rows = torch.arange(lengths.shape[0])
            keys[rows, :, lengths] = key[:, :, 0]
            values[rows, :, lengths] = value[:, :, 0]
            return keys[: lengths.shape[0], :, :width], values[: lengths.shape[0], :, :width]
        _, start, tokens, rows = self._write
        keys[:rows, :, start : start + tokens] = key
        values[:rows, :, start : start + tokens] = value
        return keys[:rows, :, : start + tokens], values[:rows, :, : start + tokens]

    def finish_decode(self) -> None:
        self.lengths[: self.rows] += 1

    def finish_chunk(self, real_tokens: torch.Tensor) -> None:
        """Record how many of the chunk's tokens were real for each row."""
        self.lengths[: real_tokens.shape[0]] += real_tokens


def llama_parts(model):  # noqa: ANN001, ANN201
    """The pieces `forward` drives, or a clear error for an architecture it cannot."""
    inner = getattr(model, "model", None)
    needed = ("embed_tokens", "layers", "norm", "rotary_emb")
    if inner is None or not all(hasattr(inner, part) for part in needed) or not hasattr(model, "lm_head"):
        raise ValueError(
            f"the local engine serves decoder-only models with the Llama layout (SmolLM2, Llama, Qwen2, "
            f"Mistral); {type(model).__name__} is not one"
        )
    return inner


def forward(model, cache: SlotCache, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor,
            pick: torch.Tensor | None = None) -> torch.Tensor:  # noqa: ANN001
    """Run the decoder on `ids` [rows, t] against `cache` (prepared by begin_decode/begin_chunk) and
    return logits [rows, vocab] for the token each row picks (`pick[row]`, default the last)."""
    inner = model.model
    hidden = inner.embed_tokens(ids)
    position_embeddings = inner.rotary_emb(hidden, position_ids=positions)
    for layer in inner.layers:
        hidden = layer(hidden, attention_mask=mask, position_ids=positions, past_key_values=cache,
                       position_embeddings=position_embeddings)
    if pick is None:
        last = hidden[:, -1, :]
    else:
        last = hidden[torch.arange(hidden.shape[0]), pick]
    return model.lm_head(inner.norm(last)).float()
