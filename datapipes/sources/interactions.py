"""Any interaction log as CSV or Parquet: one row per (user, item, timestamp).

Keys are read as strings (numeric ids stay exact); timestamps become integer seconds from integer,
whole-float, numeric-text, date or timestamp columns. Optional item text comes from a second
CSV/Parquet keyed by the same item column. In messages "row N" counts data rows from 1 and "line N"
is a physical line of a CSV file (header = line 1).
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Dict, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from datapipes.schema import DEFAULT_USERS_PER_ROW_GROUP, DataError
from datapipes.sequences import add_cold_arguments, add_duplicate_arguments, build_sequences

HELP = "an interaction log (CSV or Parquet) of user, item, timestamp columns"

PARQUET_SUFFIXES = {".parquet", ".pq"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--path", type=Path, required=True, help="interaction file (.csv, .tsv or .parquet)")
    parser.add_argument("--user-col", default="user_id", help="user key column (default user_id)")
    parser.add_argument("--item-col", default="item_id", help="item key column (default item_id)")
    parser.add_argument(
        "--time-col", default="timestamp",
        help="timestamp column: integer seconds (ints, whole floats, numeric text), dates or timestamps (default timestamp)",
    )
    parser.add_argument(
        "--delimiter", default=None,
        help="CSV field delimiter (default: tab for .tsv, comma otherwise)",
    )
    parser.add_argument(
        "--item-text", type=Path, default=None,
        help="optional CSV/Parquet of item text, keyed by the --item-col column",
    )
    parser.add_argument("--text-col", default="text", help="text column of --item-text (default text)")
    parser.add_argument(
        "--k-core", type=int, default=5,
        help="iterative k-core on users and items; 0 keeps every interaction (default 5)",
    )
    add_cold_arguments(parser)
    add_duplicate_arguments(parser)
    parser.add_argument("--domain", default=None, help="domain name recorded for users and items (default: file stem)")
    parser.add_argument(
        "--rows-per-group", type=int, default=DEFAULT_USERS_PER_ROW_GROUP,
        help=f"users per Parquet row group in users.parquet (default {DEFAULT_USERS_PER_ROW_GROUP})",
    )


def read_columns(path: Path, columns: Sequence[str], strings: Sequence[str], delimiter: Optional[str] = None) -> pa.Table:
    """Read `columns` from a CSV or Parquet file; `strings` are read as (nullable) strings."""
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: empty file")
    is_parquet = path.suffix.lower() in PARQUET_SUFFIXES
    try:
        if is_parquet:
            _check_columns(path, pq.read_schema(path).names, columns)
            table = pq.read_table(path, columns=list(columns))
        else:
            parse = pacsv.ParseOptions(delimiter=delimiter or ("\t" if path.suffix.lower() == ".tsv" else ","))
            read = pacsv.ReadOptions(use_threads=False)  # keeps row numbers in parse errors
            with pacsv.open_csv(path, read_options=read, parse_options=parse) as header:
                _check_columns(path, header.schema.names, columns)
            table = pacsv.read_csv(
                path,
                read_options=read,
                parse_options=parse,
                convert_options=pacsv.ConvertOptions(
                    include_columns=list(columns),
                    column_types={c: pa.string() for c in strings},
                    strings_can_be_null=True,  # an empty key is a missing key
                ),
            )
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"{path}: cannot read as {'Parquet' if is_parquet else 'CSV'}: {physical_lines(e)}") from None
    if table.num_rows == 0:
        raise DataError(f"{path}: no data rows")
    for name in strings:
        column = table[name]
        if not pa.types.is_string(column.type) and not pa.types.is_large_string(column.type):
            try:
                column = column.cast(pa.string())
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                raise DataError(f"{path}: column {name!r} has type {column.type}; expected string or integer keys") from None
        table = table.set_column(table.column_names.index(name), name, column)
        _check_no_nulls(path, table[name], name)
    return table


def physical_lines(error: Exception) -> str:
    """pyarrow's CSV "Row #N" counts physical lines (header included): call it "line N"."""
    return re.sub(r"Row #(\d+)", r"line \1", str(error))


