"""model.relative_time_bias (HSTU's rab_t): the buckets, which times each query and key read, and
every path that encodes users (training forward, both evaluation engines, `missrec score`) reading
the batches' timestamps the same way."""

from __future__ import annotations

import re
from dataclasses import replace

import pytest
import torch

from missrec_torchrec.model.layers import time_bias_logits, time_buckets
from missrec_torchrec.model.losses import Compaction

from test_fast_modes import SMALL, make_batch, make_model, make_rows, randomise_biases
from test_score import QUIET, assert_same_topk, brute_force, rows, run_score
from test_stream import with_timestamps
from test_train import small_overrides

DAY, YEAR = 86_400, 365 * 86_400


def test_buckets_are_hstu_s_log_buckets_of_the_absolute_gap():
    query = torch.tensor([[10**9]])
    keys = query - torch.tensor([[0, 1, 2, 3, 60, 3600, DAY, YEAR, -DAY]])
    # trunc(ln(gap) / 0.301), gaps under 1 s counted as 1 s: by hand, ln 2 / 0.301 = 2.3, ln 3 / 0.301
    # = 3.65, ln 60 / 0.301 = 13.6, ln 3600 / 0.301 = 27.2, ln 86400 / 0.301 = 37.8, ln 31536000 / 0.301 = 57.4
    assert time_buckets(query, keys).tolist() == [[[0, 0, 2, 3, 13, 27, 37, 57, 37]]]


