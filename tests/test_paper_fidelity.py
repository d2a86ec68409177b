"""The `paper` preset's ID table, softmax width and early stopping; mixed-negative sampled softmax."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from missrec_torchrec import item_state
from missrec_torchrec.metrics import early_stopping
from missrec_torchrec.model import losses

from test_train import small_overrides


def _sm(logits, weights=None):
    """-log softmax of column 0 over the given logits, by hand."""
    return -logits[0] + math.log(sum(math.exp(x) for x in logits))


def test_mixed_negative_softmax_on_a_hand_computed_case():
    t = 0.5
    pos = torch.tensor([1.0, 0.5, 0.2])
    uniform_ids = torch.tensor([7, 3])  # item 3 is row 1's target: an accidental hit
    uniform = torch.tensor([[0.2, -0.4], [0.3, 0.1], [0.0, 0.6]])
    target = torch.tensor([3, 3, 5])  # rows 0 and 1 share a target: neither is the other's negative
    batch = torch.tensor([[1.0, 0.9, -0.2], [0.4, 0.5, 0.7], [0.1, 0.3, 0.2]])
    logq_u = torch.log(torch.tensor([2 / 10, 2 / 10]))
    logq_b = torch.log(torch.tensor([3 * 0.5, 3 * 0.5, 3 * 0.25]))

    got = losses.mixed_negative_softmax(pos, uniform, uniform_ids, logq_u, batch, target, logq_b, t)
    lu, lb = math.log(0.2), [math.log(1.5), math.log(1.5), math.log(0.75)]
    # Row 0 (target 3): uniform 7 and 3 (hit, removed); in-batch: own column and row 1 (same target)
    # removed, row 2's target 5 kept.
    row0 = _sm([1.0 / t, 0.2 / t - lu, -0.2 / t - lb[2]])
    row1 = _sm([0.5 / t, 0.3 / t - lu, 0.7 / t - lb[2]])
    # Row 2 (target 5): both uniform, rows 0 and 1 (target 3) are negatives, its own column is not.
    row2 = _sm([0.2 / t, 0.0 / t - lu, 0.6 / t - lu, 0.1 / t - lb[0], 0.3 / t - lb[1]])
    assert got.item() == pytest.approx((row0 + row1 + row2) / 3, rel=1e-6)

    plain = losses.mixed_negative_softmax(pos, uniform, uniform_ids, None, batch, target, None, t)
    row0 = _sm([1.0 / t, 0.2 / t, -0.2 / t])
    row1 = _sm([0.5 / t, 0.3 / t, 0.7 / t])
    row2 = _sm([0.2 / t, 0.0, 0.6 / t, 0.1 / t, 0.3 / t])
    assert plain.item() == pytest.approx((row0 + row1 + row2) / 3, rel=1e-6)

    # A zero-weight row's target is nobody's negative, and its own loss does not count.
    weight = torch.tensor([1.0, 1.0, 0.0])
    masked = losses.mixed_negative_softmax(pos, uniform, uniform_ids, None, batch, target, None, t, weight=weight)
    row0 = _sm([1.0 / t, 0.2 / t])
    row1 = _sm([0.5 / t, 0.3 / t])
    assert masked.item() == pytest.approx((row0 + row1) / 2, rel=1e-6)


def recbole_early_stopping(value, best, cur_step, max_step):
    """RecBole's `recbole.utils.early_stopping` (bigger=True), as the reference's trainer calls it."""
    if value >= best:
        return value, 0, False
    cur_step += 1
    return best, cur_step, cur_step > max_step


def test_early_stopping_matches_recbole():
    values = [0.1, 0.2, 0.2, 0.15, 0.2, 0.19, 0.18, 0.21, 0.2, 0.2, 0.2]
    for patience in (1, 2):
        best, cur, theirs = -math.inf, 0, None
        for i, v in enumerate(values):
            best, cur, stop = recbole_early_stopping(v, best, cur, max_step=patience)
            if stop:
                theirs = i
                break
        ours_best, bad, ours = None, 0, None
        for i, v in enumerate(values):
            improved, bad, stop = early_stopping(v, ours_best, bad, patience, recbole=True)
            ours_best = v if improved else ours_best
            if stop:
                ours = i
                break
        assert theirs is not None and ours == theirs
    # Ours by default: a tie is no improvement, and `patience` validations without one stop.
    assert early_stopping(0.2, 0.2, 0, 1) == (False, 1, True)
    assert early_stopping(0.2, 0.2, 0, 1, recbole=True) == (True, 0, False)


@pytest.fixture(scope="module")
def paper_trainer(synthetic_mm, tmp_path_factory):
    from missrec_torchrec.config import load_config
    from missrec_torchrec.trainer import Trainer

    out = tmp_path_factory.mktemp("paper")
    overrides = small_overrides(synthetic_mm, out, **{"train.max_steps_per_epoch": 1, "model.heads": 2})
    cfg = load_config("paper", [o for o in overrides if not o.startswith("train.lr=")])
    return Trainer(cfg)


def test_paper_id_table_starts_as_the_reference_and_trains_by_dense_adam(paper_trainer):
    from missrec_torchrec import distributed as mdist
    from datapipes.batch import candidates_key
    from missrec_torchrec.recommender import ID_TABLE

    tr = paper_trainer
    table = tr.head.id_table.weight
    n = tr.session.num_items
    assert table.shape == (n + 1, tr.model_cfg.hidden)
    rows = table[:n].detach()
    assert abs(rows.mean().item()) < 0.002 and rows.std().item() == pytest.approx(0.02, rel=0.05)
    assert torch.equal(table[n].detach(), torch.zeros_like(table[n]))
    # Trained by the dense Adam at train.lr = 1e-3, not by a fused sparse optimizer.
    dense = dict(tr.optimizer.optimizers)["dense"]
    names = [k for k in dense.params if k.endswith("head.id_table.weight")]
    assert len(names) == 1
    assert dense.param_groups[0]["lr"] == 1e-3
    assert not dict(tr.optimizer.optimizers)["sparse"].params

    before = rows.clone()
    progress = {"epoch": 0, "step": 0, "skip_batches": 0}
    tr.recluster(0)
    tr.train_epoch(0, progress)
    after = table[:n].detach()
    moved = (after - before).abs()
    # Adam's first step moves every coordinate with a gradient by about lr (a 50x smaller step than
    # the fused row-wise Adagrad's default), and the padding row never moves.
    assert moved.max().item() == pytest.approx(1e-3, rel=0.02)
    assert torch.equal(table[n].detach(), torch.zeros_like(table[n]))
    assert set(dense.state_dict()["state"][names[0]]) >= {"exp_avg", "exp_avg_sq"}  # Adam's moments
    # Evaluation reads the sharded mirror: publishing copies the dense rows there.
    tr.session.publish_ids()
    items = tr.session.all_items
    mirror = mdist.lookup_rows(tr.session.collection(ID_TABLE), candidates_key(ID_TABLE), items, pg=tr.pg)
    assert torch.equal(mirror, after)


def test_paper_softmax_has_the_padding_item_as_one_more_negative(paper_trainer):
    head = paper_trainer.head
    core = head.core
    assert head.config.pad_negative
    u = F.normalize(torch.randn(4, head.config.hidden, generator=torch.Generator().manual_seed(0)), dim=1)
    # The reference's padding item: zero features (so each adapter gives its bias) and a zero ID row.
    zero = {m: torch.zeros(1, core.adapters[m].in_features) for m in head.modalities}
    pad_id = head.id_table.weight[-1:].detach()
    expected = core.score(u, core.adapt(zero), pad_id)
    with torch.no_grad():
        torch.testing.assert_close(head.core.pad_scores(u), expected)


def test_sampled_softmax_uses_in_batch_and_uniform_negatives_with_their_own_log_q():
    from dataclasses import replace

    from missrec_torchrec.recommender import MISSRecModel
    from test_fast_modes import DIMS, NUM_ITEMS, SMALL, make_batch, make_rows, seed_interests

    config = replace(SMALL, use_id=True)
    torch.manual_seed(0)
    model = MISSRecModel(config, DIMS, NUM_ITEMS, loss="sampled_softmax", table_device=torch.device("cpu"),
                         mixed_negatives=True)
    seed_interests(model.head, state=model.state_weight())
    share = torch.rand(NUM_ITEMS, generator=torch.Generator().manual_seed(1)) + 0.1
    logq = (share / share.sum()).log()
    with torch.no_grad():
        item_state.write_columns(model.state_weight(), model.head.modalities, logq=logq)
    values, lengths, target, user = make_rows(8, config.max_len, seed=3)
    target[1] = target[0]  # a shared target: those two rows are not each other's negatives
    cands = torch.randperm(NUM_ITEMS, generator=torch.Generator().manual_seed(2))[:12]
    _, out = model.train()(make_batch(model, (values, lengths, target, user), config.max_len, cands))
    with torch.no_grad():
        _, ev = model.eval()(make_batch(model, (values, lengths, target, user), config.max_len))
    scores, tgt = ev["scores"], torch.from_numpy(target)
    pos = scores[torch.arange(len(tgt)), tgt]
    expected = losses.mixed_negative_softmax(
        pos, scores[:, cands], cands, losses.expected_logq(cands, cands.numel(), NUM_ITEMS),
        scores[:, tgt], tgt, logq[tgt] + math.log(len(tgt)), config.temperature,
    )
    torch.testing.assert_close(out["main"], expected, rtol=1e-5, atol=1e-5)
    uniform_only = losses.sampled_softmax(pos, scores[:, cands], tgt, cands, config.temperature,
                                          neg_logq=losses.expected_logq(cands, cands.numel(), NUM_ITEMS))
    assert not torch.allclose(out["main"], uniform_only)


def test_a_buffer_as_large_as_the_data_mixes_users_from_every_row_group(synthetic_mm):
    import pyarrow.parquet as pq

    from datapipes.schema import read_stats
    from datapipes.stream import SequenceStream

    groups = pq.ParquetFile(synthetic_mm / "users.parquet").metadata.num_row_groups  # 64 users each
    rows = read_stats(synthetic_mm)["training_rows"]

    def groups_in_first_batch(buffer):
        stream = SequenceStream(synthetic_mm, batch_size=32, max_len=8, seed=5, shuffle_buffer=buffer)
        return len(set((next(iter(stream)).user // 64).tolist()))

    # The paper preset's buffer holds the whole (reference-sized) training set: one uniform shuffle,
    # so the first batch already mixes users from every row group; a small one draws from the few
    # units read so far.
    assert groups >= 4
    assert groups_in_first_batch(rows) == groups
    assert groups_in_first_batch(64) <= 2
