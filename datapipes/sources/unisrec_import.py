"""The official MISSRec / UniSRec atomic folder as a `missrec prepare` source (`unisrec_export` writes it back).

A downstream folder ``NAME/`` holds (docs/model.md section 11)::

    NAME.train.inter  NAME.valid.inter  NAME.test.inter   TSV: user_id, item_id_list, item_id
    NAME.feat1CLS  NAME.feat3CLS  [NAME.feat2CLS]          raw little-endian float32, N x 512

History tokens are 0-based item indices (row i of the feature files is item i) and are truncated
to the last 50 items, so full sequences are rebuilt from the train rows. UniSRec's
``convert_to_atomic_files`` writes a user's train rows longest prefix first (target = last train
item, then the one before, ..., target = item 1 with history [item 0]); a file written shortest
prefix first is read as well (a user's first row then has a one-item history). Every row's history
is then checked against the rebuilt sequence.

A pre-training folder adds ``NAME.pt_datasets`` (one line: comma-separated domain names), item
and user tokens ``"<domainIdx>-<id>"`` and per-domain feature files ``<domain>.feat*CLS``
(UniSRec's ``to_pretrain_atomic_files`` and ``PretrainUniSRecDataset``). Items are numbered
domain by domain: item ``"d-i"`` gets index ``offset[d] + i``.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from datapipes.schema import (DEFAULT_USERS_PER_ROW_GROUP, FEATURE_DTYPES, ITEMS_FILE, USERS_FILE, DataError, UsersWriter,
                              write_items)
from datapipes.sequences import encode_keys
from datapipes.sources.interactions import physical_lines
from datapipes.sources.unisrec_layout import HEADER, HISTORY_WINDOW, Layout, read_layout, scan_features, write_features

HELP = "the official MISSRec/UniSRec atomic folder (NAME.{train,valid,test}.inter + NAME.feat*CLS)"
TRAIN_BLOCK_BYTES = 16 << 20  # train.inter is streamed twice in blocks of this size


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folder", type=Path, nargs="?", default=None, metavar="FOLDER",
                        help="the atomic folder (e.g. dataset/downstream/Scientific_mm_full)")
    parser.add_argument("--path", type=Path, default=None, help="the atomic folder, as a flag (same as FOLDER)")
    parser.add_argument("--name", default=None, help="file name stem inside the folder (default: the folder name)")
    parser.add_argument("--feat-dim", type=int, default=512, help="feature width of the .feat*CLS files (default 512)")
    parser.add_argument("--dtype", choices=sorted(FEATURE_DTYPES), default="float32",
                        help="stored feature precision (default float32; float16 halves the tables)")
    parser.add_argument(
        "--rows-per-group", type=int, default=DEFAULT_USERS_PER_ROW_GROUP,
        help=f"users per Parquet row group in users.parquet (default {DEFAULT_USERS_PER_ROW_GROUP})",
    )


# ----------------------------------------------------------------------------------------------
# Tokens and .inter rows


class BadToken(Exception):
    def __init__(self, position: int, reason: str):
        super().__init__(reason)
        self.position, self.reason = position, reason


class TokenParser:
    """Item tokens -> dense item indices: "i" (downstream) or "d-i" (pre-training)."""

    def __init__(self, layout: Layout, domain_sizes: np.ndarray):
        self.layout = layout
        self.sizes = domain_sizes
        self.offsets = np.concatenate([[0], np.cumsum(domain_sizes)])

    def __call__(self, tokens: pa.Array) -> np.ndarray:
        if self.layout.pretrain:
            parts = pc.extract_regex(tokens, r"^(?P<d>[0-9]{1,9})-(?P<i>[0-9]{1,18})$")
            self._check(parts.is_valid(), tokens, "is not <domainIdx>-<id>")
            domain = pc.cast(pc.struct_field(parts, "d"), pa.int64()).to_numpy()
            local = pc.cast(pc.struct_field(parts, "i"), pa.int64()).to_numpy()
            beyond = domain >= len(self.sizes)
            if beyond.any():
                pos = int(np.argmax(beyond))
                raise BadToken(pos, f"item {tokens[pos]}: domain index {domain[pos]} is beyond the "
                                    f"{len(self.sizes)} domains of {self.layout.name}.pt_datasets")
        else:
            self._check(pc.match_substring_regex(tokens, r"^[0-9]{1,18}$"), tokens, "is not an item index")
            domain = np.zeros(len(tokens), np.int64)
            local = pc.cast(tokens, pa.int64()).to_numpy()
        beyond = local >= self.sizes[domain]
        if beyond.any():
            pos = int(np.argmax(beyond))
            raise BadToken(pos, f"item id {tokens[pos]} is beyond the {self.sizes[domain[pos]]} feature rows")
        return self.offsets[domain] + local

    @staticmethod
    def _check(ok: pa.Array, tokens: pa.Array, what: str) -> None:
        ok = ok.to_numpy(zero_copy_only=False)
        if not ok.all():
            pos = int(np.argmin(ok))
            raise BadToken(pos, f"item token {tokens[pos].as_py()!r} {what}")


@dataclass
class InterRows:
    """Parsed .inter rows: user keys, histories as (offsets, item indices), targets."""

    path: Path
    first_line: int
    users: pa.Array
    offsets: np.ndarray
    history: np.ndarray
    target: np.ndarray

    def __len__(self) -> int:
        return len(self.target)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def where(self, row: int) -> str:
        return f"{self.path}: line {self.first_line + row}"


def iter_inter(path: Path) -> Iterator[Tuple[int, pa.RecordBatch]]:
    """(line number of the batch's first row, batch) for a .inter file, header checked."""
    try:
        reader = pacsv.open_csv(
            path,
            # Single-threaded so parse errors carry the row number.
            read_options=pacsv.ReadOptions(use_threads=False, block_size=TRAIN_BLOCK_BYTES),
            parse_options=pacsv.ParseOptions(delimiter="\t", quote_char=False),
            convert_options=pacsv.ConvertOptions(column_types={h: pa.string() for h in HEADER}, strings_can_be_null=False),
        )
        if reader.schema.names != HEADER:
            raise DataError(f"{path}: line 1: header {reader.schema.names} is not {HEADER}")
        line = 2
        for batch in reader:
            yield line, batch
            line += batch.num_rows
    except pa.ArrowInvalid as e:
        raise DataError(f"{path}: {physical_lines(e)}") from None


def parse_rows(path: Path, first_line: int, batch: pa.RecordBatch, tokens: TokenParser) -> InterRows:
    users, history, target = (batch.column(i) for i in range(3))
    for column, what in ((users, "user id"), (history, "history (item_id_list)"), (target, "target item")):
        empty = pc.equal(column, "").to_numpy(zero_copy_only=False)
        if empty.any():
            raise DataError(f"{path}: line {first_line + int(np.argmax(empty))}: empty {what}")
    lists = pc.split_pattern(history, " ")
    offsets = np.asarray(lists.offsets, dtype=np.int64)
    try:
        items = tokens(lists.values.slice(offsets[0], offsets[-1] - offsets[0]))
    except BadToken as bad:
        row = int(np.searchsorted(offsets - offsets[0], bad.position, side="right")) - 1
        raise DataError(f"{path}: line {first_line + row}: history {bad.reason}") from None
    try:
        targets = tokens(target)
    except BadToken as bad:
        raise DataError(f"{path}: line {first_line + bad.position}: target {bad.reason}") from None
    return InterRows(path, first_line, users, offsets - offsets[0], items, targets)


def read_split(path: Path, tokens: TokenParser) -> InterRows:
    """A whole valid/test file (one row per user), with duplicate users rejected."""
    batches = [b for _, b in iter_inter(path)]
    table = pa.Table.from_batches(batches, schema=pa.schema([(h, pa.string()) for h in HEADER])).combine_chunks()
    if table.num_rows == 0:
        raise DataError(f"{path}: no rows after the header")
    rows = parse_rows(path, 2, table.to_batches()[0], tokens)
    codes, _ = encode_keys(rows.users)
    seen_before = np.ones(len(codes), dtype=bool)
    seen_before[np.unique(codes, return_index=True)[1]] = False
    if seen_before.any():
        row = int(np.argmax(seen_before))
        raise DataError(f"{rows.where(row)}: user {rows.users[row]} has a second row (one row per user expected)")
    return rows


def user_positions(rows: InterRows, users: pa.Array, other: Path) -> np.ndarray:
    """Index of each row's user in `users` (the valid file's users); error if absent."""
    pos = pc.index_in(rows.users, value_set=users)
    if pos.null_count:
        row = int(np.argmax(pos.is_null().to_numpy(zero_copy_only=False)))
        raise DataError(f"{rows.where(row)}: user {rows.users[row]} has no row in {other.name}")
    return pos.to_numpy(zero_copy_only=False).astype(np.int64)


def check_windows(rows: InterRows, seq_start: np.ndarray, k: np.ndarray, sequences: np.ndarray) -> None:
    """Row r's history must be the last <= 50 of its user's first k[r] items."""
    want = np.minimum(k, HISTORY_WINDOW)
    wrong_length = rows.lengths != want
    if wrong_length.any():
        row = int(np.argmax(wrong_length))
        raise DataError(
            f"{rows.where(row)}: history of user {rows.users[row]} has {rows.lengths[row]} items; the sequence "
            f"rebuilt from the train rows puts {want[row]} items before this target"
        )
    within = np.arange(len(rows.history)) - np.repeat(rows.offsets[:-1], want)
    expected = sequences[np.repeat(seq_start + k - want, want) + within]
    differs = expected != rows.history
    if differs.any():
        pos = int(np.argmax(differs))
        row = int(np.searchsorted(rows.offsets, pos, side="right")) - 1
        raise DataError(
            f"{rows.where(row)}: history of user {rows.users[row]} does not match its sequence rebuilt from the "
            f"train rows (history item {pos - rows.offsets[row] + 1} is {rows.history[pos]}, expected {expected[pos]})"
        )


# ----------------------------------------------------------------------------------------------
# Import


def rebuild_sequences(layout: Layout, tokens: TokenParser, valid: InterRows, test: InterRows):
    """Full item sequences of the valid file's users: (offsets, flat items, train rows per user)."""
    train_path = layout.inter("train")
    n_users = len(valid)
    test_user = user_positions(test, valid.users, layout.inter("valid"))
    if len(test) != n_users:
        missing = np.setdiff1d(np.arange(n_users), test_user)[0]
        raise DataError(f"{valid.where(int(missing))}: user {valid.users[int(missing)]} has no row in {layout.inter('test').name}")

    # Pass 1: per train row its user, target and the first history item.
    user_parts, target_parts, length_parts, first_parts = [], [], [], []
    for line, batch in iter_inter(train_path):
        rows = parse_rows(train_path, line, batch, tokens)
        user_parts.append(user_positions(rows, valid.users, layout.inter("valid")))
        target_parts.append(rows.target)
        length_parts.append(rows.lengths)
        first_parts.append(rows.history[rows.offsets[:-1]])
    concat = lambda parts: np.concatenate(parts) if parts else np.zeros(0, np.int64)  # noqa: E731
    row_user, row_target, row_length, row_first = map(concat, (user_parts, target_parts, length_parts, first_parts))

    # Position k of each row's target in its user's sequence, from the row's rank within the user.
    train_rows = np.bincount(row_user, minlength=n_users)
    by_user = np.argsort(row_user, kind="stable")
    group_start = np.concatenate([[0], np.cumsum(train_rows)])[:-1]
    rank = np.arange(len(by_user)) - group_start[row_user[by_user]]
    users_with_rows = train_rows > 0
    shortest_first = np.zeros(n_users, dtype=bool)
    shortest_first[users_with_rows] = row_length[by_user[group_start[users_with_rows]]] == 1
    sorted_user = row_user[by_user]
    k = np.empty(len(by_user), np.int64)
    k[by_user] = np.where(shortest_first[sorted_user], rank + 1, train_rows[sorted_user] - rank)

    no_rows = ~users_with_rows & (valid.lengths != 1)
    if no_rows.any():
        u = int(np.argmax(no_rows))
        raise DataError(
            f"{valid.where(u)}: user {valid.users[u]} has no row in {train_path.name} but a "
            f"{valid.lengths[u]}-item validation history (only a 1-item history needs no train row)"
        )

    lengths = train_rows + 3
    seq_offsets = np.concatenate([[0], np.cumsum(lengths)])
    start = seq_offsets[:-1]
    sequences = np.full(seq_offsets[-1], -1, np.int64)
    sequences[start[row_user] + k] = row_target
    sequences[start[row_user[k == 1]]] = row_first[k == 1]
    sequences[start[~users_with_rows]] = valid.history[valid.offsets[:-1][~users_with_rows]]
    sequences[start + train_rows + 1] = valid.target
    sequences[start[test_user] + train_rows[test_user] + 2] = test.target

    # Pass 2: every history must be the window of the rebuilt sequence before its target.
    seen = 0
    for line, batch in iter_inter(train_path):
        rows = parse_rows(train_path, line, batch, tokens)
        u = row_user[seen : seen + len(rows)]
        check_windows(rows, start[u], k[seen : seen + len(rows)], sequences)
        seen += len(rows)
    check_windows(valid, start, train_rows + 1, sequences)
    check_windows(test, start[test_user], train_rows[test_user] + 2, sequences)
    return seq_offsets, sequences, train_rows


def source_folder(args: argparse.Namespace) -> Path:
    """The UniSRec folder, given as FOLDER or as --path (once)."""
    given = [Path(p) for p in (args.folder, args.path) if p is not None]
    if not given:
        raise DataError("missrec-atomic: name the atomic folder (missrec prepare missrec-atomic FOLDER --out DIR)")
    if len(given) == 2 and given[0] != given[1]:
        raise DataError(f"missrec-atomic: two folders given, {given[0]} and --path {given[1]}; give one")
    return given[0]


def run(args: argparse.Namespace, out: Path) -> dict:
    layout = read_layout(source_folder(args), args.name)
    domain_sizes, feature_files = scan_features(layout, args.feat_dim)
    tokens = TokenParser(layout, domain_sizes)
    valid = read_split(layout.inter("valid"), tokens)
    test = read_split(layout.inter("test"), tokens)
    seq_offsets, sequences, train_rows = rebuild_sequences(layout, tokens, valid, test)

    n_items = int(domain_sizes.sum())
    item_domain = np.repeat(np.arange(len(domain_sizes)), domain_sizes)
    domain_names = pa.array(layout.domains, pa.string())
    writer = UsersWriter(out / USERS_FILE, args.rows_per_group)
    try:
        for lo in range(0, len(valid), args.rows_per_group):
            hi = min(lo + args.rows_per_group, len(valid))
            offsets = seq_offsets[lo : hi + 1]
            writer.add(
                valid.users.slice(lo, hi - lo),
                # A user's domain is that of its first item (merged files never mix domains in a user).
                domain_names.take(pa.array(item_domain[sequences[offsets[:-1]]])),
                pa.ListArray.from_arrays(pa.array((offsets - offsets[0]).astype(np.int32)), pa.array(sequences[offsets[0] : offsets[-1]])),
                train_end=train_rows[lo:hi] + 1,
                valid_end=train_rows[lo:hi] + 2,
            )
    finally:
        writer.close()

    local = pc.cast(pa.array(np.arange(n_items) - np.repeat(tokens.offsets[:-1], domain_sizes)), pa.string())
    keys = pc.binary_join_element_wise(pc.cast(pa.array(item_domain), pa.string()), local, "-") if layout.pretrain else local
    write_items(out / ITEMS_FILE, keys, domain_names.take(pa.array(item_domain)))
    modalities = {m: write_features(out, m, paths, args.feat_dim, args.dtype) for m, paths in feature_files.items()}
    return {
        "source": "missrec-atomic",
        "domains": layout.domains,
        "users": writer.users,
        "items": n_items,
        "interactions": writer.interactions,
        "interactions_raw": writer.interactions,
        "training_rows": writer.training_rows,
        "filter": {},  # the folder is already filtered (5-core upstream); nothing is dropped here
        "split": "leave-one-out",
        "modalities": modalities,
        "atomic": {"name": layout.name, "layout": "pretrain" if layout.pretrain else "downstream", "path": str(layout.folder.resolve())},
    }


# ----------------------------------------------------------------------------------------------
# Export
