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
from typing import Dict, Sequence

from datapipes.io import staged_dir
from datapipes.schema import DataError, write_stats

# name -> module; imported lazily so `missrec --help` stays fast.
SOURCES: Dict[str, str] = {
    "movielens-100k": "datapipes.sources.movielens",
    "movielens-1m": "datapipes.sources.movielens",
    "missrec-atomic": "datapipes.sources.unisrec_import",
    "interactions": "datapipes.sources.interactions",
    "synthetic": "datapipes.sources.synthetic",
    "multi-domain": "datapipes.sources.combine",
}


def source_module(name: str):
    if name not in SOURCES:
        raise DataError(f"unknown source {name!r}; choose one of: {', '.join(SOURCES)}")
    return importlib.import_module(SOURCES[name])


class _OptionParser(argparse.ArgumentParser):
    """A source's flags, parsed outside the command line: a bad flag is a DataError, not an exit."""

    def error(self, message: str):
        raise DataError(f"{self.prog}: {message}")


def source_options(name: str, flags: Sequence[str] = ()) -> argparse.Namespace:
    """Source `name`'s options from flags written as on the command line (without --out)."""
    parser = _OptionParser(prog=f"missrec prepare {name}", add_help=False)
    source_module(name).add_arguments(parser)
    args = parser.parse_args([str(f) for f in flags])
    args.source = name
    return args


def prepare(name: str, out: Path | str, flags: Sequence[str] = (), *, overwrite: bool = False, **options) -> dict:
    """`missrec prepare NAME --out OUT FLAGS...` as a function; `options` (argparse names, e.g.
    k_core=5) replace the parsed flags' values."""
    args = source_options(name, flags)
    unknown = sorted(set(options) - set(vars(args)))
    if unknown:
        raise DataError(f"missrec prepare {name}: unknown options {unknown}")
    vars(args).update(options, out=Path(out), overwrite=overwrite)
    return prepare_parsed(name, args)


def prepare_parsed(name: str, args: argparse.Namespace) -> dict:
    """Run source `name` into `args.out` atomically and write its stats.json; `args` as parsed by
    the command line or `source_options`."""
    module = source_module(name)
    # Every path flag (--path, --item-text, --inputs ...) is an input that --out must not hold.
    inputs = [v for value in vars(args).values() for v in (value if isinstance(value, list) else [value])
              if isinstance(v, Path) and v is not args.out]
    with staged_dir(Path(args.out), overwrite=getattr(args, "overwrite", False), inputs=inputs) as tmp:
        stats = module.run(args, tmp)
        write_stats(tmp, stats)
    return stats


def summary(out: Path | str, stats: dict) -> str:
    """The line `missrec prepare` prints for a written dataset."""
    return f"wrote {out}: {stats['users']:,} users, {stats['items']:,} items, {stats['interactions']:,} interactions"
