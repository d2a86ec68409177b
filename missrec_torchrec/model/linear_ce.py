"""Cross-entropy of `u @ items.T + bias` over a whole catalogue, without the B x N logit matrix.

Full-softmax training spends most of a step on elementwise passes over B x N logits (temperature,
log-softmax and their backward: ~a third of an ML-1M step on CPU). Where the score is linear in
the user vector, the same loss is computed in row blocks that fit in cache, each block's logits
turned into its share of the loss and straight into gradients, and none kept (the "fused linear
cross-entropy" of LLM trainers). Equal to the weighted mean of
`F.cross_entropy(u @ items.T + bias, target, reduction="none")` up to float rounding
(tests/test_linear_ce.py).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

# Rows per block: a block's logits stay around 4 MB in fp32 whatever the catalogue's size.
BLOCK_ELEMENTS = 1 << 20


def block_rows(num_items: int) -> int:
    """Rows per block of a catalogue of `num_items`."""
    return max(16, min(4096, BLOCK_ELEMENTS // max(num_items, 1)))


class _LinearCrossEntropy(torch.autograd.Function):
    """The weighted mean of the rows' cross-entropies. The gradients are computed in the forward,
    block by block while its logits are at hand (as Liger-Kernel's fused linear cross-entropy does):
    the loss is a scalar, so the backward only scales them, and no block's logits are made twice."""

    @staticmethod
    def forward(ctx, u: Tensor, items: Tensor, target: Tensor, bias: Optional[Tensor], weight: Tensor) -> Tensor:
        rows = block_rows(items.shape[0])
        coef = weight.to(u.dtype) / weight.sum().to(u.dtype).clamp(min=1e-12)
        grad_u = torch.empty_like(u) if ctx.needs_input_grad[0] else None
        grad_items = torch.zeros_like(items) if ctx.needs_input_grad[1] else None
        loss = u.new_zeros(())
        for i in range(0, u.shape[0], rows):
            block, t, c = u[i:i + rows], target[i:i + rows], coef[i:i + rows, None]
            p = block @ items.T
            if bias is not None:
                p += bias
            lse = torch.logsumexp(p, dim=-1, keepdim=True)
            picked = p.gather(1, t[:, None])
            loss += ((lse - picked) * c).sum()
            # d loss / d logit_rj = (softmax_rj - [j = target_r]) c_r; c_r scales D columns, not N.
            p.sub_(lse).exp_()
            p[torch.arange(p.shape[0], device=p.device), t] -= 1
            if grad_u is not None:
                torch.mul(p @ items, c, out=grad_u[i:i + rows])
            if grad_items is not None:
                grad_items.addmm_(p.T, block * c)
        ctx.save_for_backward(grad_u, grad_items)
        return loss

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad_u, grad_items = ctx.saved_tensors
        return (None if grad_u is None else grad_u * grad, None if grad_items is None else grad_items * grad,
                None, None, None)


def linear_cross_entropy(u: Tensor, items: Tensor, target: Tensor, bias: Optional[Tensor] = None,
                         weight: Optional[Tensor] = None) -> Tensor:
    """The `weight`ed mean (B, default 1 each) of the rows' cross-entropies of the logits
    u @ items.T + bias (u: B x D, items: N x D, bias: N and constant, -inf for an item that is no
    candidate) against `target` (B item indices)."""
    weight = torch.ones(u.shape[0], device=u.device) if weight is None else weight
    return _LinearCrossEntropy.apply(u, items, target, bias, weight)
