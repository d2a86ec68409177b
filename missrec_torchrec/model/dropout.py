"""Dropout whose random draws cost 1/8 of a 64-bit word per element instead of one Bernoulli each.

Why: on CPU `F.dropout` draws one Bernoulli per element from the serial mt19937 generator. At the
paper's dropout of 0.5 on B x L x 300 activations that was a quarter of a training step
(bench/train.py). Here one 64-bit draw of the same generator gives 8 bytes (or 4 16-bit words);
an element is kept when its byte (word) is at least the threshold. The rest is three vectorised
elementwise passes. Same generator, so seeding, RNG checkpointing and determinism are unchanged.

Keep probability: exactly 1 - p when p is a multiple of 1/256 (0.5, 0.25, 0.1 is not); otherwise p
is rounded to the nearest multiple of 1/65536 (F.dropout's float Bernoulli rounds at 2^-24). The
kept elements are scaled by the inverse of the keep probability actually used, so E[output] = input
exactly, as with F.dropout.
"""

from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor, nn


def quantised(p: float) -> Tuple[int, int, float]:
    """(bits per element, threshold, keep probability) used for drop probability p in (0, 1)."""
    if float(p * 256).is_integer():
        threshold = int(p * 256)
        return 8, threshold, 1.0 - threshold / 256
    threshold = min(65535, max(1, round(p * 65536)))
    return 16, threshold, 1.0 - threshold / 65536


def keep_mask(shape: torch.Size, p: float, device: torch.device) -> Tuple[Tensor, float]:
    """(bool mask of kept elements, keep probability) from the default generator of `device`."""
    bits, threshold, keep = quantised(p)
    n = 1
    for s in shape:
        n *= s
    per_word = 64 // bits
    words = torch.randint(-(2**63), 2**63 - 1, (max(1, -(-n // per_word)),), dtype=torch.int64, device=device)
    if bits == 8:
        mask = words.view(torch.uint8)[:n] >= threshold
    else:  # int16 is signed: shift the threshold into [-32768, 32767]
        mask = words.view(torch.int16)[:n] >= threshold - 32768
    return mask.view(shape), keep


def _masked_scale(x: Tensor, mask: Tensor, scale: float) -> Tensor:
    # bool -> uint8 view -> x.dtype is ~3x faster on CPU than multiplying by the bool (type promotion).
    return (x * mask.view(torch.uint8).to(x.dtype)).mul_(scale)


class _MaskedScale(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, mask: Tensor, scale: float) -> Tensor:
        ctx.save_for_backward(mask)
        ctx.scale = scale
        return _masked_scale(x, mask, scale)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (mask,) = ctx.saved_tensors
        return _masked_scale(grad, mask, ctx.scale), None, None


def fast_dropout(x: Tensor, p: float, training: bool = True) -> Tensor:
    """Drop-in for `F.dropout(x, p, training)` (see the module docstring for the keep probability)."""
    if not training or p == 0.0:
        return x
    if p >= 1.0:
        return x * 0.0
    mask, keep = keep_mask(x.shape, p, x.device)
    return _MaskedScale.apply(x, mask, 1.0 / keep)


class Dropout(nn.Module):
    """`nn.Dropout` with `fast_dropout` (fast=True) or `F.dropout` (fast=False, the reference path)."""

    def __init__(self, p: float, fast: bool = True) -> None:
        super().__init__()
        self.p = p
        self.fast = fast

    def forward(self, x: Tensor) -> Tensor:
        if self.fast:
            return fast_dropout(x, self.p, self.training)
        return nn.functional.dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}, fast={self.fast}"
