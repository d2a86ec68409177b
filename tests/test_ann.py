"""ANN candidates (faiss HNSW / IVF per table, union re-scored exactly) against the exact top-K, on a
catalogue of a few thousand planted-topic items: no model, no files."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from datapipes.schema import DataError
from missrec_torchrec.ann_index import AnnSettings, TableIndexes, ann_topk
from missrec_torchrec.topk import Seen, approx_topk, exact_topk, recall
from test_topk import TwoModalityBank

ITEMS, DIM, TOPICS, USERS, K = 4000, 16, 40, 200, 20
RECALL = 0.95  # the stated floor of recall@K against the exact top-K (default C = 8K per table, both indexes)


class TopicBank(TwoModalityBank):
    """Two modalities that agree the way real ones do: each item's text and image vectors are noisy
    copies of its topic's two centres, and users lean towards one topic (random vectors would make
    the fused top-K a coin toss that no per-table retrieval reaches)."""

    def __init__(self, alpha: float, seed: int = 0):
        super().__init__(ITEMS, DIM, alpha, seed)
        gen = torch.Generator().manual_seed(seed + 1)
        topic = torch.randint(0, TOPICS, (ITEMS,), generator=gen)
        for m in self.modalities:
            centres = torch.randn(TOPICS, DIM, generator=gen)
            self.unit[m] = F.normalize(centres[topic] + 0.8 * torch.randn(ITEMS, DIM, generator=gen), dim=-1)
        self.topic = topic

    def users(self, n: int, seed: int = 2) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        items = torch.randint(0, ITEMS, (n,), generator=gen)
        mix = self.unit["text"][items] + self.unit["image"][items] + 0.5 * torch.randn(n, DIM, generator=gen)
        return F.normalize(mix, dim=-1)


def seen_of(bank: TopicBank, u: torch.Tensor, per_user: int = 5) -> Seen:
    """Each user's history: items it would score highly (the hard case: they crowd the candidates)."""
    _, near = exact_topk(bank, u, per_user, 1024, None)
    return Seen(torch.arange(u.shape[0]).repeat_interleave(per_user), near.reshape(-1))


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_ann_topk_recall_exact_scores_and_no_seen_items(kind):
    """Dynamic fusion (alpha 4): the fused top-K lies within each table's top 8K (the default C), so
    the union of the ANN candidates holds nearly all of it."""
    bank = TopicBank(alpha=4.0)
    u = bank.users(USERS)
    seen = seen_of(bank, u)
    _, exact = exact_topk(bank, u, K, 1024, seen)
    settings = AnnSettings(kind)
    scores, items = ann_topk(TableIndexes(bank, settings), bank, u, K, settings.per_table(K, ITEMS), seen)
    r = float(np.nanmean(recall(items.numpy(), exact.numpy())))
    assert r >= RECALL, (kind, r)
    assert bool((items >= 0).all()), "every user gets K items"
    # Re-scoring is exact: each returned score is the item's fused score from a full scan.
    full = bank.all_scores(u)
    torch.testing.assert_close(scores, full.gather(1, items), rtol=0, atol=1e-6)
    assert not seen.contains(items, ITEMS).any(), "a seen item came back"


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_ann_candidates_are_nearly_the_scanned_ones(kind):
    """Static fusion (alpha 0, a mean) reaches further down each table's list, so C = 4K recalls only
    ~0.91 even when every table is scanned exactly (`approx_topk`); the index itself loses at most
    0.03 of recall against that scan."""
    bank = TopicBank(alpha=0.0)
    u = bank.users(USERS)
    _, exact = exact_topk(bank, u, K, 1024, None)
    settings = AnnSettings(kind, candidates=4)
    per_table = settings.per_table(K, ITEMS)
    _, scanned, _ = approx_topk(bank, u, K, per_table, 1024, None)
    _, items = ann_topk(TableIndexes(bank, settings), bank, u, K, per_table, None)
    r_scan = float(np.nanmean(recall(scanned.numpy(), exact.numpy())))
    r_ann = float(np.nanmean(recall(items.numpy(), exact.numpy())))
    assert 0.85 <= r_scan < 1 and r_ann >= r_scan - 0.03, (r_scan, r_ann)


