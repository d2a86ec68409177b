"""TorchRec distributed plumbing: process group, sharding plan, DMP, optimizers, table I/O.

One code path for CPU (gloo) and GPU (NCCL). The model keeps its embedding tables in
`EmbeddingCollection`s (one per embedding dim; frozen and trainable tables in separate collections)
built on the meta device, so no rank ever allocates a whole table: `plan_and_shard` plans, shards and
materialises only the local shards; `load_table_rows` then fills frozen tables from pretrained
features shard by shard.

Freezing (docs/torchrec-notes.md §4): a frozen table gets a fused EXACT_SGD with lr 0, which keeps no
optimizer state, so a frozen table costs no memory beyond its weights and is left out of the training
optimizer (`build_optimizer`), so no learning-rate schedule can unfreeze it. Models may also
`.detach()` a frozen collection's output to skip its backward altogether.
"""

from __future__ import annotations

import os
import warnings
from datetime import timedelta
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Set, Tuple, Union

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

import torchrec.optim as trec_optim
from torchrec.distributed.embedding import EmbeddingCollectionSharder
from torchrec.distributed.model_parallel import DefaultDataParallelWrapper, DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.types import ShardingEnv, ShardingPlan
from torchrec.modules.embedding_configs import EmbeddingConfig
from torchrec.modules.embedding_modules import EmbeddingCollection
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

# Sharding types verified for EmbeddingCollection on CPU/gloo (docs/torchrec-notes.md §2); data_parallel failed there.
SHARDING_TYPES = ("table_wise", "row_wise", "column_wise")

# Fused optimizers that FBGEMM's CPU kernels support (docs/torchrec-notes.md §3), by the name used in configs.
FUSED_OPTIMIZERS: Dict[str, type] = {
    "rowwise_adagrad": trec_optim.RowWiseAdagrad,  # one accumulator per row: the cheapest adaptive one
    "adagrad": trec_optim.Adagrad,
    "sgd": trec_optim.SGD,
}

ShardingSpec = Union[None, str, Mapping[str, Optional[str]]]
LOAD_ROWS = 1 << 16  # table rows `load_table_rows` reads and copies at once
FusedSpec = Tuple[str, Mapping[str, Any]]


# -- process group ------------------------------------------------------------------------------


def init_distributed(backend: Optional[str] = None) -> Tuple[int, int, torch.device, dist.ProcessGroup]:
    """Join (or create) the default process group; return (rank, world_size, device, pg).

    Under torchrun / TorchX the usual env vars (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) are
    read through the `env://` rendezvous. Without them a one-rank group is created on an in-memory
    store (no port to pick, no race with other jobs), because DMP and DDP need a process group even
    alone. NCCL on `cuda:LOCAL_RANK` when CUDA is available, gloo on CPU otherwise. Idempotent.
    """
    use_cuda = torch.cuda.is_available() and backend != "gloo"
    backend = backend or ("nccl" if use_cuda else "gloo")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            dist.init_process_group(backend=backend, timeout=timedelta(minutes=30))
        else:
            dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)
    pg = dist.group.WORLD
    return dist.get_rank(pg), dist.get_world_size(pg), device, pg


# -- planning and sharding -----------------------------------------------------------------------


def embedding_collections(model: nn.Module) -> Dict[str, EmbeddingCollection]:
    """Every unsharded EmbeddingCollection in `model`, by module path."""
    return {name: m for name, m in model.named_modules() if isinstance(m, EmbeddingCollection)}


def _table_configs(model: nn.Module) -> Dict[str, EmbeddingConfig]:
    return {c.name: c for ec in embedding_collections(model).values() for c in ec.embedding_configs()}


def _constraints(tables: Iterable[str], sharding_type: ShardingSpec) -> Dict[str, ParameterConstraints]:
    tables = list(tables)
    if sharding_type is None or isinstance(sharding_type, str):
        per_table = {t: sharding_type for t in tables}
    else:
        unknown = sorted(set(sharding_type) - set(tables))
        if unknown:
            raise ValueError(f"sharding_type names unknown tables {unknown} (tables: {sorted(tables)})")
        per_table = {t: sharding_type.get(t) for t in tables}
    constraints = {}
    for table, kind in per_table.items():
        if kind is None:
            continue  # the planner's choice
        if kind not in SHARDING_TYPES:
            raise ValueError(f"table {table!r}: sharding type {kind!r} is not one of {SHARDING_TYPES}")
        constraints[table] = ParameterConstraints(sharding_types=[kind])
    return constraints


