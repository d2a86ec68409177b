"""Full-ranking metrics: hand-computed cases, chunked scoring, and the cross-rank reduction."""

from __future__ import annotations

import math

import pytest
import torch

from missrec_torchrec.metrics import RankCounter, RankingMetrics, target_ranks
from test_distributed import launch

# Three users, six items. Ranks by hand (rank = 1 + unmasked non-target items scoring >= target):
#   user 0: target 3 (0.5); item 1 ties at 0.5 -> rank 2. Masking {1, 3(target, kept), pad} -> rank 1.
#   user 1: target 4 (0.5); items 0..3 score higher -> rank 5. Masking {0, 2, 2, 4(target)} leaves
#           items 1 and 3 above -> rank 3.
#   user 2: padding row (weight 0); all scores tie -> rank 6, never counted.
SCORES = torch.tensor(
    [
        [0.1, 0.5, 0.3, 0.5, 0.2, 0.0],
        [0.9, 0.8, 0.7, 0.6, 0.5, 0.4],
        [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
    ]
)
TARGET = torch.tensor([3, 4, 0])
WEIGHT = torch.tensor([1.0, 1.0, 0.0])
EXCLUDE_OFFSETS = torch.tensor([0, 3, 7, 7])
EXCLUDE_VALUES = torch.tensor([1, 3, -1, 0, 2, 2, 4])


def test_hand_computed_ranks_unmasked_and_masked():
    assert target_ranks(SCORES, TARGET).tolist() == [2, 5, 6]
    assert target_ranks(SCORES, TARGET, EXCLUDE_OFFSETS, EXCLUDE_VALUES).tolist() == [1, 3, 6]


def test_hand_computed_metrics_ignore_padding_rows():
    unmasked = RankingMetrics(ks=(1, 3))
    unmasked.update(SCORES, TARGET, WEIGHT)
    # ranks 2 and 5: HR@3 = (1 + 0)/2, NDCG@3 = (1/log2(3) + 0)/2, MRR = (1/2 + 1/5)/2.
    assert unmasked.compute() == pytest.approx(
        {"hr@1": 0.0, "ndcg@1": 0.0, "hr@3": 0.5, "ndcg@3": 0.5 / math.log2(3), "mrr": 0.35, "count": 2.0}
    )
    masked = RankingMetrics(ks=(1, 3))
    masked.update(SCORES, TARGET, WEIGHT, EXCLUDE_OFFSETS, EXCLUDE_VALUES)
    # ranks 1 and 3: HR@1 = 1/2, HR@3 = 1, NDCG@3 = (1 + 1/log2(4))/2, MRR = (1 + 1/3)/2.
    assert masked.compute() == pytest.approx(
        {"hr@1": 0.5, "ndcg@1": 0.5, "hr@3": 1.0, "ndcg@3": 0.75, "mrr": 2 / 3, "count": 2.0}
    )


def test_nan_scores_count_against_the_target():
    scores = torch.tensor([[0.5, float("nan"), 0.1], [float("nan"), 0.3, 0.1]])
    assert target_ranks(scores, torch.tensor([0, 0])).tolist() == [2, 3]


def reference_ranks(scores, target, offsets, values):
    """The rank rule written out row by row, independent of the vectorised code."""
    ranks = []
    for b in range(scores.shape[0]):
        masked = {int(v) for v in values[offsets[b] : offsets[b + 1]]} - {int(target[b])}
        t = scores[b, target[b]].item()
        row = scores[b].tolist()
        ranks.append(1 + sum(1 for j, s in enumerate(row) if j != target[b] and j not in masked and s >= t))
    return ranks


def random_case(rows: int, items: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 20, (rows, items), generator=g).float() / 20  # many ties
    target = torch.randint(items, (rows,), generator=g)
    lengths = torch.randint(0, 30, (rows,), generator=g)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    values = torch.randint(-1, items, (int(lengths.sum()),), generator=g)
    values[offsets[:-1][lengths > 0]] = target[lengths > 0]  # targets inside their own history
    return scores, target, offsets, values


def test_vectorised_ranks_match_the_rule_and_chunking_changes_nothing():
    scores, target, offsets, values = random_case(rows=37, items=300, seed=0)
    expected = reference_ranks(scores, target, offsets, values)
    assert target_ranks(scores, target, offsets, values).tolist() == expected

    # Uneven chunks (one of width 1) against target scores computed beforehand.
    counter = RankCounter(target, scores.gather(1, target[:, None]).squeeze(1), offsets, values)
    bounds = [0, 1, 64, 65, 200, 300]
    for lo, hi in zip(bounds, bounds[1:]):
        counter.update(scores[:, lo:hi], lo)
    assert counter.ranks().tolist() == expected


def test_target_scored_slightly_differently_never_beats_itself():
    scores = torch.tensor([[0.3, 0.7, 0.1]])
    counter = RankCounter(torch.tensor([1]), torch.tensor([0.7 - 1e-7]))
    counter.update(scores, 0)
    assert counter.ranks().tolist() == [1]


def test_bad_shapes_are_rejected():
    with pytest.raises(ValueError, match="target ids"):
        target_ranks(SCORES, torch.tensor([0, 6, 1]))
    with pytest.raises(ValueError, match="weight"):
        RankingMetrics().update(SCORES, TARGET, torch.ones(2))


# -- cross-rank reduction --------------------------------------------------------------------------

UNION_ROWS = 7
RANK0_ROWS = 5  # uneven: rank 0 scores 5 users, rank 1 the other 2 plus one padding row


def _union_batch():
    scores, target, offsets, values = random_case(rows=UNION_ROWS, items=60, seed=3)
    return scores, target, offsets, values


def _rank_worker():
    from missrec_torchrec.distributed import init_distributed

    torch.set_num_threads(1)
    rank, _, _, pg = init_distributed()
    scores, target, offsets, values = _union_batch()
    rows = slice(0, RANK0_ROWS) if rank == 0 else slice(RANK0_ROWS, UNION_ROWS)
    mine_scores, mine_target = scores[rows], target[rows]
    mine_offsets = offsets[rows.start : rows.stop + 1]
    weight = torch.ones(mine_target.shape[0])
    if rank == 1:  # a padding row that must not count
        mine_scores = torch.cat([mine_scores, torch.zeros(1, 60)])
        mine_target = torch.cat([mine_target, torch.zeros(1, dtype=torch.int64)])
        mine_offsets = torch.cat([mine_offsets, mine_offsets[-1:]])
        weight = torch.cat([weight, torch.zeros(1)])
    metrics = RankingMetrics(ks=(5, 20))
    metrics.update(mine_scores, mine_target, weight, mine_offsets, values)
    local_mean_mrr = (metrics.sums[-2] / metrics.sums[-1]).item()
    return {"reduced": metrics.compute(pg), "local_mean_mrr": local_mean_mrr}


def test_two_rank_reduction_equals_one_rank_on_the_union():
    scores, target, offsets, values = _union_batch()
    single = RankingMetrics(ks=(5, 20))
    single.update(scores, target, None, offsets, values)
    expected = single.compute()

    results = launch(_rank_worker, 2)
    for out in results.values():
        assert out["reduced"] == pytest.approx(expected, rel=1e-12)
    # The data is uneven enough that averaging per-rank averages would give a different answer.
    mean_of_means = sum(out["local_mean_mrr"] for out in results.values()) / 2
    assert mean_of_means != pytest.approx(expected["mrr"], rel=1e-6)
