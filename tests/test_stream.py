"""The streaming pipeline against naive Python references computed from users.parquet."""

from __future__ import annotations

import math
import shutil
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from datapipes.batch import candidates_key, history_key, target_key
from datapipes.candidates import Candidates
from datapipes.schema import DataError, DatasetInfo, UsersWriter, write_items, write_stats
from datapipes.sources import prepare
from datapipes.stream import SequenceStream, make_loader

torch.set_num_threads(1)
GROUPS = {"ids": ["item", "item_copy"]}
MAX_LEN = 5  # short, so histories get truncated


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("stream") / "syn"
    prepare("synthetic", out, ["--users", "300", "--items", "200", "--topics", "8", "--mean-len", "9",
                               "--min-len", "3", "--modalities", "", "--rows-per-group", "64", "--seed", "5"])
    return out


@pytest.fixture(scope="module")
def users(data):
    return pq.read_table(data / "users.parquet").to_pylist()


def reference_train_rows(users, max_len=MAX_LEN, end="train_end"):
    """Every (user, target, history) prefix row, by the definition in datapipes/schema.py."""
    return Counter(
        (u["user_index"], u["items"][k], tuple(u["items"][max(0, k - max_len) : k]))
        for u in users
        for k in range(1, u[end])
    )


def batch_rows(batch, with_weight=False):
    """The rows of a batch as (user, target, history) tuples, read from the dense tensors."""
    out = []
    for i in range(batch.batch_size):
        n = int(batch.lengths[i])
        assert (batch.history[i, n:] == -1).all()
        row = (int(batch.user[i]), int(batch.target[i]), tuple(batch.history[i, :n].tolist()))
        out.append(row + (float(batch.weight[i]),) if with_weight else row)
    return out


def check_kjt(batch):
    """Every table's KJT features carry exactly the batch's histories and targets."""
    kjt = batch.sparse["ids"]
    assert kjt.keys() == [history_key("item"), target_key("item"), history_key("item_copy"), target_key("item_copy")]
    check_kjt_features(batch)


def check_kjt_features(batch):
    hist = torch.cat([batch.history[i, : int(batch.lengths[i])] for i in range(batch.batch_size)])
    feats = batch.sparse["ids"].to_dict()
    for t in GROUPS["ids"]:
        assert torch.equal(feats[history_key(t)].values(), hist)
        assert torch.equal(feats[history_key(t)].lengths(), batch.lengths)
        assert torch.equal(feats[target_key(t)].values(), batch.target)
        assert torch.equal(feats[target_key(t)].lengths(), torch.ones(batch.batch_size, dtype=torch.int64))


def stream(data, **kw):
    kw = {"batch_size": 64, "max_len": MAX_LEN, "kjt_groups": GROUPS, "seed": 11, "shuffle_buffer": 100, **kw}
    return SequenceStream(data, **kw)


def test_one_epoch_is_every_prefix_row(data, users):
    ref = reference_train_rows(users)
    s = stream(data)
    batches = list(s)
    rows = [r for b in batches for r in batch_rows(b)]
    total = sum(ref.values())
    assert len(batches) == len(s) == math.ceil(total / 64)
    assert all(b.batch_size == 64 for b in batches)
    assert set(rows) == set(ref)
    # Only the last batch may wrap into a second pass; everything else is one copy of each row.
    assert sum((Counter(rows) - ref).values()) == len(rows) - total < 64
    check_kjt(batches[0])
    # Shuffled: the order changes with the epoch, the rows do not.
    s.set_epoch(1)
    again = [r for b in s for r in batch_rows(b)]
    assert set(again) == set(ref) and again[:64] != rows[:64]


