"""Flat (user, item, timestamp) interactions -> the canonical users.parquet / items.parquet.

Shared by the sources that start from an interaction log (MovieLens, generic CSV/Parquet). The
rules, in order, all vectorised over the whole log:

0. Exact duplicates, rows repeating an earlier row's (user, item, timestamp), are dropped (the first
   one stays) and counted in ``duplicates_dropped``; `keep_duplicates` keeps them. The same item at
   another time is a new interaction and always stays.
1. Iterative k-core: drop users and items with fewer than `k_core` interactions, repeated until no
   count falls below `k_core` (k_core <= 1 keeps everything).
   Optional cold-item hold-out (`cold_items` > 0): a seeded random share of the items that end some
   user's sequence keeps only those last interactions; every other interaction of theirs is dropped.
   Those items then occur only as test targets, never in a training sequence or a history, so the
   users whose test item is one of them measure cold start (`eval.cold_start`).
2. Users left with fewer than 3 interactions are dropped (leave-one-out needs a training item, a
   validation item and a test item) and counted in ``users_dropped_short``. This runs after the
   k-core, so with ``k_core < 3`` an item may end up below `k_core`.
3. Dense indices follow time: the log is ordered by (timestamp, file row); users and items are
   numbered in order of their first interaction in that order. The numbering is therefore
   independent of how the file happens to group its rows.
4. Each user's sequence is sorted by timestamp with a stable sort: interactions with equal
   timestamps keep their file order (over half of MovieLens' timestamps tie within a user).
5. Leave-one-out: ``train_end = n - 2``, ``valid_end = n - 1``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Optional, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from datapipes.schema import (
    DEFAULT_USERS_PER_ROW_GROUP,
    ITEMS_FILE,
    USERS_FILE,
    DataError,
    UsersWriter,
    write_items,
)

MIN_SEQUENCE_LENGTH = 3  # one training, one validation and one test item


def encode_keys(keys) -> Tuple[np.ndarray, pa.Array]:
    """Dictionary-encode string keys: (int64 codes, distinct keys in first-appearance order)."""
    if isinstance(keys, np.ndarray):
        keys = pa.array(keys, pa.string())
    if isinstance(keys, pa.Array):
        keys = pa.chunked_array([keys])
    keys = keys.cast(pa.string())
    encoded = pa.table({"k": keys.dictionary_encode()}).unify_dictionaries().column("k")
    if encoded.num_chunks == 0:
        return np.zeros(0, np.int64), pa.array([], pa.string())
    codes = np.concatenate([c.indices.to_numpy(zero_copy_only=False) for c in encoded.chunks])
    return codes.astype(np.int64, copy=False), encoded.chunk(0).dictionary


def add_cold_arguments(parser) -> None:
    """The cold-item hold-out flags shared by the interaction-log sources."""
    parser.add_argument(
        "--cold-items", type=float, default=0.0,
        help="share of the test-target items held out as cold: each keeps only the interactions that "
        "end a user's sequence, so it never occurs in training (default 0: none)",
    )
    parser.add_argument("--cold-seed", type=int, default=0, help="seed of the cold-item draw (default 0)")


def add_duplicate_arguments(parser) -> None:
    """The duplicate-interaction flag shared by the interaction-log sources."""
    parser.add_argument(
        "--keep-duplicates", action="store_true",
        help="keep rows that repeat an earlier row's (user, item, timestamp); by default they are dropped "
        "(the first stays) and counted in stats.json as duplicates_dropped",
    )


def duplicate_rows(users: np.ndarray, items: np.ndarray, times: np.ndarray) -> np.ndarray:
    """Rows repeating an earlier row's (user, item, timestamp); the first of each group is not one."""
    order = np.lexsort((times, items, users))  # stable: equal rows stay in file order
    same = ((users[order][1:] == users[order][:-1]) & (items[order][1:] == items[order][:-1])
            & (times[order][1:] == times[order][:-1]))
    repeated = np.zeros(len(users), dtype=bool)
    repeated[order[1:][same]] = True
    return repeated


def k_core_mask(users: np.ndarray, items: np.ndarray, k: int,
                start: Optional[np.ndarray] = None) -> Tuple[np.ndarray, int]:
    """Rows (of `start`, default all) that survive the iterative k-core on users and items, and the
    number of rounds."""
    keep = np.ones(len(users), dtype=bool) if start is None else start.copy()
    if k <= 1:
        return keep, 0
    rounds = 0
    while True:
        rounds += 1
        user_count = np.bincount(users[keep], minlength=users.max(initial=-1) + 1)
        item_count = np.bincount(items[keep], minlength=items.max(initial=-1) + 1)
        still = keep & (user_count[users] >= k) & (item_count[items] >= k)
        if still.sum() == keep.sum():
            return keep, rounds
        keep = still


