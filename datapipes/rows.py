"""Blocks of training or evaluation rows as flat numpy arrays, and the shuffle buffer that batches them.

A row is a history (a slice of a user's items, oldest first), a target item and the user. Histories
are ragged: a block keeps them as one flat `values` array with per-row `lengths`, and the helpers
here index such arrays without a Python loop over rows.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Dict, Iterator, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from datapipes.schema import DataError


def ragged_arange(lengths: np.ndarray) -> np.ndarray:
    """[0..l0-1, 0..l1-1, ...]: the position of every element within its segment."""
    lengths = np.asarray(lengths, dtype=np.int64)
    starts = np.cumsum(lengths) - lengths
    return np.arange(int(lengths.sum()), dtype=np.int64) - np.repeat(starts, lengths)


def ragged_gather(values: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenate values[starts[i] : starts[i] + lengths[i]] over i, without a loop."""
    return values[np.repeat(starts, lengths) + ragged_arange(lengths)]


@dataclass
class Rows:
    """A block of rows with ragged histories (flat `values`, per-row `lengths`)."""

    values: np.ndarray
    lengths: np.ndarray
    target: np.ndarray
    user: np.ndarray
    weight: Optional[np.ndarray] = None  # eval only; None = all real rows
    seen_values: Optional[np.ndarray] = None  # eval only: the whole history before the target
    seen_lengths: Optional[np.ndarray] = None
    times: Optional[np.ndarray] = None  # with timestamps: each history value's, flat like `values`
    target_time: Optional[np.ndarray] = None  # ... and each row's target's (the request time)

    def __len__(self) -> int:
        return len(self.lengths)

    @staticmethod
    def empty() -> "Rows":
        z = np.zeros(0, dtype=np.int64)
        return Rows(z, z, z, z)

    def take(self, idx: np.ndarray) -> "Rows":
        """Training rows idx (the eval-only fields are dropped)."""
        starts = np.cumsum(self.lengths) - self.lengths
        lengths = self.lengths[idx]
        flat = lambda a: None if a is None else ragged_gather(a, starts[idx], lengths)  # noqa: E731
        return Rows(flat(self.values), lengths, self.target[idx], self.user[idx], times=flat(self.times),
                    target_time=None if self.target_time is None else self.target_time[idx])

    def slice(self, lo: int, hi: int) -> "Rows":
        """Training rows lo..hi-1 (the eval-only fields are dropped)."""
        ends = np.cumsum(self.lengths)
        v0 = int(ends[lo - 1]) if lo > 0 else 0
        v1 = int(ends[hi - 1]) if hi > 0 else 0
        return Rows(self.values[v0:v1], self.lengths[lo:hi], self.target[lo:hi], self.user[lo:hi],
                    times=None if self.times is None else self.times[v0:v1],
                    target_time=None if self.target_time is None else self.target_time[lo:hi])

    @staticmethod
    def concat(parts: Sequence["Rows"]) -> "Rows":
        """Rows of all parts in order; an optional field is kept when every part has it."""
        parts = [p for p in parts if len(p)]
        if len(parts) <= 1:
            return parts[0] if parts else Rows.empty()
        columns = {}
        for f in fields(Rows):
            arrays = [getattr(p, f.name) for p in parts]
            columns[f.name] = None if any(a is None for a in arrays) else np.concatenate(arrays)
        return Rows(**columns)


class ShuffleBatcher:
    """A bounded shuffle buffer over training rows that hands out full batches.

    Rows beyond `capacity` leave the pool in a random order; `flush` (end of a pass over the
    worker's units) empties it. The remainder that does not fill a batch is carried into the very
    next batch, so a pass's rows all go out within ceil(rows / batch_size) batches.

    `bucket`: the rows leaving together are sorted by history length before they are cut into
    batches, and the batches go out in a random order, so each batch holds rows of similar length
    (and pads little once collated to its own longest row). Ties keep the random order. Only the
    batch that completes the previous pass's carry mixes lengths.
    """

    def __init__(self, capacity: int, batch_size: int, rng: np.random.Generator, bucket: bool = False):
        self.capacity, self.batch_size, self.rng, self.bucket = capacity, batch_size, rng, bucket
        self.pool = Rows.empty()
        self.carry = Rows.empty()

    def add(self, rows: Rows) -> Iterator[Rows]:
        self.pool = Rows.concat([self.pool, rows])
        if len(self.pool) > self.capacity:
            yield from self._emit(len(self.pool) - self.capacity)

    def flush(self) -> Iterator[Rows]:
        yield from self._emit(len(self.pool))

    def _emit(self, n: int) -> Iterator[Rows]:
        perm = self.rng.permutation(len(self.pool))
        carried = len(self.carry)
        out = Rows.concat([self.carry, self.pool.take(perm[:n])])
        self.pool = self.pool.take(perm[n:])
        full = len(out) // self.batch_size * self.batch_size
        rest = out.slice(full, len(out))
        if self.bucket and len(self.pool) and (full or not carried):
            # Mid-pass the remainder can wait in the pool, so that no batch mixes lengths; only a
            # carry from the end of a pass must go out in the very next batch.
            self.pool, self.carry = Rows.concat([self.pool, rest]), Rows.empty()
        else:
            self.carry = rest
        if not self.bucket:
            for lo in range(0, full, self.batch_size):
                yield out.slice(lo, lo + self.batch_size)
            return
        head = self.batch_size if carried and full else 0  # the carry's batch goes first, unsorted
        body = out.slice(head, full)
        body = body.take(np.argsort(body.lengths, kind="stable"))
        if head:
            yield out.slice(0, head)
        for lo in self.rng.permutation(np.arange(0, len(body), self.batch_size)):
            yield body.slice(int(lo), int(lo) + self.batch_size)


