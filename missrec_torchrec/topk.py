"""Top-K over an item catalogue scored in chunks: exact, or approximate with a certificate.

`RunningTopK` keeps each row's k best (score, item) pairs over the chunks seen so far; `Seen` is the
(row, item) pairs a batch excludes. `approx_topk` retrieves each table's K' nearest items by cosine
and re-scores only their union exactly. Fused scores are convex combinations of the per-modality
cosines, so every item outside the union scores at most `fusion.upper_bound` of the K'-th retrieved
cosines; a row whose k-th re-scored item beats that bound got the exact top-k ("certified").
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import pyarrow.parquet as pq
import torch

from datapipes.batch import SeqBatch, row_ids
from datapipes.schema import DataError
from missrec_torchrec.catalogue import ItemBank, item_ranges
from missrec_torchrec.model import fusion
from missrec_torchrec.recommender import ID_TABLE

CERTIFY_MARGIN = 1e-5  # retrieval and re-scoring round differently; a certificate must survive that


class RunningTopK:
    """The k best (score, item) pairs of each row over the item chunks seen so far, plus optional
    payload planes whose values travel with the kept pairs."""

    def __init__(self, rows: int, k: int, device: torch.device, payload: int = 0):
        self.k = k
        self.scores = torch.zeros(rows, 0, device=device)
        self.items = torch.zeros(rows, 0, dtype=torch.int64, device=device)
        self.payload = [torch.zeros(rows, 0, device=device) for _ in range(payload)]

    def add(self, scores: torch.Tensor, items: torch.Tensor, payload: Sequence[torch.Tensor] = ()) -> None:
        """scores B x C of `items` (C shared by the rows, or B x C); payload: B x C planes."""
        found = self._columns(scores)
        if found is None:
            return
        cols, ok = found
        picked = scores.gather(1, cols)
        if ok is not None:
            picked = picked.masked_fill(~ok, float("-inf"))
        both = torch.cat([self.scores, picked], 1)
        self.scores, pos = both.topk(min(self.k, both.shape[1]), dim=1)
        chosen = items[cols] if items.dim() == 1 else items.gather(1, cols)
        self.items = torch.cat([self.items, chosen], 1).gather(1, pos)
        self.payload = [torch.cat([old, p.gather(1, cols)], 1).gather(1, pos) for old, p in zip(self.payload, payload)]

    def _columns(self, scores: torch.Tensor):
        """(B x W columns, valid mask or None) that may enter the top k, or None for no column.

        Once a row holds k pairs only columns beating its k-th score qualify, after the first chunks
        a small share: selecting them costs a comparison, where a top-k selection costs a sort.
        """
        width = scores.shape[1]
        if self.scores.shape[1] == self.k:
            rows, cols = (scores > self.scores[:, -1:]).nonzero(as_tuple=True)  # row-major order
            if rows.numel() == 0:
                return None
            counts = torch.bincount(rows, minlength=scores.shape[0])
            most = int(counts.max())
            if most <= width // 8:
                slot = torch.arange(rows.numel(), device=rows.device) - (counts.cumsum(0) - counts)[rows]
                out = torch.zeros(scores.shape[0], most, dtype=torch.int64, device=scores.device)
                ok = torch.zeros(scores.shape[0], most, dtype=torch.bool, device=scores.device)
                out[rows, slot], ok[rows, slot] = cols, True
                return out, ok
        return scores.topk(min(self.k, width), dim=1)[1], None

    def result(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """Scores descending, ties by item index, so the order never depends on the chunking;
        -inf entries (excluded, or fewer than k items) carry item -1."""
        items = self.items.masked_fill(self.scores == float("-inf"), -1)
        by_item = items.argsort(dim=1)
        scores, items = self.scores.gather(1, by_item), items.gather(1, by_item)
        order = scores.argsort(dim=1, descending=True, stable=True)
        return scores.gather(1, order), items.gather(1, order)


class Seen:
    """The (row, item) pairs a batch excludes from its candidates: each user's history."""

    def __init__(self, rows: torch.Tensor, items: torch.Tensor):
        self.rows, self.items = rows, items

    @classmethod
    def of(cls, batch: SeqBatch, keep: torch.Tensor) -> "Seen":
        """Pairs of the rows `keep` (renumbered 0..len(keep)-1) from the batch's seen lists."""
        offsets, values = batch.seen_offsets, batch.seen_values
        rows = row_ids(offsets)
        return cls(rows, values[offsets[0] : offsets[-1]]).subset(keep, batch.batch_size)

    def subset(self, keep: torch.Tensor, rows: int) -> "Seen":
        new_row = torch.full((rows,), -1, dtype=torch.int64, device=self.rows.device)
        new_row[keep] = torch.arange(keep.numel(), device=self.rows.device)
        mapped = new_row[self.rows]
        ok = mapped >= 0
        return Seen(mapped[ok], self.items[ok])

    def to(self, device: torch.device) -> "Seen":
        return Seen(self.rows.to(device), self.items.to(device))

    def contains(self, items: torch.Tensor, num_items: int) -> torch.Tensor:
        """B x S: whether row b's item items[b, s] is one of its excluded pairs."""
        rows = torch.arange(items.shape[0], device=items.device).unsqueeze(1)
        return torch.isin(rows * num_items + items, self.rows * num_items + self.items)

    def mask(self, scores: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        inside = (self.items >= lo) & (self.items < hi)
        scores[self.rows[inside], self.items[inside] - lo] = float("-inf")
        return scores


def exact_topk(bank: ItemBank, u: torch.Tensor, k: int, chunk: int, seen: Optional[Seen]):
    """(scores, items) B x k: the whole catalogue scored exactly, chunk by chunk."""
    top = RunningTopK(u.shape[0], k, u.device)
    for lo, hi in item_ranges(bank.num_items, chunk):
        scores = bank.chunk_scores(u, lo, hi)
        top.add(seen.mask(scores, lo, hi) if seen is not None else scores, torch.arange(lo, hi, device=u.device))
    return top.result()


def approx_topk(bank: ItemBank, u: torch.Tensor, k: int, per_table: int, chunk: int, seen: Optional[Seen]):
    """(scores, items, certified): the union of every table's `per_table` nearest items by cosine,
    re-scored exactly; certified[b] says row b's top-k provably equals the exact one.

    Each table's top list carries every table's cosines of its items, so the re-scoring needs no
    vector lookups (except for a one-modality model with IDs, see ItemBank).
    """
    b, tables = u.shape[0], list(bank.unit)
    tops = {t: RunningTopK(b, per_table, u.device, payload=len(tables)) for t in tables}
    for lo, hi in item_ranges(bank.num_items, chunk):
        sims = bank.cosines(u, lo, hi)
        if seen is not None:  # a seen item then never enters any list, so its payload never matters
            for plane in sims.values():
                seen.mask(plane, lo, hi)
        idx = torch.arange(lo, hi, device=u.device)
        for t, top in tops.items():
            top.add(sims[t], idx, [sims[s] for s in tables])
    none = torch.full((b,), float("-inf"), device=u.device)  # the table retrieved every candidate
    kth = {t: top.scores[:, -1] if top.scores.shape[1] == per_table else none for t, top in tops.items()}
    found = torch.cat([top.items.masked_fill(top.scores == float("-inf"), -1) for top in tops.values()], 1)
    cand, order = found.sort(dim=1)
    payload = {t: torch.cat([top.payload[j] for top in tops.values()], 1).gather(1, order)
               for j, t in enumerate(tables)}
    duplicate = torch.zeros_like(cand, dtype=torch.bool)
    duplicate[:, 1:] = cand[:, 1:] == cand[:, :-1]
    usable = (cand >= 0) & ~duplicate
    rescored = bank.fused(u, payload, cand.clamp(min=0)).masked_fill(~usable, float("-inf"))
    top = RunningTopK(b, k, u.device)
    top.add(rescored, cand)
    scores, items = top.result()
    return scores, items, _certified(bank, scores, kth, k)


def _certified(bank: ItemBank, scores: torch.Tensor, kth: Dict[str, torch.Tensor], k: int) -> torch.Tensor:
    """Rows whose k-th re-scored item beats every item outside the retrieved union.

    Outside the union each table's cosine is at most its k'-th retrieved one, so every item there
    scores at most `fusion.upper_bound` of those. A table that retrieved every candidate
    (kth = -inf) leaves nothing outside the union.
    The one-modality model with IDs scores a summed vector, which has no such bound.
    """
    b, device = scores.shape[0], scores.device
    if bank.summed:
        return torch.zeros(b, dtype=torch.bool, device=device)
    everything = torch.stack([v == float("-inf") for v in kth.values()]).any(0)
    bound = fusion.upper_bound([kth[m] for m in bank.modalities], kth.get(ID_TABLE))
    kth_score = scores[:, k - 1] if scores.shape[1] >= k else torch.full((b,), float("-inf"), device=device)
    return everything | (kth_score > bound + CERTIFY_MARGIN)


def recall(approx_items: np.ndarray, exact_items: np.ndarray) -> np.ndarray:
    """Per row |approx & exact| / |exact| over valid (>= 0) entries; NaN where exact is empty."""
    out = np.full(len(exact_items), np.nan)
    for i, (a, e) in enumerate(zip(approx_items, exact_items)):
        e = set(np.asarray(e)[np.asarray(e) >= 0].tolist())
        if e:
            out[i] = len(e & set(np.asarray(a).tolist())) / len(e)
    return out


def topk_recall(approx_path: Path | str, exact_path: Path | str) -> float:
    """Mean recall of one score file's top-K lists against another's (same users, e.g. approx vs exact)."""
    a, e = pq.read_table(approx_path), pq.read_table(exact_path)
    if a.column("user_index").to_pylist() != e.column("user_index").to_pylist():
        raise DataError(f"{approx_path}: not the same users as {exact_path}")
    return float(np.nanmean(recall(a.column("items").to_pylist(), e.column("items").to_pylist())))
