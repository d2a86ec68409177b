"""Dataset sources for `missrec prepare SOURCE`.

Each source module defines ``HELP`` (one line; ``HELPS`` maps a name to its own where one module
serves several names), ``add_arguments(parser)`` and
``run(args, out: Path) -> dict``: it writes users.parquet / items.parquet (and any features it
carries) into `out`, a temporary folder, and returns the stats to record. `prepare` owns the
atomic rename and stats.json, so a failing source leaves nothing behind.
"""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path
from typing import Dict

from datapipes.schema import DataError, atomic_dir, write_stats

# name -> module; imported lazily so `missrec --help` stays fast.
SOURCES: Dict[str, str] = {
    "movielens-100k": "datapipes.sources.movielens",
    "movielens-1m": "datapipes.sources.movielens",
    "missrec-atomic": "datapipes.sources.atomic",
    "interactions": "datapipes.sources.interactions",
    "synthetic": "datapipes.sources.synthetic",
    "multi-domain": "datapipes.sources.combine",
}


def source_module(name: str):
    if name not in SOURCES:
        raise DataError(f"unknown source {name!r}; choose one of: {', '.join(SOURCES)}")
    return importlib.import_module(SOURCES[name])


def prepare(name: str, args: argparse.Namespace) -> dict:
    """Run source `name` into `args.out` atomically and write its stats.json."""
    module = source_module(name)
    # Every path flag (--path, --item-text, --inputs ...) is an input that --out must not hold.
    inputs = [v for value in vars(args).values() for v in (value if isinstance(value, list) else [value])
              if isinstance(v, Path) and v is not args.out]
    with atomic_dir(Path(args.out), overwrite=getattr(args, "overwrite", False), inputs=inputs) as tmp:
        stats = module.run(args, tmp)
        write_stats(tmp, stats)
    return stats