def test_fewer_candidates_lose_recall():
    """The knob does something: one candidate per K (C = K) recalls less than the default 4K."""
    bank = TopicBank(4.0)
    u = bank.users(USERS)
    _, exact = exact_topk(bank, u, K, 1024, None)
    got = {}
    for mult in (1, 4):
        s = AnnSettings("hnsw", candidates=mult)
        _, items = ann_topk(TableIndexes(bank, s), bank, u, K, s.per_table(K, ITEMS), None)
        got[mult] = float(np.nanmean(recall(items.numpy(), exact.numpy())))
    assert got[1] < got[4], got


def test_seen_contains_only_its_own_rows_pairs():
    seen = Seen(torch.tensor([0, 0, 1]), torch.tensor([2, 5, 3]))
    hits = seen.contains(torch.tensor([[2, 3, 5], [2, 3, 5]]), num_items=10)
    assert hits.tolist() == [[True, False, True], [False, True, False]]


@pytest.mark.parametrize("settings,message", [
    (AnnSettings("hnsw", candidates=0), "--ann-candidates 0: must be >= 1"),
    (AnnSettings("hnsw", hnsw_ef=0), "--hnsw-ef 0: must be >= 1"),
    (AnnSettings("hnsw", hnsw_m=1), "--hnsw-m 1: must be >= 2"),
    (AnnSettings("ivf", ivf_probe=-1), "--ivf-probe -1: must be >= 1"),
    (AnnSettings("hnsw", ivf_probe=4), "--ivf-probe is a knob of --ann ivf, not of --ann hnsw"),
    (AnnSettings("ivf", hnsw_ef=64), "--hnsw-ef is a knob of --ann hnsw, not of --ann ivf"),
    (AnnSettings("ivf", ivf_lists=ITEMS + 1), f"--ivf-lists {ITEMS + 1}: more lists than the catalogue's"),
    (AnnSettings("ivf", ivf_lists=8, ivf_probe=9), "--ivf-probe 9: more than the index's 8 lists"),
    (AnnSettings("annoy"), "--ann annoy: must be one of hnsw, ivf"),
    (AnnSettings("ivf", bits=5), "--ann-bits 5: must be one of 4, 6, 8"),
])
def test_bad_knobs_are_one_line(settings, message):
    with pytest.raises(DataError) as e:
        TableIndexes(TopicBank(0.0), settings)
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_fewer_code_bits_smaller_indexes_same_recall_floor(kind):
    """--ann-bits 4: codes half the size of 8-bit ones (the index's bytes say so), candidates still
    good enough for the stated recall floor, scores still exact."""
    bank = TopicBank(alpha=4.0)
    u = bank.users(USERS)
    _, exact = exact_topk(bank, u, K, 1024, None)
    sizes = {}
    for bits in (8, 4):
        settings = AnnSettings(kind, bits=bits)
        indexes = TableIndexes(bank, settings)
        sizes[bits] = indexes.bytes
        scores, items = ann_topk(indexes, bank, u, K, settings.per_table(K, ITEMS), None)
        assert float(np.nanmean(recall(items.numpy(), exact.numpy()))) >= RECALL, (kind, bits)
        torch.testing.assert_close(scores, bank.all_scores(u).gather(1, items), rtol=0, atol=1e-6)
        assert f"{bits}-bit codes" in indexes.describe(K, ITEMS)
    assert sizes[8] - sizes[4] == ITEMS * len(bank.modalities) * DIM // 2  # half a byte less per dimension


def test_ivf_lists_filled_at_their_size_equal_faiss_add():
    """`fill_lists` (each inverted list allocated once) builds the index faiss's own `add` builds: the
    same ids and codes in every list, so the same search results."""
    import faiss

    from missrec_torchrec.ann_index import numpy_of

    bank = TopicBank(alpha=4.0)
    indexes = TableIndexes(bank, AnnSettings("ivf"))
    for t, index in indexes.indexes.items():
        reference = faiss.clone_index(index)
        reference.reset()  # the same trained quantizer, empty lists
        reference.add(numpy_of(bank.unit[t]))
        assert index.ntotal == reference.ntotal == ITEMS
        mine, theirs = faiss.downcast_InvertedLists(index.invlists), faiss.downcast_InvertedLists(reference.invlists)
        for lst in range(index.nlist):
            n = mine.list_size(lst)
            assert n == theirs.list_size(lst), (t, lst)
            if n:
                assert np.array_equal(faiss.rev_swig_ptr(mine.get_ids(lst), n), faiss.rev_swig_ptr(theirs.get_ids(lst), n))
                size = n * index.code_size
                assert np.array_equal(faiss.rev_swig_ptr(mine.get_codes(lst), size),
                                      faiss.rev_swig_ptr(theirs.get_codes(lst), size))