@pytest.mark.parametrize("autocast", [False, True])
def test_the_time_bias_lookup_and_its_gradient_equal_plain_indexing(autocast):
    torch.manual_seed(0)
    table = torch.randn(129, requires_grad=True)
    buckets = torch.randint(0, 60, (3, 5, 7), dtype=torch.int32)
    upstream = torch.randn(3, 2, 5, 7)  # a gradient that differs per head
    # A term added beside the lookup shares its gradient, which the lookup's backward must not change;
    # made first, its backward runs after the lookup's.
    beside = torch.zeros(3, 2, 5, 7, requires_grad=True)
    other = beside * 1.0
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        fast = time_bias_logits(table, buckets, heads=2)
    assert fast.shape == (3, 2, 5, 7) and fast.dtype == (torch.bfloat16 if autocast else torch.float32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        # evaluation reads fp32, so its metrics are those of the plain lookup (the terms sum before one rounding)
        assert torch.equal(time_bias_logits(table, buckets, heads=2), table[buckets.long()].unsqueeze(1).expand(-1, 2, -1, -1))
    ((fast.float() + other) * upstream).sum().backward()
    assert torch.equal(beside.grad, upstream)
    reference = table.detach().clone().requires_grad_()
    plain = reference[buckets.long()].unsqueeze(1).expand(-1, 2, -1, -1)
    (plain * upstream.to(fast.dtype).float()).sum().backward()
    tolerance = {"rtol": 0, "atol": 0} if not autocast else {"rtol": 2**-8, "atol": 0}
    torch.testing.assert_close(fast.float(), plain.detach(), **tolerance)
    torch.testing.assert_close(table.grad, reference.grad, rtol=1e-6, atol=1e-6)


def test_dropping_items_keeps_each_kept_item_s_time_and_moves_the_target_s():
    # Row 0 keeps positions 0 and 2 of 3 items, row 1 keeps its only item.
    comp = Compaction(index=torch.tensor([[0, 2, 1], [0, 1, 2]]),
                      valid=torch.tensor([[True, True, False], [True, False, False]]))
    times = torch.tensor([[10, 20, 30, 40], [5, 9, 0, 0]])  # targets' times at the old lengths 3 and 1
    assert comp.apply_times(times, torch.tensor([3, 1])).tolist() == [[10, 30, 40, 0], [5, 9, 0, 0]]


@pytest.mark.parametrize("causal", [False, True])
def test_the_last_query_is_timed_by_the_target_and_padding_times_are_never_read(causal):
    config = replace(SMALL, use_id=True, causal=causal, relative_time_bias=True)
    model = make_model(config)
    randomise_biases(model.head)
    batch = make_batch(model, make_rows(24, config.max_len), config.max_len)
    columns = torch.arange(batch.times.shape[1])
    # Items a day apart, the target a day after the last: each key in its own bucket of the last query.
    batch.times = torch.where(columns <= batch.lengths.unsqueeze(1), 10**9 + columns * DAY, 0)
    model.eval()
    with torch.no_grad():
        u = model(batch)[1]["user"]
        original = batch.times
        batch.times = original.masked_fill(columns > batch.lengths.unsqueeze(1), 12345)
        torch.testing.assert_close(model(batch)[1]["user"], u, rtol=0, atol=0)  # nothing reads past the target
        later = original.clone()
        later[torch.arange(batch.batch_size), batch.lengths] += 1000 * DAY  # now every key shares one bucket
        batch.times = later
        moved = (model(batch)[1]["user"] - u).abs().amax(1) > 1e-4
    # One key gets all the attention whatever its bias; two or more are reweighted.
    assert torch.equal(moved, batch.lengths > 1)


# ---- end to end: training, evaluation engines and `missrec score` on timestamped data -----------


@pytest.fixture(scope="module")
def timed_run(synthetic_mm, tmp_path_factory):
    """One epoch on the synthetic dataset (its timestamps: log-uniform gaps of 1 s to 30 days)."""
    from missrec_torchrec.config import load_config
    from missrec_torchrec.trainer import train

    out = tmp_path_factory.mktemp("timed-run")
    cfg = load_config("ml100k", small_overrides(synthetic_mm, out, **{
        "train.epochs": 1, "model.use_id": "true", "model.relative_time_bias": "true",
        "checkpoint.run_dir": out / "run", "train.precision": "fp32"}))
    train(cfg)
    return out / "run"


def test_training_learns_a_time_bias(timed_run):
    from missrec_torchrec.session import load_run, open_session

    step_dir, cfg = load_run(timed_run, QUIET)
    session = open_session(cfg.for_inference(), step_dir)
    biases = [layer.time_bias for layer in session.head.core.decoder.layers]
    assert all(float(b.detach().abs().max()) > 0 for b in biases)


@pytest.mark.parametrize("held", ["held", "rank_local"])
@pytest.mark.parametrize("split,mask", [("test", False), ("all", True)])
def test_score_reads_the_times_as_the_model_s_forward(timed_run, tmp_path, split, mask, held):
    out = tmp_path / "scores.parquet"
    run_score(timed_run, out, "--split", split, *(["--mask-history"] if mask else []),
              overrides=[f"eval.catalogue={held}"])
    assert_same_topk(rows(out), brute_force(timed_run, split, mask))


def test_both_evaluation_engines_give_the_same_metrics(timed_run):
    from missrec_torchrec.session import load_run, open_session
    from missrec_torchrec.evaluate import evaluate

    step_dir, cfg = load_run(timed_run, QUIET)
    results = {}
    for engine, catalogue in [("dmp", "auto"), ("catalogue", "held"), ("catalogue", "rank_local")]:
        cfg.eval.engine, cfg.eval.catalogue = engine, catalogue
        results[engine, catalogue] = evaluate(open_session(cfg.for_inference(), step_dir), "valid")
    first = results["dmp", "auto"]
    for got in results.values():
        assert got == pytest.approx(first, abs=1e-9)


def test_a_dataset_without_timestamps_is_refused_in_one_line_before_the_run_folder(synthetic_mm, tmp_path):
    from test_train import run_cli

    data, run = with_timestamps(synthetic_mm, tmp_path / "data"), tmp_path / "run"  # null timestamps
    done = run_cli(["train", "--config", "ml100k", *small_overrides(data, tmp_path, **{
        "model.relative_time_bias": "true", "checkpoint.run_dir": run})])
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and re.fullmatch(
        rf"missrec train: error: {re.escape(str(data / 'users.parquet'))}: user_index 0 has no timestamps "
        r"for \d+ items \(model\.relative_time_bias reads one per item\)", errors[0]), done.stderr[-2000:]
    assert not run.exists()
