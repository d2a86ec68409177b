"""`missrec inspect`: a prepared dataset's stats.json, feature tables and a few example rows."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq

from datapipes.schema import DatasetInfo


def print_dataset(dataset: Path, rows: int = 3, as_json: bool = False) -> None:
    """Print the statistics (only stats.json, as JSON, with `as_json`) and `rows` example users; a bad
    feature table is refused before anything is printed."""
    info = DatasetInfo.open(dataset)
    for name in info.modalities:  # refuse a bad table before printing anything
        info.check_features(name)
    if as_json:
        print(json.dumps(info.stats, indent=2, sort_keys=True))
        return
    s = info.stats
    print(f"dataset   {info.root}  (schema v{s['schema_version']}, source {s.get('source')})")
    print(f"domains   {', '.join(s.get('domains', []))}")
    print(f"users     {s['users']:,}")
    print(f"items     {s['items']:,}")
    raw, kept = s.get("interactions_raw"), s.get("interactions")
    print(f"interactions  {kept:,} kept of {raw:,} raw" if raw is not None else f"interactions  {kept:,}")
    if s.get("duplicates_dropped"):
        print(f"duplicates    {s['duplicates_dropped']:,} exact (user, item, timestamp) repeats dropped")
    print(f"training rows {s.get('training_rows', 0):,}")
    if s.get("filter"):
        print(f"filter    {json.dumps(s['filter'], sort_keys=True)}")
    mods = info.modalities
    if not mods:
        print("modalities  none yet (run `missrec features`)")
    for m in mods.values():
        print(f"modality  {m.name}: dim {m.dim} {m.dtype}, present for {m.present:,}/{s['items']:,} items")
    if rows > 0:
        pf = pq.ParquetFile(info.users_path)
        head = pf.read_row_group(0).slice(0, rows).to_pylist()
        for row in head:
            seq = row["items"]
            shown = " ".join(map(str, seq[:12])) + (" ..." if len(seq) > 12 else "")
            print(
                f"user {row['user_key']}: {len(seq)} items, train_end {row['train_end']}, "
                f"valid_end {row['valid_end']}: {shown}"
            )
