"""Interest discovery: minibatch k-means over adapted item vectors, and per-sequence interest tokens.

Clustering follows TorchPQ's `MinibatchKMeans` as the reference calls it (Euclidean, running-count
learning rate), but in plain torch and split across ranks: every rank passes only its own shard of
points, the ranks step through their shards in lock-step, and each step's per-cluster sums and
counts are combined with `all_reduce`, so every rank holds the same centroids and no point is
assigned twice. Without a process group (or with world size 1) the same code runs locally.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from .collectives import all_reduce, global_offsets, group_active
from .config import ModelConfig
from .faiss_kmeans import faiss_assign, faiss_kmeans_chunks

# `auto` clusters more points than this with faiss: 100,000 items x 2 modalities. Every dataset the
# README trains (ML-100K: 3,364 points) and every test stays on the torch k-means.
FAISS_ABOVE_POINTS = 200_000
# Elements of one distance block in `assign`: 2**24 floats = 64 MiB, whatever N and K are.
ASSIGN_BLOCK_ELEMENTS = 1 << 24


def num_clusters(ratio: float, n_points: int, cap: Optional[int] = None) -> int:
    """K = max(ceil(ratio * n_points), 1), capped at `cap` (the reference has no cap)."""
    k = max(math.ceil(ratio * n_points), 1)
    return k if cap is None else min(k, cap)


def assign(points: torch.Tensor, centroids: torch.Tensor, block_elements: int = ASSIGN_BLOCK_ELEMENTS) -> torch.Tensor:
    """Nearest centroid (Euclidean) of every point, as cluster ids 1..K (0 stays the padding id).

    `centroids` is K x D without the padding row. Points go through in blocks of at most
    `block_elements` distances, so N x K is never held at once.
    """
    labels = torch.empty(points.shape[0], dtype=torch.long, device=points.device)
    if points.shape[0] == 0:
        return labels
    c = centroids.to(points.dtype)
    c_sq = c.pow(2).sum(1)
    rows = max(1, block_elements // max(1, c.shape[0]))
    for start in range(0, points.shape[0], rows):
        block = points[start : start + rows]
        # |x - c|^2 = |x|^2 - 2 x.c + |c|^2; |x|^2 does not change the argmin.
        dist_sq = torch.addmm(c_sq, block, c.T, alpha=-2.0)
        labels[start : start + rows] = dist_sq.argmin(1) + 1
    return labels


def random_init(points: torch.Tensor, k: int, generator: Optional[torch.Generator] = None, group=None) -> torch.Tensor:
    """K distinct points drawn uniformly from all ranks' points (ranks in order), replicated.

    Every rank must pass a generator in the same state: all draw the same global indices and fill
    the rows they own, and a sum over ranks assembles the K x D result.
    """
    if generator is None and group_active(group):
        raise ValueError("k-means over several ranks needs a generator seeded alike on every rank")
    offset, n_total = global_offsets(points.shape[0], points.device, group)
    if not 1 <= k <= n_total:
        raise ValueError(f"k-means: cannot pick {k} initial centroids from {n_total} points")
    chosen = torch.randperm(n_total, generator=generator)[:k].to(points.device)
    local = chosen - offset
    mine = (local >= 0) & (local < points.shape[0])
    init = torch.zeros(k, points.shape[1], dtype=torch.float64, device=points.device)
    init[mine] = points[local[mine]].double()
    return all_reduce(init, group).to(points.dtype)


def _step_slices(n_local: int, k: int, minibatch: int, world: int, n_total: int, merge: bool, group) -> List[slice]:
    """This rank's point slice for every minibatch step of one pass.

    Each rank contributes its next ceil(minibatch / world) points per step. `merge` (the reference's
    `cluster_kmeans`): the step after which at most K points would remain takes all of them, so a
    short last minibatch is folded into the previous one (with K = 0.5 * 2N and a 1.1 K minibatch
    that is one step over every point). The step count comes from the global count, as the
    reference's loop over the whole matrix; one rank it reproduces exactly.
    """
    local_batch = math.ceil(minibatch / world)
    if merge:
        steps = max(1, math.ceil((n_total - k) / minibatch))
        cuts = [i * local_batch for i in range(steps)] + [max(n_local, steps * local_batch)]
        return [slice(cuts[i], cuts[i + 1]) for i in range(steps)]
    steps = torch.tensor([math.ceil(n_local / local_batch)])
    steps = int(all_reduce(steps, group, dist.ReduceOp.MAX))
    return [slice(i * local_batch, (i + 1) * local_batch) for i in range(steps)]


def _update(centroids, counts, chunk, labels, torchpq_update: bool, group) -> torch.Tensor:
    """One minibatch's centroid update from its (global) per-cluster sums and counts."""
    sums = torch.zeros_like(centroids).index_add_(0, labels, chunk.double())
    batch_counts = torch.bincount(labels, minlength=centroids.shape[0]).double()
    all_reduce(sums, group)
    all_reduce(batch_counts, group)
    if torchpq_update:
        weight = (1.0 / counts).unsqueeze(1)
        means = sums / batch_counts.clamp(min=1).unsqueeze(1)
        centroids = centroids * (1 - weight) + means * weight
        counts += batch_counts
        return centroids
    counts += batch_counts
    return centroids + (sums - batch_counts.unsqueeze(1) * centroids) / counts.clamp(min=1).unsqueeze(1)


