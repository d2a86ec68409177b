"""What the model knows of each item besides its vectors, held in a sharded TorchRec table.

One fp32 row per item: its interest cluster per modality (0: none), a flags column (bit i: modality
i is present; bit M: the item may be a finetune softmax negative) and the log of its share of the
training targets (the in-batch negatives' log-Q). The table is row-wise sharded like the item
tables and looked up with them, so no rank holds these N-long columns whole: training reads the
batch's rows from its own KJT, inference and re-clustering look rows up or read the rank's own.
Small integers are exact in fp32 (below 2**24), so clusters and flags round-trip bit for bit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence

import torch
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F

from datapipes.schema import DataError

STATE_TABLE = "item_state"
STATE_GROUP = "state"
MAX_CLUSTERS = 1 << 24  # fp32 holds every integer up to here exactly


def sharding(spec, tables: Sequence[str]):
    """The model's sharding spec (one type, a {table: type} mapping, or None) with the state table
    row-wise: each rank then owns the rows of its `item_slice`, so re-clustering and set-up write
    their own rows without a collective."""
    per_table = dict(spec) if isinstance(spec, Mapping) else {t: spec for t in tables if t != STATE_TABLE}
    return {**per_table, STATE_TABLE: "row_wise"}


def width(modalities: Sequence[str]) -> int:
    """Columns: a cluster per modality, the flags and log-Q, padded to FBGEMM's multiple of 4."""
    return -(-(len(modalities) + 2) // 4) * 4


def default_rows(n: int, modalities: Sequence[str], num_items: int) -> torch.Tensor:
    """n rows of a fresh model: no clusters, every modality present, every item a negative, uniform
    log-Q."""
    rows = torch.zeros(n, width(modalities))
    m = len(modalities)
    rows[:, m] = float((1 << (m + 1)) - 1)
    rows[:, m + 1] = -math.log(num_items)
    return rows


@dataclass
class ItemState:
    """Decoded view of state rows (any leading shape x width)."""

    rows: torch.Tensor
    modalities: List[str]

    @property
    def _flags(self) -> torch.Tensor:
        return self.rows[..., len(self.modalities)].to(torch.int64)

    def clusters(self) -> Dict[str, torch.Tensor]:
        return {m: self.rows[..., i].to(torch.int64) for i, m in enumerate(self.modalities)}

    def present(self) -> Dict[str, torch.Tensor]:
        flags = self._flags
        return {m: (flags >> i) & 1 == 1 for i, m in enumerate(self.modalities)}

    def in_softmax(self) -> torch.Tensor:
        return (self._flags >> len(self.modalities)) & 1 == 1

    def logq(self) -> torch.Tensor:
        return self.rows[..., len(self.modalities) + 1]

    def at(self, index: torch.Tensor) -> "ItemState":
        """Rows of `index` (any shape; negative = padding, read as row 0) of a 1-D item state."""
        return ItemState(F.embedding(index.clamp(min=0), self.rows), self.modalities)

    def map(self, fn) -> "ItemState":
        return ItemState(fn(self.rows), self.modalities)


def write_columns(rows: torch.Tensor, modalities: Sequence[str], *, clusters: Optional[Mapping[str, torch.Tensor]] = None,
                  present: Optional[Mapping[str, torch.Tensor]] = None, in_softmax: Optional[torch.Tensor] = None,
                  logq: Optional[torch.Tensor] = None) -> None:
    """Overwrite the given columns of `rows` (n x width, in place); the others keep their values."""
    modalities = list(modalities)
    m = len(modalities)
    for name, values in (clusters or {}).items():
        if values.numel() and int(values.max()) >= MAX_CLUSTERS:
            raise ValueError(f"cluster ids reach {int(values.max())}: the state table holds ids below {MAX_CLUSTERS}")
        rows[:, modalities.index(name)] = values.to(rows.dtype)
    if present is not None or in_softmax is not None:
        flags = rows[:, m].to(torch.int64)
        for name, values in (present or {}).items():
            bit = 1 << modalities.index(name)
            flags = torch.where(values.to(torch.bool), flags | bit, flags & ~bit)
        if in_softmax is not None:
            bit = 1 << m
            flags = torch.where(in_softmax.to(torch.bool), flags | bit, flags & ~bit)
        rows[:, m] = flags.to(rows.dtype)
    if logq is not None:
        rows[:, m + 1] = logq.to(rows.dtype)


def legacy_clusters(path, modalities: Sequence[str], num_items: int) -> Dict[str, torch.Tensor]:
    """Every item's clusters from a checkpoint written before the item state, which kept them in
    N-long head buffers (`head.assign_<modality>`, int64 or int32): read whole, once, on load."""
    metadata = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    keys = {m: f"head.assign_{m}" for m in modalities}
    lacking = [k for k in keys.values() if f"model.{k}" not in metadata]
    if lacking:
        raise DataError(f"{path}: holds neither the item state nor the cluster buffer {lacking[0]}")
    old = {"model": {k: torch.zeros(num_items, dtype=metadata[f"model.{k}"].properties.dtype) for k in keys.values()}}
    dcp.load(old, storage_reader=dcp.FileSystemReader(str(path)))
    return {m: old["model"][k] for m, k in keys.items()}
