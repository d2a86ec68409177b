"""Blocks of users scored against every rank's items: the other half of the rank-local catalogue.

Each rank encodes its own users (its stream's batches) and collects them into a block of at most
eval.block_users. `gather_block` hands every rank the whole block, every rank's users in rank
order; each rank then scans only its own item range once (`scan` over `ChunkedBank.local_chunks`)
and scores all of the block's users against each chunk, in groups small enough that no score matrix
exceeds SCORE_FLOATS. What a rank found about each user then goes back to that user's rank: rank
counts are summed (`RankPass`), top-K lists travel in one all-to-all (`Block.exchange`) and are
merged there (topk.py). Every item is scored once, by its owner, against every user: exact.

A held catalogue (`catalogue.HeldCatalogue`: every item on every rank) uses the same passes with no
collective: its `pg` is None, so `gather_block` makes a block of this rank's users alone, its scan
covers every item, and the counts and lists stay where they are.

With the model's learned repeat bias (model.repeat_bias) every block user's history window travels
with it as (row, item) pairs like the exclusions (`Seen.of_window`), and each pass lowers those
items' scores by the bias (`lowered_scores`; a target in the history too), as the forward does.

Memory per rank: the gathered block (world x block users x hidden floats, their exclusion lists and
history windows), each user's running result (a count, or top-K lists) and one group x chunk score
matrix.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator, List, Optional, Sequence, Tuple, TypeVar

import torch
import torch.distributed as dist

from datapipes.batch import PAD, SeqBatch, row_ids
from missrec_torchrec.catalogue import Catalogue, ItemChunk, item_ranges
from missrec_torchrec.metrics import RankCounter
from missrec_torchrec.model.collectives import all_gather_scalar, group_active

# Users x items scored at once in a scan: 4 MiB per fp32 matrix. The fusion makes about a dozen of them
# per group; at 16 MiB each (1 << 22) evaluation was 1.7x slower (cache) and ~70 MB larger (bench: 1e5 items).
SCORE_FLOATS = 1 << 20

T = TypeVar("T")


def in_blocks(items: Iterable[T], per_block: int) -> Iterator[List[T]]:
    """Consecutive lists of `per_block` items (the last one shorter)."""
    block: List[T] = []
    for item in items:
        block.append(item)
        if len(block) == per_block:
            yield block
            block = []
    if block:
        yield block


def batches_per_block(block_users: int, batch_size: int) -> int:
    """Batches hold at most `batch_size` rows, so this many keep a block within `block_users`;
    the same on every rank, so the ranks' blocks end together without asking each other."""
    return max(1, block_users // batch_size)


class Seen:
    """The (row, item) pairs a block excludes from its candidates: each user's history. Rows ascend."""

    def __init__(self, rows: torch.Tensor, items: torch.Tensor):
        self.rows, self.items = rows, items

    @classmethod
    def of(cls, batch: SeqBatch, keep: Optional[torch.Tensor] = None) -> "Seen":
        """Pairs of the rows `keep` (renumbered 0..len(keep)-1; default all) from the batch's seen lists."""
        offsets, values = batch.seen_offsets, batch.seen_values
        seen = cls(row_ids(offsets), values[offsets[0] : offsets[-1]])
        return seen if keep is None else seen.subset(keep, batch.batch_size)

    @classmethod
    def of_window(cls, history: torch.Tensor, keep: Optional[torch.Tensor] = None) -> "Seen":
        """The distinct (row, item) pairs of history windows (B x L, PAD excluded), `keep` as in `of`:
        the items the repeat bias lowers (an item twice in a window is lowered once, as a column)."""
        rows, cols = torch.nonzero(history != PAD, as_tuple=True)
        pairs = torch.unique(torch.stack([rows, history[rows, cols].to(torch.int64)]), dim=1)
        seen = cls(pairs[0], pairs[1])
        return seen if keep is None else seen.subset(keep, history.shape[0])

    @classmethod
    def cat(cls, parts: Sequence["Seen"], rows: Sequence[int]) -> "Seen":
        """The pairs of consecutive row blocks (`rows[i]` rows each) as one block's."""
        starts = torch.tensor([0, *rows[:-1]]).cumsum(0).tolist()
        return cls(torch.cat([p.rows + s for p, s in zip(parts, starts)]), torch.cat([p.items for p in parts]))

    def subset(self, keep: torch.Tensor, rows: int) -> "Seen":
        new_row = torch.full((rows,), -1, dtype=torch.int64, device=self.rows.device)
        new_row[keep] = torch.arange(keep.numel(), device=self.rows.device)
        mapped = new_row[self.rows]
        ok = mapped >= 0
        return Seen(mapped[ok], self.items[ok])

    def window(self, lo: int, hi: int) -> "Seen":
        """The pairs of rows [lo, hi), renumbered from 0."""
        inside = (self.rows >= lo) & (self.rows < hi)
        return Seen(self.rows[inside] - lo, self.items[inside])

    def jagged(self, rows: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """(offsets, values): the pairs as `rows` jagged lists (what RankCounter reads)."""
        counts = torch.bincount(self.rows, minlength=rows)
        offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
        return offsets, self.items[torch.argsort(self.rows, stable=True)]

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

    def lower(self, scores: torch.Tensor, lo: int, hi: int, by: float) -> torch.Tensor:
        """scores (rows x items lo..hi-1) less `by` at the pairs, in place (pairs distinct)."""
        inside = (self.items >= lo) & (self.items < hi)
        rows, cols = self.rows[inside], self.items[inside] - lo
        scores[rows, cols] = scores[rows, cols] - by
        return scores


def all_gather_rows(t: torch.Tensor, sizes: List[int], pg) -> torch.Tensor:
    """Every rank's `t` (sizes[r] rows on rank r) concatenated in rank order."""
    # Collectives need equal shapes: pad every rank's rows to the longest, cut after.
    padded = t.new_zeros(max(sizes), *t.shape[1:])
    padded[: t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded, group=pg)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)])


