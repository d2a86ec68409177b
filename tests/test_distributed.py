"""Two-process gloo runs of the TorchRec plumbing on a toy model shaped like MISSRec's item side:
a frozen feature table (own EC), a trainable item-ID table (own EC) and a dense Linear."""

from __future__ import annotations

import uuid
from typing import Any, Callable, Dict, Tuple

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.launcher.api import LaunchConfig, elastic_launch
from torchrec.modules.embedding_configs import EmbeddingConfig
from torchrec.modules.embedding_modules import EmbeddingCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from missrec_torchrec.distributed import (
    build_optimizer,
    format_plan,
    init_distributed,
    load_table_rows,
    lookup_rows,
    plan_and_shard,
    plan_sharding,
)

NUM_ITEMS, FEAT_DIM, ID_DIM, HIST = 24, 8, 8, 3
FROZEN, TRAINABLE = "text", "item_id"


def pretrained_features() -> torch.Tensor:
    """The 'CLIP' matrix every rank loads, from a fixed seed so all ranks hold the same values."""
    return torch.randn(NUM_ITEMS, FEAT_DIM, generator=torch.Generator().manual_seed(7))


class ToyModel(nn.Module):
    """Each row: HIST history items and one target; the prediction is <history vector, target vector>."""

    def __init__(self, device: torch.device = torch.device("cpu")) -> None:
        super().__init__()

        def table(name: str, dim: int) -> EmbeddingConfig:
            return EmbeddingConfig(
                name=name, embedding_dim=dim, num_embeddings=NUM_ITEMS,
                feature_names=[f"{name}.history", f"{name}.target"],
            )

        meta = torch.device("meta")
        self.features = EmbeddingCollection(tables=[table(FROZEN, FEAT_DIM)], device=meta)
        self.ids = EmbeddingCollection(tables=[table(TRAINABLE, ID_DIM)], device=meta)
        self.adapter = nn.Linear(FEAT_DIM, ID_DIM, device=device)

    def forward(self, feats: KeyedJaggedTensor, ids: KeyedJaggedTensor, label: torch.Tensor) -> torch.Tensor:
        f, e = self.features(feats), self.ids(ids)
        b = label.shape[0]
        hist = self.adapter(f[f"{FROZEN}.history"].values()).view(b, HIST, -1).mean(1)
        hist = hist + e[f"{TRAINABLE}.history"].values().view(b, HIST, -1).mean(1)
        tgt = self.adapter(f[f"{FROZEN}.target"].values()) + e[f"{TRAINABLE}.target"].values()
        return ((hist * tgt).sum(-1) - label).pow(2).mean()


def toy_batch(seed: int, batch_size: int = 8) -> Tuple[KeyedJaggedTensor, KeyedJaggedTensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    history = torch.randint(NUM_ITEMS, (batch_size, HIST), generator=g)
    target = torch.randint(NUM_ITEMS, (batch_size,), generator=g)
    label = torch.randn(batch_size, generator=g)
    lengths = torch.cat([torch.full((batch_size,), HIST), torch.ones(batch_size, dtype=torch.int64)])

    def kjt(table: str) -> KeyedJaggedTensor:
        return KeyedJaggedTensor(
            keys=[f"{table}.history", f"{table}.target"],
            values=torch.cat([history.reshape(-1), target]),
            lengths=lengths,
        )

    return kjt(FROZEN), kjt(TRAINABLE), label


def build_toy(sharding_type, pg, device, output_dtensor=False):
    torch.manual_seed(0)  # same dense init everywhere (DDP also broadcasts rank 0's)
    return plan_and_shard(
        ToyModel(device),
        sharding_type=sharding_type,
        frozen_tables={FROZEN},
        trainable_fused=("rowwise_adagrad", {"lr": 0.1}),
        pg=pg,
        device=device,
        output_dtensor=output_dtensor,
    )


def launch(worker: Callable, nproc: int, *args) -> Dict[int, Any]:
    """Run `worker(*args)` in `nproc` spawned gloo ranks; returns {rank: worker's return value}."""
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=str(uuid.uuid4()),
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",
        max_restarts=0,
        monitor_interval=0.1,
        start_method="spawn",
    )
    return elastic_launch(config, entrypoint=worker)(*args)


def _all_ids() -> torch.Tensor:
    return torch.arange(NUM_ITEMS)


