"""The canonical on-disk dataset that every source writes and everything downstream reads.

A prepared dataset is one folder::

    DIR/
      users.parquet            one row per user, written in row groups as users stream in
      items.parquet            one row per item; item_index is dense 0..N-1 and is the row number
      features/<modality>.parquet   one row per item (row i = item i): vector + present flag
      stats.json               counts, modalities, source and filter settings, schema version

`users.parquet` holds each user's full time-ordered sequence of dense item indices and two split
boundaries. Training targets are ``items[1:train_end]`` (every prefix of the training part), the
validation target is ``items[train_end]`` (history ``items[:train_end]``) and the test target is
``items[valid_end]`` (history ``items[:valid_end]``). Leave-one-out gives ``train_end = n - 2`` and
``valid_end = n - 1``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from datapipes.feature_rows import FeatureRows, check_finite, check_row_count, open_features
from datapipes.io import DataError, staged_file

SCHEMA_VERSION = 1
USERS_FILE = "users.parquet"
ITEMS_FILE = "items.parquet"
FEATURES_DIR = "features"
STATS_FILE = "stats.json"

USERS_SCHEMA = pa.schema(
    [
        pa.field("user_index", pa.int64(), nullable=False),
        pa.field("user_key", pa.string(), nullable=False),
        pa.field("domain", pa.string(), nullable=False),
        pa.field("items", pa.list_(pa.int64()), nullable=False),
        # Seconds since the epoch where the source has them; null for sources without time.
        pa.field("timestamps", pa.list_(pa.int64()), nullable=True),
        pa.field("train_end", pa.int32(), nullable=False),
        pa.field("valid_end", pa.int32(), nullable=False),
    ],
    metadata={b"missrec.schema_version": str(SCHEMA_VERSION).encode()},
)

ITEMS_SCHEMA = pa.schema(
    [
        pa.field("item_index", pa.int64(), nullable=False),
        pa.field("item_key", pa.string(), nullable=False),
        pa.field("domain", pa.string(), nullable=False),
        pa.field("text", pa.string(), nullable=True),
    ],
    metadata={b"missrec.schema_version": str(SCHEMA_VERSION).encode()},
)

FEATURE_DTYPES = {"float16": pa.float16(), "float32": pa.float32()}

# Users per row group unless a source says otherwise: small enough that MovieLens-100K still splits
# across 2 ranks x several workers, large enough to keep Parquet overhead negligible at scale.
DEFAULT_USERS_PER_ROW_GROUP = 4096



def feature_schema(dim: int, dtype: str = "float32") -> pa.Schema:
    if dtype not in FEATURE_DTYPES:
        raise DataError(f"feature dtype {dtype!r} is not one of {sorted(FEATURE_DTYPES)}")
    return pa.schema(
        [
            pa.field("item_index", pa.int64(), nullable=False),
            pa.field("vector", pa.list_(FEATURE_DTYPES[dtype], dim), nullable=False),
            pa.field("present", pa.bool_(), nullable=False),
        ],
        metadata={b"missrec.schema_version": str(SCHEMA_VERSION).encode()},
    )


def feature_path(root: Path | str, modality: str) -> Path:
    return Path(root) / FEATURES_DIR / f"{modality}.parquet"


class UsersWriter:
    """Streams user rows into `users.parquet`, one row group per `rows_per_group` users.

    Call `add` with column batches (any size); user_index is assigned densely in arrival order.
    """

    def __init__(self, path: Path | str, rows_per_group: int = DEFAULT_USERS_PER_ROW_GROUP):
        self.path = Path(path)
        self.rows_per_group = int(rows_per_group)
        self._writer = pq.ParquetWriter(str(self.path), USERS_SCHEMA)
        self._pending: List[pa.Table] = []
        self._pending_rows = 0
        self.users = 0
        self.interactions = 0
        self.training_rows = 0

    def add(
        self,
        user_keys: List[str] | pa.Array,
        domain: str | List[str] | pa.Array,
        items: pa.ListArray,
        train_end: np.ndarray,
        valid_end: np.ndarray,
        timestamps: Optional[pa.ListArray] = None,
    ) -> None:
        n = len(items)
        if n == 0:
            return
        lengths = np.diff(np.asarray(items.offsets)).astype(np.int64)
        train_end = np.asarray(train_end, dtype=np.int32)
        valid_end = np.asarray(valid_end, dtype=np.int32)
        if isinstance(domain, str):
            domain = pa.array([domain] * n, pa.string())
        table = pa.Table.from_arrays(
            [
                pa.array(np.arange(self.users, self.users + n, dtype=np.int64)),
                pa.array(user_keys, pa.string()),
                pa.array(domain, pa.string()),
                items.cast(pa.list_(pa.int64())),
                timestamps.cast(pa.list_(pa.int64()))
                if timestamps is not None
                else pa.nulls(n, pa.list_(pa.int64())),
                pa.array(train_end),
                pa.array(valid_end),
            ],
            schema=USERS_SCHEMA,
        )
        self.users += n
        self.interactions += int(lengths.sum())
        self.training_rows += int(np.maximum(train_end.astype(np.int64) - 1, 0).sum())
        self._pending.append(table)
        self._pending_rows += n
        while self._pending_rows >= self.rows_per_group:
            self._flush(self.rows_per_group)

    def _flush(self, rows: int) -> None:
        table = pa.concat_tables(self._pending)
        head, rest = table.slice(0, rows), table.slice(rows)
        self._writer.write_table(head, row_group_size=rows)
        self._pending = [rest] if rest.num_rows else []
        self._pending_rows = rest.num_rows

    def close(self) -> None:
        if self._pending_rows:
            self._flush(self._pending_rows)
        self._writer.close()


def write_items(path: Path | str, keys, domains, texts=None) -> int:
    n = len(keys)
    table = pa.Table.from_arrays(
        [
            pa.array(np.arange(n, dtype=np.int64)),
            pa.array(keys, pa.string()),
            pa.array(domains, pa.string()) if not isinstance(domains, str) else pa.array([domains] * n, pa.string()),
            pa.array(texts, pa.string()) if texts is not None else pa.nulls(n, pa.string()),
        ],
        schema=ITEMS_SCHEMA,
    )
    pq.write_table(table, str(path), row_group_size=1 << 16)
    return n


class FeatureWriter:
    """Streams a modality's feature rows (in item order) into `features/<modality>.parquet`."""

    def __init__(self, path: Path | str, dim: int, dtype: str = "float32", rows_per_group: int = 1 << 16):
        self.path = Path(path)
        self.dim = int(dim)
        self.dtype = dtype
        self.schema = feature_schema(dim, dtype)
        self.rows_per_group = rows_per_group
        self._writer = pq.ParquetWriter(str(self.path), self.schema)
        self.rows = 0
        self.present = 0

    def add(self, vectors: np.ndarray, present: np.ndarray, source: str = "features") -> None:
        vectors = np.asarray(vectors)
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise DataError(f"{source}: feature rows must be N x {self.dim}, got shape {vectors.shape}")
        check_finite(vectors, source, self.rows)
        np_dtype = np.float16 if self.dtype == "float16" else np.float32
        big = (np.abs(vectors) > np.finfo(np_dtype).max).any(axis=1)
        if big.any():  # would be stored as inf
            raise DataError(f"{source}: row {self.rows + int(np.argmax(big))} overflows {self.dtype}; "
                            f"store float32 (--dtype float32) or normalise the vectors")
        flat = pa.array(np.ascontiguousarray(vectors, dtype=np_dtype).reshape(-1))
        n = vectors.shape[0]
        table = pa.Table.from_arrays(
            [
                pa.array(np.arange(self.rows, self.rows + n, dtype=np.int64)),
                pa.FixedSizeListArray.from_arrays(flat, self.dim),
                pa.array(np.asarray(present, dtype=bool)),
            ],
            schema=self.schema,
        )
        self._writer.write_table(table, row_group_size=self.rows_per_group)
        self.rows += n
        self.present += int(np.asarray(present, dtype=bool).sum())

    def close(self) -> None:
        self._writer.close()


