"""`missrec export-atomic`: a prepared dataset back to the official MISSRec / UniSRec atomic folder.

The layout is the one `unisrec_import` reads (see its module doc and docs/model.md section 11): NAME.{train,
valid,test}.inter rows in UniSRec's order, feature matrices as raw float32 .feat*CLS files, and for
pre-training the per-domain files plus NAME.pt_datasets.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from datapipes.io import staged_dir
from datapipes.schema import DataError, DatasetInfo
from datapipes.sources.unisrec_layout import FEATURE_CHUNK_ROWS, HEADER, HISTORY_WINDOW, MODALITY_SUFFIX


def write_unisrec(dataset_dir: Path | str, out_folder: Path | str, name: str, *, pretrain: Optional[bool] = None,
                 overwrite: bool = False) -> Path:
    """Write a prepared leave-one-out dataset as a UniSRec folder `out_folder` (files NAME.*).

    Train rows follow UniSRec's order (per user, longest prefix first); users keep their order.
    `pretrain` (default: for multi-domain datasets and those imported from a pre-training folder) writes "<domainIdx>-<id>" item tokens, NAME.pt_datasets and per-domain feature files.
    Modalities text, image and text_aug become .feat1CLS, .feat3CLS and .feat2CLS (float32).
    """
    info = DatasetInfo.open(dataset_dir)
    domains = list(info.stats["domains"])
    if pretrain is None:
        pretrain = (
            len(domains) > 1
            or info.stats.get("source") == "multi-domain"
            or info.stats.get("atomic", {}).get("layout") == "pretrain"
        )
    tokens, domain_offsets = _item_tokens(info, domains, pretrain)
    with staged_dir(Path(out_folder), overwrite=overwrite, inputs=[info.root]) as tmp:
        _write_inter_files(info, tokens, tmp, name)
        for modality, suffix in MODALITY_SUFFIX.items():
            if modality in info.modalities:
                stems = domains if pretrain else [name]
                _write_feature_files(info, modality, [tmp / f"{s}.{suffix}" for s in stems], domain_offsets)
        if pretrain:
            (tmp / f"{name}.pt_datasets").write_text(",".join(domains) + "\n")
    return Path(out_folder)


def _item_tokens(info: DatasetInfo, domains: List[str], pretrain: bool) -> Tuple[pa.Array, np.ndarray]:
    n = info.num_items
    if not pretrain:
        return pc.cast(pa.array(np.arange(n)), pa.string()), np.array([0, n])
    item_domain = pc.index_in(pq.read_table(info.items_path, columns=["domain"])["domain"], value_set=pa.array(domains))
    if item_domain.null_count:
        raise DataError(f"{info.items_path}: an item's domain is not in stats.json domains {domains}")
    item_domain = item_domain.to_numpy().astype(np.int64)
    if (np.diff(item_domain) < 0).any():
        raise DataError(f"{info.items_path}: items are not grouped by domain in stats.json order {domains}")
    offsets = np.concatenate([[0], np.cumsum(np.bincount(item_domain, minlength=len(domains)))])
    local = np.arange(n) - offsets[item_domain]
    tokens = pc.binary_join_element_wise(
        pc.cast(pa.array(item_domain), pa.string()), pc.cast(pa.array(local), pa.string()), "-"
    )
    return tokens, offsets


def _windows(tokens: pa.Array, values: np.ndarray, seq_start: np.ndarray, k: np.ndarray) -> pa.Array:
    """For each row, the space-joined tokens of the last <= 50 items before position k."""
    size = np.minimum(k, HISTORY_WINDOW)
    offsets = np.concatenate([[0], np.cumsum(size)])
    within = np.arange(offsets[-1]) - np.repeat(offsets[:-1], size)
    flat = tokens.take(pa.array(values[np.repeat(seq_start + k - size, size) + within]))
    return pc.binary_join(pa.ListArray.from_arrays(pa.array(offsets.astype(np.int64)).cast(pa.int32()), flat), " ")


def _write_inter_files(info: DatasetInfo, tokens: pa.Array, folder: Path, name: str) -> None:
    schema = pa.schema([(h, pa.string()) for h in HEADER])
    # pyarrow quotes header names, the reference does not: write the header line ourselves.
    options = pacsv.WriteOptions(include_header=False, delimiter="\t", quoting_style="none")
    sinks, writers = {}, {}
    for split in ("train", "valid", "test"):
        sinks[split] = open(folder / f"{name}.{split}.inter", "wb")
        sinks[split].write(("\t".join(HEADER) + "\n").encode())
        writers[split] = pacsv.CSVWriter(sinks[split], schema, write_options=options)
    try:
        users = pq.ParquetFile(info.users_path)
        for group in range(users.num_row_groups):
            table = users.read_row_group(group, columns=["user_key", "items", "train_end", "valid_end"])
            keys = table["user_key"].combine_chunks()
            lists = table["items"].combine_chunks()
            offsets = np.asarray(lists.offsets, dtype=np.int64)
            values = lists.values.to_numpy()[offsets[0] : offsets[-1]]
            start, n = offsets[:-1] - offsets[0], np.diff(offsets)
            train_end = table["train_end"].to_numpy().astype(np.int64)
            valid_end = table["valid_end"].to_numpy().astype(np.int64)
            not_loo = (valid_end != train_end + 1) | (n != valid_end + 1) | (train_end < 1)
            if not_loo.any():
                raise DataError(f"{info.users_path}: user {keys[int(np.argmax(not_loo))]}: the atomic format needs "
                                "leave-one-out splits (train_end = n - 2 >= 1, valid_end = n - 1)")
            spaced = pc.match_substring_regex(keys, r"\s").to_numpy(zero_copy_only=False)
            if spaced.any():
                raise DataError(f"{info.users_path}: user key {keys[int(np.argmax(spaced))]} contains whitespace")
            # UniSRec order: per user, targets train_end-1, ..., 1 (longest prefix first).
            per_user = train_end - 1
            row_user = np.repeat(np.arange(len(n)), per_user)
            rank = np.arange(len(row_user)) - np.repeat(np.cumsum(per_user) - per_user, per_user)
            k = train_end[row_user] - 1 - rank
            for split, u, pos in (
                ("train", row_user, k),
                ("valid", np.arange(len(n)), train_end),
                ("test", np.arange(len(n)), valid_end),
            ):
                target = tokens.take(pa.array(values[start[u] + pos]))
                history = _windows(tokens, values, start[u], pos)
                writers[split].write_table(pa.table([keys.take(pa.array(u)), history, target], schema=schema))
    finally:
        for split in writers:
            writers[split].close()
            sinks[split].close()


def _write_feature_files(info: DatasetInfo, modality: str, paths: List[Path], domain_offsets: np.ndarray) -> None:
    """Rows of features/<modality>.parquet (checked) as raw float32, split at domain_offsets into `paths`."""
    files = [open(p, "wb") for p in paths]
    try:
        row = 0
        for matrix in info.iter_features(modality, FEATURE_CHUNK_ROWS):
            matrix = matrix.astype("<f4")
            for d, f in enumerate(files):
                lo = max(domain_offsets[d], row) - row
                hi = min(domain_offsets[d + 1], row + len(matrix)) - row
                if hi > lo:
                    f.write(matrix[lo:hi].tobytes())
            row += len(matrix)
    finally:
        for f in files:
            f.close()