def cold_item_rows(users: np.ndarray, items: np.ndarray, times: np.ndarray, keep: np.ndarray,
                   share: float, seed: int) -> Tuple[np.ndarray, int]:
    """Kept rows to drop for the cold-item hold-out, and how many items were held out.

    The held-out items are a seeded `share` of the items that end some user's sequence (by time, then
    file row), so each stays in the catalogue as at least one test target; all their other
    interactions are dropped."""
    rows = np.flatnonzero(keep)
    order = rows[np.lexsort((rows, times[rows], users[rows]))]
    is_last = np.zeros(len(users), dtype=bool)
    is_last[order[np.r_[users[order][1:] != users[order][:-1], True]]] = True
    targets = np.unique(items[is_last])
    n_cold = int(round(share * len(targets)))
    cold = np.zeros(items.max(initial=-1) + 1, dtype=bool)
    cold[np.random.default_rng(seed).choice(targets, size=n_cold, replace=False)] = True
    return keep & cold[items] & ~is_last, n_cold


def first_appearance_rank(codes_in_order: np.ndarray, size: int) -> np.ndarray:
    """new_index[code] for codes numbered by first appearance in `codes_in_order` (-1 if absent)."""
    distinct, first = np.unique(codes_in_order, return_index=True)
    rank = np.full(size, -1, dtype=np.int64)
    rank[distinct[np.argsort(first, kind="stable")]] = np.arange(len(distinct), dtype=np.int64)
    return rank


def _as_int64(values, what: str) -> np.ndarray:
    if isinstance(values, (pa.Array, pa.ChunkedArray)):
        if values.null_count:
            raise DataError(f"{what}: {values.null_count} null value(s)")
        values = values.to_numpy() if isinstance(values, pa.ChunkedArray) else values.to_numpy(zero_copy_only=False)
    return np.asarray(values, dtype=np.int64)


def _encoded(user_keys, item_keys, timestamps, origin: str):
    """(users, user dictionary, items, item dictionary, int64 times) of checked interaction columns."""
    users, user_dict = encode_keys(user_keys)
    items, item_dict = encode_keys(item_keys)
    n_raw = len(users)
    if len(items) != n_raw:
        raise DataError(f"{origin}: {n_raw} user keys but {len(items)} item keys")
    if n_raw == 0:
        raise DataError(f"{origin}: no interactions")
    if (users < 0).any() or (items < 0).any():  # dictionary_encode leaves nulls as nulls
        raise DataError(f"{origin}: null user or item keys")
    times = np.zeros(n_raw, np.int64) if timestamps is None else _as_int64(timestamps, f"{origin} timestamps")
    if len(times) != n_raw:
        raise DataError(f"{origin}: {n_raw} interactions but {len(times)} timestamps")
    return users, user_dict, items, item_dict, times


def _write_users(path: Path, rows_per_group: int, user_out: pa.Array, domain: str, seq_items: np.ndarray,
                 seq_times: np.ndarray, lengths: np.ndarray) -> UsersWriter:
    """users.parquet from the users' concatenated sequences (`lengths` each), leave-one-out split."""
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    writer = UsersWriter(path, rows_per_group)
    try:
        for start in range(0, len(lengths), rows_per_group):
            stop = min(start + rows_per_group, len(lengths))
            lo, hi = offsets[start], offsets[stop]
            chunk_offsets = pa.array((offsets[start : stop + 1] - lo).astype(np.int32))
            n = lengths[start:stop]
            writer.add(
                user_out.slice(start, stop - start),
                domain,
                pa.ListArray.from_arrays(chunk_offsets, pa.array(seq_items[lo:hi])),
                train_end=n - 2,
                valid_end=n - 1,
                timestamps=pa.ListArray.from_arrays(chunk_offsets, pa.array(seq_times[lo:hi])),
            )
    finally:
        writer.close()
    return writer


def _kept(users: np.ndarray, items: np.ndarray, times: np.ndarray, n_users: int, k_core: int, keep_duplicates: bool,
          cold_items: float, cold_seed: int):
    """(rows kept, counts): duplicates dropped (unless kept), the k-core filter, cold items held out,
    then users left with fewer than MIN_SEQUENCE_LENGTH interactions."""
    duplicates = np.zeros(len(users), dtype=bool) if keep_duplicates else duplicate_rows(users, items, times)
    keep, rounds = k_core_mask(users, items, k_core, ~duplicates)
    n_cold = 0
    if cold_items > 0:
        dropped, n_cold = cold_item_rows(users, items, times, keep, cold_items, cold_seed)
        keep &= ~dropped
    per_user = np.bincount(users[keep], minlength=n_users)
    long_enough = per_user >= MIN_SEQUENCE_LENGTH
    dropped_short = int(((per_user > 0) & ~long_enough).sum())
    keep &= long_enough[users]
    return keep, {"duplicates": int(duplicates.sum()), "rounds": rounds, "cold": n_cold, "short": dropped_short}


