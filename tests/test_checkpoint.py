"""DCP checkpoints of the toy TorchRec model: bit-exact round trips under row_wise and table_wise on two
gloo ranks, 2 -> 1 rank resharding, crash safety of the `latest` pointer and retention."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Dict

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn
from torchrec.optim.keyed import KeyedOptimizerWrapper

import missrec_torchrec.checkpoint as checkpoint
from missrec_torchrec import item_state
from missrec_torchrec.checkpoint import CheckpointManager
from missrec_torchrec.checkpoint_files import best_checkpoint, complete_checkpoints, latest_checkpoint
from missrec_torchrec.distributed import build_optimizer, init_distributed, load_table_rows
from test_distributed import FROZEN, build_toy, launch, pretrained_features, toy_batch


def gather_full(entries: Dict[str, object]) -> Dict[str, torch.Tensor]:
    """Whole tensors behind (possibly sharded) state entries, assembled on every rank with one
    collective: under table_wise a fused-optimizer entry exists only on its owner's rank."""
    local = {}
    for name, value in entries.items():
        if hasattr(value, "local_shards"):  # ShardedTensor
            shards = [(s.metadata.shard_offsets, s.tensor.detach().clone()) for s in value.local_shards()]
            local[name] = (tuple(value.shape), shards)
        else:  # replicated: any rank's copy will do
            local[name] = (tuple(value.shape), [((0,) * value.dim(), value.detach().clone())])
    gathered = [None] * dist.get_world_size() if dist.is_initialized() else [local]
    if dist.is_initialized():
        dist.all_gather_object(gathered, local)
    out: Dict[str, torch.Tensor] = {}
    for rank_entries in gathered:
        for name, (shape, shards) in rank_entries.items():
            for offsets, t in shards:
                full = out.setdefault(name, torch.zeros(shape, dtype=t.dtype))
                full[tuple(slice(o, o + n) for o, n in zip(offsets, t.shape))] = t
    return out


def snapshot(dmp, optimizer) -> Dict[str, torch.Tensor]:
    """Every model tensor and optimizer state tensor (fused Adagrad accumulators, Adam moments/step)."""
    entries = {f"model.{k}": v for k, v in dmp.state_dict().items()}
    for param, states in optimizer.state_dict()["state"].items():
        entries.update({f"optim.{param}.{name}": value for name, value in states.items()})
    return gather_full(entries)


