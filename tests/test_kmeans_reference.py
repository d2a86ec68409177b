"""Golden test: the `paper` k-means flags against a step-by-step port of the reference.

The port below follows `cluster_utils.cluster_kmeans` and TorchPQ's `MinibatchKMeans` as the
reference runs them: the 1.1 K minibatch rule, the merge of a short last minibatch, one pass (the
error check reads 0), the chunked `get_labels` whose `euc_sim(inplace=True)` squares and square-roots
the data chunk and the centroids in place, and the 1/n update with counts from 1.
"""

import math

import numpy as np
import torch

from missrec_torchrec.model import ModelConfig, assign, discover_interests, kmeans
from missrec_torchrec.model.interest import random_init

torch.set_num_threads(1)


def _euc_sim_inplace(a, b):
    """TorchPQ's euc_sim(a, b, inplace=True), a: d x m, b: d x n (both modified in place)."""
    y = a.transpose(-2, -1) @ b
    y.mul_(2)
    a.pow_(2)
    b.pow_(2)
    y.sub_(a.sum(dim=0)[:, None])
    y.sub_(b.sum(dim=0)[None, :])
    a.sqrt_()
    b.sqrt_()
    return y


class _ReferenceKMeans:
    def __init__(self, k, init):
        self.k = k
        self.centroids = init.T.clone()  # d x K, as TorchPQ holds them
        self.n = torch.ones(k, dtype=init.dtype)

    def get_labels(self, data):
        return _euc_sim_inplace(data, self.centroids).max(dim=-1).indices

    def fit_minibatch(self, data):
        data = data.contiguous()  # the transposed slice is copied: the caller's rows stay signed
        labels = self.get_labels(data)
        delta = torch.zeros_like(self.centroids)
        for c, count in zip(*labels.unique(return_counts=True)):
            delta[:, c] = data[:, labels == c].sum(dim=1) / count
        w = 1 / self.n[None]
        self.centroids[:] = self.centroids * (1 - w) + delta * w
        uniq, counts = labels.unique(return_counts=True)
        self.n[uniq] += counts


def _reference_cluster_kmeans(tokens, k, batch_size, init_rows):
    """cluster_kmeans(tokens, k, batch_size) with the initial centroids tokens[init_rows]."""
    tokens = tokens.clone()
    if batch_size <= k:
        batch_size = int(k * 1.1)
    km = _ReferenceKMeans(k, tokens[init_rows])
    steps = 0
    for ptr in range(0, len(tokens), batch_size):  # niter=5, but the error reads 0: one pass
        remaining = len(tokens) - ptr - batch_size
        offset = batch_size + remaining if remaining <= k else batch_size
        km.fit_minibatch(tokens[ptr : ptr + offset].T)
        steps += 1
        if remaining <= k:
            break
    labels = torch.cat([km.get_labels(tokens[p : p + batch_size].T) for p in range(0, len(tokens), batch_size)])
    return km.centroids.T.clone(), labels, steps


def _points(n, dim, seed):
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _paper_kmeans(points, k, minibatch, init):
    return kmeans(points, k, iters=5, minibatch=minibatch, init=init, single_pass=True, torchpq_update=True,
                  reference_batches=True, abs_inplace=True)


def test_paper_flags_reproduce_the_reference_kmeans_over_several_minibatches():
    # K = 20, minibatch 16 <= K -> 22; 105 points: steps of 22, 22, 22, then 39 (17 <= K merged).
    points = _points(105, 6, seed=0)
    k = 20
    init_rows = np.random.default_rng(0).choice(22, size=k, replace=False)  # from the first minibatch
    expected, labels, steps = _reference_cluster_kmeans(points, k, 16, init_rows)
    assert steps == 4
    ours = _paper_kmeans(points, k, 16, points[init_rows])
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-12)
    assert torch.equal(assign(points, ours) - 1, labels)
    # The in-place |x|: centroids are means of |x|, so non-negative, while points stay signed.
    assert (ours >= 0).all() and (points < 0).any()
    without_abs = kmeans(points, k, minibatch=16, init=points[init_rows], single_pass=True, torchpq_update=True,
                         reference_batches=True)
    assert (without_abs < 0).any()


def test_paper_flags_reproduce_the_reference_kmeans_in_one_merged_step():
    # Fine-tuning shape: 2N points, K = N, minibatch 1.1 N: one step over all 2N points.
    n = 40
    points = _points(2 * n, 5, seed=1)
    k = math.ceil(0.5 * 2 * n)
    init_rows = np.random.default_rng(1).choice(2 * n, size=k, replace=False)
    expected, labels, steps = _reference_cluster_kmeans(points, k, 2048 if k < 2048 else k, init_rows)
    assert steps == 1
    ours = _paper_kmeans(points, k, 2048, points[init_rows])
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-12)
    assert torch.equal(assign(points, ours) - 1, labels)


def test_merge_and_first_minibatch_init_leave_no_zero_centroid():
    # 1,500 items x 2 modalities, K = N = 1,500: without the merge the 2,048-point first step leaves
    # a 952-point second one, and every centroid that got no point in the first is set to exactly 0.
    points = _points(3000, 8, seed=2).float()
    k = 1500
    common = dict(iters=5, minibatch=2048, single_pass=True, torchpq_update=True)
    merged = kmeans(points, k, reference_batches=True, generator=torch.Generator().manual_seed(3), **common)
    split = kmeans(points, k, generator=torch.Generator().manual_seed(3), **common)
    assert (merged.abs().sum(1) > 0).all()
    assert (split.abs().sum(1) == 0).sum() > 50
    # With one merged step every centroid is the mean of its own cluster: every cluster is used.
    assert torch.unique(assign(points, merged)).numel() == k


def test_reference_batches_draw_the_initial_centroids_from_the_first_minibatch():
    points = _points(105, 4, seed=4)
    first = random_init(points[:22], 20, generator=torch.Generator().manual_seed(5))
    ours = kmeans(points, 20, minibatch=16, iters=1, reference_batches=True, torchpq_update=True,
                  generator=torch.Generator().manual_seed(5))
    replay = _paper_kmeans(points, 20, 16, first)
    replay_no_abs = kmeans(points, 20, minibatch=16, iters=1, reference_batches=True, torchpq_update=True, init=first)
    assert torch.equal(ours, replay_no_abs) and not torch.equal(ours, replay)


def test_discover_interests_under_paper_flags_matches_the_reference():
    g = torch.Generator().manual_seed(6)
    n, dim = 30, 6
    points = {"text": torch.randn(n, dim, generator=g, dtype=torch.float64),
              "image": torch.randn(n, dim, generator=g, dtype=torch.float64)}
    config = ModelConfig.paper("transductive_ft", hidden=dim, heads=1)
    table, ids = discover_interests(points, config, generator=torch.Generator().manual_seed(7))
    stacked = torch.cat([points["text"], points["image"]])
    k = n  # ratio 0.5 of 2N points
    init_rows = torch.randperm(2 * n, generator=torch.Generator().manual_seed(7))[:k]
    expected, labels, _ = _reference_cluster_kmeans(stacked, k, 2048, init_rows)
    torch.testing.assert_close(table[1:], expected, rtol=0, atol=1e-12)
    assert torch.equal(table[0], torch.zeros(dim, dtype=table.dtype))
    assert torch.equal(torch.cat([ids["text"], ids["image"]]) - 1, labels)