def _keys_by_index(dictionary: pa.Array, codes: np.ndarray, index: np.ndarray, n: int) -> pa.Array:
    """The original keys in dense-index order."""
    by_index = np.empty(n, np.int64)
    by_index[index] = codes
    return dictionary.take(pa.array(by_index))


def _item_texts(item_text: Mapping[str, str], item_keys: pa.Array) -> pa.Array:
    """Each item's text (null where `item_text` has none), in `item_keys` order."""
    text_keys = pa.array(list(item_text.keys()), pa.string())
    text_values = pa.array(list(item_text.values()), pa.string())
    return text_values.take(pc.index_in(item_keys, value_set=text_keys))


def _check_options(k_core: int, rows_per_group: int, cold_items: float) -> None:
    if k_core < 0:
        raise DataError(f"--k-core must be >= 0, got {k_core}")
    if rows_per_group < 1:
        raise DataError(f"--rows-per-group must be >= 1, got {rows_per_group}")
    if not 0.0 <= cold_items < 1.0:
        raise DataError(f"--cold-items must be in [0, 1), got {cold_items}")


def _sequences(users: np.ndarray, items: np.ndarray, times: np.ndarray, user_dict: pa.Array, item_dict: pa.Array):
    """(items and times of every sequence, concatenated in user order; sequence lengths; user keys
    and item keys by their new index) of the kept interactions. Indices follow first appearance in time."""
    # Masking kept file order, so a stable sort on time breaks ties by file row.
    time_order = np.argsort(times, kind="stable")
    user_index = first_appearance_rank(users[time_order], len(user_dict))[users]
    item_index = first_appearance_rank(items[time_order], len(item_dict))[items]
    by_user = time_order[np.argsort(user_index[time_order], kind="stable")]
    lengths = np.bincount(user_index)
    user_out = _keys_by_index(user_dict, users, user_index, len(lengths))
    item_out = _keys_by_index(item_dict, items, item_index, int(item_index.max()) + 1)
    return item_index[by_user], times[by_user], lengths, user_out, item_out


def build_sequences(
    user_keys,
    item_keys,
    timestamps,
    *,
    k_core: int,
    out: Path | str,
    domain: str,
    item_text: Optional[Mapping[str, str]] = None,
    rows_per_group: int = DEFAULT_USERS_PER_ROW_GROUP,
    origin: Optional[str] = None,
    cold_items: float = 0.0,
    cold_seed: int = 0,
    keep_duplicates: bool = False,
) -> dict:
    """Write users.parquet and items.parquet into `out`; return the stats that describe them.

    `user_keys` / `item_keys` are string arrays (numpy or pyarrow, no nulls), `timestamps` int64
    seconds or None (file order then decides). `item_text` maps item key -> text for items.parquet.
    `origin` names the input in error messages (default: the domain). `cold_items` is the share of
    items held out as cold test targets (module docstring), drawn with `cold_seed`. Exact duplicate
    rows are dropped unless `keep_duplicates` (rule 0).
    """
    origin = origin or domain
    _check_options(k_core, rows_per_group, cold_items)
    users, user_dict, items, item_dict, times = _encoded(user_keys, item_keys, timestamps, origin)
    n_raw = len(users)

    keep, counts = _kept(users, items, times, len(user_dict), k_core, keep_duplicates, cold_items, cold_seed)
    if not keep.any():
        raise DataError(
            f"{origin}: no user keeps {MIN_SEQUENCE_LENGTH}+ interactions after the {k_core}-core filter "
            f"({n_raw:,} interactions in)"
        )
    seq_items, seq_times, lengths, user_out, item_out = _sequences(
        users[keep], items[keep], times[keep], user_dict, item_dict)
    writer = _write_users(Path(out) / USERS_FILE, rows_per_group, user_out, domain, seq_items, seq_times, lengths)
    texts = _item_texts(item_text, item_out) if item_text is not None else None
    n_items = write_items(Path(out) / ITEMS_FILE, item_out, domain, texts)

    return {
        "domains": [domain],
        "users": writer.users,
        "items": n_items,
        "interactions": writer.interactions,
        "interactions_raw": n_raw,
        "training_rows": writer.training_rows,
        "filter": {"k_core": int(k_core)},
        "duplicates": "kept" if keep_duplicates else "dropped",
        "duplicates_dropped": counts["duplicates"],
        "cold_items": {"share": float(cold_items), "seed": int(cold_seed), "items": counts["cold"]},
        "split": "leave-one-out",
        "users_dropped_short": counts["short"],
        "k_core_rounds": counts["rounds"],
        "items_with_text": 0 if texts is None else len(texts) - texts.null_count,
    }
