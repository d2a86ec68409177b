"""A feature table read a row range at a time, from the Parquet row groups that hold the range.

At 1e8 items x 512 values a whole table does not fit one process, so a rank that owns rows
[lo, hi) of a row-wise sharded table must read those rows only. `FeatureRows` is an N x dim view of
`features/<modality>.parquet`: slicing it (`rows[lo:hi, c0:c1]`, what
`missrec_torchrec.distributed.load_table_rows` does per local shard) decodes the row groups that
overlap [lo, hi) one at a time into the result, so a slice holds at most its own rows plus one row
group. The file's row count and vector width are checked from the Parquet metadata when it opens
and the values (finite) as each range is read, with the same one-line messages as the whole-table
reader (`DatasetInfo.load_features`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Optional, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from datapipes.io import DataError

# numpy dtypes of the stored value types (Parquet has float16 and float32; no bfloat16).
STORED_DTYPES = {pa.float16(): np.float16, pa.float32(): np.float32}


def check_finite(vectors: np.ndarray, source: object, first_row: int = 0) -> None:
    """Refuse feature rows holding NaN or inf, naming `source` and the row (= item index)."""
    bad = ~np.isfinite(vectors).all(axis=1)
    if bad.any():
        row = first_row + int(np.argmax(bad))
        raise DataError(f"{source}: row {row} (item {row}) has NaN or inf values")


def open_features(path: Path, modality: str, dim: int, reader):
    """`reader(path)` (pq.read_table or pq.ParquetFile) of a feature table, refused in one line
    naming the file unless it is readable Parquet with `dim` values per row and a 'present' column."""
    if not path.is_file():
        raise DataError(f"{path}: missing (stats.json lists modality {modality!r})")
    try:
        opened = reader(path)
        schema = opened.schema_arrow if isinstance(opened, pq.ParquetFile) else opened.schema
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable Parquet file ({str(e).splitlines()[0]})") from None
    vector = schema.field("vector").type if "vector" in schema.names else None
    if getattr(vector, "list_size", None) != dim or "present" not in schema.names:
        raise DataError(f"{path}: needs a 'vector' column of {dim} values per row (got {vector}) "
                        f"and a 'present' column")
    return opened


def check_row_count(path: Path, rows: int, items: int) -> None:
    if rows != items:
        raise DataError(f"{path}: {rows} feature rows for the dataset's {items} items")


class FeatureRows:
    """A feature table as a lazy `shape = (items, dim)` matrix of its stored dtype (float16 or
    float32). `rows_decoded` counts the rows this view has decoded so far (whole row groups), so a
    caller can check that it read its own range and not the table. The last row group decoded is kept,
    so consecutive ranges (a shard filled piece by piece) decode a shared row group once."""

    def __init__(self, path: Path | str, modality: str, dim: int, items: int):
        self.path = Path(path)
        self.file = open_features(self.path, modality, dim, pq.ParquetFile)
        meta = self.file.metadata
        sizes = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
        self.starts = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
        check_row_count(self.path, int(self.starts[-1]), items)
        value_type = self.file.schema_arrow.field("vector").type.value_type
        if value_type not in STORED_DTYPES:
            raise DataError(f"{self.path}: vector values are {value_type}, not one of float16, float32")
        self.dtype = np.dtype(STORED_DTYPES[value_type])
        self.shape = (items, dim)
        self.rows_decoded = 0
        self._last: Optional[Tuple[int, np.ndarray]] = None  # the last row group decoded, kept for the next range

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key) -> np.ndarray:
        rows, cols = key if isinstance(key, tuple) else (key, slice(None))
        if not isinstance(rows, slice) or not isinstance(cols, slice):
            raise TypeError("FeatureRows takes [lo:hi] or [lo:hi, c0:c1] slices")
        lo, hi, step = rows.indices(self.shape[0])
        if step != 1:
            raise TypeError("FeatureRows reads contiguous row ranges only (step 1)")
        hi = max(lo, hi)
        width = len(range(*cols.indices(self.shape[1])))
        out = np.empty((hi - lo, width), dtype=self.dtype)
        for g_lo, g_hi, values in self.checked(lo, hi):
            out[g_lo - lo : g_hi - lo] = values[:, cols]
        return out

    def checked(self, lo: int, hi: int) -> Iterator[Tuple[int, int, np.ndarray]]:
        """(first row, end row, their vectors) of rows [lo, hi), refused at the first NaN/inf row; one
        row group is decoded at a time, so a pass over the table holds one row group, whatever N is."""
        for group, g_lo, g_hi in self.groups(lo, hi):
            if self._last is not None and self._last[0] == group:  # a range that starts where the last ended
                values = self._last[1]
            else:
                part = self.file.read_row_group(group, columns=["vector"]).column(0)
                values = part.combine_chunks().flatten().to_numpy(zero_copy_only=False).reshape(-1, self.shape[1])
                self.rows_decoded += len(values)
                self._last = (group, values)
            start = int(self.starts[group])
            values = values[g_lo - start : g_hi - start]
            check_finite(values, self.path, g_lo)
            yield g_lo, g_hi, values

    def groups(self, lo: int, hi: int) -> list[Tuple[int, int, int]]:
        """(row group, first row, end row) of the groups overlapping [lo, hi), clipped to it."""
        first = int(np.searchsorted(self.starts, lo, side="right")) - 1
        out = []
        for g in range(max(first, 0), len(self.starts) - 1):
            g_lo, g_hi = max(lo, int(self.starts[g])), min(hi, int(self.starts[g + 1]))
            if g_lo >= hi:
                break
            if g_lo < g_hi:
                out.append((g, g_lo, g_hi))
        return out

    def present(self, lo: int = 0, hi: Optional[int] = None) -> np.ndarray:
        """The present flags of rows [lo, hi) (all N by default): only the 'present' column of the
        row groups holding them is read."""
        hi = self.shape[0] if hi is None else hi
        out = np.zeros(max(0, hi - lo), dtype=bool)
        for group, g_lo, g_hi in self.groups(lo, hi):
            flags = self.file.read_row_group(group, columns=["present"]).column(0).to_numpy(zero_copy_only=False)
            start = int(self.starts[group])
            out[g_lo - lo : g_hi - lo] = flags[g_lo - start : g_hi - start]
        return out
