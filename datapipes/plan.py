"""The training work plan: which data worker reads which users each epoch, and for how many batches.

The file is cut into work units (a row group, or a contiguous slice of one when row groups are fewer
than the data workers need). Each epoch every rank computes the same assignment of units to the
`world_size * num_workers` data workers (epoch-seeded shuffle, then greedy largest-first balancing
by training rows) from the `train_end` column alone, so all ranks agree on the number of batches
without a collective.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass
from pathlib import Path
from typing import List, Sequence, Tuple

import numpy as np
import pyarrow.parquet as pq

from datapipes.schema import DataError

UNITS_PER_WORKER = 4  # when row groups are scarce, cut slices so greedy balancing has room to work
# Tags that keep the random streams of the data pipes' different decisions apart.
TAG_ASSIGN, TAG_ORDER, TAG_SAMPLE, TAG_SHUFFLE, TAG_NEGATIVES = 1, 2, 3, 4, 5


@dataclass(frozen=True)
class Unit:
    """Users [lo, hi) of a row group (row-group-local positions) and their training-row counts."""

    row_group: int
    lo: int
    hi: int
    rows: int  # every prefix
    sampled: int  # rows kept per epoch under prefix_sample


def split_evenly(total: int, parts: int) -> List[int]:
    base, rem = divmod(total, parts)
    return [base + (i < rem) for i in range(parts)]


def rows_per_user(train_end: np.ndarray, max_len: int, windows: bool) -> np.ndarray:
    """Training rows of each user: every prefix, or (windows) one per max_len targets."""
    targets = np.maximum(train_end - 1, 0)
    return -(-targets // max_len) if windows else targets


def cut_units(path: Path, row_group_sizes: Sequence[int], workers: int, prefix_sample: float, max_len: int,
              windows: bool, end_column: str = "train_end") -> List[Unit]:
    """Work units for `workers` data workers (read once from the column where the training part ends)."""
    n_rg = len(row_group_sizes)
    want = UNITS_PER_WORKER * workers
    per_rg = 1 if n_rg >= want else math.ceil(want / n_rg)
    pf = pq.ParquetFile(path)
    units: List[Unit] = []
    for rg, size in enumerate(row_group_sizes):
        train_end = pf.read_row_group(rg, columns=[end_column]).column(0).to_numpy().astype(np.int64)
        cum = np.concatenate([[0], np.cumsum(rows_per_user(train_end, max_len, windows))])
        cuts = np.unique(np.linspace(0, size, min(per_rg, size) + 1).astype(np.int64))
        for lo, hi in zip(cuts[:-1], cuts[1:]):
            rows = int(cum[hi] - cum[lo])
            units.append(Unit(rg, int(lo), int(hi), rows, math.ceil(prefix_sample * rows)))
    return units


def assign_units(units: Sequence[Unit], workers: int, seed: int, epoch: int, path: Path) -> Tuple[np.ndarray, np.ndarray]:
    """(owner data worker of each unit, training rows per data worker) for an epoch.

    Largest units first, each to the least loaded worker; the epoch-seeded shuffle decides ties and
    so varies the plan across epochs.
    """
    sampled = np.array([u.sampled for u in units], dtype=np.int64)
    order = np.random.default_rng([seed, epoch, TAG_ASSIGN]).permutation(len(units))
    order = order[np.argsort(-sampled[order], kind="stable")]
    owner = np.empty(len(units), dtype=np.int64)
    heap = [(0, g) for g in range(workers)]
    for u in order:  # one step per unit (hundreds to thousands), not per row
        load, g = heapq.heappop(heap)
        owner[u] = g
        heapq.heappush(heap, (load + int(sampled[u]), g))
    loads = np.bincount(owner, weights=sampled, minlength=workers).astype(np.int64)
    if loads.min() == 0:
        raise DataError(
            f"{path}: {int(sampled.sum())} training rows in {len(units)} units cannot keep "
            f"{workers} data workers busy; use fewer ranks or loader workers"
        )
    return owner, loads
