"""Interest discovery at catalogue scale through faiss: k-means trained on a seeded sample of the points,
then every rank assigns its own rows in chunks through a flat L2 index (docs/model.md §3).

The sample is at most `POINTS_PER_CENTROID` x K rows (faiss's own `max_points_per_centroid`;
model.kmeans_points_per_centroid): past it more points barely move the centroids but still cost K
distances each. Sample indices are global (see `SampleCollector`), so one seed picks the same rows,
in the same order, whatever the world size and however the points are chunked; the points may
arrive a chunk at a time, so no rank needs to hold its share of the catalogue's vectors.
Only the group's first rank trains; the others receive its centroids, so every rank holds the same
table even where faiss's threading would round differently.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist

from .collectives import all_gather_scalar, all_reduce, broadcast_from_first, group_active

POINTS_PER_CENTROID = 256
# Rows per faiss search in `faiss_assign`: 65,536 x 300-d float32 is 75 MiB, whatever N is.
ASSIGN_ROWS = 1 << 16


class SampleCollector:
    """About `size` rows drawn without repeats from every rank's points, in global order, gathered on
    the first rank; the points arrive in chunks (`take`), so no rank needs to hold its own whole.

    The global order is part-major: part 0 of every rank in rank order, then part 1, ..., so a rank's
    parts (one per modality, its item slice each) index the catalogue as one process's would, and a
    seed picks the same rows whatever the world size and chunking. Every rank draws the same `size`
    global indices (with replacement: O(size) memory, not O(N)) and keeps the distinct ones it owns;
    repeats are dropped, so fewer than `size` rows come back when `size` is a large share of the
    points (in expectation at least size / 2, as size < N). All points come back when `size` covers them.
    `local_counts[p]`: this rank's points in part p; collective (every rank constructs one alike).
    """

    def __init__(self, local_counts: Sequence[int], size: int, generator: torch.Generator, device, group=None):
        counts = torch.stack([all_gather_scalar(int(c), device, group) for c in local_counts]).cpu()  # parts x ranks
        rank = dist.get_rank(group) if group_active(group) else 0
        self.group, self.total = group, int(counts.sum())
        self.take_all = size >= self.total
        self.chosen = None if self.take_all else torch.randint(self.total, (size,), generator=generator).unique()
        bases = torch.cat([torch.zeros(1, dtype=torch.int64), counts.sum(1).cumsum(0)[:-1]])
        self.starts = [int(b + c[:rank].sum()) for b, c in zip(bases, counts)]  # this rank's first global index
        self.rows: List[List[torch.Tensor]] = [[] for _ in local_counts]

    def take(self, part: int, first: int, rows: torch.Tensor) -> None:
        """Rows `first`, `first` + 1, ... of this rank's part `part` (chunks of a part in ascending order)."""
        if self.take_all:
            self.rows[part].append(rows)
            return
        lo = self.starts[part] + first
        local = self.chosen[(self.chosen >= lo) & (self.chosen < lo + rows.shape[0])] - lo
        self.rows[part].append(rows[local.to(rows.device)])

    def gather(self, dim: int, device) -> Optional[torch.Tensor]:
        """The sample on the first rank (None elsewhere), received straight into one buffer: no
        padded copies, no second concatenation of it. Collective."""
        counts = [sum(c.shape[0] for c in chunks) for chunks in self.rows]
        if not group_active(self.group):
            return torch.cat([c for chunks in self.rows for c in chunks] or [torch.zeros(0, dim, device=device)])
        sizes = torch.stack([all_gather_scalar(n, device, self.group) for n in counts]).cpu()  # parts x ranks
        if dist.get_rank(self.group) != 0:
            for chunks, n in zip(self.rows, counts):
                if n:
                    dist.send(torch.cat(chunks), group=self.group, group_dst=0)
            return None
        out = torch.empty(int(sizes.sum()), dim, device=device)
        at = 0
        for chunks, part_sizes in zip(self.rows, sizes.tolist()):
            for c in chunks:  # the first rank's own rows of the part
                out[at : at + c.shape[0]] = c
                at += c.shape[0]
            for r, n in enumerate(part_sizes[1:], start=1):
                if n:
                    dist.recv(out[at : at + n], group=self.group, group_src=r)
                at += n
        return out