def kmeans(
    points: torch.Tensor,
    k: int,
    *,
    iters: int = 5,
    minibatch: int = 2048,
    single_pass: bool = False,
    torchpq_update: bool = False,
    reference_batches: bool = False,
    abs_inplace: bool = False,
    init: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
    tol: float = 1e-5,
    group: Optional[dist.ProcessGroup] = None,
) -> torch.Tensor:
    """Minibatch k-means of this rank's `points` (n_local x D) together with the other ranks'.

    Returns K x D centroids, identical on every rank. `minibatch` is the global minibatch (raised
    to 1.1 K when it is <= K, as the reference does); see `_step_slices` for the steps. Passes stop
    early once a pass moves the centroids by less than `tol` (summed squared shift); `single_pass`
    reproduces the reference, whose error check always reads 0 and so stops after one pass (quirk 1).

    Update per step, with per-cluster batch sums S_k, counts b_k and running counts n_k:
    running mean (default, n_k from 0): n_k += b_k; c_k += (S_k - b_k c_k) / n_k, empty clusters
    stay. `torchpq_update` (quirk 15): w_k = 1/n_k with n_k from 1, c_k = (1-w_k) c_k + w_k S_k/b_k
    for every cluster (an empty one is pulled towards the origin), then n_k += b_k.
    `reference_batches` (quirk 18): the short last minibatch is merged into the previous one and
    the initial centroids are drawn from the first minibatch, so under the TorchPQ update every
    centroid keeps at least its own starting point. `abs_inplace` (quirk 19): after each step's
    assignment the minibatch and the centroids are replaced by their absolute values, as
    TorchPQ's `euc_sim(inplace=True)` leaves them, so the update averages |x|.
    """
    world = dist.get_world_size(group) if group_active(group) else 1
    if minibatch <= k:
        minibatch = int(k * 1.1)
    n_total = int(all_reduce(torch.tensor([points.shape[0]], device=points.device), group))
    slices = _step_slices(points.shape[0], k, minibatch, world, n_total, reference_batches, group)
    if init is None:
        pool = points[slices[0]] if reference_batches else points
        init = random_init(pool, k, generator, group)
    centroids = init.double().clone()
    if centroids.shape != (k, points.shape[1]):
        raise ValueError(f"k-means: init has shape {tuple(centroids.shape)}, expected {(k, points.shape[1])}")
    counts = torch.full((k,), 1.0 if torchpq_update else 0.0, dtype=torch.float64, device=points.device)
    for _ in range(1 if single_pass else iters):
        start_of_pass = centroids.clone()
        for part in slices:
            chunk = points[part]
            labels = assign(chunk, centroids) - 1
            if abs_inplace:
                chunk, centroids = chunk.abs(), centroids.abs()
            centroids = _update(centroids, counts, chunk, labels, torchpq_update, group)
        if (centroids - start_of_pass).pow(2).sum() < tol:
            break
    return centroids.to(points.dtype)


def _keep_masks(names: Sequence[str], config: ModelConfig, present) -> Dict[str, Optional[torch.Tensor]]:
    return {m: present[m].bool() if (config.mask_missing_modality and present is not None and m in present) else None
            for m in names}


