"""The interest encoder and the interest-aware decoder: post-LN transformer layers on SDPA.

The layers are written on `F.scaled_dot_product_attention` rather than reusing
`nn.TransformerEncoderLayer`/`DecoderLayer`: those only take their fused fast path in inference
(and the decoder never), while training goes through `F.multi_head_attention_forward`, which expands
the key-padding mask to B*heads x T x S. Here the mask stays B x 1 x 1 x S and SDPA picks its
kernel. Parameter names and shapes are those of `nn.Transformer` (`encoder.layers.0.self_attn.
in_proj_weight`, ...), so the reference's `trm_model.*` weights load unchanged (tested).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import Attention
from .config import ModelConfig
from .dropout import Dropout


class Memory(NamedTuple):
    """What the decoder's cross-attention reads: the encoder output (B x M x D), its key mask (B x M,
    True = real token) and, in causal mode, which positions may read which token (B x L x M)."""

    values: Tensor
    mask: Tensor
    allowed: Optional[Tensor] = None


def _activation(name: str):
    return F.gelu if name == "gelu" else F.relu


def _attention(c: ModelConfig) -> Attention:
    p = c.dropout if c.attention_dropout is None else c.attention_dropout
    return Attention(c.hidden, c.heads, p, c.fast_dropout, c.attention, c.fold_single_query)


class EncoderLayer(nn.Module):
    """Post-LN layer with the parameters of `nn.TransformerEncoderLayer`."""

    def __init__(self, c: ModelConfig) -> None:
        super().__init__()
        self.self_attn = _attention(c)
        self.linear1 = nn.Linear(c.hidden, c.ffn)
        self.linear2 = nn.Linear(c.ffn, c.hidden)
        self.norm1 = nn.LayerNorm(c.hidden, eps=c.layer_norm_eps)
        self.norm2 = nn.LayerNorm(c.hidden, eps=c.layer_norm_eps)
        self.drop = Dropout(c.dropout, c.fast_dropout)
        self.act = _activation(c.activation)

    def feed_forward(self, x: Tensor) -> Tensor:
        return self.drop(self.linear2(self.drop(self.act(self.linear1(x)))))

    def forward(self, x: Tensor, mask: Tensor, allowed: Optional[Tensor] = None, qkv: Optional[Tensor] = None) -> Tensor:
        x = self.norm1(x + self.drop(self.self_attn(x, x, mask, allowed, qkv)))
        return self.norm2(x + self.feed_forward(x))


TIME_BUCKETS = 128  # HSTU's cap; real gaps stay far below it (bucket 128 is ~5e16 s)
# Bucket k >= 1 starts at the first whole second with ln(seconds) / 0.301 >= k.
_TIME_EDGES = torch.tensor([math.ceil(math.exp(0.301 * k)) for k in range(1, TIME_BUCKETS + 1)], dtype=torch.int64)


class DecoderLayer(EncoderLayer):
    """Post-LN layer with the parameters of `nn.TransformerDecoderLayer`."""

    def __init__(self, c: ModelConfig) -> None:
        super().__init__(c)
        self.multihead_attn = _attention(c)
        self.norm3 = nn.LayerNorm(c.hidden, eps=c.layer_norm_eps)
        # HSTU's relative position bias (rab_p), not the paper's: one learned logit per head and query
        # minus key position, -(max_len - 1)..max_len - 1, on the item self-attention; 0 at init.
        self.position_bias = nn.Parameter(torch.zeros(c.heads, 2 * c.max_len - 1)) if c.relative_position_bias else None
        # HSTU's relative time bias (rab_t): one learned logit per bucket of `time_buckets`, shared by
        # the heads as in HSTU (a per-head table would double the B x L x L gather and its backward).
        self.time_bias = nn.Parameter(torch.zeros(TIME_BUCKETS + 1)) if c.relative_time_bias else None

    def forward(self, x: Tensor, mask: Tensor, memory: Memory, allowed: Optional[Tensor] = None,
                query: Optional[Tensor] = None, offsets: Optional[Tensor] = None,
                buckets: Optional[Tensor] = None) -> Tensor:
        """`query` (B x Q x D, default x): the positions to compute; they attend to all of x.
        `offsets` (Q x L, or B x 1 x L with `query`): query minus key position plus max_len - 1, the
        position bias's columns (needed with `position_bias`); `buckets` (B x Q x L): the time
        bias's columns (needed with `time_bias`)."""
        q = x if query is None else query
        biases = []
        if self.position_bias is not None:
            by_position = self.position_bias[:, offsets]  # H x Q x L, or H x B x 1 x L
            biases.append(by_position if offsets.dim() == 2 else by_position.movedim(0, 1))
        if self.time_bias is not None:
            biases.append(time_bias_logits(self.time_bias, buckets, self.self_attn.heads))
        q = self.norm1(q + self.drop(self.self_attn(q, x, mask, allowed, biases=biases)))
        q = self.norm2(q + self.drop(self.multihead_attn(q, memory.values, memory.mask, memory.allowed)))
        return self.norm3(q + self.feed_forward(q))


class InterestEncoder(nn.Module):
    """Contextual encoder over interest tokens: bidirectional, no positions, final LayerNorm."""

    def __init__(self, c: ModelConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(c) for _ in range(c.n_enc_layers))
        self.norm = nn.LayerNorm(c.hidden, eps=c.layer_norm_eps)

    def forward(self, x: Tensor, mask: Tensor, allowed: Optional[Tensor] = None, qkv: Optional[Tensor] = None) -> Tensor:
        """`qkv`: the first layer's self-attention input projections of x, if already computed."""
        for i, layer in enumerate(self.layers):
            x = layer(x, mask, allowed, qkv if i == 0 else None)
        return self.norm(x)


