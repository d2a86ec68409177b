"""Training objectives and sequence augmentations of MISSRec, plus sampled softmax for large catalogues.

Every loss takes scores BEFORE temperature (what `MISSRecCore.score` returns) and an optional
per-row `weight` (1 real, 0 for rows padded in so that no rank is empty): the loss is the weighted
mean, and a zero-weight row is never anyone's negative in the in-batch losses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor


def _weighted_mean(per_row: Tensor, weight: Optional[Tensor]) -> Tensor:
    if weight is None:
        return per_row.mean()
    w = weight.to(per_row.dtype)
    return (per_row * w).sum() / w.sum().clamp(min=1e-12)


def _mask_dead_columns(logits: Tensor, weight: Optional[Tensor]) -> Tensor:
    if weight is None:
        return logits
    dead = (weight == 0).unsqueeze(0) & ~torch.eye(logits.shape[0], dtype=torch.bool, device=logits.device)
    return logits.masked_fill(dead, float("-inf"))


def seq_item_infonce(
    scores: Tensor,
    temperature: float,
    target: Optional[Tensor] = None,
    weight: Optional[Tensor] = None,
) -> Tensor:
    """In-batch InfoNCE: row a's positive is column a (scores[a, b] = score(u_a, target item b)).

    With `target` (B item indices), a column b != a whose target equals a's is no negative of a
    (quirk 6 fixed); without it every other column is, as in the reference.
    """
    logits = scores / temperature
    if target is not None:
        same = target.unsqueeze(0) == target.unsqueeze(1)
        same.fill_diagonal_(False)
        logits = logits.masked_fill(same, float("-inf"))
    logits = _mask_dead_columns(logits, weight)
    labels = torch.arange(logits.shape[0], device=logits.device)
    return _weighted_mean(F.cross_entropy(logits, labels, reduction="none"), weight)


def seq_seq_infonce(u: Tensor, u_aug: Tensor, temperature: float, weight: Optional[Tensor] = None) -> Tensor:
    """CE(u u_aug^T / temperature, diagonal): one direction, as the reference."""
    logits = _mask_dead_columns(u @ u_aug.T / temperature, weight)
    labels = torch.arange(logits.shape[0], device=logits.device)
    return _weighted_mean(F.cross_entropy(logits, labels, reduction="none"), weight)


def full_softmax_ce(scores: Tensor, target: Tensor, temperature: float, weight: Optional[Tensor] = None) -> Tensor:
    """Cross-entropy over the whole catalogue (scores B x N)."""
    return _weighted_mean(F.cross_entropy(scores / temperature, target, reduction="none"), weight)


def sampled_softmax(
    pos_scores: Tensor,
    neg_scores: Tensor,
    target: Tensor,
    neg_ids: Tensor,
    temperature: float,
    pos_logq: Optional[Tensor] = None,
    neg_logq: Optional[Tensor] = None,
    weight: Optional[Tensor] = None,
) -> Tensor:
    """Softmax over each row's positive and candidates with log-Q correction.

    pos_scores: B; neg_scores: B x S; neg_ids: S (shared candidates) or B x S item indices;
    pos_logq / neg_logq: log of the expected number of times each was drawn (see `expected_logq`),
    None = no correction. A candidate equal to the row's target (an accidental hit, or the row's
    own target among in-batch candidates) is removed, so the positive counts once.
    """
    pos = pos_scores / temperature
    neg = neg_scores / temperature
    if pos_logq is not None:
        pos = pos - pos_logq
    if neg_logq is not None:
        neg = neg - neg_logq
    hit = neg_ids.expand_as(neg_scores) == target.unsqueeze(1)
    neg = neg.masked_fill(hit, float("-inf"))
    logits = torch.cat([pos.unsqueeze(1), neg], dim=1)
    labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    return _weighted_mean(F.cross_entropy(logits, labels, reduction="none"), weight)


def mixed_negative_softmax(
    pos_scores: Tensor,
    uniform_scores: Tensor,
    uniform_ids: Tensor,
    uniform_logq: Optional[Tensor],
    batch_scores: Tensor,
    target: Tensor,
    batch_logq: Optional[Tensor],
    temperature: float,
    weight: Optional[Tensor] = None,
) -> Tensor:
    """Sampled softmax over each row's positive, a shared uniform sample and the batch's targets.

    uniform_scores: B x S against `uniform_ids` (S); batch_scores: B x B, [a, b] = score(u_a,
    target_b). Each kind of negative has its own log-Q (S and B; None = no correction). The
    positive counts once: every candidate equal to the row's target (its own in-batch column,
    another row with the same target, an accidental uniform hit) is removed. A zero-weight row's
    target is nobody's negative.
    """
    neg = torch.cat([uniform_scores, batch_scores], dim=1)
    ids = torch.cat([uniform_ids.expand(neg.shape[0], -1), target.expand(neg.shape[0], -1)], dim=1)
    logq = None
    if uniform_logq is not None or batch_logq is not None:
        zeros_u, zeros_b = uniform_scores.new_zeros(uniform_scores.shape[1]), batch_scores.new_zeros(target.numel())
        logq = torch.cat([zeros_u if uniform_logq is None else uniform_logq, zeros_b if batch_logq is None else batch_logq])
    if weight is not None:
        dead = torch.cat([torch.zeros_like(uniform_ids, dtype=torch.bool), weight == 0])
        neg = neg.masked_fill(dead, float("-inf"))
    return sampled_softmax(pos_scores, neg, target, ids, temperature, neg_logq=logq, weight=weight)


def expected_logq(ids: Tensor, draws: int, num_items: int, probs: Optional[Tensor] = None) -> Tensor:
    """log(draws * q(id)): the log-Q term of candidates drawn `draws` times from q.

    q is uniform over `num_items` when `probs` is None, else `probs` (N, summing to 1). In-batch
    targets are draws from the target distribution (popularity) with draws = batch size.
    """
    if probs is None:
        return torch.full(ids.shape, math.log(draws / num_items), device=ids.device)
    return torch.log(draws * probs[ids])


def sample_negatives(
    num: int,
    num_items: int,
    generator: Optional[torch.Generator] = None,
    probs: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """`num` candidate indices with replacement, uniform or from `probs`, and their log-Q."""
    if probs is None:
        ids = torch.randint(num_items, (num,), generator=generator)
    else:
        ids = torch.multinomial(probs, num, replacement=True, generator=generator)
    return ids, expected_logq(ids, num, num_items, probs)


@dataclass
class Compaction:
    """Where each output position of a left-aligned history comes from, after dropping items."""

    index: Tensor  # B x L: source position of each output position
    valid: Tensor  # B x L bool: output position holds a real item

    @property
    def lengths(self) -> Tensor:
        return self.valid.sum(1)

    def apply(self, x: Tensor, fill=0) -> Tensor:
        """Move positions of x (B x L x ...) the same way; positions past the new length get `fill`."""
        index = self.index.view(*self.index.shape, *([1] * (x.dim() - 2))).expand_as(x)
        valid = self.valid.view(*self.valid.shape, *([1] * (x.dim() - 2)))
        return x.gather(1, index).masked_fill(~valid, fill)

    def apply_times(self, times: Tensor, lengths: Tensor) -> Tensor:
        """SeqBatch.times (B x (L + 1)) after the drop: the kept items' times, then the target's
        (found at each row's old history length `lengths`)."""
        out = F.pad(self.apply(times[:, : self.index.shape[1]]), (0, 1))
        return out.scatter_(1, self.lengths.view(-1, 1), times.gather(1, lengths.view(-1, 1)))


def item_drop(valid: Tensor, drop_prob: float = 0.2, generator: Optional[torch.Generator] = None) -> Compaction:
    """Drop each real item with `drop_prob`, always keep position 0, compact left in order.

    One `Compaction` for the whole row, so ids, every modality, presence flags and interest
    lookups move together (quirk 2 fixed: the reference re-gathers only the text side).
    """
    keep = torch.rand(valid.shape, generator=generator, device=valid.device) >= drop_prob
    keep &= valid
    keep[:, 0] = valid[:, 0]
    # A stable sort on "dropped" lists kept positions first, in their original order.
    index = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices
    positions = torch.arange(valid.shape[1], device=valid.device)
    return Compaction(index=index, valid=positions.unsqueeze(0) < keep.sum(1, keepdim=True))


def feature_swap(
    base: Tensor,
    alternative: Tensor,
    prob: float = 0.2,
    generator: Optional[torch.Generator] = None,
    alternative_present: Optional[Tensor] = None,
) -> Tensor:
    """Each position of base (B x L x D) takes `alternative` with `prob` where that exists.

    The reference's "word drop": 20% of positions read the `.feat2CLS` feature of a word-dropped
    description instead of the text feature (docs/model.md §9).
    """
    swap = torch.rand(base.shape[:2], generator=generator, device=base.device) < prob
    if alternative_present is not None:
        swap &= alternative_present
    return torch.where(swap.unsqueeze(-1), alternative.to(base.dtype), base)


def use_item_drop(coefficient: float, generator: Optional[torch.Generator] = None) -> bool:
    """The per-batch choice of augmentation: item drop with P = coefficient, else feature swap."""
    return bool(torch.rand((), generator=generator) < coefficient)