def discover_interests(
    points: Mapping[str, torch.Tensor],
    config: ModelConfig,
    present: Optional[Mapping[str, torch.Tensor]] = None,
    generator: Optional[torch.Generator] = None,
    group: Optional[dist.ProcessGroup] = None,
    k: Optional[int] = None,
    faiss_above: Optional[int] = None,
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Cluster all modalities' adapted item vectors together (docs/model.md §3).

    `points[m]` is this rank's shard of adapted item vectors for modality m (n_local x D, the same
    item rows for every modality). Returns the centroid table ((K+1) x D, row 0 = zeros for padding)
    and, per modality, the cluster id of each local item (1..K; 0 for an item whose modality is
    missing when `config.mask_missing_modality`). Gathering the id tables across ranks is the
    caller's: they are as sharded as the points. K defaults to `num_clusters` of the clustered
    point count (which excludes masked missing modalities); pass `k` to keep it fixed instead.
    Every rank must pass a generator in the same state (see `random_init`). `config.kmeans_backend`
    picks the k-means (see `kmeans_backend`; `faiss_above` overrides its threshold); the ids are int32.
    """
    names = list(points)
    first = points[names[0]]
    return discover_interests_chunked(lambda: ((m, 0, points[m]) for m in names), names, first.shape[0],
                                      first.shape[1], config, present, generator, group, k, faiss_above, first.device)


def discover_interests_chunked(
    chunks: Callable[[], Iterable[Tuple[str, int, torch.Tensor]]],
    names: Sequence[str],
    local_items: int,
    dim: int,
    config: ModelConfig,
    present: Optional[Mapping[str, torch.Tensor]] = None,
    generator: Optional[torch.Generator] = None,
    group: Optional[dist.ProcessGroup] = None,
    k: Optional[int] = None,
    faiss_above: Optional[int] = None,
    device: Optional[torch.device] = None,
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """`discover_interests` of points that arrive in chunks: `chunks()` yields (modality, first local
    item, the adapted vectors of items first, first + 1, ...), every modality's chunks in ascending
    order over this rank's `local_items` items (collective where it looks rows up). The faiss backend
    reads it twice, once for its sample and once to assign each chunk, so a rank never holds its
    points whole: one chunk, the sample (on the first rank) and the int32 ids. The torch k-means
    needs every point in memory at once; it collects them (small catalogues: `kmeans_backend`)."""
    names = list(names)
    keep = _keep_masks(names, config, present)
    local = [local_items if keep[m] is None else int(keep[m].sum()) for m in names]
    n_total = int(all_reduce(torch.tensor([sum(local)], device=device), group))
    if k is None:
        k = num_clusters(config.interest_ratio, n_total, config.interest_cap)
    if kmeans_backend(config, n_total, faiss_above) == "torch":
        return _torch_interests(chunks, names, keep, config, generator, group, k, dim, device)

    def kept_chunks():
        seen = dict.fromkeys(names, 0)  # kept rows of each modality before the chunk
        for m, start, rows in chunks():
            if keep[m] is not None:
                rows = rows[keep[m][start : start + rows.shape[0]]]
            yield names.index(m), seen[m], rows
            seen[m] += rows.shape[0]

    centroids = faiss_kmeans_chunks(local, kept_chunks, k, dim=dim, iters=config.kmeans_iters, generator=generator,
                                    group=group, points_per_centroid=config.kmeans_points_per_centroid, device=device)
    # int32: this rank's items only; they go into its rows of the sharded item state.
    assignments = {m: torch.zeros(local_items, dtype=torch.int32, device=device) for m in names}
    for m, start, rows in chunks():
        out = assignments[m][start : start + rows.shape[0]]
        if keep[m] is None:
            out.copy_(faiss_assign(rows, centroids))
        else:
            mask = keep[m][start : start + rows.shape[0]]
            out[mask] = faiss_assign(rows[mask], centroids)
    return torch.cat([centroids.new_zeros(1, dim), centroids]), assignments


def _torch_interests(chunks, names, keep, config: ModelConfig, generator, group, k: int, dim: int, device):
    """The torch k-means over every point (collected from `chunks`), then each point's nearest centroid."""
    held: Dict[str, List[torch.Tensor]] = {m: [] for m in names}
    for m, _, rows in chunks():
        held[m].append(rows)
    points = {m: torch.cat(v) if v else torch.zeros(0, dim, device=device) for m, v in held.items()}
    parts = [points[m] if keep[m] is None else points[m][keep[m]] for m in names]
    centroids = torch_kmeans(torch.cat(parts), k, config, generator, group)
    assignments = {}
    for m in names:
        ids = torch.zeros(points[m].shape[0], dtype=torch.int32, device=points[m].device)
        rows = slice(None) if keep[m] is None else keep[m]
        ids[rows] = assign(points[m][rows], centroids).to(torch.int32)
        assignments[m] = ids
    return torch.cat([centroids.new_zeros(1, dim), centroids]), assignments


