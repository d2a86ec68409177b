"""Dynamic fusion of per-modality cosines: the one place its formula lives (docs/model.md §8).

s_m = u . v_m / |v_m| (`cosine`); fused = sum_m softmax_m(alpha * s_m) * s_m over the item's present
modalities (0 if it has none); static fusion is alpha = 0 (a plain mean). With item IDs:
(s_id + 2 * fused) / 3. One modality is the reference's other path: the cosine of one summed vector
(`summed`). `fuse` has a differentiable form (training, `MISSRecCore.score`) and an in-place
inference form (batch scoring over large catalogues); `upper_bound` bounds the score of an
item whose cosines are bounded (certified approximate retrieval); `DESCRIPTION` states the formula
for exported files.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

DESCRIPTION = ("s_m = u . v_m/|v_m| per modality; fused = sum_m softmax(alpha * s)_m s_m over present "
               "modalities (0 if none); transductive: (u . id/|id| + 2 fused) / 3. One modality: "
               "u . w/|w| with w = v (x present) (+ id). u = the model's unit user vector.")


def cosine(u: Tensor, v: Tensor) -> Tensor:
    """u (B x D, unit) against every candidate (v: N x D) -> B x N, or against its own S candidates
    (v: B x S x D) -> B x S."""
    if v.dim() == 2:
        return u @ F.normalize(v, dim=-1).T
    return torch.einsum("bd,bsd->bs", u, F.normalize(v, dim=-1))


def summed(v: Tensor, present: Optional[Tensor], id_emb: Optional[Tensor]) -> Tensor:
    """One modality: the vector whose cosine is the score, v (x present) (+ the ID embedding)."""
    v = v * present.unsqueeze(-1).to(v.dtype) if present is not None else v
    return v if id_emb is None else v + id_emb


def fuse(
    sims: List[Tensor],
    present: Optional[List[Tensor]],
    alpha: Optional[Tensor],
    id_sim: Optional[Tensor] = None,
    inference: bool = False,
) -> Tensor:
    """The fused score from per-modality cosines `sims` (any shape, broadcasting with `present[m]`
    and `alpha`), differentiable: training and `MISSRecCore.score`. `inference`: the same score by
    in-place elementwise passes, for no autograd (`MISSRecCore.fuse`, large catalogues)."""
    if inference:
        return _fuse_planes(sims, present, alpha, id_sim)
    fused = _pair(sims, present, alpha) if len(sims) == 2 else _softmax_mix(sims, present, alpha)
    return fused if id_sim is None else (id_sim + 2 * fused) / 3


def _softmax_mix(sims: List[Tensor], present: Optional[List[Tensor]], alpha: Optional[Tensor]) -> Tensor:
    s = torch.stack(sims, dim=-1)  # ... x n_modalities
    # static fusion is the softmax with alpha = 0: a plain mean over the (present) modalities.
    logits = s * alpha.unsqueeze(-1) if alpha is not None else torch.zeros_like(s)
    if present is not None:
        p = torch.stack(present, dim=-1).expand_as(s)
        anything = p.any(-1, keepdim=True)
        # Missing modalities get weight 0; an item with none keeps finite logits and scores 0.
        logits = logits.masked_fill(~p & anything, float("-inf"))
        s = s * p.to(s.dtype)
    return (F.softmax(logits, dim=-1) * s).sum(-1)


def _pair(sims: List[Tensor], present: Optional[List[Tensor]], alpha: Optional[Tensor]) -> Tensor:
    """`fuse` of two modalities, differentiable: the softmax weight of the first is sigmoid(l1 - l2),
    so fused = s2 + (s1 - s2) * w1: a few elementwise passes instead of a softmax over a last dim
    of 2 (which is ~5x slower on CPU). A missing modality makes l1 - l2 = -inf or +inf."""
    first, second = sims
    diff = first - second
    z = diff * alpha if alpha is not None else torch.zeros_like(diff)
    if present is not None:
        p1, p2 = present
        z = z.masked_fill(p1 & ~p2, float("inf")).masked_fill(~p1 & p2, float("-inf"))
        first, second = first * p1.to(first.dtype), second * p2.to(second.dtype)
        diff = first - second
    return second + diff * torch.sigmoid(z)


def _fuse_planes(
    planes: List[Tensor], present: Optional[List[Tensor]], alpha: Optional[Tensor], id_sim: Optional[Tensor]
) -> Tensor:
    """`fuse`'s inference form: each step is one elementwise pass over one tensor per modality, and a
    missing modality enters as a per-item logit bias of -inf, where the differentiable form's
    softmax over a last dim of 2 is ~5x slower on CPU. One plane is its own score (x present);
    `id_sim` needs two or more (one modality with IDs is the cosine of `summed`)."""
    if len(planes) == 1:
        if id_sim is not None:
            raise ValueError("one modality with IDs scores a summed vector, not a function of cosines")
        return planes[0] * present[0] if present else planes[0].clone()
    alpha = alpha if alpha is not None else planes[0].new_zeros(())  # static fusion: alpha = 0
    bias, anything = None, None
    if present is not None:
        anything = torch.stack(torch.broadcast_tensors(*present)).any(0)
        bias = [torch.where(~p & anything, float("-inf"), 0.0) for p in present]
    fused = _fuse_two(planes, bias, alpha) if len(planes) == 2 else _fuse_many(planes, bias, alpha)
    # An item with no modality scores 0, as in `fuse` (its finite logits give a mean of zeros).
    if anything is not None and not bool(anything.all()):
        fused.masked_fill_(~anything, 0.0)
    return fused if id_sim is None else fused.mul_(2).add_(id_sim).div_(3)


def _fuse_two(planes: List[Tensor], bias: Optional[List[Tensor]], alpha: Tensor) -> Tensor:
    # Two modalities: the softmax weight of the first is sigmoid(l1 - l2), so fused = s2 + (s1 - s2) w1.
    # A missing modality makes l1 - l2 = -inf or +inf (never both missing: then neither is masked).
    first, second = planes
    diff = first - second
    shift = bias[0] - bias[1] if bias is not None else diff.new_zeros(())
    weight = torch.addcmul(shift, diff, alpha).sigmoid_()
    return diff.mul_(weight).add_(second)


def _fuse_many(planes: List[Tensor], bias: Optional[List[Tensor]], alpha: Tensor) -> Tensor:
    zero = planes[0].new_zeros(())
    logits = [torch.addcmul(bias[i] if bias is not None else zero, s, alpha) for i, s in enumerate(planes)]
    # Cosines lie in [-1, 1]: exp(alpha * s) stays finite without the max shift unless |alpha| is huge.
    if float(alpha.abs().max()) > 80:
        top = logits[0]
        for logit in logits[1:]:
            top = torch.maximum(top, logit)
        logits = [logit - top for logit in logits]
    num = den = None
    for s, logit in zip(planes, logits):
        e = logit.exp_()
        num = e * s if num is None else num.addcmul_(e, s)
        den = e if den is None else den.add_(e)
    return num.div_(den)


def upper_bound(modality_bounds: Sequence[Tensor], id_bound: Optional[Tensor]) -> Tensor:
    """An upper bound on the fused score of items whose cosines are at most the given bounds.

    A fused score is a convex combination of the present modalities' cosines (0 when none is
    present), so it is at most max_m max(bound_m, 0); with IDs it is (cos_id + 2 fused) / 3, and
    without modalities cos_id.
    """
    if not modality_bounds:
        return id_bound
    fused = torch.stack([b.clamp(min=0) for b in modality_bounds]).amax(0)
    return fused if id_bound is None else (id_bound + 2 * fused) / 3
