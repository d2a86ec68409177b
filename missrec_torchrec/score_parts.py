"""`missrec score`'s output: per-rank part files, their manifests, and the merge into one Parquet file.

Each rank commits its results in segments: a Parquet file per segment (temporary name, then rename)
followed by the rank's manifest `progress.json` listing the committed segments. A resume keeps what
the manifests list and removes anything else. When all ranks are done rank 0 checks that every user
appears exactly once, writes OUT (temporary name, then rename) sorted by user_index, and removes
OUT.parts.
The parts hold dense indices only; rank 0 maps them to user and item keys as it merges, once the
scoring has freed its memory, so no scoring rank holds every key (10M item keys: ~0.2 GB).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from datapipes.io import creating, staged_file
from datapipes.schema import DataError

SCORE_SCHEMA = pa.schema(
    [
        pa.field("user_index", pa.int64(), nullable=False),
        pa.field("user_key", pa.string(), nullable=False),
        pa.field("items", pa.list_(pa.int64()), nullable=False),
        pa.field("item_keys", pa.list_(pa.string()), nullable=False),
        pa.field("scores", pa.list_(pa.float32()), nullable=False),
    ]
)
# A rank's part files: the output without its key columns.
PART_SCHEMA = pa.schema([f for f in SCORE_SCHEMA if f.name in ("user_index", "items", "scores")])
METADATA_KEY = b"missrec.score"
MERGE_ROWS_PER_GROUP = 8192  # users per row group of the merged output


class Keys:
    """Key strings by dense index (items.parquet: item_index is the row number; users.parquet:
    looked up through user_index)."""

    def __init__(self, path: Path, index_column: Optional[str], key_column: str):
        table = pq.read_table(path, columns=[c for c in (index_column, key_column) if c])
        self.keys = table.column(key_column).combine_chunks()
        self.index = None
        if index_column is not None:
            index = table.column(index_column).to_numpy()
            self.order = np.argsort(index, kind="stable")
            self.index = index[self.order]

    def take(self, idx: np.ndarray) -> pa.Array:
        if self.index is None:
            return self.keys.take(pa.array(idx))
        return self.keys.take(pa.array(self.order[np.searchsorted(self.index, idx)]))


def part_table(users: np.ndarray, items: np.ndarray, scores: np.ndarray) -> pa.Table:
    """A part's rows from B x k arrays (item -1 = no item: dropped from that user's list)."""
    valid = items >= 0
    offsets = pa.array(np.concatenate([[0], np.cumsum(valid.sum(1))]).astype(np.int32))
    return pa.Table.from_arrays(
        [
            pa.array(users, pa.int64()),
            pa.ListArray.from_arrays(offsets, pa.array(items[valid], pa.int64())),
            pa.ListArray.from_arrays(offsets, pa.array(scores[valid].astype(np.float32))),
        ],
        schema=PART_SCHEMA,
    )


def with_keys(part: pa.Table, user_keys: Keys, item_keys: Keys) -> pa.Table:
    """The output's rows: a part's rows with the user and item keys of their indices."""
    users, items, scores = (part.column(c).combine_chunks() for c in ("user_index", "items", "scores"))
    offsets = items.offsets.to_numpy()  # a slice's start from 0, as its flattened values do
    keys = pa.ListArray.from_arrays(pa.array(offsets - offsets[0]), item_keys.take(items.flatten().to_numpy()))
    return pa.Table.from_arrays(
        [users, user_keys.take(users.to_numpy()), items, keys, scores],
        schema=SCORE_SCHEMA,
    )


class RankParts:
    """One rank's committed segments under `folder` and the manifest that lists them.

    A segment file is renamed into place before the manifest names it, so a crash between the two
    leaves an unlisted file, which a resume deletes; listed segments are never rewritten.
    """

    MANIFEST = "progress.json"

    def __init__(self, folder: Path, plan: Dict[str, Any], resume: bool):
        self.folder, self.plan = folder, plan
        self.segments: List[Dict[str, Any]] = []
        manifest = folder / self.MANIFEST
        if resume and manifest.is_file():
            saved = json.loads(manifest.read_text())
            if saved["plan"] != plan:
                # Both sides' keys: a mode's own settings (--ann's) appear only in its plans.
                diff = sorted(k for k in set(plan) | set(saved["plan"]) if saved["plan"].get(k) != plan.get(k))
                raise DataError(f"{manifest}: written with other settings ({', '.join(diff)} differ); "
                                f"resume with the same ones or pass --overwrite without --resume")
            self.segments = saved["segments"]
        elif folder.exists():
            shutil.rmtree(folder)
        with creating(folder):
            folder.mkdir(parents=True, exist_ok=True)
        keep = {seg["file"] for seg in self.segments} | {self.MANIFEST}
        for stray in folder.iterdir():  # unlisted segments and half-written temporary files
            if stray.name not in keep:
                stray.unlink()

    @property
    def done(self) -> int:
        return self.segments[-1]["end"] if self.segments else 0

    def commit(self, table: pa.Table, start: int, end: int, stats: Dict[str, float]) -> None:
        name = f"seg-{start:09d}-{end:09d}.parquet"
        with staged_file(self.folder / name) as tmp:
            pq.write_table(table, tmp)
        self.segments.append({"file": name, "start": start, "end": end, "rows": table.num_rows, **stats})
        with staged_file(self.folder / self.MANIFEST) as tmp:
            tmp.write_text(json.dumps({"plan": self.plan, "segments": self.segments}))


def rank_folder(parts: Path, rank: int) -> Path:
    return parts / f"rank-{rank:05d}"


def merge_parts(
    parts: Path, out: Path, world: int, batches: int, users: int, metadata: Dict[str, Any], keys: Tuple[Keys, Keys]
) -> Dict[str, Any]:
    """Rank 0: every rank's segments into `out`, sorted by user_index, each user exactly once, with
    the user and item keys (`keys`: users', items'); the totals (users, certified share, sampled
    recall) go into the file's metadata too."""
    files, segments = _finished_segments(parts, world, batches)
    ordered = _check_users(parts, files, users)
    totals = _totals(segments)
    schema = SCORE_SCHEMA.with_metadata({METADATA_KEY: json.dumps({**metadata, "totals": totals}).encode()})
    with staged_file(out) as tmp, pq.ParquetWriter(str(tmp), schema) as writer:
        if ordered:  # the usual case: ranks own contiguous user ranges in file order
            pending: List[pa.Table] = []
            for f in files:
                pending.append(pq.read_table(f, columns=PART_SCHEMA.names))
                if sum(t.num_rows for t in pending) >= MERGE_ROWS_PER_GROUP:
                    writer.write_table(with_keys(pa.concat_tables(pending), *keys))
                    pending = []
            if pending:
                writer.write_table(with_keys(pa.concat_tables(pending), *keys))
        else:
            table = pa.concat_tables([pq.read_table(f, columns=PART_SCHEMA.names) for f in files]).sort_by("user_index")
            for lo in range(0, table.num_rows, MERGE_ROWS_PER_GROUP):
                writer.write_table(with_keys(table.slice(lo, MERGE_ROWS_PER_GROUP), *keys))
    shutil.rmtree(parts)
    return totals


