"""ANN candidates for batch scoring: rank-local faiss indexes, then exact re-scoring of the union.

Each rank indexes only its own items [lo, hi) (catalogue.py), like the exact scan: one faiss index
per item table (every modality, and the ID table in transductive mode) over the unit item vectors,
so inner product is cosine: HNSW (a graph) or IVF (a k-means partition), both storing
scalar-quantized codes (8 bits per dimension, a quarter of fp32, or 6 or 4 with --ann-bits; trained
on a seeded, strided sample of the rank's items).
The build is two collective scans of the rank's range: the sample, then every chunk added.

For a block of every rank's users (user_blocks.py) each rank retrieves each table's C nearest of its
items per user, C = `candidates` x K, reads the union's rows from its own row-wise shards (or looks
them up, collectively, where a table is not row-wise), re-scores them exactly with the model's
fusion and keeps a top-K; the ranks' lists are merged for each user as in
the exact scan. So every returned score is the exact one; only the choice of items is approximate
(no certificate: an ANN list bounds nothing outside it). The codes only choose candidates. Seen
items are dropped after retrieval, so with --mask-history each table retrieves up to C more, as many
as the block's longest seen list.

Memory per rank: its indexes (items/rank x tables x (D bytes + list ids or graph links); IVF lists are
allocated at their final size, `TableIndexes.fill_lists`) and one group of users' candidate rows of
one table at a time (up to RESCORE_IDS x D floats).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Dict, Optional, Tuple

import numpy as np
import torch

from datapipes.schema import DataError
from missrec_torchrec.catalogue import LOOKUP_CHUNK, Catalogue, item_ranges
from missrec_torchrec.resources import release_memory
from missrec_torchrec.topk import RunningTopK, merged
from missrec_torchrec.user_blocks import Seen, gather_block

if TYPE_CHECKING:
    import faiss

INDEX_KINDS = ("hnsw", "ivf")
# Per-table candidates as a multiple of K. At 1e6 items (bench/score.py) 4K kept 0.73 of the exact
# top-100 even from an exact per-table scan, 8K kept 0.93: the fused top-K reaches deep into each list.
CANDIDATES = 8
HNSW_M = 32  # graph links per node: faiss's usual choice for 64-300-d vectors
IVF_PROBE = 16  # lists scanned per query
# IVF k-means trains on at most this many points per list: more barely moves the centroids.
IVF_TRAIN_PER_LIST = 64
# Candidate slots (users x tables x width) re-scored at once: their distinct rows (at most this many
# x D floats per table) and each table's distinct x users cosines. At 1e7 items a group of 1 << 17
# left ~130 MiB per rank resident after its first group (the heap keeps the freed transients); with
# 1 << 15 a 4,000-user run peaked at 1.28x of the bound instead of 1.33x, at 8% fewer users/s.
RESCORE_IDS = 1 << 15
# Users per rank in one --ann block of `missrec score` (at most eval.block_users). A block's lists
# (every rank's users x K scores and ids, gathered, exchanged, merged) are all its size buys: at 1e6
# items, 20,000 users a rank in one block peaked the score phase at 1.45 GB, blocks of 4,096 at 1.15.
ANN_BLOCK_USERS = 4096
SAMPLE = 65536  # points an HNSW index's scalar quantizer trains its ranges on
# Bits per dimension of the codes: faiss's scalar quantizers. Fewer bits, a smaller index, coarser
# candidates (the re-scoring stays exact); 8 = a quarter of fp32.
CODE_KINDS = {4: "QT_4bit", 6: "QT_6bit", 8: "QT_8bit"}
CODE_BITS = 8


@dataclass
class AnnSettings:
    """`missrec score --ann` and its knobs; None = the default stated on each."""

    kind: str = "hnsw"
    candidates: Optional[int] = None  # C = candidates x K per table (default CANDIDATES)
    hnsw_m: Optional[int] = None  # default HNSW_M
    hnsw_ef: Optional[int] = None  # HNSW search breadth (default: the number retrieved; never below it)
    ivf_lists: Optional[int] = None  # default: sqrt(items), at most items / 39 (faiss's least per list)
    ivf_probe: Optional[int] = None  # default IVF_PROBE, at most the lists
    bits: Optional[int] = None  # bits per dimension of the scalar-quantized codes (default CODE_BITS)

    def check(self) -> None:
        """One DataError line for a bad value or a knob of the other index."""
        if self.kind not in INDEX_KINDS:
            raise DataError(f"--ann {self.kind}: must be one of {', '.join(INDEX_KINDS)}")
        if self.bits is not None and self.bits not in CODE_KINDS:
            raise DataError(f"--ann-bits {self.bits}: must be one of {', '.join(map(str, CODE_KINDS))}")
        least = {"candidates": 1, "hnsw_m": 2, "hnsw_ef": 1, "ivf_lists": 1, "ivf_probe": 1}
        for name, low in least.items():
            value = getattr(self, name)
            flag = "--ann-candidates" if name == "candidates" else f"--{name.replace('_', '-')}"
            if value is not None and value < low:
                raise DataError(f"{flag} {value}: must be >= {low}")
            if value is not None and name.split("_")[0] in INDEX_KINDS and not name.startswith(self.kind):
                raise DataError(f"{flag} is a knob of --ann {name.split('_')[0]}, not of --ann {self.kind}")

    def plan(self) -> Dict[str, object]:
        return asdict(self)

    def per_table(self, k: int, num_items: int) -> int:
        return min(num_items, (self.candidates or CANDIDATES) * k)

    def lists(self, per_rank: int, num_items: int, world: int) -> int:
        """IVF lists of each rank's index (the smallest rank's `per_rank` items decide, so every rank
        builds the same number and raises the same error)."""
        if self.ivf_lists is None:
            return max(1, min(round(math.sqrt(per_rank)), per_rank // 39))
        if self.ivf_lists > per_rank:
            where = "" if world == 1 else f" a rank indexes ({num_items} over {world} ranks)"
            raise DataError(f"--ivf-lists {self.ivf_lists}: more lists than the catalogue's {per_rank} items{where}")
        return self.ivf_lists

    def describe(self, k: int, num_items: int, lists: int) -> str:
        c = self.per_table(k, num_items)
        if self.kind == "hnsw":
            knobs = f"M {self.hnsw_m or HNSW_M}, efSearch {max(self.hnsw_ef or 0, c)}"
        else:
            knobs = f"{lists} lists, nprobe {min(lists, self.ivf_probe or IVF_PROBE)}"
        return f"ann {self.kind} ({knobs}, {self.bits or CODE_BITS}-bit codes, one index per rank), {c} candidates per table"


def new_index(dim: int, settings: AnnSettings, lists: int) -> faiss.Index:
    """An untrained inner-product index of scalar-quantized codes for one table's unit vectors."""
    import faiss  # here, not at the top: `missrec score` without --ann never needs it (~0.2 s)
    codes = getattr(faiss.ScalarQuantizer, CODE_KINDS[settings.bits or CODE_BITS])
    if settings.kind == "hnsw":
        return faiss.IndexHNSWSQ(dim, codes, settings.hnsw_m or HNSW_M, faiss.METRIC_INNER_PRODUCT)
    probe = settings.ivf_probe or IVF_PROBE
    if settings.ivf_probe is not None and probe > lists:
        raise DataError(f"--ivf-probe {probe}: more than the index's {lists} lists")
    index = faiss.IndexIVFScalarQuantizer(faiss.IndexFlatIP(dim), dim, lists, codes, faiss.METRIC_INNER_PRODUCT)
    index.cp.max_points_per_centroid = IVF_TRAIN_PER_LIST  # faiss samples (seeded) above this
    index.cp.min_points_per_centroid = 1  # small catalogues: lists are capped above, no warning needed
    index.nprobe = min(probe, lists)
    return index


