"""The streaming input pipeline: `users.parquet` row groups in, `SeqBatch`es out.

Training rows are never stored: a user with sequence ``items`` and split point ``train_end`` gives
one row per prefix k in 1..train_end-1 (history ``items[max(0, k-L):k]``, target ``items[k]``),
built on the fly from the Arrow list offsets and flat values with ragged-arange index arithmetic.
With `windows` (one-pass causal training) a user gives one row per window of L targets instead: the
row whose target is items[k] carries history items[k-L:k], and a causal model predicts each of its
positions' next item, so the windows ending at train_end-1, train_end-1-L, ... cover every target once.
With `length_buckets` the shuffle buffer batches rows of similar history length and each batch's
dense history is only as wide as its longest row.

Distribution. The file is cut into work units (a row group, or a contiguous slice of one when row
groups are fewer than the data workers need). Each epoch every rank computes the same assignment of
units to the `world_size * num_workers` data workers (epoch-seeded shuffle, then greedy
largest-first balancing by training rows) from the `train_end` column alone, so all ranks agree on
the number of batches without a collective. Every worker yields the same number of full batches,
enough for its heaviest peer to emit all its rows, re-reading its own units when it runs short:
no rank ever sees an empty or short batch (TorchRec's sharded embeddings cannot take one).

Evaluation gives one row per user; users are split over ranks as contiguous ranges and every rank
yields the same number of batches, padded with `weight == 0` dummy rows.

Resuming: `state_dict()` is (epoch, batches emitted). The stream is a pure function of
(seed, epoch, worker), so a restored worker replays its epoch without collating and continues with
exactly the batches an uninterrupted run would give. `StatefulDataLoader` saves and restores that
state in each worker.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import pyarrow.parquet as pq
import torch
from torch.utils.data import IterableDataset, get_worker_info
from torchdata.stateful_dataloader import StatefulDataLoader

from datapipes.batch import SeqBatch, collate
from datapipes.schema import DataError, DatasetInfo

SPLITS = ("train", "valid", "test", "all")  # "all": whole sequences, no target (batch scoring)
DEFAULT_KJT_GROUPS: Mapping[str, Sequence[str]] = {"item": ("item",)}
UNITS_PER_WORKER = 4  # when row groups are scarce, cut slices so greedy balancing has room to work
EXPAND_ROWS = 1 << 15  # training rows materialised at once, bounds memory for long sequences
COLUMNS = ["user_index", "items", "train_end", "valid_end"]
# Tags that keep the random streams of the different decisions apart.
TAG_ASSIGN, TAG_ORDER, TAG_SAMPLE, TAG_SHUFFLE = 1, 2, 3, 4


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

    def __len__(self) -> int:
        return len(self.lengths)

    @staticmethod
    def empty() -> "Rows":
        z = np.zeros(0, dtype=np.int64)
        return Rows(z, z, z, z)

    def take(self, idx: np.ndarray) -> "Rows":
        starts = np.cumsum(self.lengths) - self.lengths
        lengths = self.lengths[idx]
        return Rows(ragged_gather(self.values, starts[idx], lengths), lengths, self.target[idx], self.user[idx])

    def slice(self, lo: int, hi: int) -> "Rows":
        ends = np.cumsum(self.lengths)
        v0 = int(ends[lo - 1]) if lo > 0 else 0
        v1 = int(ends[hi - 1]) if hi > 0 else 0
        return Rows(self.values[v0:v1], self.lengths[lo:hi], self.target[lo:hi], self.user[lo:hi])

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


@dataclass
class RowGroup:
    """One row group's columns as numpy arrays; `offsets` index into the flat `values`."""

    offsets: np.ndarray
    values: np.ndarray
    train_end: np.ndarray
    valid_end: np.ndarray
    user_index: np.ndarray

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

    def users(self, lo: int, hi: int):
        """(offsets, flat values, train_end, valid_end, user_index) of row-group users [lo, hi)."""
        return (
            self.offsets[lo : hi + 1],
            self.values,
            self.train_end[lo:hi],
            self.valid_end[lo:hi],
            self.user_index[lo:hi],
        )


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


