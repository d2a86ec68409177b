"""ANN candidates for batch scoring: a faiss index per item table, then exact re-scoring of the union.

Each item table (every modality, and the ID table in transductive mode) gets one faiss index over
its unit item vectors, so inner product is cosine: HNSW (a graph; no training) or IVF (a
k-means partition; trained on a seeded sample). Each table retrieves its C nearest items per user,
C = `candidates` x K, and the union is re-scored exactly with the model's fusion, so every returned
score is the exact one; only the choice of items is approximate (no certificate: an ANN list bounds
nothing outside it). Seen items are dropped after retrieval, so with --mask-history each table
retrieves up to C more, as many as the batch's longest seen list.

Open work: unlike exact and `--approx` scoring, which scan only each rank's own items
(catalogue.py, user_blocks.py), every rank builds its indexes over the whole catalogue, so it holds
every item's unit vectors (`catalogue.HeldCatalogue`, looked up chunk by chunk) plus the index.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Dict, Optional, Tuple

import numpy as np
import torch

from datapipes.schema import DataError
from missrec_torchrec.topk import RunningTopK, Seen

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
RESCORE_FLOATS = 1 << 23  # users x candidates x hidden gathered at once when re-scoring (32 MiB)


@dataclass
class AnnSettings:
    """`missrec score --ann` and its knobs; None = the default stated on each."""

    kind: str = "hnsw"
    candidates: Optional[int] = None  # C = candidates x K per table (default CANDIDATES)
    hnsw_m: Optional[int] = None  # default HNSW_M
    hnsw_ef: Optional[int] = None  # HNSW search breadth (default: the number retrieved; never below it)
    ivf_lists: Optional[int] = None  # default: sqrt(items), at most items / 39 (faiss's least per list)
    ivf_probe: Optional[int] = None  # default IVF_PROBE, at most the lists

    def check(self) -> None:
        """One DataError line for a bad value or a knob of the other index."""
        if self.kind not in INDEX_KINDS:
            raise DataError(f"--ann {self.kind}: must be one of {', '.join(INDEX_KINDS)}")
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

    def lists(self, num_items: int) -> int:
        if self.ivf_lists is None:
            return max(1, min(round(math.sqrt(num_items)), num_items // 39))
        if self.ivf_lists > num_items:
            raise DataError(f"--ivf-lists {self.ivf_lists}: more lists than the catalogue's {num_items} items")
        return self.ivf_lists

    def describe(self, k: int, num_items: int) -> str:
        c = self.per_table(k, num_items)
        if self.kind == "hnsw":
            knobs = f"M {self.hnsw_m or HNSW_M}, efSearch {max(self.hnsw_ef or 0, c)}"
        else:
            knobs = f"{self.lists(num_items)} lists, nprobe {self.ivf_probe or IVF_PROBE}"
        return f"ann {self.kind} ({knobs}), {c} candidates per table"


def build_index(vectors: torch.Tensor, settings: AnnSettings) -> faiss.Index:
    """A faiss inner-product index over one table's unit vectors (N x D)."""
    import faiss  # here, not at the top: `missrec score` without --ann never needs it (~0.2 s)
    x = np.ascontiguousarray(vectors.detach().float().cpu().numpy())
    n, dim = x.shape
    if settings.kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, settings.hnsw_m or HNSW_M, faiss.METRIC_INNER_PRODUCT)
    else:
        lists = settings.lists(n)
        probe = settings.ivf_probe or IVF_PROBE
        if settings.ivf_probe is not None and probe > lists:
            raise DataError(f"--ivf-probe {probe}: more than the index's {lists} lists")
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, lists, faiss.METRIC_INNER_PRODUCT)
        index.cp.max_points_per_centroid = IVF_TRAIN_PER_LIST  # faiss samples (seeded) above this
        index.cp.min_points_per_centroid = 1  # small catalogues: lists are capped above, no warning needed
        index.train(x)
        index.nprobe = min(probe, lists)
    index.add(x)
    return index


class TableIndexes:
    """One index per table of a held catalogue (every item's unit vectors), built once per scoring
    run; `seconds` is the build time."""

    def __init__(self, held, settings: AnnSettings):
        settings.check()
        self.settings = settings
        t0 = time.perf_counter()
        self.indexes = {t: build_index(v, settings) for t, v in held.unit.items()}
        self.seconds = time.perf_counter() - t0

    def search(self, u: torch.Tensor, width: int) -> torch.Tensor:
        """B x (tables * width) item indices: each table's `width` nearest by cosine (-1: none found)."""
        import faiss

        q = np.ascontiguousarray(u.detach().float().cpu().numpy())
        found = []
        for index in self.indexes.values():
            params = None
            if self.settings.kind == "hnsw":  # faiss searches max(efSearch, k) wide
                params = faiss.SearchParametersHNSW(efSearch=max(self.settings.hnsw_ef or 0, width))
            found.append(torch.from_numpy(index.search(q, width, params=params)[1]))
        return torch.cat(found, 1).to(device=u.device, dtype=torch.int64)


def candidate_scores(held, u: torch.Tensor, cand: torch.Tensor) -> torch.Tensor:
    """B x S exact fused scores of each row's own candidates `cand` (B x S, valid indices) in a held
    catalogue."""
    out = torch.empty(cand.shape, device=u.device)
    step = max(1, RESCORE_FLOATS // max(1, cand.shape[1] * u.shape[1]))
    for lo in range(0, cand.shape[0], step):
        rows, uu = cand[lo : lo + step], u[lo : lo + step]
        # The one-modality model with IDs scores a summed vector: `fused` gathers it itself.
        sims = {} if held.summed else {t: torch.bmm(v[rows], uu.unsqueeze(2)).squeeze(2) for t, v in held.unit.items()}
        out[lo : lo + step] = held.fused(uu, sims, rows)
    return out


def ann_topk(indexes: TableIndexes, held, u: torch.Tensor, k: int, per_table: int,
             seen: Optional[Seen]) -> Tuple[torch.Tensor, torch.Tensor]:
    """(scores, items) B x k: the union of every table's ANN candidates, re-scored exactly (`held`:
    the catalogue the indexes were built over). No collective."""
    b = u.shape[0]
    extra = 0
    if seen is not None and seen.rows.numel():
        extra = min(per_table, int(torch.bincount(seen.rows, minlength=b).max()))
    cand = indexes.search(u, min(held.num_items, per_table + extra)).sort(dim=1).values
    usable = cand >= 0
    usable[:, 1:] &= cand[:, 1:] != cand[:, :-1]  # an item several tables retrieved counts once
    if seen is not None:
        usable &= ~seen.contains(cand, held.num_items)
    scores = candidate_scores(held, u, cand.clamp(min=0)).masked_fill(~usable, float("-inf"))
    top = RunningTopK(b, k, u.device)
    top.add(scores, cand)
    return top.result()
