"""Pure-torch checks of the top-K pieces that scoring builds on (no model, no files): running top-K,
exclusions, recall, and exact / certified approximate top-K over a catalogue of random vectors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from missrec_torchrec import item_state
from missrec_torchrec.catalogue import HeldCatalogue
from missrec_torchrec.item_state import ItemState
from missrec_torchrec.model.fusion import fuse
from missrec_torchrec.topk import RunningTopK, Seen, approx_topk, exact_topk, recall


@pytest.mark.parametrize("chunk", [1, 3, 7, 50])
def test_running_topk_over_chunks_equals_one_topk(chunk):
    gen = torch.Generator().manual_seed(0)
    scores = torch.rand(5, 50, generator=gen)
    scores[:, 10] = scores[:, 40] = 2.0  # a tie inside the top k: the smaller item comes first
    top = RunningTopK(5, 8, torch.device("cpu"))
    for lo in range(0, 50, chunk):
        hi = min(50, lo + chunk)
        top.add(scores[:, lo:hi], torch.arange(lo, hi))
    got_scores, got_items = top.result()
    for row in range(5):
        # Descending score, then ascending item among equal scores.
        expect = sorted(range(50), key=lambda i: (-float(scores[row, i]), i))[:8]
        assert got_items[row].tolist() == expect
        assert got_scores[row].tolist() == [float(scores[row, i]) for i in expect]


def test_running_topk_with_fewer_items_than_k_pads_with_item_minus_one():
    top = RunningTopK(2, 4, torch.device("cpu"))
    top.add(torch.tensor([[0.5, float("-inf")], [0.1, 0.2]]), torch.tensor([7, 9]))
    scores, items = top.result()
    assert items.tolist() == [[7, -1], [9, 7]]
    assert scores[0, 1] == float("-inf")


def test_seen_masks_only_its_rows_items_inside_the_chunk():
    seen = Seen(torch.tensor([0, 0, 1]), torch.tensor([2, 5, 3]))
    scores = seen.mask(torch.zeros(2, 4), lo=2, hi=6)  # items 2..5
    assert torch.isinf(scores).nonzero().tolist() == [[0, 0], [0, 3], [1, 1]]
    sub = seen.subset(torch.tensor([1]), rows=2)  # keep row 1 only, renumbered 0
    assert sub.rows.tolist() == [0] and sub.items.tolist() == [3]


def test_recall_counts_valid_entries_and_is_nan_without_exact_items():
    r = recall(np.array([[1, 2, 3], [4, 5, 6]]), np.array([[3, 9, -1], [-1, -1, -1]]))
    assert r[0] == 0.5 and np.isnan(r[1])


class TwoModalityBank(HeldCatalogue):
    """A held catalogue of random vectors: two modalities, dynamic fusion with one alpha, some items
    missing a modality."""

    def __init__(self, n: int, dim: int, alpha: float, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        modalities = ["text", "image"]
        unit = {m: F.normalize(torch.randn(n, dim, generator=gen), dim=-1) for m in modalities}
        rows = item_state.default_rows(n, modalities, n)
        item_state.write_columns(rows, modalities, present={m: torch.rand(n, generator=gen) > 0.2 for m in modalities})
        super().__init__(unit, self.fuse_cosines, modalities, ItemState(rows, modalities))
        self.alpha = torch.tensor(alpha)

    def fuse_cosines(self, u, sims, idx, items, present):
        return fuse([sims[m] for m in self.modalities], [present[m] for m in self.modalities], self.alpha,
                    inference=True)

    def all_scores(self, u):
        """B x N: every item scored at once."""
        return self.chunk_scores(u, next(self.local_chunks(self.num_items)))


@pytest.mark.parametrize("alpha", [0.0, 4.0, -3.0])
def test_certified_rows_of_approximate_topk_equal_the_exact_topk(alpha):
    bank = TwoModalityBank(n=600, dim=8, alpha=alpha)
    u = F.normalize(torch.randn(40, 8, generator=torch.Generator().manual_seed(1)), dim=-1)
    seen = Seen(torch.arange(40).repeat_interleave(3), torch.randint(0, 600, (120,)))
    exact_scores, exact_items = exact_topk(bank, u, k=10, chunk=128, seen=seen)
    brute = bank.all_scores(u)
    seen.mask(brute, 0, 600)
    torch.testing.assert_close(exact_scores, brute.topk(10, dim=1).values)
    scores, items, certified = approx_topk(bank, u, k=10, per_table=60, chunk=128, seen=seen)
    assert certified.any()
    assert torch.equal(items[certified], exact_items[certified])
    torch.testing.assert_close(scores[certified], exact_scores[certified])
    everything = approx_topk(bank, u, k=10, per_table=600, chunk=128, seen=seen)
    assert bool(everything[2].all()) and torch.equal(everything[1], exact_items)