COLUMNS = ["user_index", "items", "train_end", "valid_end"]


@dataclass
class RowGroup:
    """One row group's columns as numpy arrays; `offsets` index into the flat `values` (and `times`)."""

    offsets: np.ndarray
    values: np.ndarray
    train_end: np.ndarray
    valid_end: np.ndarray
    user_index: np.ndarray
    times: Optional[np.ndarray] = None  # each item's timestamp, when read

    @staticmethod
    def read(file: pq.ParquetFile, i: int, path: Path, num_items: int, times: bool = False) -> "RowGroup":
        """Row group i of a users file, validated; `times` reads the timestamps too (none may be null)."""
        table = file.read_row_group(i, columns=COLUMNS + ["timestamps"] * times)
        items = table.column("items").combine_chunks()
        rg = RowGroup(
            offsets=np.asarray(items.offsets).astype(np.int64),
            values=items.values.to_numpy(),
            train_end=table.column("train_end").to_numpy().astype(np.int64),
            valid_end=table.column("valid_end").to_numpy().astype(np.int64),
            user_index=table.column("user_index").to_numpy().copy(),  # writable, for torch.from_numpy
        )
        rg.check(path, num_items)
        if times:
            rg.times = rg.read_times(table.column("timestamps").combine_chunks(), path)
        return rg

    def read_times(self, column: pa.ListArray, path: Path) -> np.ndarray:
        """The flat timestamps, one per item: a user without them is a DataError."""
        n = np.diff(self.offsets)
        counts = column.value_lengths().fill_null(-1).to_numpy(zero_copy_only=False)
        if (counts != n).any():
            r = int(np.argmax(counts != n))
            have = "no timestamps" if counts[r] < 0 else f"{counts[r]} timestamps"
            raise DataError(f"{path}: user_index {self.user_index[r]} has {have} for {n[r]} items "
                            f"(model.relative_time_bias reads one per item)")
        flat = np.zeros(len(self.values), np.int64)  # aligned with `values`, which `offsets` index
        flat[self.offsets[0] : self.offsets[-1]] = column.flatten().to_numpy()
        return flat

    def check(self, path: Path, num_items: int) -> None:
        n = np.diff(self.offsets)
        bad = (self.train_end < 0) | (self.train_end > self.valid_end) | (self.valid_end >= n)
        if bad.any():
            r = int(np.argmax(bad))
            raise DataError(
                f"{path}: user_index {self.user_index[r]} has train_end {self.train_end[r]}, valid_end "
                f"{self.valid_end[r]} for {n[r]} items (need 0 <= train_end <= valid_end < items)"
            )
        if len(self.values) and (self.values.min() < 0 or self.values.max() >= num_items):
            first = int(np.argmax((self.values < 0) | (self.values >= num_items)))
            r = int(np.searchsorted(self.offsets, first, "right")) - 1
            raise DataError(f"{path}: user_index {self.user_index[r]} has an item index outside 0..{num_items - 1}")

    def times_of(self, starts: np.ndarray, lengths: np.ndarray, target_pos: np.ndarray) -> Dict[str, np.ndarray]:
        """Rows' `times` and `target_time` fields ({} when no times were read); positions index `values`."""
        if self.times is None:
            return {}
        return {"times": ragged_gather(self.times, starts, lengths), "target_time": self.times[target_pos]}

    def users(self, lo: int, hi: int):
        """(offsets, flat values, train_end, valid_end, user_index) of row-group users [lo, hi)."""
        return (
            self.offsets[lo : hi + 1],
            self.values,
            self.train_end[lo:hi],
            self.valid_end[lo:hi],
            self.user_index[lo:hi],
        )



def check_times(path: Path, num_items: int, rank: int = 0, world: int = 1) -> None:
    """Refuse (DataError) a users file without one timestamp per item; this rank reads row groups
    rank, rank + world, ... (with the items: `RowGroup.read` checks both)."""
    file = pq.ParquetFile(path)
    for i in range(rank, file.metadata.num_row_groups, world):
        RowGroup.read(file, i, path, num_items, times=True)