class SequenceStream(IterableDataset):
    """Batches of one split of a prepared dataset, for one rank (see the module docstring).

    `num_workers` must equal the data loader's worker count (`make_loader` keeps them equal): the
    work plan and the batch count depend on it. Dummy eval rows have ``user == -1``, ``weight == 0``,
    history ``[0]`` and target 0. `steps_per_epoch` (training only) fixes the batches per rank.
`length_buckets` and `windows`: see the module docstring.
    """

    def __init__(
        self,
        dataset: Path | str,
        split: str = "train",
        batch_size: int = 512,
        max_len: int = 50,
        kjt_groups: Optional[Mapping[str, Sequence[str]]] = None,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle_buffer: int = 16384,
        prefix_sample: float = 1.0,
        with_seen: bool = False,
        steps_per_epoch: Optional[int] = None,
        num_workers: int = 0,
        length_buckets: bool = False,
        windows: bool = False,
    ):
        super().__init__()
        if split not in SPLITS:
            raise ValueError(f"split {split!r} is not one of {SPLITS}")
        if batch_size < 1 or max_len < 1 or shuffle_buffer < 0:
            raise ValueError("batch_size and max_len must be >= 1, shuffle_buffer >= 0")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size {world_size})")
        if not 0.0 < prefix_sample <= 1.0:
            raise ValueError(f"prefix_sample {prefix_sample} must lie in (0, 1]")
        if steps_per_epoch is not None and steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch {steps_per_epoch} must be >= 1")
        if with_seen and split == "train":
            raise ValueError("with_seen is for evaluation splits (valid, test)")
        self.info = DatasetInfo.open(dataset)
        self.path = self.info.users_path
        self.split, self.batch_size, self.max_len = split, int(batch_size), int(max_len)
        self.kjt_groups = dict(kjt_groups or DEFAULT_KJT_GROUPS)
        self.rank, self.world_size, self.seed = int(rank), int(world_size), int(seed)
        self.shuffle_buffer, self.prefix_sample = int(shuffle_buffer), float(prefix_sample)
        self.with_seen, self.steps_per_epoch = with_seen, steps_per_epoch
        self.num_workers = int(num_workers)
        self.length_buckets, self.windows = bool(length_buckets), bool(windows)
        self.epoch = 0
        meta = pq.ParquetFile(self.path).metadata
        self.row_group_sizes = np.array([meta.row_group(i).num_rows for i in range(meta.num_row_groups)], np.int64)
        self.num_users = int(self.row_group_sizes.sum())
        self._units: Optional[Tuple[int, List[Unit]]] = None  # (planned worker count, units)
        self._resume: Optional[Dict[str, int]] = None
        self._progress: Optional[List[int]] = None  # [epoch, batches emitted] while iterating
        self._file: Optional[pq.ParquetFile] = None
        self._cached: Optional[Tuple[int, RowGroup]] = None

    # ------------------------------------------------------------------------------------------
    # Epochs, length and state

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self._progress = None
        self._resume = None

    def __len__(self) -> int:
        """Batches this rank yields in the current epoch (the same on every rank)."""
        if self.split != "train":
            return self._eval_batches_per_rank()
        return sum(self._quotas(self.epoch)[1])

    def _plan(self) -> List[Any]:
        """What the batch sequence depends on besides the epoch; a resume must match it."""
        return [self.split, self.rank, self.world_size, self.num_workers, self.seed, self.batch_size,
                self.max_len, self.prefix_sample, self.steps_per_epoch, self.length_buckets, self.windows]

    def state_dict(self) -> Dict[str, Any]:
        if self._resume is not None:
            epoch, batches = self._resume["epoch"], self._resume["batches"]
        elif self._progress is not None:
            epoch, batches = self._progress
        else:
            epoch, batches = self.epoch, 0
        return {"epoch": epoch, "batches": batches, "plan": self._plan()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Continue from `state` on the next iteration.

        Loaded in a loader worker (as StatefulDataLoader does), `batches` counts that worker's
        batches. Loaded in the trainer process, it counts the rank's batches, e.g.
        ``{"epoch": e, "batches": steps_done}`` from a checkpoint; the loader's round-robin over
        workers then tells each worker its share. The remaining batches are then exactly those of
        an uninterrupted run, but with loader workers their order can differ (a fresh loader starts
        at worker 0); the loader's own `state_dict` restores the order too. `plan`, when present,
        must match this stream.
        """
        if "plan" in state and list(state["plan"]) != self._plan():
            raise ValueError(
                f"cannot resume: the state was saved for (split, rank, world_size, num_workers, seed, batch_size, "
                f"max_len, prefix_sample, steps_per_epoch, length_buckets, windows) = {state['plan']}, this stream has {self._plan()}"
            )
        self.epoch = int(state["epoch"])
        scope = "worker" if get_worker_info() is not None else "rank"
        self._resume = {"epoch": self.epoch, "batches": int(state["batches"]), "scope": scope}
        self._progress = None

    # ------------------------------------------------------------------------------------------
    # Reading

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_file"] = state["_cached"] = None  # open files and cached tables stay per process
        return state

    def _row_group(self, i: int) -> RowGroup:
        """Row group i as numpy arrays, validated (cached: slices of one row group come in runs)."""
        if self._cached is not None and self._cached[0] == i:
            return self._cached[1]
        if self._file is None:
            self._file = pq.ParquetFile(self.path)
        table = self._file.read_row_group(i, columns=COLUMNS)
        items = table.column("items").combine_chunks()
        rg = RowGroup(
            offsets=np.asarray(items.offsets).astype(np.int64),
            values=items.values.to_numpy(),
            train_end=table.column("train_end").to_numpy().astype(np.int64),
            valid_end=table.column("valid_end").to_numpy().astype(np.int64),
            user_index=table.column("user_index").to_numpy().copy(),  # writable, for torch.from_numpy
        )
        rg.check(self.path, self.info.num_items)
        self._cached = (i, rg)
        return rg

    # ------------------------------------------------------------------------------------------
    # Training plan: units, assignment to workers, batches per worker

    def _loader_workers(self) -> int:
        return max(1, self.num_workers)

    def units(self) -> List[Unit]:
        """Work units for the planned worker count (read once from the train_end column)."""
        workers = self.world_size * self._loader_workers()
        if self._units is not None and self._units[0] == workers:
            return self._units[1]
        n_rg = len(self.row_group_sizes)
        want = UNITS_PER_WORKER * workers
        per_rg = 1 if n_rg >= want else math.ceil(want / n_rg)
        pf = pq.ParquetFile(self.path)
        units: List[Unit] = []
        for rg, size in enumerate(self.row_group_sizes):
            train_end = pf.read_row_group(rg, columns=["train_end"]).column(0).to_numpy().astype(np.int64)
            cum = np.concatenate([[0], np.cumsum(self._rows_per_user(train_end))])
            cuts = np.unique(np.linspace(0, size, min(per_rg, size) + 1).astype(np.int64))
            for lo, hi in zip(cuts[:-1], cuts[1:]):
                rows = int(cum[hi] - cum[lo])
                units.append(Unit(rg, int(lo), int(hi), rows, math.ceil(self.prefix_sample * rows)))
        self._units = (workers, units)
        return units

    def assignment(self, epoch: int) -> Tuple[np.ndarray, np.ndarray]:
        """(owner data worker of each unit, training rows per data worker) for an epoch.

        Data worker g = rank * num_workers + loader worker. Largest units first, each to the least
        loaded worker; the epoch-seeded shuffle decides ties and so varies the plan across epochs.
        """
        units = self.units()
        workers = self.world_size * self._loader_workers()
        sampled = np.array([u.sampled for u in units], dtype=np.int64)
        order = np.random.default_rng([self.seed, epoch, TAG_ASSIGN]).permutation(len(units))
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
                f"{self.path}: {int(sampled.sum())} training rows in {len(units)} units cannot keep "
                f"{workers} data workers busy; use fewer ranks or loader workers"
            )
        return owner, loads

    def _quotas(self, epoch: int) -> Tuple[np.ndarray, List[int]]:
        """(unit owners, batches per loader worker of this rank) for an epoch."""
        owner, loads = self.assignment(epoch)
        if self.steps_per_epoch is not None:
            return owner, split_evenly(self.steps_per_epoch, self._loader_workers())
        # Enough batches for the heaviest worker to emit every row it owns; lighter ones wrap.
        per_worker = int(max(-(-loads // self.batch_size)))
        return owner, [per_worker] * self._loader_workers()

    def _rows_per_user(self, train_end: np.ndarray) -> np.ndarray:
        """Training rows of each user: every prefix, or (windows) one per max_len targets."""
        targets = np.maximum(train_end - 1, 0)
        return -(-targets // self.max_len) if self.windows else targets

    def _target_position(self, j: np.ndarray, train_end: np.ndarray) -> np.ndarray:
        """The target position k of a user's j-th row (its history is items[max(0, k-max_len):k]).

        Windows end at train_end-1, train_end-1-max_len, ...: a causal model reading a window's
        history predicts every target in it once, and the windows together cover targets 1..train_end-1.
        """
        return train_end - 1 - j * self.max_len if self.windows else j + 1

    def _expand(self, unit_id: int, unit: Unit, epoch: int, pass_: int) -> Iterator[Rows]:
        """The unit's (sampled) training rows in a random order, EXPAND_ROWS at a time."""
        offsets, values, train_end, _, user_index = self._row_group(unit.row_group).users(unit.lo, unit.hi)
        per_user = self._rows_per_user(train_end)
        cum = np.cumsum(per_user)
        rng = np.random.default_rng([self.seed, epoch, unit_id, pass_, TAG_SAMPLE])
        picked = rng.permutation(unit.rows)[: unit.sampled]
        for lo in range(0, len(picked), EXPAND_ROWS):
            idx = picked[lo : lo + EXPAND_ROWS]
            u = np.searchsorted(cum, idx, side="right")  # row idx belongs to user u ...
            k = self._target_position(idx - (cum[u] - per_user[u]), train_end[u])  # ... target items[k]
            target_pos = offsets[u] + k
            hist_len = np.minimum(k, self.max_len)
            yield Rows(
                values=ragged_gather(values, target_pos - hist_len, hist_len),
                lengths=hist_len,
                target=values[target_pos],
                user=user_index[u],
            )

    def _train_rows(self, epoch: int, worker: int) -> Iterator[Rows]:
        """This loader worker's training batches (as Rows), exactly its quota of them."""
        owner, quotas = self._quotas(epoch)
        quota = quotas[worker]
        g = self.rank * self._loader_workers() + worker
        mine = np.flatnonzero(owner == g)
        units = self.units()
        rng = np.random.default_rng([self.seed, epoch, g, TAG_SHUFFLE])
        batcher = ShuffleBatcher(self.shuffle_buffer, self.batch_size, rng, bucket=self.length_buckets)
        emitted = 0
        pass_ = 0
        while emitted < quota:
            order = np.random.default_rng([self.seed, epoch, g, pass_, TAG_ORDER]).permutation(mine)
            for unit_id in order:
                for rows in self._expand(int(unit_id), units[unit_id], epoch, pass_):
                    for batch in batcher.add(rows):
                        yield batch
                        emitted += 1
                        if emitted == quota:
                            return
            for batch in batcher.flush():
                yield batch
                emitted += 1
                if emitted == quota:
                    return
            pass_ += 1

    # ------------------------------------------------------------------------------------------
    # Evaluation: one row per user, contiguous user ranges per rank, padded batches

    def _rank_users(self, rank: int) -> Tuple[int, int]:
        return rank * self.num_users // self.world_size, (rank + 1) * self.num_users // self.world_size

    def _eval_batches_per_rank(self) -> int:
        most = max(hi - lo for lo, hi in map(self._rank_users, range(self.world_size)))
        return max(1, -(-most // self.batch_size))

    def _eval_rows_of(self, rg: int, lo: int, hi: int) -> Rows:
        offsets, values, train_end, valid_end, user_index = self._row_group(rg).users(lo, hi)
        end = {"valid": train_end, "test": valid_end, "all": np.diff(offsets)}[self.split]
        if (end < 1).any():
            r = int(np.argmax(end < 1))
            raise DataError(
                f"{self.path}: user_index {user_index[r]} has an empty history before its {self.split} target"
            )
        hist_len = np.minimum(end, self.max_len)
        rows = Rows(
            values=ragged_gather(values, offsets[:-1] + end - hist_len, hist_len),
            lengths=hist_len,
            # "all" recommends the item after the whole sequence: none exists yet, item 0 stands in.
            target=values[offsets[:-1] + end] if self.split != "all" else np.zeros(len(end), np.int64),
            user=user_index,
            weight=np.ones(len(end), dtype=np.float32),
        )
        if self.with_seen:
            rows.seen_values = ragged_gather(values, offsets[:-1], end)
            rows.seen_lengths = end
        return rows

    def _padded(self, rows: Rows) -> Rows:
        """Fill up to a full batch with dummy rows of weight 0."""
        pad = self.batch_size - len(rows)
        dummy = Rows(
            values=np.zeros(pad, np.int64),
            lengths=np.ones(pad, np.int64),
            target=np.zeros(pad, np.int64),
            user=np.full(pad, -1, np.int64),
            weight=np.zeros(pad, np.float32),
            seen_values=np.zeros(0, np.int64) if self.with_seen else None,
            seen_lengths=np.zeros(pad, np.int64) if self.with_seen else None,
        )
        return Rows.concat([rows, dummy])

    def _eval_rows(self) -> Iterator[Rows]:
        lo, hi = self._rank_users(self.rank)
        starts = np.concatenate([[0], np.cumsum(self.row_group_sizes)])
        batches = self._eval_batches_per_rank()
        for b in range(batches):
            a, z = min(hi, lo + b * self.batch_size), min(hi, lo + (b + 1) * self.batch_size)
            parts = []
            for rg in range(int(np.searchsorted(starts, a, "right")) - 1, len(self.row_group_sizes)):
                if a >= z or starts[rg] >= z:
                    break
                parts.append(self._eval_rows_of(rg, max(a, starts[rg]) - starts[rg], min(z, starts[rg + 1]) - starts[rg]))
            yield self._padded(Rows.concat(parts))

    # ------------------------------------------------------------------------------------------
    # Iteration

    def _pad_to(self, rows: Rows) -> int:
        # With length buckets the dense history is as wide as the batch's longest row: histories
        # are left-aligned and padding is key-masked, so the model's outputs do not change.
        return int(rows.lengths.max(initial=1)) if self.length_buckets else self.max_len

    def _collate(self, rows: Rows) -> SeqBatch:
        seen_offsets = None
        if rows.seen_lengths is not None:
            seen_offsets = np.concatenate([[0], np.cumsum(rows.seen_lengths)])
        return collate(
            rows.values, rows.lengths, rows.target, rows.user, self._pad_to(rows), self.kjt_groups,
            weight=rows.weight, seen_offsets=seen_offsets, seen_values=rows.seen_values,
        )

    def __iter__(self) -> Iterator[SeqBatch]:
        info = get_worker_info()
        worker, loader_workers = (0, 0) if info is None else (info.id, info.num_workers)
        if loader_workers != self.num_workers:
            raise ValueError(
                f"this stream was planned for num_workers={self.num_workers} but runs under {loader_workers} "
                f"loader workers; build the loader with make_loader(stream)"
            )
        if self.split != "train" and loader_workers > 0:
            raise ValueError(f"{self.split} streams run in the trainer process: use num_workers=0")
        if self._resume is not None:
            epoch, skip = self._resume["epoch"], self._resume["batches"]
            if self._resume["scope"] == "rank" and loader_workers > 0:
                # The loader takes batch i of the rank from worker i % num_workers.
                skip = split_evenly(skip, loader_workers)[worker]
            self._resume = None
        else:
            epoch, skip = self.epoch, 0
        self._progress = [epoch, skip]
        source = self._train_rows(epoch, worker) if self.split == "train" else self._eval_rows()
        for i, rows in enumerate(source):
            if i < skip:  # replaying up to the restored position: nothing to collate
                continue
            self._progress[1] = i + 1  # counted before the yield: the loader snapshots while we wait
            yield self._collate(rows)


def make_loader(stream: SequenceStream, num_workers: Optional[int] = None) -> StatefulDataLoader:
    """A resumable loader over `stream` (already batched, so batch_size=None).

    Passing `num_workers` re-plans the stream for that many loader workers (0 = in this process).
    Workers are not persistent: each epoch's workers get a fresh copy of the stream, so
    `stream.set_epoch(e)` before iterating reaches them.
    """
    if num_workers is not None:
        stream.num_workers = int(num_workers)
    # Its own generator: creating an iterator would otherwise draw from the global torch RNG and
    # shift dropout after a resume (the resumed run creates its iterator at another point).
    return StatefulDataLoader(
        stream,
        batch_size=None,
        num_workers=stream.num_workers,
        generator=torch.Generator().manual_seed(stream.seed * 1_000_003 + stream.epoch),
    )
