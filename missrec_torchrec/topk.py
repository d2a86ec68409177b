"""Top-K over an item catalogue scored in chunks: exact, or approximate with a certificate.

`RunningTopK` keeps each row's k best (score, item) pairs over the chunks seen so far; `Seen`
(user_blocks.py) is the (row, item) pairs a block excludes. The passes scan this rank's items for
every user of a block (user_blocks.py) and merge the ranks' lists for each rank's own users: the
top-K of the union of the per-rank top-Ks is the top-K of all items, ordered by the same rule
(`RunningTopK.result`). Which of several items tied at the K-th score are kept is unspecified, as it
was across chunk sizes in one process. `approx_topk` retrieves each table's K' nearest items by cosine
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

from datapipes.schema import DataError
from missrec_torchrec.catalogue import Catalogue, ItemChunk
from missrec_torchrec.user_blocks import Block, Seen, gather_block, lowered_scores, scan
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


def stacked(tops: Sequence[RunningTopK], width: int, rows: int, device: torch.device, payload: int = 0):
    """(scores, items, payload planes), rows x width: the groups' lists one under the other, each
    padded to `width` (a rank's range may hold fewer items) with -inf, item -1, payload 0."""
    def cat(parts, fill, dtype):
        if not parts:
            return torch.full((rows, width), fill, dtype=dtype, device=device)
        return torch.cat([torch.nn.functional.pad(p, (0, width - p.shape[1]), value=fill) for p in parts])

    scores = cat([t.scores for t in tops], float("-inf"), torch.float32)
    items = cat([t.items for t in tops], -1, torch.int64)
    planes = [cat([t.payload[j] for t in tops], 0.0, torch.float32) for j in range(payload)]
    return scores, items, planes


def merged(block: Block, width: int, scores: torch.Tensor, items: torch.Tensor,
           payload: Sequence[torch.Tensor] = ()) -> RunningTopK:
    """Each of this rank's users' best `width` of every rank's lists (collective)."""
    s, i = block.exchange(scores), block.exchange(items)
    top = RunningTopK(s.shape[0], width, s.device, payload=len(payload))
    top.add(s, i, [block.exchange(p) for p in payload])
    return top


class TopKPass:
    """Exact top-k of every block user over this rank's items; `finish` merges the ranks' lists
    into this rank's users' (scores, items), B x k (collective)."""

    def __init__(self, bank: Catalogue, block: Block, k: int, chunk: int):
        self.bank, self.block, self.k = bank, block, k
        self.groups = block.groups(chunk)
        self.tops = [RunningTopK(hi - lo, k, block.u.device) for lo, hi in self.groups]
        self.seen = [block.window(lo, hi) for lo, hi in self.groups]
        self.repeats = [block.repeats(bank, lo, hi) for lo, hi in self.groups]

    def visit(self, chunk: ItemChunk) -> None:
        idx = chunk.idx
        for (lo, hi), top, seen, repeats in zip(self.groups, self.tops, self.seen, self.repeats):
            scores = lowered_scores(self.bank, self.block.u[lo:hi], chunk, repeats)
            top.add(seen.mask(scores, chunk.lo, chunk.hi) if seen is not None else scores, idx)

    def finish(self) -> Tuple[torch.Tensor, torch.Tensor]:
        scores, items, _ = stacked(self.tops, self.k, self.block.u.shape[0], self.block.u.device)
        return merged(self.block, self.k, scores, items).result()


class ApproxPass:
    """Each table's `per_table` nearest items by cosine for every block user, each list carrying
    every table's cosines of its items, so the re-scoring needs no vector lookups (except for a
    one-modality model with IDs); `finish` merges the ranks' lists and re-scores their union."""

    def __init__(self, bank: Catalogue, block: Block, k: int, per_table: int, chunk: int):
        if bank.repeat_bias is not None:  # its certificate bounds cosines, which know no history
            raise ValueError("model.repeat_bias: approximate top-K is not supported; score exactly")
        self.bank, self.block, self.k, self.per_table = bank, block, k, per_table
        self.tables = list(bank.tables)
        self.groups = block.groups(chunk)
        device = block.u.device
        self.tops = [{t: RunningTopK(hi - lo, per_table, device, payload=len(self.tables)) for t in self.tables}
                     for lo, hi in self.groups]
        self.seen = [block.window(lo, hi) for lo, hi in self.groups]

    def visit(self, chunk: ItemChunk) -> None:
        idx = chunk.idx
        for (lo, hi), tops, seen in zip(self.groups, self.tops, self.seen):
            sims = chunk.cosines(self.block.u[lo:hi])
            if seen is not None:  # a seen item then never enters any list, so its payload never matters
                for plane in sims.values():
                    seen.mask(plane, chunk.lo, chunk.hi)
            for t, top in tops.items():
                top.add(sims[t], idx, [sims[s] for s in self.tables])

    def finish(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(scores, items, certified) of this rank's users; certified[b]: row b's top-k provably
        equals the exact one."""
        rows, device, n = self.block.u.shape[0], self.block.u.device, len(self.tables)
        tops = {}
        for t in self.tables:
            scores, items, payload = stacked([g[t] for g in self.tops], self.per_table, rows, device, n)
            tops[t] = merged(self.block, self.per_table, scores, items, payload)
        return rescore_union(self.bank, self.block.u[self.block.own], tops, self.k)


def rescore_union(bank: Catalogue, u: torch.Tensor, tops: Dict[str, RunningTopK], k: int):
    """(scores, items, certified): the union of the tables' lists re-scored exactly (collective for
    a rank-local bank: the candidates' item state, and a one-modality model with IDs' vectors, are
    looked up)."""
    b, tables = u.shape[0], list(tops)
    # A list's last score is -inf when the table retrieved every candidate there was.
    kth = {t: top.scores[:, -1] for t, top in tops.items()}
    found = torch.cat([top.items.masked_fill(top.scores == float("-inf"), -1) for top in tops.values()], 1)
    cand, order = found.sort(dim=1)
    payload = {t: torch.cat([top.payload[j] for top in tops.values()], 1).gather(1, order)
               for j, t in enumerate(tables)}
    duplicate = torch.zeros_like(cand, dtype=torch.bool)
    duplicate[:, 1:] = cand[:, 1:] == cand[:, :-1]
    usable = (cand >= 0) & ~duplicate
    safe = cand.clamp(min=0)
    items = bank.vectors(safe) if bank.summed else None
    rescored = bank.fused(u, payload, safe, items, bank.presence(safe)).masked_fill(~usable, float("-inf"))
    top = RunningTopK(b, k, u.device)
    top.add(rescored, cand)
    scores, best = top.result()
    return scores, best, certified(bank, scores, kth, k)


def certified(bank: Catalogue, scores: torch.Tensor, kth: Dict[str, torch.Tensor], k: int) -> torch.Tensor:
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


def exact_topk(bank: Catalogue, u: torch.Tensor, k: int, chunk: int, seen: Optional[Seen] = None,
               history: Optional[Seen] = None):
    """(scores, items) B x k of this rank's users `u` over the whole catalogue, scored exactly chunk
    by chunk (`history`: their windows, for the repeat bias). Collective for a rank-local bank:
    every rank passes its own users (maybe none)."""
    top = TopKPass(bank, gather_block(u, bank.pg, seen, history=history), k, chunk)
    scan(bank, chunk, [top])
    return top.finish()


def approx_topk(bank: Catalogue, u: torch.Tensor, k: int, per_table: int, chunk: int, seen: Optional[Seen] = None):
    """(scores, items, certified): the union of every table's `per_table` nearest items by cosine,
    re-scored exactly (`ApproxPass`). Collective like `exact_topk`."""
    approx = ApproxPass(bank, gather_block(u, bank.pg, seen), k, per_table, chunk)
    scan(bank, chunk, [approx])
    return approx.finish()

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