def plan_sharding(
    model: nn.Module,
    *,
    sharding_type: ShardingSpec = None,
    world_size: int,
    local_world_size: Optional[int] = None,
    compute_device: str = "cpu",
    pg: Optional[dist.ProcessGroup] = None,
) -> ShardingPlan:
    """Plan the model's EmbeddingCollections for `world_size` ranks.

    With `pg` every rank runs the planner and rank 0's plan is broadcast (all ranks must agree); without
    it the plan is computed locally, which is what `--dry-run` needs (any world size, no processes).
    """
    topology = Topology(
        world_size=world_size,
        local_world_size=local_world_size or world_size,
        compute_device=compute_device,
    )
    planner = EmbeddingShardingPlanner(
        topology=topology, constraints=_constraints(_table_configs(model), sharding_type)
    )
    sharders = [EmbeddingCollectionSharder()]
    if pg is not None:
        return planner.collective_plan(model, sharders, pg)
    return planner.plan(model, sharders)


def format_plan(plan: ShardingPlan) -> str:
    """The plan as the planner's tables: per table its sharding type, kernel, ranks and shard extents."""
    return str(plan)


def attach_fused_optimizers(
    model: nn.Module, frozen_tables: Set[str], trainable_fused: FusedSpec
) -> None:
    kind, kwargs = trainable_fused
    if kind not in FUSED_OPTIMIZERS:
        raise ValueError(f"fused optimizer {kind!r} is not one of {sorted(FUSED_OPTIMIZERS)} (CPU kernels)")
    known = set(_table_configs(model))
    if not set(frozen_tables) <= known:
        raise ValueError(f"frozen_tables names unknown tables {sorted(set(frozen_tables) - known)}")
    for path, ec in embedding_collections(model).items():
        tables = [c.name for c in ec.embedding_configs()]
        frozen = [t for t in tables if t in frozen_tables]
        if frozen and len(frozen) != len(tables):
            # One fused optimizer per collection: a mixed one could not be left out of training.
            raise ValueError(f"collection {path!r} mixes frozen {frozen} and trainable tables; split it")
        weights = [ec.embeddings[t].weight for t in tables]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            if frozen:
                apply_optimizer_in_backward(trec_optim.SGD, weights, {"lr": 0.0})
            else:
                apply_optimizer_in_backward(FUSED_OPTIMIZERS[kind], weights, dict(kwargs))


def plan_and_shard(
    model: nn.Module,
    *,
    sharding_type: ShardingSpec = None,
    frozen_tables: Iterable[str] = (),
    trainable_fused: FusedSpec = ("rowwise_adagrad", {"lr": 0.01}),
    pg: dist.ProcessGroup,
    device: torch.device,
    output_dtensor: bool = False,
    find_unused_parameters: bool = False,
) -> DistributedModelParallel:
    """Shard `model`'s EmbeddingCollections across `pg` and wrap the rest in DDP.

    Build the collections on the meta device (`EmbeddingCollection(..., device=torch.device("meta"))`)
    and the dense modules on `device`: DMP allocates only local shards. `sharding_type` is one type for
    all tables, a {table: type or None} mapping, or None for the planner's choice. Tables named in
    `frozen_tables` never change (see module docstring); every other table trains with the fused
    optimizer `trainable_fused = (kind, kwargs)`, kind in FUSED_OPTIMIZERS. Must be called by every rank.
    """
    frozen_tables = set(frozen_tables)
    attach_fused_optimizers(model, frozen_tables, trainable_fused)
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", dist.get_world_size(pg)))
    plan = plan_sharding(
        model,
        sharding_type=sharding_type,
        world_size=dist.get_world_size(pg),
        local_world_size=local_world_size,
        compute_device=device.type,
        pg=pg,
    )
    env = ShardingEnv(dist.get_world_size(pg), dist.get_rank(pg), pg, output_dtensor=output_dtensor)
    return DistributedModelParallel(
        module=model,
        env=env,
        device=device,
        plan=plan,
        sharders=[EmbeddingCollectionSharder()],
        data_parallel_wrapper=DefaultDataParallelWrapper(find_unused_parameters=find_unused_parameters),
    )