def _train_and_check(sharding_type, output_dtensor: bool) -> None:
    rank, world, device, pg = init_distributed()
    dmp = build_toy(sharding_type, pg, device, output_dtensor)
    full = pretrained_features()
    load_table_rows(dmp, FROZEN, full)
    feats_ec, ids_ec = dmp.module.features, dmp.module.ids

    # The gather helper returns the full matrix on every rank, whoever owns the rows; ranks ask for
    # different id counts (rank 1 for none) and still meet in every all-to-all.
    mine = _all_ids().flip(0)[: NUM_ITEMS // (rank + 1) if rank == 0 else 0]
    got = lookup_rows(feats_ec, f"{FROZEN}.target", mine, chunk_size=5, pg=pg)
    assert torch.equal(got, full[mine]), f"{sharding_type}: gathered rows differ from the loaded matrix"
    frozen_before = lookup_rows(feats_ec, f"{FROZEN}.history", _all_ids(), pg=pg)
    ids_before = lookup_rows(ids_ec, f"{TRAINABLE}.history", _all_ids(), pg=pg)

    optimizer = build_optimizer(dmp, {FROZEN}, torch.optim.Adam, {"lr": 0.02})
    probe = toy_batch(seed=100 + rank)
    with torch.no_grad():
        loss_start = dmp(*probe)
    for step in range(6):
        # A hand-written warm-up over every param group: must not unfreeze the frozen table.
        for group in optimizer.param_groups:
            group["lr"] = 0.05 * min(1.0, (step + 1) / 3)
        optimizer.zero_grad()
        dmp(*toy_batch(seed=1000 * step + rank)).backward()
        optimizer.step()
    with torch.no_grad():
        loss_end = dmp(*probe)

    frozen_after = lookup_rows(feats_ec, f"{FROZEN}.history", _all_ids(), pg=pg)
    ids_after = lookup_rows(ids_ec, f"{TRAINABLE}.history", _all_ids(), pg=pg)
    assert torch.equal(frozen_after, frozen_before), f"{sharding_type}: frozen table changed"
    assert torch.equal(frozen_after, full)
    assert not torch.equal(ids_after, ids_before), f"{sharding_type}: ID table did not train"
    # Probe losses differ per rank: compare the sums.
    losses = torch.stack([loss_start, loss_end])
    dist.all_reduce(losses, group=pg)
    assert losses[1] < losses[0], f"{sharding_type}: loss did not fall ({losses.tolist()})"

    dense = torch.cat([p.detach().reshape(-1) for p in dmp.module.adapter.parameters()])
    gathered = [torch.empty_like(dense) for _ in range(world)]
    dist.all_gather(gathered, dense, group=pg)
    assert all(torch.equal(g, gathered[0]) for g in gathered), "dense params diverged across ranks"
    assert not torch.equal(dense, _initial_adapter()), "dense params did not train"


def _initial_adapter() -> torch.Tensor:
    torch.manual_seed(0)
    lin = ToyModel().adapter
    return torch.cat([p.detach().reshape(-1) for p in lin.parameters()])


def _worker() -> None:
    torch.set_num_threads(1)
    _train_and_check("row_wise", output_dtensor=False)
    _train_and_check("table_wise", output_dtensor=False)
    _train_and_check("row_wise", output_dtensor=True)  # DTensor state_dict path of load_table_rows
    _train_and_check({FROZEN: "column_wise", TRAINABLE: None}, output_dtensor=False)


def test_two_ranks_train_row_wise_and_table_wise():
    launch(_worker, 2)


def test_dry_run_plan_for_any_world_size_without_processes():
    plan = plan_sharding(ToyModel(), sharding_type={FROZEN: "row_wise", TRAINABLE: "table_wise"}, world_size=4)
    text = format_plan(plan)
    assert "row_wise" in text and "table_wise" in text
    shards = plan.plan["features"][FROZEN].sharding_spec.shards
    assert len(shards) == 4 and sum(s.shard_sizes[0] for s in shards) == NUM_ITEMS


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="unknown tables"):
        plan_sharding(ToyModel(), sharding_type={"nope": "row_wise"}, world_size=2)
    with pytest.raises(ValueError, match="data_parallel"):
        plan_sharding(ToyModel(), sharding_type="data_parallel", world_size=2)