def _code_size(index: faiss.Index) -> int:
    """Bytes of one item's code (an HNSW index keeps its codes in its storage index)."""
    import faiss

    return index.code_size if hasattr(index, "code_size") else faiss.downcast_index(index.storage).code_size


def numpy_of(v: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(v.detach().float().cpu().numpy())


class TableIndexes:
    """One index per table over this process's items [bank.lo, bank.hi), built once per scoring run
    (two collective scans of the range: a strided training sample, then every item); `seconds` is
    the build time, `bytes` the indexes' codes and ids."""

    def __init__(self, bank: Catalogue, settings: AnnSettings):
        settings.check()
        self.settings, self.lo = settings, bank.lo
        self.own = bank.own_tables()  # candidates re-scored from the rank's own shards, no lookups
        self.items = bank.hi - bank.lo
        self.lists = settings.lists(bank.num_items // bank.world, bank.num_items, bank.world)
        t0 = time.perf_counter()
        want = SAMPLE if settings.kind == "hnsw" else self.lists * IVF_TRAIN_PER_LIST
        stride = max(1, -(-self.items // want))
        sample: Dict[str, list] = {t: [] for t in bank.tables}
        for chunk in bank.local_chunks(LOOKUP_CHUNK):
            first = -(chunk.lo - bank.lo) % stride  # the range's every stride-th item, wherever chunks cut
            for t, v in chunk.unit.items():  # a copy: a strided view would keep the whole chunk alive
                sample[t].append(v[first::stride].clone())
            release_memory()  # each chunk's lookups leave freed heap pages resident (+0.5 GB at 1e6)
        self.indexes = {}
        for t in list(sample):
            x = numpy_of(torch.cat(sample.pop(t)))
            self.indexes[t] = new_index(x.shape[1], settings, self.lists)
            self.indexes[t].train(x)
            del x
        if settings.kind == "hnsw":
            for chunk in bank.local_chunks(LOOKUP_CHUNK):
                for t, v in chunk.unit.items():
                    self.indexes[t].add(numpy_of(v))
                release_memory()
        else:
            self.fill_lists(bank)
        self.seconds = time.perf_counter() - t0
        # An item's code and its list id (int64), or its level-0 links (2M int32).
        links = 8 * (settings.hnsw_m or HNSW_M) if settings.kind == "hnsw" else 8
        self.bytes = self.items * sum(_code_size(index) + links for index in self.indexes.values())

    def fill_lists(self, bank: Catalogue) -> None:
        """Add every item to the IVF indexes with each inverted list allocated once at its final size:
        faiss's own `add` grows each list's vectors by doubling, which left a rank's indexes at ~1.9x
        their codes (5e6 items of 64-d: 674 MB for 343). So the scan only encodes (list ids and codes
        into arrays of the exact size), then each list is filled in one append."""
        import faiss

        codes = {t: np.empty((self.items, ix.code_size), np.uint8) for t, ix in self.indexes.items()}
        lists = {t: np.empty((self.items, 1), np.int64) for t in self.indexes}
        for chunk in bank.local_chunks(LOOKUP_CHUNK):
            a, b = chunk.lo - bank.lo, chunk.hi - bank.lo
            for t, v in chunk.unit.items():
                x, index = numpy_of(v), self.indexes[t]
                lists[t][a:b] = index.quantizer.assign(x, 1)
                index.encode_vectors(b - a, faiss.swig_ptr(x), faiss.swig_ptr(lists[t][a:b]), faiss.swig_ptr(codes[t][a:b]))
            release_memory()
        for t, index in self.indexes.items():
            ids, code = lists.pop(t).ravel(), codes.pop(t)  # each table's arrays freed once its lists hold them
            order = np.argsort(ids, kind="stable")
            ends = np.cumsum(np.bincount(ids, minlength=self.lists))
            for l, (a, b) in enumerate(zip(ends - np.diff(ends, prepend=0), ends)):
                if b > a:
                    rows = order[a:b]
                    block = np.ascontiguousarray(code[rows])  # named: swig_ptr holds no reference
                    index.invlists.add_entries(l, int(b - a), faiss.swig_ptr(rows), faiss.swig_ptr(block))
            index.ntotal = self.items
            del ids, code, order
            release_memory()

    def describe(self, k: int, num_items: int) -> str:
        return self.settings.describe(k, num_items, self.lists)

    def search(self, u: torch.Tensor, width: int) -> torch.Tensor:
        """B x (tables * width) item indices: each table's `width` nearest of this process's items by
        cosine (-1: none found)."""
        import faiss

        q = numpy_of(u)
        found = []
        for index in self.indexes.values():
            params = None
            if self.settings.kind == "hnsw":  # faiss searches max(efSearch, k) wide
                params = faiss.SearchParametersHNSW(efSearch=max(self.settings.hnsw_ef or 0, width))
            found.append(torch.from_numpy(index.search(q, width, params=params)[1]))
        local = torch.cat(found, 1).to(device=u.device, dtype=torch.int64)
        return torch.where(local >= 0, local + self.lo, local)


def candidate_scores(bank: Catalogue, u: torch.Tensor, cand: torch.Tensor, own=None) -> torch.Tensor:
    """B x S exact fused scores of each row's own candidates `cand` (B x S valid item ids, all of
    this process's range): each distinct one read from `own` (`Catalogue.own_tables`) or looked up
    (collective for a rank-local bank) and adapted once."""
    distinct, where = torch.unique(cand, return_inverse=True)
    present = {m: p[where] for m, p in bank.presence(distinct, own=own is not None).items()}
    if bank.summed:  # the one-modality model with IDs scores a summed vector: `fused` reads its parts
        _, adapted = bank.lookup(distinct, own=own)
        return bank.fused(u, {}, cand, {t: v[where] for t, v in adapted.items()}, present)
    # Every distinct candidate against every row, then each row's own: a matmul and a gather of
    # cosines instead of gathering B x S x D vectors. From the rank's own shards one table at a time,
    # so only one table's rows (up to RESCORE_IDS of them) are alive at once.
    rows = torch.arange(cand.shape[0], device=cand.device).unsqueeze(1)
    cosines = {}
    for part in [own] if own is None else [{t: o} for t, o in own.items()]:
        for t, v in bank.lookup(distinct, own=part)[0].items():
            cosines[t] = (v @ u.T)[where, rows]
    return bank.fused(u, cosines, cand, None, present)


def ann_topk(indexes: TableIndexes, bank: Catalogue, u: torch.Tensor, k: int, per_table: int,
             seen: Optional[Seen]) -> Tuple[torch.Tensor, torch.Tensor]:
    """(scores, items) B x k of this process's users `u` over the whole catalogue: every rank's
    candidates for the block of every rank's users, re-scored exactly, the ranks' lists merged.
    Collective for a rank-local bank: every rank passes its own users (maybe none)."""
    block = gather_block(u, bank.pg, seen)
    rows, device = block.u.shape[0], block.u.device
    extra = 0
    if block.seen is not None and block.seen.rows.numel():
        extra = min(per_table, int(torch.bincount(block.seen.rows, minlength=rows).max()))
    width = max(1, min(indexes.items, per_table + extra))
    # The block's lists, filled group by group: one allocation, not one per group interleaved with
    # each group's large transients (which kept the freed heap resident: +2.6 GiB per rank at 1e7).
    scores = torch.full((rows, k), float("-inf"), device=device)
    items = torch.full((rows, k), -1, dtype=torch.int64, device=device)
    # The same groups on every rank (the block and width are), so their lookups meet.
    for lo, hi in item_ranges(rows, max(1, RESCORE_IDS // (width * len(indexes.indexes)))):
        cand = indexes.search(block.u[lo:hi], width).sort(dim=1).values
        usable = cand >= 0
        usable[:, 1:] &= cand[:, 1:] != cand[:, :-1]  # an item several tables retrieved counts once
        if block.seen is not None:
            usable &= ~block.window(lo, hi).contains(cand, bank.num_items)
        safe = torch.where(usable, cand, bank.lo)  # a valid id of this range in every dropped slot
        top = RunningTopK(hi - lo, k, device)
        top.add(candidate_scores(bank, block.u[lo:hi], safe, indexes.own).masked_fill(~usable, float("-inf")), cand)
        found = top.scores.shape[1]
        scores[lo:hi, :found], items[lo:hi, :found] = top.scores, top.items
    return merged(block, k, scores, items).result()