# ----------------------------------------------------------------------------------------------
# Stats and reading


def write_stats(root: Path | str, stats: Dict[str, Any]) -> None:
    stats = {"schema_version": SCHEMA_VERSION, **stats}
    with staged_file(Path(root) / STATS_FILE) as tmp:
        tmp.write_text(json.dumps(stats, indent=2, sort_keys=True) + "\n")


def read_stats(root: Path | str) -> Dict[str, Any]:
    path = Path(root) / STATS_FILE
    if not path.is_file():
        raise DataError(f"{path}: missing; is {root} a prepared dataset (run `missrec prepare`)?")
    try:
        stats = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None
    version = stats.get("schema_version")
    if version != SCHEMA_VERSION:
        raise DataError(f"{path}: schema_version {version!r}, this code reads {SCHEMA_VERSION}")
    return stats


@dataclass(frozen=True)
class ModalityInfo:
    name: str
    dim: int
    dtype: str
    present: int
    path: Path


@dataclass(frozen=True)
class DatasetInfo:
    """What a prepared dataset holds, read from its stats.json and folder."""

    root: Path
    stats: Dict[str, Any]

    @classmethod
    def open(cls, root: Path | str) -> "DatasetInfo":
        root = Path(root)
        stats = read_stats(root)
        for name in (USERS_FILE, ITEMS_FILE):
            if not (root / name).is_file():
                raise DataError(f"{root / name}: missing from the prepared dataset")
        return cls(root=root, stats=stats)

    @property
    def users_path(self) -> Path:
        return self.root / USERS_FILE

    @property
    def items_path(self) -> Path:
        return self.root / ITEMS_FILE

    @property
    def num_users(self) -> int:
        return int(self.stats["users"])

    @property
    def num_items(self) -> int:
        return int(self.stats["items"])

    @property
    def modalities(self) -> Dict[str, ModalityInfo]:
        out = {}
        for name, m in sorted(self.stats.get("modalities", {}).items()):
            out[name] = ModalityInfo(name, int(m["dim"]), m["dtype"], int(m["present"]), feature_path(self.root, name))
        return out

    def load_features(self, modality: str) -> tuple[np.ndarray, np.ndarray]:
        """The whole feature table as (N x dim float32 array, N bool present mask), refused (naming the
        file and row) unless it has one finite row of the recorded dim per item, present or not."""
        m = self.modalities[modality]
        table = open_features(m.path, m.name, m.dim, pq.read_table)
        vec = table.column("vector").combine_chunks()
        values = vec.values.to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(-1, m.dim)
        check_finite(values, m.path)
        self._check_rows(m, len(values))
        return values, table.column("present").to_numpy()

    def feature_rows(self, modality: str) -> FeatureRows:
        """The feature table as a lazy N x dim view in its stored dtype: a slice reads only the row
        groups it overlaps (per-shard loading; `datapipes.feature_rows`)."""
        m = self.modalities[modality]
        rows = FeatureRows(m.path, m.name, m.dim, self.num_items)
        if rows.dtype.name != m.dtype:  # the model sizes its tables by the recorded dtype
            raise DataError(f"{m.path}: vector values are {rows.dtype.name}, stats.json records {m.dtype}")
        return rows

    def iter_features(self, modality: str, batch_rows: int = 1 << 16) -> Iterator[np.ndarray]:
        """The feature table's vectors, a (rows x dim) batch at a time in item order, with
        `load_features`'s checks in flat memory (the row count once the last batch is read). Without
        pre-buffering: pyarrow would otherwise fetch every row group's pages of the file at once."""
        m = self.modalities[modality]
        rows = 0
        opened = open_features(m.path, m.name, m.dim, lambda path: pq.ParquetFile(path, pre_buffer=False))
        for batch in opened.iter_batches(columns=["vector"], batch_size=batch_rows):
            values = batch.column(0).flatten().to_numpy(zero_copy_only=False).reshape(-1, m.dim)
            check_finite(values, m.path, rows)
            rows += len(values)
            yield values
        self._check_rows(m, rows)

    def check_features(self, modality: str, lo: int = 0, hi: Optional[int] = None) -> None:
        """Refuse a bad feature table in one line naming the file (and row): unreadable, another width,
        row count or dtype than stats.json records, or NaN/inf in rows [lo, hi) (default: every row).
        One row group is decoded at a time, so memory stays flat however large the table is."""
        rows = self.feature_rows(modality)
        for _ in rows.checked(lo, self.num_items if hi is None else hi):
            pass

    def _check_rows(self, m: "ModalityInfo", rows: int) -> None:
        check_row_count(m.path, rows, self.num_items)

    def _training_positions(self, through_valid: bool = False):
        """Per row group: (values, position of each value in its list, its row's train_end, or
        valid_end when the validation target is trained on too)."""
        end = "valid_end" if through_valid else "train_end"
        users = pq.ParquetFile(self.users_path)
        for g in range(users.num_row_groups):
            table = users.read_row_group(g, columns=["items", end])
            items = table.column("items").combine_chunks()
            offsets = items.offsets.to_numpy()
            lengths = np.diff(offsets)
            row = np.repeat(np.arange(len(lengths)), lengths)
            values = items.values.to_numpy()
            yield values, np.arange(len(values)) - offsets[:-1][row], table.column(end).to_numpy()[row]

    def training_items(self, through_valid: bool = False) -> np.ndarray:
        """N bools: whether the item occurs in any user's training part (`items[:train_end]`, or
        `items[:valid_end]` with `through_valid`, as `data.train_through_valid` trains). Read one
        row group at a time; items never trained on are the cold-start targets."""
        seen = np.zeros(self.num_items, dtype=bool)
        for values, position, train_end in self._training_positions(through_valid):
            seen[values[position < train_end]] = True
        return seen

    def target_counts(self, through_valid: bool = False) -> np.ndarray:
        """N counts: how often each item is a training target (`items[1:train_end]`, one per prefix;
        `items[1:valid_end]` with `through_valid`).
        Targets are counted N at a time, not per row group: a bincount costs O(N) however few values
        it counts, and a 1e7-item catalogue has thousands of row groups."""
        counts = np.zeros(self.num_items, dtype=np.int64)
        pending: List[np.ndarray] = []
        held = 0
        for values, position, train_end in self._training_positions(through_valid):
            pending.append(values[(position >= 1) & (position < train_end)])
            held += len(pending[-1])
            if held >= self.num_items:
                counts += np.bincount(np.concatenate(pending), minlength=self.num_items)
                pending, held = [], 0
        if pending:
            counts += np.bincount(np.concatenate(pending), minlength=self.num_items)
        return counts


def register_modality(root: Path | str, name: str, dim: int, dtype: str, present: int, encoder: str) -> None:
    """Record a finished feature table in stats.json."""
    stats = read_stats(root)
    stats.setdefault("modalities", {})[name] = {
        "dim": int(dim),
        "dtype": dtype,
        "present": int(present),
        "encoder": encoder,
    }
    stats.pop("schema_version", None)
    write_stats(root, stats)