def _check_columns(path: Path, names: Sequence[str], wanted: Sequence[str]) -> None:
    missing = [c for c in wanted if c not in names]
    if missing:
        raise DataError(f"{path}: no column {missing[0]!r} (columns: {', '.join(names)})")


def _check_no_nulls(path: Path, column: pa.ChunkedArray, name: str) -> None:
    if column.null_count:
        row = int(np.argmax(column.is_null().to_numpy(zero_copy_only=False)))
        raise DataError(f"{path}: row {row + 1}: column {name!r} is empty")


def timestamps_seconds(path: Path, column: pa.ChunkedArray, name: str) -> np.ndarray:
    """int64 seconds from an integer, whole-float or timestamp column."""
    _check_no_nulls(path, column, name)
    type_ = column.type
    if pa.types.is_date(type_):  # CSV dates like 2020-01-31 are inferred as date32
        column, type_ = column.cast(pa.timestamp("s")), pa.timestamp("s")
    if pa.types.is_timestamp(type_):
        return column.cast(pa.timestamp("s", tz=type_.tz), safe=False).cast(pa.int64()).to_numpy()
    if pa.types.is_integer(type_):
        return column.cast(pa.int64()).to_numpy()
    if not pa.types.is_floating(type_):
        # Text (a Parquet string column, or CSV text pyarrow could not read as numbers): accept it
        # only if every value is a number, else name the first row that is not.
        text = column.cast(pa.string())
        numeric = pc.match_substring_regex(text, r"^\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*$")
        numeric = numeric.to_numpy(zero_copy_only=False)
        if not numeric.all():
            row = int(np.argmin(numeric))
            raise DataError(
                f"{path}: row {row + 1}: column {name!r} holds {text[row].as_py()!r}; "
                f"timestamps must be integer seconds (column type {type_})"
            )
        column = pc.utf8_trim_whitespace(text).cast(pa.float64())
    values = column.to_numpy()
    bad = ~np.isfinite(values) | (values != np.floor(values))
    if bad.any():
        row = int(np.argmax(bad))
        raise DataError(f"{path}: row {row + 1}: column {name!r} holds {float(values[row])}, not whole seconds")
    return values.astype(np.int64)


def read_item_text(path: Path, key_col: str, text_col: str, delimiter: Optional[str]) -> Dict[str, str]:
    table = read_columns(path, [key_col, text_col], strings=[key_col], delimiter=delimiter)
    keys = table[key_col]
    if pc.count_distinct(keys).as_py() != len(keys):
        counts = pc.value_counts(keys)
        repeated = counts.filter(pc.greater(counts.field("counts"), 1))[0]["values"].as_py()
        raise DataError(f"{path}: item {repeated!r} has more than one {text_col!r} row")
    texts = table[text_col].cast(pa.string())
    return dict(zip(keys.to_pylist(), texts.to_pylist()))


def run(args: argparse.Namespace, out: Path) -> dict:
    path = Path(args.path)
    table = read_columns(
        path, [args.user_col, args.item_col, args.time_col], strings=[args.user_col, args.item_col],
        delimiter=args.delimiter,
    )
    times = timestamps_seconds(path, table[args.time_col], args.time_col)
    texts = read_item_text(Path(args.item_text), args.item_col, args.text_col, args.delimiter) if args.item_text else None
    stats = build_sequences(
        table[args.user_col],
        table[args.item_col],
        times,
        k_core=args.k_core,
        cold_items=args.cold_items,
        cold_seed=args.cold_seed,
        keep_duplicates=args.keep_duplicates,
        out=out,
        domain=args.domain or path.stem,
        item_text=texts,
        rows_per_group=args.rows_per_group,
        origin=str(path),
    )
    stats.update(source="interactions", path=str(path.resolve()))
    return stats