@dataclass
class Block:
    """Every rank's users of one block, in rank order (u: T x D); this rank's are rows `own`.
    Evaluation adds each user's target and target score; `seen`: pairs excluded, by block row;
    `history`: each user's history window (`Seen.of_window`), for the model's repeat bias."""

    u: torch.Tensor
    sizes: List[int]
    rank: int = 0
    pg: Optional[dist.ProcessGroup] = None
    seen: Optional[Seen] = None
    target: Optional[torch.Tensor] = None
    target_scores: Optional[torch.Tensor] = None
    history: Optional[Seen] = None

    @property
    def own(self) -> slice:
        start = sum(self.sizes[: self.rank])
        return slice(start, start + self.sizes[self.rank])

    def groups(self, chunk: int) -> List[Tuple[int, int]]:
        """Row ranges scored together against a chunk of `chunk` items."""
        return list(item_ranges(self.u.shape[0], max(1, SCORE_FLOATS // max(1, chunk))))

    def window(self, lo: int, hi: int) -> Optional[Seen]:
        return None if self.seen is None else self.seen.window(lo, hi)

    def repeats(self, bank: Catalogue, lo: int, hi: int) -> Optional[Seen]:
        """Rows [lo, hi)'s history pairs when the bank's model has a repeat bias, else None."""
        if bank.repeat_bias is None:
            return None
        if self.history is None:
            raise ValueError("model.repeat_bias: this block carries no history windows to lower")
        return self.history.window(lo, hi)

    def exchange(self, t: torch.Tensor) -> torch.Tensor:
        """From T x W rows (one per block user, on every rank): this rank's users' rows from every
        rank, side by side in rank order (own x world * W). One all-to-all."""
        world = len(self.sizes)
        if world == 1:
            return t
        mine = self.sizes[self.rank]
        out = t.new_empty(world * mine, *t.shape[1:])
        dist.all_to_all_single(out, t.contiguous(), output_split_sizes=[mine] * world,
                               input_split_sizes=self.sizes, group=self.pg)
        return out.view(world, mine, -1).transpose(0, 1).reshape(mine, -1)


def gather_block(u: torch.Tensor, pg=None, seen: Optional[Seen] = None, target: Optional[torch.Tensor] = None,
                 target_scores: Optional[torch.Tensor] = None, history: Optional[Seen] = None) -> Block:
    """The block of every rank's users `u` (with their exclusions, targets and history windows).
    Collective when `pg` spans several ranks; pg None: this process's users alone."""
    if pg is None or not group_active(pg):
        return Block(u, [u.shape[0]], seen=seen, target=target, target_scores=target_scores, history=history)
    rank = dist.get_rank(pg)
    sizes = all_gather_scalar(u.shape[0], u.device, pg).tolist()
    block = Block(all_gather_rows(u, sizes, pg), sizes, rank, pg)
    if target is not None:
        block.target = all_gather_rows(target, sizes, pg)
        block.target_scores = all_gather_rows(target_scores, sizes, pg)
    start = sum(sizes[:rank])
    block.seen = None if seen is None else gather_pairs(seen, start, pg)
    block.history = None if history is None else gather_pairs(history, start, pg)
    return block


def gather_pairs(pairs: Seen, start: int, pg) -> Seen:
    """Every rank's pairs, this rank's rows moved to start at block row `start` (collective)."""
    counts = all_gather_scalar(pairs.rows.numel(), pairs.rows.device, pg).tolist()
    return Seen(all_gather_rows(pairs.rows + start, counts, pg), all_gather_rows(pairs.items, counts, pg))


def lowered_scores(bank: Catalogue, u: torch.Tensor, chunk: ItemChunk, repeats: Optional[Seen]) -> torch.Tensor:
    """B x chunk exact scores, less the repeat bias at each user's history items (`Block.repeats`)."""
    scores = bank.chunk_scores(u, chunk)
    return scores if repeats is None else repeats.lower(scores, chunk.lo, chunk.hi, bank.repeat_bias)


def scan(bank: Catalogue, chunk: int, passes: Sequence) -> None:
    """Feed every chunk of the bank's own items to each pass (`visit(chunk)`), one chunk held at a time."""
    for items in bank.local_chunks(chunk):
        for p in passes:
            p.visit(items)
        del items  # released before the next chunk is looked up


class RankPass:
    """Evaluation: each block user's count of items that beat its target (metrics.py's rank rule),
    over this rank's items, summed over the ranks by `finish` (collective)."""

    def __init__(self, bank: Catalogue, block: Block, chunk: int):
        self.bank, self.block = bank, block
        self.groups = block.groups(chunk)
        self.counters, self.repeats = [], [block.repeats(bank, lo, hi) for lo, hi in self.groups]
        for (lo, hi), repeats in zip(self.groups, self.repeats):
            exclude = block.window(lo, hi).jagged(hi - lo) if block.seen is not None else (None, None)
            target, target_scores = block.target[lo:hi], block.target_scores[lo:hi]
            if repeats is not None:  # a target the user had before is lowered as in its chunk
                again = repeats.contains(target.to(torch.int64).unsqueeze(1), bank.num_items).squeeze(1)
                target_scores = torch.where(again, target_scores - bank.repeat_bias, target_scores)
            self.counters.append(RankCounter(target, target_scores, *exclude))

    def visit(self, chunk) -> None:
        for (lo, hi), counter, repeats in zip(self.groups, self.counters, self.repeats):
            counter.update(lowered_scores(self.bank, self.block.u[lo:hi], chunk, repeats), chunk.lo)

    def finish(self) -> torch.Tensor:
        """This rank's users' ranks."""
        beaten = torch.cat([c.beaten_by for c in self.counters]) if self.counters else \
            torch.zeros(0, dtype=torch.int64, device=self.block.u.device)
        if len(self.block.sizes) > 1:
            dist.all_reduce(beaten, group=self.block.pg)
        return beaten[self.block.own] + 1


def block_ranks(bank: Catalogue, block: Block, chunk: int) -> torch.Tensor:
    """Ranks of this rank's users of `block` over the whole catalogue (collective)."""
    ranks = RankPass(bank, block, chunk)
    scan(bank, chunk, [ranks])
    return ranks.finish()