# -- optimizers ----------------------------------------------------------------------------------


def build_optimizer(
    dmp: DistributedModelParallel,
    frozen_tables: Iterable[str] = (),
    dense_optimizer: type = torch.optim.Adam,
    dense_kwargs: Optional[Mapping[str, Any]] = None,
) -> CombinedOptimizer:
    """The training optimizer: the trainable tables' fused optimizers plus `dense_optimizer` (Adam by
    default) over the dense parameters that require grad.

    Frozen tables' fused optimizers are left out, so setting `lr` on every param group (warm-up,
    schedulers) cannot unfreeze them (docs/torchrec-notes.md §4); their lr-0 SGD keeps no state to checkpoint.
    Fused optimizers step inside backward; `step()` here only advances the dense one.
    """
    frozen_tables = set(frozen_tables)
    sparse = []
    for module_path, opt in dmp.fused_optimizer.optimizers:
        # Fused params are keyed `embeddings.<table>.weight` within their collection.
        tables = {key.split(".")[-2] for key in opt.params}
        if not tables <= frozen_tables:
            sparse.append((module_path, opt))
    dense_params = {
        name: p for name, p in in_backward_optimizer_filter(dmp.named_parameters()) if p.requires_grad
    }
    kwargs = dict(dense_kwargs or {"lr": 1e-3})
    dense = KeyedOptimizerWrapper(dense_params, lambda params: dense_optimizer(params, **kwargs))
    return CombinedOptimizer([("sparse", CombinedOptimizer(sparse)), ("dense", dense)])


# -- table I/O -----------------------------------------------------------------------------------


def table_weight(dmp: nn.Module, table: str) -> Any:
    suffix = f"embeddings.{table}.weight"
    matches = [(k, v) for k, v in dmp.state_dict().items() if k == suffix or k.endswith("." + suffix)]
    if len(matches) != 1:
        raise KeyError(f"table {table!r}: expected one state_dict key ending in {suffix!r}, got {len(matches)}")
    return matches[0][1]


def local_shards(weight: Any) -> List[Tuple[torch.Tensor, Sequence[int]]]:
    """(local shard tensor, global (row, col) offset) pairs of a table weight, however it is held."""
    if isinstance(weight, DTensor):
        wrapper = weight.to_local()  # LocalShardsWrapper: `.copy_` on it raises; copy per shard
        return list(zip(wrapper.local_shards(), wrapper.local_offsets()))
    if hasattr(weight, "local_shards"):  # ShardedTensor
        return [(s.tensor, s.metadata.shard_offsets) for s in weight.local_shards()]
    return [(weight, (0, 0))]


def own_rows(dmp: nn.Module, table: str, lo: int, hi: int) -> Optional[torch.Tensor]:
    """Rows [lo, hi) of table `table` as a view of this rank's local shard, when one local shard holds
    them with every column (row-wise or replicated); None otherwise (table-wise, column-wise, or a
    range that crosses shards)."""
    weight = table_weight(dmp, table)
    for shard, (r0, c0) in local_shards(weight):
        if c0 == 0 and shard.shape[1] == weight.shape[1] and r0 <= lo and hi <= r0 + shard.shape[0]:
            return shard[lo - r0 : hi - r0]
    return None