def test_through_valid_adds_each_user_s_validation_target_and_nothing_else(data, users):
    ref = reference_train_rows(users, end="valid_end")
    added = ref - reference_train_rows(users)
    assert sum(added.values()) == sum(u["valid_end"] > u["train_end"] for u in users) > 0
    assert {(user, target) for user, target, _ in added} == {
        (u["user_index"], u["items"][u["train_end"]]) for u in users if u["valid_end"] > u["train_end"]}
    s = stream(data, through_valid=True)
    rows = [r for b in s for r in batch_rows(b)]
    assert len(s) == math.ceil(sum(ref.values()) / 64) and set(rows) == set(ref)
    assert sum((Counter(rows) - ref).values()) == len(rows) - sum(ref.values()) < 64  # only the wrap
    assert stream(data).plan() == {k: v for k, v in s.plan().items() if k != "through_valid"}
    with pytest.raises(ValueError, match="through_valid None -> True"):  # a resume cannot switch it
        s.load_state_dict(stream(data).position(0, 3))
    with pytest.raises(ValueError, match="through_valid True -> None"):
        stream(data).load_state_dict(s.position(0, 3))


def test_through_valid_trains_on_the_validation_targets_items_too(data, users):
    """The softmax's training items, mixed negatives' target counts and the cold-start split follow
    the training part, which then ends at valid_end."""
    info = DatasetInfo.open(data)
    for end, through in (("train_end", False), ("valid_end", True)):
        counts, seen = np.zeros(info.num_items, dtype=np.int64), np.zeros(info.num_items, dtype=bool)
        for u in users:
            np.add.at(counts, u["items"][1 : u[end]], 1)
            seen[u["items"][: u[end]]] = True
        assert np.array_equal(info.target_counts(through), counts)
        assert np.array_equal(info.training_items(through), seen)
    assert int(info.target_counts(True).sum() - info.target_counts().sum()) == sum(
        u["valid_end"] > u["train_end"] for u in users) > 0


def test_two_ranks_two_workers_cover_every_row_with_equal_full_batches(data, users):
    ref = reference_train_rows(users)
    per_rank = []
    for rank in range(2):
        s = stream(data, rank=rank, world_size=2, batch_size=32)
        batches = list(make_loader(s, num_workers=2))
        assert len(batches) == len(s)
        assert all(b.batch_size == 32 for b in batches)
        per_rank.append([r for b in batches for r in batch_rows(b)])
        check_kjt(batches[-1])
    assert len(per_rank[0]) == len(per_rank[1]) > 0
    assert set(per_rank[0]) | set(per_rank[1]) == set(ref)
    # Each unit belongs to one data worker: no user's rows are split between ranks.
    assert not {u for u, _, _ in per_rank[0]} & {u for u, _, _ in per_rank[1]}


def test_units_cover_the_file_and_balance_workers(data, users):
    s = stream(data, world_size=2, num_workers=3)
    units = s.units()
    assert len(units) >= 2 * 3
    sizes = [0] * len(s.row_group_sizes)
    for u in units:
        sizes[u.row_group] += u.hi - u.lo
    assert sizes == list(s.row_group_sizes)
    assert sum(u.rows for u in units) == sum(reference_train_rows(users).values())
    owner, loads = s.assignment(epoch=0)
    assert len(loads) == 6 and loads.min() > 0 and loads.max() <= 1.5 * loads.mean()
    assert np.array_equal(owner, stream(data, world_size=2, num_workers=3, rank=1).assignment(0)[0])


@pytest.mark.parametrize("split", ["valid", "test"])
def test_eval_yields_every_user_once_over_three_ranks(data, users, split):
    ranks = [list(stream(data, split=split, rank=r, world_size=3, batch_size=32, with_seen=True)) for r in range(3)]
    assert len({len(b) for b in ranks}) == 1  # equal batch counts
    seen_users = []
    for batches in ranks:
        for b in batches:
            assert b.batch_size == 32
            check_kjt(b)
            for i, (user, target, hist, weight) in enumerate(batch_rows(b, with_weight=True)):
                seen = b.seen_values[int(b.seen_offsets[i]) : int(b.seen_offsets[i + 1])].tolist()
                if weight == 0:
                    assert user == -1 and seen == []
                    continue
                u = users[user]
                end = u["train_end"] if split == "valid" else u["valid_end"]
                assert target == u["items"][end] and list(hist) == u["items"][:end][-MAX_LEN:]
                assert seen == u["items"][:end]
                seen_users.append(user)
    assert sorted(seen_users) == list(range(len(users)))
    assert sum(b.batch_size for r in ranks for b in r) > len(users)  # some padding happened


