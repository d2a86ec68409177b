"""Interest discovery at catalogue scale through faiss: k-means trained on a seeded sample of the points,
then every rank assigns its own rows in chunks through a flat L2 index (docs/model.md §3).

The sample is at most `POINTS_PER_CENTROID` x K rows (faiss's own `max_points_per_centroid`): past it
more points barely move the centroids but still cost K distances each. Sample indices are global
(see `sample_rows`), so one seed picks the same rows, in the same order, whatever the world size.
Only the group's first rank trains; the others receive its centroids, so every rank holds the same
table even where faiss's threading would round differently.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist

from .collectives import all_gather_scalar, all_reduce, broadcast_from_first, gather_rows, group_active

POINTS_PER_CENTROID = 256
# Rows per faiss search in `faiss_assign`: 65,536 x 300-d float32 is 75 MiB, whatever N is.
ASSIGN_ROWS = 1 << 16


def sample_rows(parts: Sequence[torch.Tensor], size: int, generator: torch.Generator,
                group=None) -> Optional[torch.Tensor]:
    """About `size` rows drawn without repeats from all ranks' points, in global order, on the first rank.

    The global order is part-major: part 0 of every rank in rank order, then part 1, ..., so a rank's
    `parts` (one per modality, its item slice each) index the catalogue as one process's would, and a
    seed picks the same rows whatever the world size. Every rank draws the same `size` global indices
    (with replacement: O(size) memory, not O(N)) and keeps the distinct ones it owns; repeats are
    dropped, so fewer than `size` rows come back when `size` is a large share of the points (in
    expectation at least size / 2, as size < N). All points come back when `size` covers them.
    """
    device = parts[0].device
    counts = torch.stack([all_gather_scalar(p.shape[0], device, group) for p in parts]).cpu()  # parts x ranks
    rank = dist.get_rank(group) if group_active(group) else 0
    take_all = size >= int(counts.sum())
    chosen = None if take_all else torch.randint(int(counts.sum()), (size,), generator=generator).unique()
    sample, base = [], 0
    for part, sizes in zip(parts, counts):
        lo = base + int(sizes[:rank].sum())
        if take_all:
            rows = part
        else:
            local = chosen[(chosen >= lo) & (chosen < lo + part.shape[0])] - lo
            rows = part[local.to(device)]
        gathered = gather_rows(rows, group)
        if gathered is not None:
            sample.append(gathered)
        base += int(sizes.sum())
    return torch.cat(sample) if sample else None


def faiss_kmeans(parts: Sequence[torch.Tensor], k: int, *, iters: int, generator: torch.Generator, group=None,
                 points_per_centroid: Optional[int] = None) -> torch.Tensor:
    """K x D centroids (Euclidean Lloyd k-means, `iters` passes) of this rank's points (its `parts`
    concatenated) together with the other ranks', identical on every rank. Every rank must pass a
    generator in the same state. The sample is `points_per_centroid` (default `POINTS_PER_CENTROID`) x K.

    Initial centroids are K random sample points, as faiss (and `interest.random_init`) draw them:
    faiss's k-means++ init cost 1.5x the five Lloyd passes (K = 8,192, 200,000 64-d points: 20 s vs 14 s).
    """
    import faiss  # here, not at the top: ~0.2 s that runs clustering with torch never need
    points = parts[0]
    per_centroid = POINTS_PER_CENTROID if points_per_centroid is None else points_per_centroid
    n_total = int(all_reduce(torch.tensor([sum(p.shape[0] for p in parts)], device=points.device), group))
    if not 1 <= k <= n_total:
        raise ValueError(f"k-means: cannot pick {k} initial centroids from {n_total} points")
    if per_centroid < 2:  # K distinct points are needed; 2K draws keep at least K in expectation
        raise ValueError(f"faiss k-means: {per_centroid} sample points per centroid, need at least 2")
    sample = sample_rows(parts, k * per_centroid, generator, group)
    seed = int(torch.randint(2**31 - 1, (1,), generator=generator))
    centroids = torch.zeros(k, points.shape[1], dtype=torch.float32, device=points.device)
    if sample is not None:  # the first rank
        x = np.ascontiguousarray(sample.detach().cpu().float().numpy())
        # The sample is the training set: faiss must not subsample it again.
        km = faiss.Kmeans(x.shape[1], k, niter=iters, seed=seed, max_points_per_centroid=max(x.shape[0], 1),
                          min_points_per_centroid=1, verbose=False)
        with faiss_threads():
            km.train(x)
        centroids.copy_(torch.from_numpy(km.centroids))
    return broadcast_from_first(centroids, group).to(points.dtype)


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
