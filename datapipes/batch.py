"""The batch that the data pipes hand to the model, in the form TrainPipelineSparseDist expects.

`sparse` holds one KeyedJaggedTensor per TorchRec embedding collection (the model decides the
grouping: one collection per embedding dim, frozen and trainable tables apart). Every table `t` of a
group gets the features ``f"{t}.history"`` and ``f"{t}.target"`` and, when the batch has candidates,
``f"{t}.candidates"``; their values are item indices. The dense tensors carry what the model needs for index arithmetic (padding masks, cluster lookups,
augmentation) and what evaluation needs (the user's full history, for masking seen items).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Dict, Mapping, Optional, Sequence

import numpy as np
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from torchrec.streamable import Pipelineable

PAD = -1  # padding value in `history`; item indices are dense 0..N-1


def row_ids(offsets: torch.Tensor) -> torch.Tensor:
    """The row of each value of jagged lists given by their offsets (rows + 1, starting anywhere)."""
    rows = torch.arange(offsets.numel() - 1, device=offsets.device)
    return torch.repeat_interleave(rows, offsets[1:] - offsets[:-1])

def history_key(table: str) -> str:
    return f"{table}.history"


def target_key(table: str) -> str:
    return f"{table}.target"


@dataclass
class SeqBatch(Pipelineable):
    sparse: Dict[str, KeyedJaggedTensor]
    history: torch.Tensor  # [B, L] int64, left-aligned (oldest first), PAD on the right
    lengths: torch.Tensor  # [B] int64, real history length per row (>= 1)
    target: torch.Tensor  # [B] int64 target item index
    user: torch.Tensor  # [B] int64 user index
    weight: torch.Tensor  # [B] float32: 1 for real rows, 0 for rows padded in so no rank is empty
    seen_offsets: Optional[torch.Tensor] = None  # [B+1] offsets into seen_values (eval only)
    seen_values: Optional[torch.Tensor] = None  # the user's whole history before the target
    candidates: Optional[torch.Tensor] = None  # [C] item ids scored against every row (datapipes.candidates)
    # [B, L + 1] int64 timestamps when the stream reads them: times[b, :lengths[b]] the history's,
    # times[b, lengths[b]] the target's (the time the recommendation is asked for), 0 after.
    times: Optional[torch.Tensor] = None

    def to(self, device: torch.device, non_blocking: bool = False) -> "SeqBatch":
        def move(x):
            if x is None:
                return None
            return x.to(device=device, non_blocking=non_blocking)

        return SeqBatch(
            sparse={k: v.to(device=device, non_blocking=non_blocking) for k, v in self.sparse.items()},
            **{f.name: move(getattr(self, f.name)) for f in fields(self) if f.name != "sparse"},
        )

    def record_stream(self, stream: torch.Stream) -> None:
        for kjt in self.sparse.values():
            kjt.record_stream(stream)
        for f in fields(self):
            x = getattr(self, f.name)
            if isinstance(x, torch.Tensor):
                x.record_stream(stream)

    def pin_memory(self) -> "SeqBatch":
        def pin(x):
            return None if x is None else x.pin_memory()

        return SeqBatch(
            sparse={k: v.pin_memory() for k, v in self.sparse.items()},
            **{f.name: pin(getattr(self, f.name)) for f in fields(self) if f.name != "sparse"},
        )

    @property
    def batch_size(self) -> int:
        return int(self.target.shape[0])


def candidates_key(table: str) -> str:
    return f"{table}.candidates"


def collate(
    history_values: np.ndarray,
    lengths: np.ndarray,
    target: np.ndarray,
    user: np.ndarray,
    max_len: int,
    kjt_groups: Mapping[str, Sequence[str]],
    weight: Optional[np.ndarray] = None,
    seen_offsets: Optional[np.ndarray] = None,
    seen_values: Optional[np.ndarray] = None,
    candidates: Optional[torch.Tensor] = None,
    sequence_rows: bool = True,
    times: Optional[np.ndarray] = None,
    target_time: Optional[np.ndarray] = None,
) -> SeqBatch:
    """Build a SeqBatch from flat numpy arrays, without a Python loop over rows.

    `history_values` is the concatenation of every row's history (oldest first), `lengths[i]` the
    size of row i's slice (each <= max_len).

    `candidates` (item ids; see `datapipes.candidates`) adds a `<table>.candidates` feature to every
    table. The ids sit in row 0 of the jagged feature (lengths [C, 0, ..., 0]), so the sharded lookup
    fetches the candidate rows once per batch and gradients reach trainable tables through the same
    all-to-all as the history rows. `sequence_rows=False` empties the history and target features
    (the keys stay: a sharded collection expects all of its features) for a model that takes those
    vectors from the candidate rows, so their lookups and backward cost nothing.

    `times` (flat like `history_values`) and `target_time` (per row) make `SeqBatch.times`.
    """
    lengths_t = torch.from_numpy(np.ascontiguousarray(lengths, dtype=np.int64))
    values_t = torch.from_numpy(np.ascontiguousarray(history_values, dtype=np.int64))
    target_t = torch.from_numpy(np.ascontiguousarray(target, dtype=np.int64))
    b = int(lengths_t.shape[0])
    # Dense left-aligned history: position of each value within its row.
    offsets = torch.zeros(b + 1, dtype=torch.int64)
    torch.cumsum(lengths_t, 0, out=offsets[1:])
    row = row_ids(offsets)
    col = torch.arange(values_t.numel()) - offsets[row]
    history = torch.full((b, max_len), PAD, dtype=torch.int64)
    history[row, col] = values_t
    dense_times = None
    if times is not None:
        dense_times = torch.zeros((b, max_len + 1), dtype=torch.int64)
        dense_times[row, col] = torch.from_numpy(np.ascontiguousarray(times, dtype=np.int64))
        dense_times[torch.arange(b), lengths_t] = torch.from_numpy(np.ascontiguousarray(target_time, dtype=np.int64))
    return SeqBatch(
        sparse=sparse_features(kjt_groups, values_t, lengths_t, target_t, candidates, sequence_rows),
        history=history,
        lengths=lengths_t,
        target=target_t,
        user=torch.from_numpy(np.ascontiguousarray(user, dtype=np.int64)),
        weight=torch.ones(b, dtype=torch.float32)
        if weight is None
        else torch.from_numpy(np.ascontiguousarray(weight, dtype=np.float32)),
        seen_offsets=None if seen_offsets is None else torch.from_numpy(np.ascontiguousarray(seen_offsets, dtype=np.int64)),
        seen_values=None if seen_values is None else torch.from_numpy(np.ascontiguousarray(seen_values, dtype=np.int64)),
        candidates=candidates,
        times=dense_times,
    )


def sparse_features(
    kjt_groups: Mapping[str, Sequence[str]],
    values: torch.Tensor,
    lengths: torch.Tensor,
    target: torch.Tensor,
    candidates: Optional[torch.Tensor],
    sequence_rows: bool,
) -> Dict[str, KeyedJaggedTensor]:
    """One KJT per group: each table's history, target and (with `candidates`) candidates features."""
    b = int(lengths.shape[0])
    ones = torch.ones(b, dtype=torch.int64)
    if not sequence_rows:
        lengths, ones = torch.zeros(b, dtype=torch.int64), torch.zeros(b, dtype=torch.int64)
        values, target = values[:0], target[:0]
    per_table = [(history_key, values, lengths), (target_key, target, ones)]
    if candidates is not None:
        cand_lengths = torch.zeros(b, dtype=torch.int64)
        cand_lengths[0] = candidates.numel()
        per_table.append((candidates_key, candidates, cand_lengths))
    sparse: Dict[str, KeyedJaggedTensor] = {}
    for group, tables in kjt_groups.items():
        keys = [key(t) for t in tables for key, _, _ in per_table]
        vals = torch.cat([v for _ in tables for _, v, _ in per_table])
        lens = torch.cat([n for _ in tables for _, _, n in per_table])
        sparse[group] = KeyedJaggedTensor(keys=keys, values=vals, lengths=lens)
    return sparse