def test_eval_with_more_ranks_than_users_pads_whole_batches(data):
    s = stream(data, split="valid", rank=0, world_size=400, batch_size=8)  # 300 users: rank 0 gets none
    (batch,) = list(s)
    assert batch.batch_size == 8 and batch.weight.sum() == 0 and batch.seen_values is None


def test_eval_refuses_loader_workers(data, monkeypatch):
    # As if iterated inside loader worker 0 of 1 (a real worker process would only add start-up time).
    monkeypatch.setattr("datapipes.stream.get_worker_info", lambda: SimpleNamespace(id=0, num_workers=1))
    with pytest.raises(ValueError, match="num_workers=0"):
        next(iter(stream(data, split="test", num_workers=1)))


def test_stream_planned_for_other_worker_count_refuses(data):
    s = stream(data, num_workers=2)
    with pytest.raises(ValueError, match="make_loader"):
        next(iter(s))


def as_tuples(batches):
    return [(b.user.tolist(), b.target.tolist(), b.history.tolist()) for b in batches]


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_epoch_continues_exactly(data, workers):
    s = stream(data, batch_size=32, seed=3)
    s.set_epoch(2)
    full = as_tuples(make_loader(s, workers))
    assert len(full) > 10

    first = stream(data, batch_size=32, seed=3)
    first.set_epoch(2)
    loader = make_loader(first, workers)
    head = []
    for batch in loader:
        head.append(batch)
        if len(head) == 7:
            break
    state = loader.state_dict()

    resumed = stream(data, batch_size=32, seed=3)
    resumed.set_epoch(2)
    loader = make_loader(resumed, workers)
    loader.load_state_dict(state)
    assert as_tuples(head) + as_tuples(loader) == full
    # The next epoch after a resumed one starts from its beginning.
    resumed.set_epoch(3)
    assert len(list(make_loader(resumed, workers))) == len(resumed)


@pytest.mark.parametrize("workers", [0, 2])
def test_skip_rank_batches_from_a_checkpointed_step_count(data, workers):
    s = stream(data, batch_size=32, world_size=2, rank=1, num_workers=workers)
    s.set_epoch(1)
    full = as_tuples(make_loader(s))
    # A trainer that only saved (epoch, steps done) restores in its own process.
    s.set_epoch(1)
    s.load_state_dict({"epoch": 1, "batches": 5})
    rest = as_tuples(make_loader(s))
    if workers == 0:
        assert rest == full[5:]
    else:  # the same batches; a fresh loader starts its round-robin at worker 0, so pairs may swap
        assert sorted(rest) == sorted(full[5:]) and len(rest) == len(full) - 5


def test_prefix_sample_keeps_a_fraction_each_epoch(data, users):
    ref = reference_train_rows(users)
    total = sum(ref.values())
    s = stream(data, prefix_sample=0.25, batch_size=16)
    expected = sum(u.sampled for u in s.units())
    assert 0.25 * total <= expected < 0.25 * total + len(s.units())
    epochs = []
    for e in range(2):
        s.set_epoch(e)
        rows = [r for b in s for r in batch_rows(b)]
        assert len(rows) == len(s) * 16 == math.ceil(expected / 16) * 16
        assert set(rows) <= set(ref) and len(set(rows)) >= expected - 16
        epochs.append(set(rows))
    assert epochs[0] != epochs[1]  # a fresh sample per epoch


def test_steps_per_epoch_override(data):
    s = stream(data, steps_per_epoch=5, world_size=2, rank=1, num_workers=2)
    assert len(s) == 5
    assert len(list(make_loader(s))) == 5


