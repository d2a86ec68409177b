"""Interest discovery: cluster counts, chunked assignment, k-means (local and 2-rank gloo), tokens."""

import math
import os
import socket
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from missrec_torchrec.model import ModelConfig, assign, discover_interests, interest_tokens, kmeans, num_clusters
from missrec_torchrec.model.interest import random_init

torch.set_num_threads(1)


def test_num_clusters_follows_the_reference_formula_and_cap():
    # Scientific: 4,385 items x 2 modalities at ratio 0.5 gives K = 4,385 (docs/model.md §3).
    assert num_clusters(0.5, 2 * 4385) == 4385
    assert num_clusters(0.02, 10) == 1  # ceil(0.2)
    assert num_clusters(0.3, 7) == 3  # ceil(2.1)
    assert num_clusters(0.5, 2 * 4385, cap=1000) == 1000
    assert num_clusters(1e-9, 5) == 1


def test_assign_in_blocks_matches_brute_force_argmin():
    g = torch.Generator().manual_seed(0)
    points = torch.randn(301, 7, generator=g)
    centroids = torch.randn(13, 7, generator=g)
    expected = torch.cdist(points, centroids).argmin(1) + 1
    # 50 distances per block forces 3-point blocks: many partial blocks and a short last one.
    assert torch.equal(assign(points, centroids, block_elements=50), expected)
    assert torch.equal(assign(points, centroids), expected)
    assert assign(points[:0], centroids).shape == (0,)


