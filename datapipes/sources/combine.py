"""Prepared single-domain datasets -> one multi-domain pre-training dataset.

Follows UniSRec's ``to_pretrain_atomic_files``: the i-th input is domain i, and its item and user
keys become ``"<i>-<key>"``. Items are numbered input by input (input i's item j becomes
``offset_i + j``), users are concatenated in input order, and feature rows follow the items.
Users, items and features are streamed per row group, never loaded whole.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from datapipes.schema import (
    DEFAULT_USERS_PER_ROW_GROUP,
    ITEMS_FILE,
    USERS_FILE,
    DataError,
    DatasetInfo,
    FeatureWriter,
    UsersWriter,
    feature_path,
    write_items,
)

HELP = "combine prepared datasets into one multi-domain pre-training set (keys become '<domainIdx>-<key>')"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--inputs", type=Path, nargs="+", required=True,
        help="prepared single-domain dataset folders; the i-th becomes domain i",
    )
    parser.add_argument(
        "--rows-per-group", type=int, default=DEFAULT_USERS_PER_ROW_GROUP,
        help=f"users per Parquet row group in users.parquet (default {DEFAULT_USERS_PER_ROW_GROUP})",
    )


def open_inputs(paths: List[Path]) -> List[DatasetInfo]:
    infos = [DatasetInfo.open(p) for p in paths]
    owner: Dict[str, Path] = {}
    for info in infos:
        domains = info.stats.get("domains", [])
        if len(domains) != 1:
            raise DataError(f"{info.root / 'stats.json'}: domains {domains}; combine takes single-domain datasets")
        if domains[0] in owner:
            raise DataError(f"{info.root}: domain {domains[0]!r} is also the domain of {owner[domains[0]]}")
        owner[domains[0]] = info.root
        if info.stats.get("split") != infos[0].stats.get("split"):
            raise DataError(f"{info.root}: split {info.stats.get('split')!r} differs from "
                            f"{infos[0].root}'s {infos[0].stats.get('split')!r}")
    return infos


def common_modalities(infos: List[DatasetInfo]) -> Dict[str, Tuple[int, str, str]]:
    """name -> (dim, dtype, encoder) for modalities that every input has with the same dim."""
    names = sorted({m for info in infos for m in info.modalities})
    out = {}
    for name in names:
        have = [info for info in infos if name in info.modalities]
        if len(have) != len(infos):
            lacking = next(info for info in infos if name not in info.modalities)
            raise DataError(f"{lacking.root}: no {name!r} modality, which {have[0].root} has; "
                            f"give every input the same modalities (`missrec features`)")
        dims = [info.modalities[name].dim for info in infos]
        if len(set(dims)) > 1:
            odd = infos[next(i for i, d in enumerate(dims) if d != dims[0])]
            raise DataError(f"{odd.root}: modality {name!r} has dim {odd.modalities[name].dim}, "
                            f"{infos[0].root} has {dims[0]}")
        dtypes = {info.modalities[name].dtype for info in infos}
        encoders = [info.stats["modalities"][name].get("encoder", "?") for info in infos]
        encoder = encoders[0] if len(set(encoders)) == 1 else "; ".join(
            f"{info.stats['domains'][0]}: {e}" for info, e in zip(infos, encoders))
        out[name] = (dims[0], dtypes.pop() if len(dtypes) == 1 else "float32", encoder)
    return out


def prefixed(domain_index: int, keys) -> pa.Array:
    return pc.binary_join_element_wise(f"{domain_index}-", keys, "")


def write_combined_items(infos: List[DatasetInfo], out: Path) -> np.ndarray:
    """items.parquet of all inputs; returns the item index offset of each input."""
    keys, domains, texts, counts = [], [], [], []
    for i, info in enumerate(infos):
        table = pq.read_table(info.items_path, columns=["item_key", "domain", "text"])
        if table.num_rows != info.num_items:
            raise DataError(f"{info.items_path}: {table.num_rows} items but stats.json says {info.num_items}")
        keys.append(prefixed(i, table["item_key"]))
        domains.append(table["domain"])
        texts.append(table["text"])
        counts.append(table.num_rows)
    chunked = lambda parts: pa.chunked_array(parts, pa.string()).combine_chunks()  # noqa: E731
    write_items(out / ITEMS_FILE, chunked(keys), chunked(domains), chunked(texts))
    return np.concatenate([[0], np.cumsum(counts)])


def write_combined_users(infos: List[DatasetInfo], item_offsets: np.ndarray, out: Path, rows_per_group: int) -> UsersWriter:
    writer = UsersWriter(out / USERS_FILE, rows_per_group)
    try:
        for i, info in enumerate(infos):
            users = pq.ParquetFile(info.users_path)
            for group in range(users.num_row_groups):
                table = users.read_row_group(group)
                lists = table["items"].combine_chunks()
                offsets = np.asarray(lists.offsets, dtype=np.int64)
                values = lists.values.to_numpy()[offsets[0] : offsets[-1]]
                beyond = values >= info.num_items
                if beyond.any():
                    row = int(np.searchsorted(offsets - offsets[0], int(np.argmax(beyond)), side="right")) - 1
                    raise DataError(f"{info.users_path}: user {table['user_key'][row]} has item "
                                    f"{values[np.argmax(beyond)]} beyond the {info.num_items} items")
                writer.add(
                    prefixed(i, table["user_key"].combine_chunks()),
                    table["domain"].combine_chunks(),
                    pa.ListArray.from_arrays(pa.array((offsets - offsets[0]).astype(np.int32)), pa.array(values + item_offsets[i])),
                    train_end=table["train_end"].to_numpy(),
                    valid_end=table["valid_end"].to_numpy(),
                    timestamps=table["timestamps"].combine_chunks(),
                )
    finally:
        writer.close()
    return writer


def write_combined_features(infos: List[DatasetInfo], name: str, dim: int, dtype: str, encoder: str, out: Path) -> dict:
    feature_path(out, name).parent.mkdir(parents=True, exist_ok=True)
    writer = FeatureWriter(feature_path(out, name), dim, dtype)
    try:
        for info in infos:
            source = info.modalities[name].path
            start = writer.rows
            for batch in pq.ParquetFile(source).iter_batches(columns=["vector", "present"]):
                vectors = batch.column(0).flatten().to_numpy(zero_copy_only=False).reshape(-1, dim)
                writer.add(vectors, batch.column(1).to_numpy(zero_copy_only=False), source=str(source))
            if writer.rows - start != info.num_items:
                raise DataError(f"{source}: {writer.rows - start} feature rows for {info.num_items} items")
    finally:
        writer.close()
    return {"dim": dim, "dtype": dtype, "present": writer.present, "encoder": encoder}


def run(args: argparse.Namespace, out: Path) -> dict:
    infos = open_inputs(list(args.inputs))
    modalities = common_modalities(infos)
    item_offsets = write_combined_items(infos, out)
    users = write_combined_users(infos, item_offsets, out, args.rows_per_group)
    return {
        "source": "multi-domain",
        "domains": [info.stats["domains"][0] for info in infos],
        "users": users.users,
        "items": int(item_offsets[-1]),
        "interactions": users.interactions,
        "interactions_raw": users.interactions,  # nothing is filtered here; see inputs for each filter
        "training_rows": users.training_rows,
        "filter": {},
        "split": infos[0].stats.get("split"),
        "modalities": {m: write_combined_features(infos, m, *spec, out) for m, spec in modalities.items()},
        "inputs": [
            {key: info.stats.get(key) for key in ("source", "domains", "users", "items", "interactions", "filter")}
            | {"path": str(info.root.resolve())}
            for info in infos
        ],
    }
