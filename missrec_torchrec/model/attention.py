"""Multi-head attention with `nn.MultiheadAttention`'s parameters: SDPA, the math path written
out (so its dropout can be the fast one), and a folded path for one query per row."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .dropout import Dropout


class Attention(nn.Module):
    """Multi-head attention with `nn.MultiheadAttention`'s parameters: SDPA or the math path, and
    with `fold`, the folded path for one query per row (`_single_query`)."""

    def __init__(self, hidden: int, heads: int, dropout: float, fast_dropout: bool = False,
                 kernel: str = "sdpa", fold: bool = False) -> None:
        super().__init__()
        self.heads = heads
        self.fold = fold
        self.dropout = dropout
        self.kernel = kernel
        self.drop = Dropout(dropout, fast_dropout)
        self.in_proj_weight = nn.Parameter(torch.empty(3 * hidden, hidden))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * hidden))
        self.out_proj = nn.Linear(hidden, hidden)
        nn.init.xavier_uniform_(self.in_proj_weight)  # as nn.MultiheadAttention; the reference keeps it

    def forward(self, query: Tensor, memory: Tensor, key_mask: Tensor, allowed: Optional[Tensor] = None,
                qkv: Optional[Tensor] = None, biases: Sequence[Tensor] = ()) -> Tensor:
        """query B x T x D attends to memory B x S x D where key_mask (B x S, True = real) allows.

        `allowed` (T x S or B x T x S, True = may attend) further restricts each query, e.g. a
        causal mask. A query with no allowed key gets 0: attending to nothing adds nothing (SDPA
        backends disagree on fully masked rows, some give NaN). `qkv` (B x T x 3D, self-attention
        only): the input projections, already computed. `biases`: terms that each broadcast to B x H x T
        x S, added to the attention logits after scaling, e.g. relative position and time biases.
        The math path adds them one by one, in place: their B x H x T x S sum is never made.
        """
        d = query.shape[-1]
        if self.fold and qkv is None and query.shape[1] == 1 and allowed is None and query is not memory:
            return self._single_query(query, memory, key_mask, biases)
        if qkv is not None:
            q, k, v = qkv.chunk(3, dim=-1)
        elif query is memory:
            q, k, v = F.linear(query, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        else:
            q = F.linear(query, self.in_proj_weight[:d], self.in_proj_bias[:d])
            k, v = F.linear(memory, self.in_proj_weight[d:], self.in_proj_bias[d:]).chunk(2, dim=-1)
        b, t, s = query.shape[0], query.shape[1], memory.shape[1]
        q, k, v = (x.view(b, -1, self.heads, d // self.heads).transpose(1, 2) for x in (q, k, v))
        mask = key_mask.view(b, 1, s) if allowed is None else key_mask.view(b, 1, s) & allowed.view(-1, t, s)
        has_key = mask.any(dim=-1, keepdim=True)  # B x (1 or T) x 1
        mask = (mask | ~has_key).unsqueeze(1)
        if self.uses_math(q.dtype, q.device):
            logits = (q @ k.transpose(-2, -1)).mul_(q.shape[-1] ** -0.5)
            for term in biases:
                logits.add_(term.to(q.dtype))
            out = self.drop(logits.masked_fill_(~mask, float("-inf")).softmax(-1)) @ v
        else:
            if biases:  # a float mask is added
                mask = _sum(biases, q.dtype).masked_fill(~mask, float("-inf"))
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        out = self.out_proj(out.transpose(1, 2).reshape(b, t, d))
        # A pass over B x T x D only when some query has no key (rare: causal starts, empty memory).
        return out if bool(has_key.all()) else out * has_key.to(out.dtype)

    def uses_math(self, dtype: torch.dtype, device: torch.device) -> bool:
        """Whether `forward` takes the math path (q.k^T, softmax, dropout, .v written out) over SDPA."""
        if self.kernel != "auto":
            return self.kernel == "math"
        # SDPA's CPU dropout draws a Bernoulli per probability; the math path's is the fast one. Without
        # dropout, SDPA's CPU forward and backward was 1.1-2.4x slower in bf16 (causal L 200 D 64;
        # L 50 D 300) but 1.2-1.9x faster in fp32 (bench/attention.py, its table in the README).
        return self.training and device.type == "cpu" and (self.dropout > 0 or dtype == torch.bfloat16)

    def _single_query(self, query: Tensor, memory: Tensor, key_mask: Tensor, biases: Sequence[Tensor] = ()) -> Tensor:
        """`forward` for one query per row (B x 1 x D), with the key and value projections folded
        into the query side, so no S x D x D projection of the memory is made.

        Per head h: q.k_j = (q W_k,h) . m_j + q.b_k,h, whose last term is the same for every j and
        cancels in the softmax; sum_j a_j v_j = W_v,h (sum_j a_j m_j) + (sum_j a_j) b_v,h. That is
        O(B H S D) instead of O(B S D^2): 75x fewer multiply-adds at the paper's 4 heads and D 300.
        """
        b, s, dm = memory.shape
        h, d = self.heads, dm // self.heads
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q, _, b_v = self.in_proj_bias.chunk(3)
        q = F.linear(query[:, 0], w_q, b_q).view(b, h, d)
        q_k = torch.matmul(q.transpose(0, 1), w_k.view(h, d, dm)).transpose(0, 1)  # B x H x D
        has_key = key_mask.any(dim=-1)  # B
        mask = (key_mask | ~has_key.unsqueeze(1)).unsqueeze(1)  # B x 1 x S
        logits = torch.bmm(q_k, memory.transpose(1, 2)).float().mul_(d**-0.5)
        if biases:
            logits.add_(_sum(biases, torch.float32).expand(b, h, 1, s).reshape(b, h, s))
        a = self.drop(logits.masked_fill_(~mask, float("-inf")).softmax(-1))  # B x H x S, fp32 as SDPA's internal softmax
        pooled = torch.bmm(a.to(memory.dtype), memory)  # B x H x D
        out = torch.matmul(pooled.transpose(0, 1), w_v.view(h, d, dm).transpose(1, 2)).transpose(0, 1)
        out = out + a.sum(-1, keepdim=True).to(out.dtype) * b_v.view(h, d).to(out.dtype)
        out = self.out_proj(out.reshape(b, 1, dm))
        return out if bool(has_key.all()) else out * has_key.view(b, 1, 1).to(out.dtype)


def _sum(terms: Sequence[Tensor], dtype: torch.dtype) -> Tensor:
    """The bias terms' broadcast sum, in `dtype` (added in their own, fp32 for the parameters)."""
    total = terms[0]
    for term in terms[1:]:
        total = total + term
    return total.to(dtype)