def assert_same(got: Dict[str, torch.Tensor], want: Dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    different = [k for k in want if not torch.equal(got[k], want[k])]
    assert not different, f"not bit-exact: {different}"


def fresh(sharding_type, pg, device):
    dmp = build_toy(sharding_type, pg, device)
    load_table_rows(dmp, FROZEN, pretrained_features())
    return dmp, build_optimizer(dmp, {FROZEN}, torch.optim.Adam, {"lr": 0.02})


def train(dmp, optimizer, steps: int, rank: int, first: int = 0) -> None:
    for step in range(first, first + steps):
        optimizer.zero_grad()
        dmp(*toy_batch(seed=1000 * step + rank)).backward()
        optimizer.step()


def _round_trip_worker(root: str):
    torch.set_num_threads(1)
    rank, _, device, pg = init_distributed()
    saved = {}
    for sharding_type in ("row_wise", "table_wise"):
        manager = CheckpointManager(Path(root) / sharding_type, pg=pg)
        dmp, optimizer = fresh(sharding_type, pg, device)
        train(dmp, optimizer, steps=3, rank=rank)
        expected = snapshot(dmp, optimizer)
        torch.manual_seed(50 + rank), np.random.seed(60 + rank), random.seed(70 + rank)
        manager.save(3, dmp, optimizer, progress={"epoch": 1}, rank_state={"cursor": [rank, 3]})
        draws = (torch.rand(3), np.random.rand(3), random.random())

        # A fresh model and optimizer (no Adam state yet) come back bit-exact, RNG and cursor included.
        dmp2, optimizer2 = fresh(sharding_type, pg, device)
        before = snapshot(dmp2, optimizer2)
        id_table = "model.ids.embeddings.item_id.weight"
        assert not torch.equal(before[id_table], expected[id_table])
        restored = manager.load(dmp2, optimizer2)
        assert_same(snapshot(dmp2, optimizer2), expected)
        assert restored.rank_state == {"cursor": [rank, 3]}
        assert restored.progress == {"epoch": 1, "step": 3, "world_size": 2}
        assert torch.equal(torch.rand(3), draws[0])
        assert np.array_equal(np.random.rand(3), draws[1]) and random.random() == draws[2]

        # Training on from the restore is step-for-step the original run (Adam's step count included).
        train(dmp, optimizer, steps=2, rank=rank, first=3)
        train(dmp2, optimizer2, steps=2, rank=rank, first=3)
        assert_same(snapshot(dmp2, optimizer2), snapshot(dmp, optimizer))
        saved[sharding_type] = expected
    return saved["row_wise"]


@pytest.fixture
def one_rank_group():
    yield init_distributed()
    dist.destroy_process_group()


def test_two_rank_round_trip_is_bit_exact_and_loads_into_one_rank(tmp_path, one_rank_group):
    expected = launch(_round_trip_worker, 2, str(tmp_path))[0]

    _, _, device, pg = one_rank_group
    dmp, optimizer = fresh("table_wise", pg, device)  # 2 ranks, row_wise -> 1 rank, table_wise
    restored = CheckpointManager(tmp_path / "row_wise", pg=pg).load(dmp, optimizer)
    assert_same(snapshot(dmp, optimizer), expected)
    assert restored.rank_state is None  # another world size: no rank's data position applies
    assert restored.progress["epoch"] == 1


# -- crash safety and retention: a plain module, no process group needed ---------------------------


def tiny_model_and_optimizer():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    return model, KeyedOptimizerWrapper(dict(model.named_parameters()), lambda p: torch.optim.Adam(p, lr=0.1))


def tiny_step(model, optimizer) -> None:
    optimizer.zero_grad()
    model(torch.ones(4, 3)).pow(2).sum().backward()
    optimizer.step()


def test_crash_mid_save_keeps_latest_on_the_previous_checkpoint(tmp_path, monkeypatch):
    model, optimizer = tiny_model_and_optimizer()
    manager = CheckpointManager(tmp_path, keep_last=5)
    for step in (1, 2):
        tiny_step(model, optimizer)
        manager.save(step, model, optimizer, progress={"n": step})
    at_step_2 = {k: v.clone() for k, v in model.state_dict().items()}

    tiny_step(model, optimizer)
    monkeypatch.setenv(checkpoint.FAIL_AT_ENV, "manifest")  # tmp folder fully written, never published
    with pytest.raises(SystemExit, match="simulated"):
        manager.save(3, model, optimizer)
    monkeypatch.undo()
    assert (tmp_path / "step_3.tmp").is_dir() and not (tmp_path / "step_3").exists()
    assert latest_checkpoint(tmp_path) == tmp_path / "step_2"
    real_write = checkpoint.write_tmp

    def crash_after_dcp(tmp, state, rank, rank_state):
        real_write(tmp, state, rank, rank_state)
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(checkpoint, "write_tmp", crash_after_dcp)  # dies half-way through the files
    with pytest.raises(RuntimeError, match="simulated"):
        manager.save(4, model, optimizer)
    monkeypatch.undo()

    # The next save cleared step 3's leftover; step 4's is ignored.
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["step_1", "step_2", "step_4.tmp"]
    assert latest_checkpoint(tmp_path) == tmp_path / "step_2"
    model2, optimizer2 = tiny_model_and_optimizer()
    restored = manager.load(model2, optimizer2)
    assert restored.path == tmp_path / "step_2" and restored.progress["n"] == 2
    assert all(torch.equal(model2.state_dict()[k], v) for k, v in at_step_2.items())

    manager.save(5, model, optimizer)  # the next save clears the interrupted ones
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["step_1", "step_2", "step_5"]
    (tmp_path / "latest").unlink()  # a lost pointer falls back to the highest complete step
    assert latest_checkpoint(tmp_path) == tmp_path / "step_5"


def test_retention_keeps_last_k_and_the_best(tmp_path):
    model, optimizer = tiny_model_and_optimizer()
    manager = CheckpointManager(tmp_path, keep_last=2, mode="max")
    for step, metric in [(1, 0.3), (2, 0.5), (3, 0.4), (4, 0.1), (5, None)]:
        tiny_step(model, optimizer)
        manager.save(step, model, optimizer, metric=metric)
    assert sorted(complete_checkpoints(tmp_path)) == [2, 4, 5]
    assert best_checkpoint(tmp_path) == tmp_path / "step_2"
    assert latest_checkpoint(tmp_path) == tmp_path / "step_5"

    model2, optimizer2 = tiny_model_and_optimizer()
    assert manager.load(model2, optimizer2, which="best").progress["step"] == 2


def test_nothing_to_resume_and_bad_paths(tmp_path):
    model, optimizer = tiny_model_and_optimizer()
    assert CheckpointManager(tmp_path / "empty").load(model, optimizer) is None
    with pytest.raises(checkpoint.CheckpointError, match="not a complete checkpoint"):
        CheckpointManager(tmp_path).load(model, optimizer, which=tmp_path / "step_9.tmp")


def test_item_state_round_trips_and_older_cluster_buffers_load_into_it(synthetic_mm, tmp_path):
    """Today's checkpoints carry the sharded item state bit for bit; one written before it (N-long
    int64 `head.assign_<m>` buffers, no state table) loads its clusters into the state, and the
    columns it never saved (presence, softmax flags, log-Q) keep the set-up's values."""
    from test_scale import scale_session

    session = scale_session(synthetic_mm, tmp_path)
    head, n = session.head, session.num_items
    g = torch.Generator().manual_seed(5)
    fresh_rows = session.own_state().clone()  # one rank: every item's row

    clusters = {m: torch.randint(1, head.num_clusters + 1, (n,), generator=g) for m in head.modalities}
    item_state.write_columns(session.own_state(), head.modalities, clusters=clusters)
    written = session.own_state().clone()
    manager = session.checkpoints(tmp_path / "now")
    manager.save(1, session.dmp, None)
    session.own_state().copy_(fresh_rows)
    assert session.load(manager, "latest").absent == []
    assert torch.equal(session.own_state(), written)

    older = {m: torch.randint(1, head.num_clusters + 1, (n,), generator=g) for m in head.modalities}

    class Older(nn.Module):  # the model as checkpoints before the item state saw it
        def state_dict(self, *args, **kwargs):
            state = {k: v for k, v in session.dmp.state_dict().items() if k != session.state_key}
            return {**state, **{f"head.assign_{m}": a for m, a in older.items()}}

    manager = session.checkpoints(tmp_path / "older")
    manager.save(1, Older(), None)
    session.own_state().copy_(fresh_rows)
    assert session.load(manager, "latest").absent == [session.state_key]
    state, fresh = head.state(session.own_state()), head.state(fresh_rows)
    for m in head.modalities:
        assert torch.equal(state.clusters()[m], older[m]), m
        assert torch.equal(state.present()[m], fresh.present()[m]), m
    assert torch.equal(state.in_softmax(), fresh.in_softmax()) and torch.equal(state.logq(), fresh.logq())


def test_block_reader_reads_whole_tensors_in_place_and_falls_back_otherwise(tmp_path, monkeypatch):
    """Whole saved tensors are read straight into their targets, in blocks smaller than a tensor; a
    target of another layout or dtype takes DCP's own path. Both give the saved values bit for bit."""
    import torch.distributed.checkpoint as dcp

    import missrec_torchrec.checkpoint_reader as reader_module
    from missrec_torchrec.checkpoint_reader import BlockReader

    g = torch.Generator().manual_seed(0)
    saved = {"table": torch.randn(1000, 16, generator=g), "half": torch.randn(300, 8, generator=g).half(),
             "dense": torch.randn(8, 8, generator=g)}
    dcp.save(saved, checkpoint_id=str(tmp_path))
    monkeypatch.setattr(reader_module, "BLOCK", 4096)  # several blocks per tensor
    into = {"table": torch.zeros(1000, 16), "half": torch.zeros(300, 8, dtype=torch.float16),
            "dense": torch.zeros(8, 8).T}  # a transposed target: not contiguous
    reader = BlockReader(str(tmp_path))
    dcp.load(into, storage_reader=reader)
    assert reader.direct == 2
    for name in saved:
        assert torch.equal(into[name], saved[name]), name
    cast = {"table": torch.zeros(1000, 16, dtype=torch.float64)}  # another dtype: DCP converts
    reader = BlockReader(str(tmp_path))
    dcp.load(cast, storage_reader=reader)
    assert reader.direct == 0 and torch.equal(cast["table"], saved["table"].double())


def test_block_reader_falls_back_on_a_legacy_archive(tmp_path):
    """A tensor saved in torch's legacy (non-zip) format is not read in place: DCP's own path loads it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.filesystem import FileSystemWriter

    from missrec_torchrec.checkpoint_reader import BlockReader

    real_save = torch.save

    def legacy_save(obj, f, *args, **kwargs):
        return real_save(obj, f, *args, _use_new_zipfile_serialization=False, **kwargs)

    saved = {"table": torch.randn(50, 4, generator=torch.Generator().manual_seed(1))}
    torch.save = legacy_save
    try:
        dcp.save(saved, storage_writer=FileSystemWriter(str(tmp_path)))
    finally:
        torch.save = real_save
    into = {"table": torch.zeros(50, 4)}
    reader = BlockReader(str(tmp_path))
    dcp.load(into, storage_reader=reader)
    assert reader.direct == 0 and torch.equal(into["table"], saved["table"])