class InterestDecoder(nn.Module):
    """Interest-aware decoder: item self-attention, cross-attention to the memory, final LayerNorm."""

    def __init__(self, c: ModelConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(DecoderLayer(c) for _ in range(c.n_dec_layers))
        self.norm = nn.LayerNorm(c.hidden, eps=c.layer_norm_eps)
        self.shift = c.max_len - 1 if c.relative_position_bias else None  # offset 0's column
        self.timed = c.relative_time_bias

    def forward(self, x: Tensor, mask: Tensor, memory: Memory, allowed: Optional[Tensor] = None,
                last: Optional[Tensor] = None, times: Optional[Tensor] = None) -> Tensor:
        """B x L x D, or with `last` (B positions, no `allowed` masks) B x 1 x D: the last layer then
        computes only those positions' queries, all that a user vector reads (same values).
        `times` (B x (L + 1), SeqBatch.times; needed with relative_time_bias): position p's query is
        timed by the item it predicts, times[:, p + 1], and each key by its own, times[:, :L]."""
        if self.timed and times is None:
            raise ValueError("model.relative_time_bias needs the batches' timestamps (SeqBatch.times)")
        b, n = x.shape[0], x.shape[1]
        positions, shift = torch.arange(n, device=x.device), self.shift
        offsets = None if shift is None else positions.unsqueeze(1) - positions + shift
        buckets = time_buckets(times[:, 1 : n + 1], times[:, :n]) if self.timed else None
        for i, layer in enumerate(self.layers):
            query = None
            if last is not None and i == len(self.layers) - 1:
                rows = torch.arange(b, device=x.device)
                query = x[rows, last].unsqueeze(1)
                offsets = None if shift is None else last.view(-1, 1, 1) - positions + shift
                buckets = None if buckets is None else buckets[rows, last].unsqueeze(1)
            x = layer(x, mask, memory, allowed, query, offsets, buckets)
        return self.norm(x)


def time_buckets(query_times: Tensor, key_times: Tensor) -> Tensor:
    """HSTU's buckets of |query time - key time| (B x Q, B x L -> B x Q x L int32): ln(seconds) /
    0.301 truncated (gaps of 0 and 1 s in bucket 0, 2 s in 2, a day in 37, a year in 57), a bucket per
    factor ~1.35. Found by binary search on the integer edges: 1.8x faster than the logarithms in
    float64 (which float32 does not give exactly), and int32 indices halve the gathers' time."""
    gap = (query_times.unsqueeze(-1) - key_times.unsqueeze(1)).abs_()
    return torch.bucketize(gap, _TIME_EDGES.to(gap.device), right=True, out_int32=True)


def time_bias_logits(table: Tensor, buckets: Tensor, heads: int) -> Tensor:
    """table[buckets] (buckets: B x Q x L integers) broadcast over the heads: B x H x Q x L, a view.
    In training under autocast it is read in the autocast dtype (see `_TimeBias`). Evaluation (no
    grad) reads the table's dtype: the SDPA path then sums the bias terms before their one rounding,
    so metrics do not move with this training-speed choice."""
    device = buckets.device.type
    low = torch.is_grad_enabled() and torch.is_autocast_enabled(device)
    return _TimeBias.apply(table, buckets, heads, torch.get_autocast_dtype(device) if low else table.dtype)


class _TimeBias(torch.autograd.Function):
    """`time_bias_logits` in `dtype`. The backward sums the heads' gradients in fp32, one head at a
    time, then per table entry with one `bincount`. With its add to the logits, forward and backward
    in bf16 took half the time of indexing's (an fp32 lookup and copy, a reduction over the heads, an
    accumulating index_put) on CPU at B 128, L 200, 2 heads."""

    @staticmethod
    def forward(ctx, table: Tensor, buckets: Tensor, heads: int, dtype: torch.dtype) -> Tensor:
        ctx.save_for_backward(buckets)
        ctx.entries, ctx.dtype = table.numel(), table.dtype
        out = F.embedding(buckets, table.to(dtype).view(-1, 1)).view(buckets.shape).unsqueeze(1)
        return out.expand(-1, heads, -1, -1)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None, None]:
        (buckets,) = ctx.saved_tensors
        per_key = grad[:, 0].to(torch.float32, copy=True)  # summed into: never a view of grad
        for head in range(1, grad.shape[1]):
            per_key += grad[:, head]
        return torch.bincount(buckets.reshape(-1), per_key.reshape(-1), ctx.entries).to(ctx.dtype), None, None, None


def interest_regulariser(memory: Tensor, memory_mask: Tensor, reference: bool = False) -> Tensor:
    """R of docs/model.md §7 on the encoder memory (B x M x D, mask True = real token).

    reference: p_b = (real_b / M) * sum over all M slots (pads included), R = sum_b |p_b|^2 / D.
    Otherwise (quirk 5 fixed): p_b = mean of the real slots, R = mean_b |p_b|^2 / D.
    """
    # The pooled vectors are fp32 whatever the memory's dtype (bf16 under autocast), without an fp32
    # copy of the memory: a dtype-ed sum, or one matmul (fp32 accumulation) for the masked mean.
    real = memory_mask.to(torch.float32)
    if reference:
        pooled = memory.sum(1, dtype=torch.float32) * real.mean(1, keepdim=True)
        return pooled.pow(2).sum() / memory.shape[-1]
    pooled = torch.einsum("bmd,bm->bd", memory, real.to(memory.dtype)).float() / real.sum(1, keepdim=True).clamp(min=1)
    return pooled.pow(2).sum(-1).mean() / memory.shape[-1]