def test_state_dict_tracks_epoch_and_batches(data):
    s = stream(data)
    s.set_epoch(4)
    assert s.state_dict()["epoch"] == 4 and s.state_dict()["batches"] == 0
    it = iter(s)
    next(it), next(it)
    state = s.state_dict()
    assert (state["epoch"], state["batches"]) == (4, 2)
    with pytest.raises(ValueError, match=r"cannot resume: the data plan changed \(batch_size 64 -> 32\)"):
        stream(data, batch_size=32).load_state_dict(state)  # another plan would give other batches


@pytest.mark.parametrize("workers", [0, 2])
def test_sampled_negatives_are_collated_once_and_replayed_on_resume(data, workers):
    policy = Candidates("sampled", num_items=200, num_negatives=7)
    s = stream(data, batch_size=32, world_size=2, rank=1, num_workers=workers, candidates=policy)
    s.set_epoch(2)
    full = list(make_loader(s))
    for batch in full:
        kjt = batch.sparse["ids"]
        assert kjt.keys() == [key(t) for t in GROUPS["ids"] for key in (history_key, target_key, candidates_key)]
        check_kjt_features(batch)
        for t in GROUPS["ids"]:
            cands = kjt[candidates_key(t)]
            assert torch.equal(cands.values(), batch.candidates) and batch.candidates.numel() == 7
            assert cands.lengths().tolist() == [7] + [0] * 31  # fetched once per batch, in row 0
    assert len({tuple(b.candidates.tolist()) for b in full}) == len(full)  # a fresh draw per batch
    again = stream(data, batch_size=32, world_size=2, rank=1, num_workers=workers, candidates=policy)
    again.set_epoch(2)
    again.load_state_dict(s.position(2, 5))
    rest = list(make_loader(again))
    key = lambda b: (b.target.tolist(), b.candidates.tolist())  # noqa: E731
    assert sorted(map(key, rest)) == sorted(map(key, full[5:]))  # the same rows with the same negatives
    s.set_epoch(3)
    assert not torch.equal(next(iter(make_loader(s))).candidates, full[0].candidates)  # epochs differ


def test_catalogue_candidates_are_shared_and_sequence_rows_can_be_left_empty(data):
    policy = Candidates("catalogue", num_items=200, sequence_rows=False)
    batches = list(stream(data, split="valid", candidates=policy))
    assert all(b.candidates is policy.catalogue for b in batches)  # one tensor, not rebuilt per batch
    assert torch.equal(policy.catalogue, torch.arange(200))
    feats = batches[0].sparse["ids"].to_dict()
    for t in GROUPS["ids"]:
        assert feats[history_key(t)].values().numel() == feats[target_key(t)].values().numel() == 0
        assert feats[history_key(t)].lengths().tolist() == [0] * batches[0].batch_size
        assert torch.equal(feats[candidates_key(t)].values(), torch.arange(200))
    none = list(stream(data, split="valid", candidates=Candidates("none", num_items=200)))
    assert none[0].candidates.numel() == 0 and none[0].sparse["ids"][candidates_key("item")].values().numel() == 0
    check_kjt_features(none[0])


def write_users(root: Path, seqs, train_end, valid_end, n_items=10):
    root.mkdir()
    w = UsersWriter(root / "users.parquet")
    w.add([str(i) for i in range(len(seqs))], "d", pa.array(seqs, pa.list_(pa.int64())), train_end, valid_end)
    w.close()
    write_items(root / "items.parquet", [str(i) for i in range(n_items)], "d")
    write_stats(root, {"users": len(seqs), "items": n_items, "interactions": sum(map(len, seqs))})


def test_bad_rows_raise_data_error_naming_file_and_user(tmp_path):
    write_users(tmp_path / "range", [[1, 2, 3, 4], [1, 12, 3, 4]], [2, 2], [3, 3])
    with pytest.raises(DataError, match=r"users\.parquet: user_index 1 has an item index outside 0\.\.9"):
        list(SequenceStream(tmp_path / "range", batch_size=2))
    write_users(tmp_path / "split", [[1, 2, 3, 4], [1, 2, 3]], [2, 2], [3, 3])
    with pytest.raises(DataError, match=r"users\.parquet: user_index 1 has train_end 2, valid_end 3 for 3 items"):
        list(SequenceStream(tmp_path / "split", split="test", batch_size=2))