def sample_rows(parts: Sequence[torch.Tensor], size: int, generator: torch.Generator,
                group=None) -> Optional[torch.Tensor]:
    """`SampleCollector`'s sample of parts held whole."""
    collector = SampleCollector([p.shape[0] for p in parts], size, generator, parts[0].device, group)
    for i, part in enumerate(parts):
        collector.take(i, 0, part)
    return collector.gather(parts[0].shape[1], parts[0].device)


PointChunks = Callable[[], Iterable[Tuple[int, int, torch.Tensor]]]


def faiss_kmeans_chunks(local_counts: Sequence[int], chunks: PointChunks, k: int, *, dim: int, iters: int,
                        generator: torch.Generator, group=None, points_per_centroid: Optional[int] = None,
                        device=None, dtype=torch.float32) -> torch.Tensor:
    """K x D centroids (Euclidean Lloyd k-means, `iters` passes) of this rank's points together with
    the other ranks', identical on every rank. The points arrive in chunks: `chunks()` yields (part,
    first row, rows) over this rank's `local_counts[part]` points of each part (collective where it
    looks rows up); it is read once, for the sample, whose rows alone are kept. Every rank must pass
    a generator in the same state. The sample is `points_per_centroid` (default
    `POINTS_PER_CENTROID`) x K.

    Initial centroids are K random sample points, as faiss (and `interest.random_init`) draw them:
    faiss's k-means++ init cost 1.5x the five Lloyd passes (K = 8,192, 200,000 64-d points: 20 s vs 14 s).
    """
    import faiss  # here, not at the top: ~0.2 s that runs clustering with torch never need
    per_centroid = POINTS_PER_CENTROID if points_per_centroid is None else points_per_centroid
    n_total = int(all_reduce(torch.tensor([sum(local_counts)], device=device), group))
    if not 1 <= k <= n_total:
        raise ValueError(f"k-means: cannot pick {k} initial centroids from {n_total} points")
    if per_centroid < 2:  # K distinct points are needed; 2K draws keep at least K in expectation
        raise ValueError(f"faiss k-means: {per_centroid} sample points per centroid, need at least 2")
    collector = SampleCollector(local_counts, k * per_centroid, generator, device, group)
    for part, first, rows in chunks():
        collector.take(part, first, rows)
    sample = collector.gather(dim, device)
    seed = int(torch.randint(2**31 - 1, (1,), generator=generator))
    centroids = torch.zeros(k, dim, dtype=torch.float32, device=device)
    if sample is not None:  # the first rank
        x = np.ascontiguousarray(sample.detach().cpu().float().numpy())
        del sample
        # The sample is the training set: faiss must not subsample it again.
        km = faiss.Kmeans(x.shape[1], k, niter=iters, seed=seed, max_points_per_centroid=max(x.shape[0], 1),
                          min_points_per_centroid=1, verbose=False)
        with faiss_threads():
            km.train(x)
        centroids.copy_(torch.from_numpy(km.centroids))
    return broadcast_from_first(centroids, group).to(dtype)


def faiss_assign(points: torch.Tensor, centroids: torch.Tensor, rows: int = ASSIGN_ROWS) -> torch.Tensor:
    """Nearest centroid (Euclidean) of every point as int32 cluster ids 1..K (0 stays the padding id),
    searched `rows` points at a time, so the working memory does not grow with N."""
    import faiss
    labels = torch.empty(points.shape[0], dtype=torch.int32)
    index = faiss.IndexFlatL2(centroids.shape[1])
    index.add(np.ascontiguousarray(centroids.detach().cpu().float().numpy()))
    with faiss_threads():
        for start in range(0, points.shape[0], rows):
            chunk = np.ascontiguousarray(points[start : start + rows].detach().cpu().float().numpy())
            _, nearest = index.search(chunk, 1)
            labels[start : start + rows] = torch.from_numpy(nearest[:, 0].astype(np.int32)) + 1
    return labels.to(points.device)


@contextmanager
def faiss_threads():
    """faiss's OpenMP threads follow torch's setting for the duration (ranks sharing cores set it low)."""
    import faiss
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(torch.get_num_threads())
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)
