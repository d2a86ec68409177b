"""The streaming input pipeline: `users.parquet` row groups in, `SeqBatch`es out.

Training rows are never stored: a user with sequence ``items`` and split point ``train_end`` gives
one row per prefix k in 1..train_end-1 (history ``items[max(0, k-L):k]``, target ``items[k]``),
built on the fly from the Arrow list offsets and flat values with ragged-arange index arithmetic.
With `windows` (one-pass causal training) a user gives one row per window of L targets instead: the
row whose target is items[k] carries history items[k-L:k], and a causal model predicts each of its
positions' next item, so the windows ending at train_end-1, train_end-1-L, ... cover every target once.
With `through_valid` the training part runs to ``valid_end`` instead (the validation target is trained on).
With `times` each row also carries its items' timestamps and its target's (Rows.times).
With `length_buckets` the shuffle buffer batches rows of similar history length and each batch's
dense history is only as wide as its longest row.

Distribution. Each epoch every rank computes the same assignment of work units (row groups or slices
of them) to the `world_size * num_workers` data workers (`datapipes.plan`). Every worker yields the same number of full batches,
enough for its heaviest peer to emit all its rows, re-reading its own units when it runs short:
no rank ever sees an empty or short batch (TorchRec's sharded embeddings cannot take one).

Evaluation gives one row per user (the first `max_users` users only, when given); users are split
over ranks as contiguous ranges and every rank yields the same number of batches, padded with
`weight == 0` dummy rows.

Candidates. A `datapipes.candidates.Candidates` policy, when given, puts each batch's candidate
items into its KJTs as they are collated (none, the catalogue or a seeded sample of negatives).

Resuming: `state_dict()` is (epoch, batches emitted, the plan). The stream is a pure function of
(seed, epoch, worker), so a restored worker replays its epoch without collating and continues with
exactly the batches an uninterrupted run would give. `StatefulDataLoader` saves and restores that
state in each worker.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import pyarrow.parquet as pq
import torch
from torch.utils.data import IterableDataset, get_worker_info
from torchdata.stateful_dataloader import StatefulDataLoader

from datapipes.batch import SeqBatch, collate
from datapipes.candidates import Candidates
from datapipes.plan import (TAG_NEGATIVES, TAG_ORDER, TAG_SAMPLE, TAG_SHUFFLE, Unit, assign_units, cut_units,
                            rows_per_user, split_evenly)
from datapipes.rows import RowGroup, Rows, ShuffleBatcher, ragged_gather
from datapipes.schema import DataError, DatasetInfo

SPLITS = ("train", "valid", "test", "all")  # "all": whole sequences, no target (batch scoring)
DEFAULT_KJT_GROUPS: Mapping[str, Sequence[str]] = {"item": ("item",)}
EXPAND_ROWS = 1 << 15  # training rows materialised at once, bounds memory for long sequences


class SequenceStream(IterableDataset):
    """Batches of one split of a prepared dataset, for one rank (see the module docstring).

    `num_workers` must equal the data loader's worker count (`make_loader` keeps them equal): the
    work plan and the batch count depend on it. Dummy eval rows have ``user == -1``, ``weight == 0``,
    history ``[0]`` and target 0. `steps_per_epoch` (training only) fixes the batches per rank.
    `length_buckets`, `windows`, `through_valid`, `times`, `candidates`, `max_users` (evaluation only): module docstring."""

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
        length_buckets: bool = False, windows: bool = False, through_valid: bool = False, times: bool = False,
        candidates: Optional[Candidates] = None,
        max_users: Optional[int] = None,
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
        self.num_workers, self.through_valid = int(num_workers), bool(through_valid)
        self.length_buckets, self.windows = bool(length_buckets), bool(windows)
        self.candidates, self.epoch, self.times = candidates, 0, bool(times)
        meta = pq.ParquetFile(self.path).metadata
        self.row_group_sizes = np.array([meta.row_group(i).num_rows for i in range(meta.num_row_groups)], np.int64)
        self.num_users = min(int(self.row_group_sizes.sum()), int(max_users or self.row_group_sizes.sum()))
        self._units: Optional[Tuple[int, List[Unit]]] = None  # (planned worker count, units)
        self._resume: Optional[Dict[str, int]] = None
        self._progress: Optional[List[int]] = None  # [epoch, batches emitted] while iterating
        self._file, self._cached = None, None  # Optional: the open users file, (row group, RowGroup)

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

    def plan(self) -> Dict[str, Any]:
        """What the batch sequence depends on besides the epoch; a resume must match it."""
        names = ("split", "rank", "world_size", "num_workers", "seed", "batch_size", "max_len", "prefix_sample",
                 "steps_per_epoch", "length_buckets", "windows") + ("through_valid",) * self.through_valid
        return {name: getattr(self, name) for name in names}  # (through_valid only when on: older plans match)

    def position(self, epoch: int, batches: int) -> Dict[str, Any]:
        """The state of this rank's stream after `batches` batches of `epoch` (a checkpoint's data position)."""
        return {"epoch": int(epoch), "batches": int(batches), "plan": self.plan()}

    def state_dict(self) -> Dict[str, Any]:
        if self._resume is not None:
            return self.position(self._resume["epoch"], self._resume["batches"])
        if self._progress is not None:
            return self.position(*self._progress)
        return self.position(self.epoch, 0)

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Continue from `state` on the next iteration.

        Loaded in a loader worker (as StatefulDataLoader does), `batches` counts that worker's
        batches. Loaded in the trainer process, it counts the rank's batches, e.g.
        ``position(e, steps_done)`` from a checkpoint; the loader's round-robin over workers then
        tells each worker its share. The remaining batches are then exactly those of an
        uninterrupted run, but with loader workers their order can differ (a fresh loader starts at
        worker 0); the loader's own `state_dict` restores the order too. `plan`, when present, must
        match this stream: a ValueError names what changed.
        """
        saved, now = dict(state.get("plan", self.plan())), self.plan()
        changed = [f"{k} {saved.get(k)!r} -> {now.get(k)!r}" for k in {**saved, **now} if saved.get(k) != now.get(k)]
        if changed:
            raise ValueError(f"cannot resume: the data plan changed ({', '.join(changed)})")
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
        rg = RowGroup.read(self._file, i, self.path, self.info.num_items, self.times)
        self._cached = (i, rg)
        return rg

    # ------------------------------------------------------------------------------------------
    # Training plan: units, assignment to workers, batches per worker

    def _loader_workers(self) -> int:
        return max(1, self.num_workers)

    def units(self) -> List[Unit]:
        """Work units for the planned worker count (read once from the training part's end column)."""
        workers = self.world_size * self._loader_workers()
        if self._units is None or self._units[0] != workers:
            units = cut_units(self.path, self.row_group_sizes, workers, self.prefix_sample, self.max_len, self.windows,
                              "valid_end" if self.through_valid else "train_end")
            self._units = (workers, units)
        return self._units[1]

    def assignment(self, epoch: int) -> Tuple[np.ndarray, np.ndarray]:
        """(owner data worker of each unit, training rows per data worker) for an epoch; data worker
        g = rank * num_workers + loader worker."""
        return assign_units(self.units(), self.world_size * self._loader_workers(), self.seed, epoch, self.path)

    def _quotas(self, epoch: int) -> Tuple[np.ndarray, List[int]]:
        """(unit owners, batches per loader worker of this rank) for an epoch."""
        owner, loads = self.assignment(epoch)
        if self.steps_per_epoch is not None:
            return owner, split_evenly(self.steps_per_epoch, self._loader_workers())
        # Enough batches for the heaviest worker to emit every row it owns; lighter ones wrap.
        per_worker = int(max(-(-loads // self.batch_size)))
        return owner, [per_worker] * self._loader_workers()

    def _target_position(self, j: np.ndarray, train_end: np.ndarray) -> np.ndarray:
        """The target position k of a user's j-th row (its history is items[max(0, k-max_len):k]).

        Windows end at train_end-1, train_end-1-max_len, ...: a causal model reading a window's
        history predicts every target in it once, and the windows together cover targets 1..train_end-1.
        """
        return train_end - 1 - j * self.max_len if self.windows else j + 1

    def _expand(self, unit_id: int, unit: Unit, epoch: int, pass_: int) -> Iterator[Rows]:
        """The unit's (sampled) training rows in a random order, EXPAND_ROWS at a time."""
        rg = self._row_group(unit.row_group)
        offsets, values, train_end, valid_end, user_index = rg.users(unit.lo, unit.hi)
        train_end = valid_end if self.through_valid else train_end
        per_user = rows_per_user(train_end, self.max_len, self.windows)
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
                **rg.times_of(target_pos - hist_len, hist_len, target_pos),
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
        group = self._row_group(rg)
        offsets, values, train_end, valid_end, user_index = group.users(lo, hi)
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
            # "all": no target, so the request time is the last item's (as HSTU pads it).
            **group.times_of(offsets[:-1] + end - hist_len, hist_len, offsets[:-1] + end - (self.split == "all")),
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
            times=np.zeros(pad, np.int64) if self.times else None,
            target_time=np.zeros(pad, np.int64) if self.times else None,
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

    def _collate(self, rows: Rows, key: Tuple[int, ...]) -> SeqBatch:
        """The batch of `rows`, with the candidates that `key` (its place in the data) draws."""
        seen_offsets = None
        if rows.seen_lengths is not None:
            seen_offsets = np.concatenate([[0], np.cumsum(rows.seen_lengths)])
        policy = self.candidates
        return collate(
            rows.values, rows.lengths, rows.target, rows.user, self._pad_to(rows), self.kjt_groups,
            weight=rows.weight, seen_offsets=seen_offsets, seen_values=rows.seen_values,
            times=rows.times, target_time=rows.target_time,
            candidates=None if policy is None else policy.draw(key),
            sequence_rows=True if policy is None else policy.sequence_rows,
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
        g = self.rank * self._loader_workers() + worker
        for i, rows in enumerate(source):
            if i < skip:  # replaying up to the restored position: nothing to collate
                continue
            self._progress[1] = i + 1  # counted before the yield: the loader snapshots while we wait
            yield self._collate(rows, (self.seed, epoch, g, i, TAG_NEGATIVES))


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
