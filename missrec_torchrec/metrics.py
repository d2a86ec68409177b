"""Full-ranking metrics with one target item per user: HR@K (= Recall@K), NDCG@K and MRR.

Rank rule (docs/protocols.md, "Metric definitions"): rank = 1 + the number of candidates that are not masked, are not the
target itself, and do not score strictly lower than the target. Ties therefore count against the
target (pessimistic), and so does a NaN on either side, so a broken model can never look good.

Masking (`exclude`): per row a jagged set of item ids that are not candidates (the user's seen
history under the HSTU protocol; nothing under the MISSRec/UniSRec protocol). The target is never
masked, even when it also occurs in the history (a re-consumed item): masking it would leave the
row without a rank; this follows the HSTU code, which masks history items but keeps the target.
Negative ids (padding) in `exclude` are ignored; duplicates are harmless.

Catalogues too large for a B x N score matrix are scored in item-range chunks: `RankCounter`
accumulates each row's count chunk by chunk against the target's score computed beforehand.
Accumulators hold sums and counts; `compute` all-reduces them, so per-rank averages are never
averaged.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch
import torch.distributed as dist

from datapipes.batch import row_ids


def _check_rows(name: str, tensor: Optional[torch.Tensor], rows: int) -> None:
    if tensor is not None and (tensor.dim() != 1 or tensor.shape[0] != rows):
        raise ValueError(f"{name} must have shape [{rows}], got {list(tensor.shape)}")


class RankCounter:
    """One batch's target ranks over the full catalogue, fed in item-range chunks.

    `target_scores` must come from the same scoring function as the chunks; the target's own column
    is skipped in whichever chunk holds it, so a rounding difference between the two never makes the
    target beat (or tie) itself.
    """

    def __init__(
        self,
        target: torch.Tensor,
        target_scores: torch.Tensor,
        exclude_offsets: Optional[torch.Tensor] = None,
        exclude_values: Optional[torch.Tensor] = None,
    ) -> None:
        rows = target.shape[0]
        _check_rows("target_scores", target_scores, rows)
        _check_rows("exclude_offsets", exclude_offsets, rows + 1)
        if (exclude_offsets is None) != (exclude_values is None):
            raise ValueError("exclude_offsets and exclude_values go together")
        self.target = target.to(torch.int64)
        self.target_scores = target_scores.unsqueeze(1)
        self.beaten_by = torch.zeros(rows, dtype=torch.int64, device=target.device)
        # Masked (row, item) pairs sorted by item, so each chunk takes one contiguous slice.
        self._mask_rows = self._mask_items = torch.zeros(0, dtype=torch.int64, device=target.device)
        if exclude_offsets is not None:
            mask_rows = row_ids(exclude_offsets.to(target.device))
            mask_items = exclude_values[exclude_offsets[0] : exclude_offsets[-1]].to(torch.int64)
            keep = (mask_items >= 0) & (mask_items != self.target[mask_rows])
            mask_rows, mask_items = mask_rows[keep], mask_items[keep]
            order = torch.argsort(mask_items)
            self._mask_rows, self._mask_items = mask_rows[order], mask_items[order]

    def update(self, scores: torch.Tensor, start: int = 0) -> None:
        """Count candidates `start .. start + scores.shape[1] - 1` (scores: B x chunk width)."""
        if scores.dim() != 2 or scores.shape[0] != self.target.shape[0]:
            raise ValueError(f"scores must be [{self.target.shape[0]}, chunk], got {list(scores.shape)}")
        width = scores.shape[1]
        not_lower = ~(scores < self.target_scores)
        rows = torch.nonzero((self.target >= start) & (self.target < start + width)).squeeze(1)
        not_lower[rows, self.target[rows] - start] = False
        bounds = torch.tensor([start, start + width], device=self._mask_items.device)
        lo, hi = torch.searchsorted(self._mask_items, bounds).tolist()
        not_lower[self._mask_rows[lo:hi], self._mask_items[lo:hi] - start] = False
        self.beaten_by += not_lower.sum(1)

    def ranks(self) -> torch.Tensor:
        return self.beaten_by + 1


def target_ranks(
    scores: torch.Tensor,
    target: torch.Tensor,
    exclude_offsets: Optional[torch.Tensor] = None,
    exclude_values: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Ranks of `target` in a full B x N score matrix (column j = item j)."""
    if scores.dim() != 2:
        raise ValueError(f"scores must be B x N, got {list(scores.shape)}")
    _check_rows("target", target, scores.shape[0])
    if bool(((target < 0) | (target >= scores.shape[1])).any()):
        raise ValueError(f"target ids must lie in [0, {scores.shape[1]})")
    target_scores = scores.gather(1, target.to(torch.int64).unsqueeze(1)).squeeze(1)
    counter = RankCounter(target, target_scores, exclude_offsets, exclude_values)
    counter.update(scores, 0)
    return counter.ranks()