def torch_kmeans(points: torch.Tensor, k: int, config: ModelConfig, generator, group) -> torch.Tensor:
    """`kmeans` with the model's settings (the reference's k-means and its quirks)."""
    return kmeans(
        points,
        k,
        iters=config.kmeans_iters,
        minibatch=config.kmeans_minibatch,
        single_pass=config.kmeans_single_pass,
        torchpq_update=config.kmeans_torchpq_update,
        reference_batches=config.kmeans_reference_batches,
        abs_inplace=config.kmeans_abs_inplace,
        generator=generator,
        group=group,
    )


def kmeans_backend(config: ModelConfig, n_points: int, faiss_above: Optional[int] = None) -> str:
    """`torch` or `faiss` for clustering `n_points` points: `auto` takes faiss above `faiss_above`
    points (default `FAISS_ABOVE_POINTS`) unless a reference k-means quirk is on (only torch has them)."""
    if config.kmeans_backend != "auto":
        return config.kmeans_backend
    threshold = FAISS_ABOVE_POINTS if faiss_above is None else faiss_above
    return "faiss" if n_points > threshold and not config.reference_kmeans() else "torch"


def interest_tokens(
    history: torch.Tensor,
    assignments: Mapping[str, torch.Tensor] | Sequence[torch.Tensor],
    keep_zero: bool = False,
    first: bool = False,
) -> torch.Tensor | Tuple[torch.Tensor, torch.Tensor]:
    """Per row, the sorted distinct cluster ids of its items under every modality (docs/model.md §4).

    `history` is B x L item indices with PAD (-1) on the right; `assignments` holds one N-long id
    table per modality (1..K, or 0 for a masked missing modality). Returns B x M, right-padded with
    0 to the batch's longest row. `keep_zero` reproduces the reference, whose `unique` also keeps
    the id 0 of pads and masked items as a (key-masked) token: it only changes M. Vectorised: sort
    each row, mark first occurrences, left-pack them with a cumsum and one scatter.

    `first=True` also returns, per token, the earliest history position where its cluster occurs
    (B x M; L for padding slots): the causal model's time mask. No tables (an ID-only model) give
    one padding column.
    """
    tables = list(assignments.values()) if isinstance(assignments, Mapping) else list(assignments)
    items = history.clamp(min=0)
    return interest_tokens_at(history, [t[items] for t in tables], keep_zero=keep_zero, first=first)


def interest_tokens_at(
    history: torch.Tensor,
    clusters: Sequence[torch.Tensor],
    keep_zero: bool = False,
    first: bool = False,
) -> torch.Tensor | Tuple[torch.Tensor, torch.Tensor]:
    """`interest_tokens` from each history position's cluster per modality (B x L each; any value at
    PAD positions), as read from the sharded item state rather than N-long tables."""
    b, length = history.shape
    if not clusters:
        pad = torch.zeros(b, 1, dtype=torch.long, device=history.device)
        return (pad, torch.full_like(pad, length)) if first else pad
    is_pad = history < 0
    ids = torch.cat([c.long().masked_fill(is_pad, 0) for c in clusters], dim=1)
    # Sorting id * L + position orders by id, and by position within an id: each id's first
    # entry after the sort holds its earliest position.
    positions = torch.arange(length, device=history.device).repeat(len(clusters))
    key, _ = (ids * length + positions).sort(dim=1)
    ids, pos = key.div(length, rounding_mode="floor"), key.remainder(length)
    is_first = torch.ones_like(ids, dtype=torch.bool)
    is_first[:, 1:] = ids[:, 1:] != ids[:, :-1]
    if not keep_zero:
        is_first &= ids != 0
    width = ids.shape[1]
    # Non-first entries go to a spare last column, which is dropped.
    slot = torch.where(is_first, is_first.long().cumsum(1) - 1, width)
    packed = torch.zeros(b, width + 1, dtype=ids.dtype, device=ids.device).scatter_(1, slot, ids)
    # At least one column, so that a batch without any interest still has a (masked) memory slot.
    m = max(int(is_first.sum(1).max()) if b else 0, 1)
    if not first:
        return packed[:, :m]
    packed_pos = torch.full((b, width + 1), length, dtype=pos.dtype, device=pos.device).scatter_(1, slot, pos)
    return packed[:, :m], packed_pos[:, :m].masked_fill(packed[:, :m] == 0, length)