def with_timestamps(src: Path, dst: Path, times=None) -> Path:
    """A copy of a dataset with `times` (a list per user; None: null lists, as an atomic import's)
    as users.parquet's timestamps."""
    shutil.copytree(src, dst)
    users = pq.read_table(src / "users.parquet")
    times = pa.nulls(users.num_rows, pa.list_(pa.int64())) if times is None else times
    users = users.set_column(users.schema.get_field_index("timestamps"), users.schema.field("timestamps"), times)
    pq.write_table(users, dst / "users.parquet", row_group_size=64)
    return dst


@pytest.fixture(scope="module")
def timed(data, tmp_path_factory) -> Path:
    """The module's dataset with timestamps that name their item: user u's k-th is 1000 u + k."""
    users = pq.read_table(data / "users.parquet")
    items = users.column("items").combine_chunks()
    lengths = items.value_lengths().to_numpy()
    user = np.repeat(users.column("user_index").to_numpy(), lengths)
    position = np.arange(len(user)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    times = pa.ListArray.from_arrays(items.offsets, pa.array(1000 * user + position))
    return with_timestamps(data, tmp_path_factory.mktemp("timed") / "syn", times)


def check_times(batch, users, request: str = "target"):
    """Each row's times are its history items' and then its target's (`request`="last": the last
    history item's, for the "all" split), 0 after; a time 1000 u + k names user u's k-th item."""
    assert batch.times.shape == (batch.batch_size, batch.history.shape[1] + 1)
    for i in range(batch.batch_size):
        n, u = int(batch.lengths[i]), int(batch.user[i])
        if u < 0:  # a padded eval row
            assert not batch.times[i].any()
            continue
        k = int(batch.times[i, n]) - 1000 * u + (request == "last")  # the target's position
        seq = users[u]["items"]
        assert int(batch.times[i, 0]) - 1000 * u == k - n  # the history is items[k - n : k] ...
        assert batch.times[i, :n].tolist() == list(range(1000 * u + k - n, 1000 * u + k))
        assert batch.history[i, :n].tolist() == seq[k - n : k]
        assert request == "last" or int(batch.target[i]) == seq[k]  # ... and the target items[k]
        assert not batch.times[i, n + 1 :].any()


@pytest.mark.parametrize("mode", ["prefix", "windows", "buckets"])
def test_training_rows_carry_their_items_times_and_their_target_s(timed, users, mode):
    kw = {"windows": mode == "windows", "length_buckets": mode == "buckets"}
    batches = list(stream(timed, times=True, **kw))
    assert [batch_rows(b) for b in batches] == [batch_rows(b) for b in stream(timed, **kw)]  # rows unchanged
    for b in batches:
        check_times(b, users)
    assert stream(timed, times=True).plan() == stream(timed).plan()  # times do not change the rows


@pytest.mark.parametrize("split", ["valid", "test", "all"])
def test_eval_rows_carry_times_and_the_request_time(timed, users, split):
    for b in stream(timed, split=split, times=True, world_size=3, rank=2, batch_size=32):
        check_times(b, users, "last" if split == "all" else "target")


def test_a_user_without_timestamps_is_refused_naming_file_and_user(data, timed, tmp_path):
    with pytest.raises(DataError, match=r"users\.parquet: user_index 0 has no timestamps for \d+ items "
                                        r"\(model\.relative_time_bias reads one per item\)"):
        list(stream(with_timestamps(data, tmp_path / "none"), times=True))
    times = pq.read_table(timed / "users.parquet").column("timestamps").to_pylist()
    times[3] = times[3][:-1]
    broken = with_timestamps(timed, tmp_path / "broken", pa.array(times, pa.list_(pa.int64())))
    n = len(times[3]) + 1
    with pytest.raises(DataError, match=rf"user_index 3 has {n - 1} timestamps for {n} items"):
        list(stream(broken, split="test", times=True))