def _finished_segments(parts: Path, world: int, batches: int) -> Tuple[List[Path], List[Dict[str, Any]]]:
    files, segments = [], []
    for r in range(world):
        manifest = rank_folder(parts, r) / RankParts.MANIFEST
        listed = json.loads(manifest.read_text())["segments"]
        if not listed or listed[-1]["end"] != batches:
            raise DataError(f"{manifest}: rank {r} has not finished its {batches} batches")
        files += [rank_folder(parts, r) / seg["file"] for seg in listed]
        segments += listed
    return files, segments


def _check_users(parts: Path, files: List[Path], users: int) -> bool:
    """Every user exactly once; returns whether the files already come in user_index order."""
    index = np.concatenate([pq.read_table(f, columns=["user_index"]).column(0).to_numpy() for f in files])
    distinct = len(np.unique(index))
    if distinct != len(index) or len(index) != users:
        raise DataError(f"{parts}: {len(index)} rows for {distinct} distinct users, expected {users}")
    return bool(np.all(np.diff(index) > 0))


def _totals(segments: List[Dict[str, Any]]) -> Dict[str, Any]:
    rows = sum(s["rows"] for s in segments)
    out: Dict[str, Any] = {"users": rows}
    if segments and segments[0].get("certified") is not None:
        out["certified"] = sum(s["certified"] for s in segments) / max(rows, 1)
    sampled = sum(s.get("recall_users", 0) for s in segments)
    if sampled:
        out["recall"] = sum(s["recall_sum"] for s in segments) / sampled
        out["recall_users"] = sampled
    return out