@torch.no_grad()
def load_table_rows(dmp: nn.Module, table: str, rows: Any) -> None:
    """Copy a full N x dim matrix into table `table`'s local shards (TW, RW, CW; ShardedTensor or DTensor).

    `rows` is anything sliceable as [r0:r1, c0:c1] (torch tensor, numpy array, np.memmap): each rank
    reads only the slices it owns, `LOAD_ROWS` rows at a time. The state_dict tensors are views of the TBE storage, so the copy
    lands in the live weights. Call after `plan_and_shard` on every rank holding shards.
    """
    weight = table_weight(dmp, table)
    shape = tuple(rows.shape)
    if shape != tuple(weight.shape):
        raise ValueError(f"table {table!r}: rows have shape {shape}, the table is {tuple(weight.shape)}")
    for shard, (r0, c0) in local_shards(weight):
        if shard.numel() == 0:
            continue
        n, d = shard.shape
        # Piece by piece: a 5e6-row shard read at once would exist twice (1.2 GiB more per 128-d fp16 table).
        for a in range(0, n, LOAD_ROWS):
            b = min(n, a + LOAD_ROWS)
            piece = rows[r0 + a : r0 + b, c0 : c0 + d]
            if isinstance(piece, np.ndarray):
                piece = torch.from_numpy(np.ascontiguousarray(piece))
            shard[a:b].copy_(piece.to(device=shard.device, dtype=shard.dtype))


def _feature_order(ec: nn.Module) -> Tuple[List[str], Dict[str, int]]:
    configs = getattr(ec, "_embedding_configs", None) or ec.embedding_configs()
    features = [f for c in configs for f in c.feature_names]
    dims = {f: c.embedding_dim for c in configs for f in c.feature_names}
    return features, dims


@torch.no_grad()
def all_reduce_scalar(value, op: str = "sum", pg: Optional[dist.ProcessGroup] = None,
                      device: Optional[torch.device] = None, dtype: torch.dtype = torch.float64):
    """`value` reduced over the ranks of `pg` ("sum", "min" or "max"), as a Python number; the value
    itself without a process group."""
    t = torch.tensor([value], dtype=dtype, device=device)
    if dist.is_initialized():
        dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}[op],
                        group=pg)
    return t.item()


def first_error(message: Optional[str], pg: Optional[dist.ProcessGroup] = None) -> Optional[str]:
    """The lowest rank's error message, on every rank of `pg` (None when no rank has one).

    Collective: when each rank reads its own rows, only the rank holding a bad row sees it, and the
    others must stop too instead of waiting in the next collective."""
    if not dist.is_initialized() or dist.get_world_size(pg) == 1:
        return message
    messages: List[Optional[str]] = [None] * dist.get_world_size(pg)
    dist.all_gather_object(messages, message, group=pg)
    return next((m for m in messages if m), None)


def lookup_rows(
    ec: nn.Module,
    feature: str,
    ids: torch.Tensor,
    *,
    chunk_size: int = 65536,
    pg: Optional[dist.ProcessGroup] = None,
) -> torch.Tensor:
    """Rows of the table behind `feature` for `ids` (len(ids) x dim), fetched through the (sharded) EC.

    Collective: every rank of `pg` must call it, with its own ids (any count, on the model's device);
    ranks with fewer chunks send dummy lookups so all take part in every all-to-all. The KJT lists the
    EC's features in config order because a sharded EC fixes its input feature order on its first
    call: training batches must use that order too (`datapipes.batch` does). Under
    TrainPipelineSparseDist call it while the pipeline is detached (`pipeline.detach()`), since the
    pipeline rewrites the EC's forward.
    """
    features, dims = _feature_order(ec)
    if feature not in dims:
        raise KeyError(f"feature {feature!r} is not served by this collection (features: {features})")
    device = ids.device
    ids = ids.to(torch.int64).reshape(-1)
    num_chunks = all_reduce_scalar((ids.numel() + chunk_size - 1) // chunk_size, "max", pg, device, torch.int64)
    # One row (stride 1): `feature` holds the chunk; every other feature is empty.
    position = features.index(feature)
    out = []
    for i in range(num_chunks):
        chunk = ids[i * chunk_size : (i + 1) * chunk_size]
        real = chunk.numel()
        if real == 0:
            chunk = torch.zeros(1, dtype=torch.int64, device=device)  # dummy: keeps the rank in the a2a
        lengths = torch.zeros(len(features), dtype=torch.int64, device=device)
        lengths[position] = chunk.numel()
        kjt = KeyedJaggedTensor(keys=features, values=chunk, lengths=lengths)
        out.append(ec(kjt)[feature].values()[:real])
    if not out:
        return torch.zeros(0, dims[feature], device=device)
    return torch.cat(out)