def _blobs(n_per_blob=40, k=6, dim=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(k, dim, generator=g) * 10
    labels = torch.arange(k).repeat_interleave(n_per_blob)
    points = centres[labels] + 0.1 * torch.randn(k * n_per_blob, dim, generator=g)
    order = torch.randperm(points.shape[0], generator=g)
    return points[order], labels[order]


def test_kmeans_recovers_planted_clusters():
    points, labels = _blobs()
    # One initial point per blob (taken from the data, not from the answer); minibatches of 50
    # see only part of the data each step, so convergence to the blob means is the update's doing.
    init = torch.stack([points[labels == c][0] for c in range(6)])
    centroids = kmeans(points, 6, iters=5, minibatch=50, init=init)
    blob_means = torch.stack([points[labels == c].mean(0) for c in range(6)])
    assert torch.allclose(centroids, blob_means, atol=1e-4)
    found = assign(points, centroids) - 1
    assert torch.equal(found, labels)


def test_kmeans_random_init_lowers_inertia():
    points, _ = _blobs(seed=2)
    g = torch.Generator().manual_seed(3)
    init = random_init(points, 9, generator=torch.Generator().manual_seed(3))
    assert torch.equal(random_init(points, 9, generator=torch.Generator().manual_seed(3)), init)
    # Initial centroids are distinct data points.
    assert (init[:, None, :] == points[None]).all(-1).any(1).all()
    assert torch.unique(init, dim=0).shape[0] == 9

    def inertia(c):
        return torch.cdist(points, c).min(1).values.pow(2).sum()

    centroids = kmeans(points, 9, iters=5, minibatch=64, generator=g)
    assert inertia(centroids) < 0.5 * inertia(init)


def test_single_pass_is_one_pass_whatever_iters():
    points, _ = _blobs(seed=4)
    init = points[:6].clone()
    one = kmeans(points, 6, iters=1, minibatch=50, init=init)
    quirk = kmeans(points, 6, iters=5, minibatch=50, init=init, single_pass=True)
    more = kmeans(points, 6, iters=5, minibatch=50, init=init, tol=0.0)
    assert torch.equal(one, quirk)
    assert not torch.allclose(one, more)


def _torchpq_fit_minibatch(centroids, counts, batch):
    """TorchPQ's MinibatchKMeans.fit_minibatch, written out plainly (loop over clusters)."""
    k = centroids.shape[0]
    labels = torch.cdist(batch, centroids).argmin(1)
    delta = torch.zeros_like(centroids)
    for c in range(k):
        members = batch[labels == c]
        if len(members):
            delta[c] = members.sum(0) / len(members)
    w = 1 / counts
    new = centroids * (1 - w[:, None]) + delta * w[:, None]
    for c in range(k):
        counts[c] += (labels == c).sum()
    return new, counts


def test_torchpq_update_matches_a_port_of_torchpq():
    points, _ = _blobs(n_per_blob=20, seed=5)
    init = points[:8].clone()
    centroids, counts = init.double(), torch.ones(8, dtype=torch.float64)
    for start in range(0, points.shape[0], 30):
        centroids, counts = _torchpq_fit_minibatch(centroids, counts, points[start : start + 30].double())
    ours = kmeans(points, 8, minibatch=30, init=init, single_pass=True, torchpq_update=True)
    assert torch.allclose(ours, centroids.float(), atol=1e-5)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _kmeans_worker(rank, world, port, out_dir, points, init):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        shard = points[rank::world]
        minibatch = kmeans(shard, 5, iters=3, minibatch=40, init=init, tol=0.0)
        seeded = kmeans(shard, 5, iters=2, minibatch=10**6, generator=torch.Generator().manual_seed(11), tol=0.0)
        torch.save({"minibatch": minibatch, "seeded": seeded}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_kmeans_on_two_gloo_ranks_equals_one_process():
    points, _ = _blobs(n_per_blob=40, k=5, dim=6, seed=6)  # 200 points
    init = points[:5].clone() + 0.5
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_kmeans_worker, args=(2, _free_port(), out_dir, points, init), nprocs=2, join=True)
        ranks = [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(2)]
    # Rank r holds points[r::2]; its t-th local batch of 20 and the other rank's make up exactly
    # the single process's t-th batch of 40, so both runs see the same minibatches.
    single = kmeans(points, 5, iters=3, minibatch=40, init=init, tol=0.0)
    # Seeded init draws global indices over the ranks' concatenated shards.
    concatenated = torch.cat([points[0::2], points[1::2]])
    single_seeded = kmeans(concatenated, 5, iters=2, minibatch=10**6, generator=torch.Generator().manual_seed(11), tol=0.0)
    for r in ranks:
        assert torch.allclose(r["minibatch"], single, atol=1e-5)
        assert torch.allclose(r["seeded"], single_seeded, atol=1e-5)
    assert not torch.allclose(single, init)  # the runs did move the centroids


def _naive_tokens(history, tables, keep_zero):
    rows = []
    for row in history.tolist():
        ids = [int(t[i]) if i >= 0 else 0 for t in tables for i in row]
        unique = sorted(set(ids))
        if not keep_zero:
            unique = [c for c in unique if c != 0]
        rows.append(unique)
    m = max(1, max(len(r) for r in rows))
    return torch.tensor([r + [0] * (m - len(r)) for r in rows], dtype=torch.long)


@pytest.mark.parametrize("keep_zero", [False, True])
def test_interest_tokens_match_a_per_row_reference(keep_zero):
    g = torch.Generator().manual_seed(7)
    for b, length, n_items, k in [(1, 1, 3, 1), (5, 4, 10, 3), (17, 12, 40, 25), (33, 50, 200, 60), (8, 6, 5, 2)]:
        lengths = torch.randint(1, length + 1, (b,), generator=g)
        lengths[0] = length  # a full row: with keep_zero it has no 0 unless an item is masked
        history = torch.randint(0, n_items, (b, length), generator=g)
        history[torch.arange(length) >= lengths[:, None]] = -1
        text = torch.randint(1, k + 1, (n_items,), generator=g)
        image = torch.randint(1, k + 1, (n_items,), generator=g)
        image[torch.rand(n_items, generator=g) < 0.2] = 0  # masked missing images
        tables = {"text": text, "image": image}
        got = interest_tokens(history, tables, keep_zero=keep_zero)
        assert torch.equal(got, _naive_tokens(history, [text, image], keep_zero)), (b, length)


def test_interest_tokens_without_any_interest_keep_one_masked_slot():
    history = torch.tensor([[0, 1, -1], [2, -1, -1]])
    none = torch.zeros(3, dtype=torch.long)
    assert torch.equal(interest_tokens(history, [none, none]), torch.zeros(2, 1, dtype=torch.long))


@pytest.mark.parametrize("mask_missing", [True, False])
def test_discover_interests_masks_missing_modalities(mask_missing):
    g = torch.Generator().manual_seed(8)
    n, dim = 60, 5
    points = {"text": torch.randn(n, dim, generator=g), "image": torch.randn(n, dim, generator=g)}
    present = {"text": torch.ones(n, dtype=torch.bool), "image": torch.rand(n, generator=g) < 0.7}
    config = ModelConfig(interest_ratio=0.3, kmeans_minibatch=16, mask_missing_modality=mask_missing)
    table, ids = discover_interests(points, config, present, generator=g)
    clustered = n + int(present["image"].sum()) if mask_missing else 2 * n
    k = math.ceil(0.3 * clustered)
    assert table.shape == (k + 1, dim)
    assert torch.equal(table[0], torch.zeros(dim))
    assert ids["text"].min() >= 1 and ids["text"].max() <= k
    if mask_missing:
        assert (ids["image"][~present["image"]] == 0).all()
        assert (ids["image"][present["image"]] >= 1).all()
    else:
        assert (ids["image"] >= 1).all()
    # Every item sits in its nearest cluster.
    assert torch.equal(ids["text"], assign(points["text"], table[1:]))
    fixed, _ = discover_interests(points, config, present, generator=g, k=7)
    assert fixed.shape == (8, dim)