class RankingMetrics:
    """Sums of HR@K, NDCG@K and 1/rank over weighted users, plus the sum of weights.

    `weight` 0 marks padding rows (added so that no rank gets an empty batch): they count nowhere.
    """

    def __init__(self, ks: Sequence[int] = (10, 50), device: Optional[torch.device] = None) -> None:
        if not ks or any(int(k) < 1 for k in ks):
            raise ValueError(f"ks must be positive cut-offs, got {list(ks)}")
        self.ks = [int(k) for k in ks]
        self.names = [f"{m}@{k}" for k in self.ks for m in ("hr", "ndcg")] + ["mrr"]
        self.device = device
        self.reset()

    def reset(self) -> None:
        # float64: sums over millions of users stay exact enough; last slot = sum of weights.
        self.sums = torch.zeros(len(self.names) + 1, dtype=torch.float64, device=self.device)

    def update_ranks(self, ranks: torch.Tensor, weight: Optional[torch.Tensor] = None) -> None:
        if ranks.dim() != 1:
            raise ValueError(f"ranks must be 1-D, got {list(ranks.shape)}")
        _check_rows("weight", weight, ranks.shape[0])
        ranks = ranks.to(self.sums.device, torch.float64)
        w = torch.ones_like(ranks) if weight is None else weight.to(self.sums.device, torch.float64)
        gain = 1.0 / torch.log2(ranks + 1.0)
        per_user = []
        for k in self.ks:
            hit = (ranks <= k).to(torch.float64)
            per_user += [hit, hit * gain]
        per_user += [1.0 / ranks, torch.ones_like(ranks)]
        self.sums += torch.stack(per_user) @ w

    def update(
        self,
        scores: torch.Tensor,
        target: torch.Tensor,
        weight: Optional[torch.Tensor] = None,
        exclude_offsets: Optional[torch.Tensor] = None,
        exclude_values: Optional[torch.Tensor] = None,
    ) -> None:
        """Add a batch scored against the whole catalogue at once (B x N)."""
        self.update_ranks(target_ranks(scores, target, exclude_offsets, exclude_values), weight)

    def compute(self, pg: Optional[dist.ProcessGroup] = None) -> Dict[str, float]:
        """Averages over all ranks' users (collective when a process group exists) plus `count`."""
        totals = self.sums.clone()
        if dist.is_available() and dist.is_initialized():
            if dist.get_backend(pg) == "nccl":
                totals = totals.to(torch.device("cuda", torch.cuda.current_device()))
            dist.all_reduce(totals, op=dist.ReduceOp.SUM, group=pg)
        totals = totals.cpu()
        count = float(totals[-1])
        result = {n: (float(s) / count if count > 0 else float("nan")) for n, s in zip(self.names, totals)}
        result["count"] = count
        return result


def early_stopping(value: float, best: Optional[float], bad: int, patience: int, recbole: bool = False):
    """(improved, validations without improvement, stop) after one validation (higher is better).

    Ours: only a strictly higher value improves, and `patience` validations without one stop the
    run. `recbole` (RecBole's `early_stopping`, which the reference uses): an equal value improves
    too, and the run stops after patience + 1.
    """
    improved = best is None or value > best or (recbole and value == best)
    bad = 0 if improved else bad + 1
    return improved, bad, bad >= patience + int(recbole)
