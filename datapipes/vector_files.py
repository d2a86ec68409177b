"""Reading a file of item vectors for the `vectors` encoder: a .npy matrix, raw little-endian
float32 rows (MISSRec's .featNCLS files), or a Parquet list column (optionally keyed by item_key).
Every reader checks shape and type and answers a bad file with one line naming it."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from datapipes.io import DataError, first_line


def is_list(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)


def read_npy(path: Path) -> np.ndarray:
    try:
        matrix = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: not a readable .npy array ({first_line(e)})") from None
    if matrix.ndim != 2 or not np.issubdtype(matrix.dtype, np.number):
        raise DataError(f"{path}: expected a 2-d numeric array, got shape {matrix.shape} {matrix.dtype}")
    return matrix


def read_raw(path: Path, dim: Optional[int]) -> np.ndarray:
    if not dim:
        raise DataError(f"{path}: raw float32 vectors need --dim (e.g. 512 for MISSRec .featNCLS files)")
    size, row_bytes = path.stat().st_size, 4 * dim
    if size % row_bytes:
        raise DataError(f"{path}: {size} bytes is not a multiple of 4 x dim = {row_bytes}")
    if size == 0:
        return np.zeros((0, dim), np.float32)
    return np.memmap(path, dtype="<f4", mode="r", shape=(size // row_bytes, dim))


def read_parquet(path: Path, column: Optional[str], dim: Optional[int]) -> Tuple[Optional[pa.Array], np.ndarray]:
    """(the item_key column as strings, or None when the file has none; the vectors, one row each).
    `column`: the vector column (default: the file's only list column)."""
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"{path}: not a readable Parquet file ({first_line(e)})") from None
    name = column or only_list_column(path, table)
    if name not in table.column_names:
        raise DataError(f"{path}: no column {name!r} (columns: {', '.join(table.column_names)})")
    vectors = list_column_to_matrix(path, table.column(name).combine_chunks(), name, dim)
    if "item_key" not in table.column_names:
        return None, vectors
    return table.column("item_key").combine_chunks().cast(pa.string()), vectors


def only_list_column(path: Path, table: pa.Table) -> str:
    lists = [f.name for f in table.schema if is_list(f.type)]
    if len(lists) != 1:
        raise DataError(f"{path}: {len(lists)} list columns ({', '.join(lists) or 'none'}); name one with --column")
    return lists[0]


def list_column_to_matrix(path: Path, column: pa.Array, name: str, dim: Optional[int]) -> np.ndarray:
    if not is_list(column.type):
        raise DataError(f"{path}: column {name!r} is {column.type}, not a list of numbers")
    if column.null_count:
        row = int(np.argmax(column.is_null().to_numpy(zero_copy_only=False)))
        raise DataError(f"{path}: row {row} of column {name!r} is null (write zeros for a missing item)")
    lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
    width = int(lengths[0]) if len(lengths) else int(dim or 0)
    if (lengths != width).any():
        row = int(np.argmax(lengths != width))
        raise DataError(f"{path}: row {row} of column {name!r} has {lengths[row]} values, row 0 has {width}")
    values = column.flatten().to_numpy(zero_copy_only=False)
    if not np.issubdtype(values.dtype, np.number):
        raise DataError(f"{path}: column {name!r} holds {values.dtype}, not numbers")
    return values.astype(np.float32, copy=False).reshape(len(column), width)
