"""`missrec features`: compute one item-feature modality of a prepared dataset.

``missrec features DATASET --modality NAME --encoder SPEC`` writes ``features/<NAME>.parquet`` (row
i = item i: vector + present flag) and records it in stats.json. SPEC is one of

* ``minilm``: the offline all-MiniLM-L6-v2 package (384-d text vectors);
* ``sentence-transformers:PATH``: any local sentence-transformers folder (text);
* ``clip-text:PATH`` / ``clip-image:PATH``: the projected text / image features of a local
  HuggingFace CLIP folder (images come from ``--images DIR``, one ``<item_key>.<jpg|jpeg|png|webp>``
  per item);
* ``vectors:PATH``: an existing N x dim matrix (``.npy``, Parquet, or raw little-endian float32 as in
  MISSRec's ``.featNCLS`` files, which need ``--dim``).

Items without input (null or blank text, no image file, an all-zero imported row) get a zero vector
and ``present = false``; they are never sent to a model.

Vectors are stored as the encoder produces them. ``--normalize`` (off by default) L2-normalises
rows: MISSRec feeds raw CLIP projections to its adapters, and text and image vectors must stay on
one scale, so no encoder is normalised behind the user's back (all-MiniLM-L6-v2 normalises itself).

Work is cached in chunks of ``--chunk-size`` items under ``features/.<NAME>.parts/``, named by a
hash of everything that decides the output (encoder spec, model or file identity, item count), the
chunk size and the chunk index. A killed run resumes where it stopped; the merged table is written
atomically, registered, and only then is the parts folder removed. A finished modality is not
recomputed unless ``--overwrite`` is given (it is an error, like `missrec prepare` on an existing
folder, so a typo in NAME cannot silently keep stale vectors).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
from pathlib import Path
from typing import Any, Dict, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from datapipes.encoders import DEFAULT_BATCH_SIZE, Encoder, EncoderOptions, make_encoder, read_items
from datapipes.io import first_line, staged_file
from datapipes.schema import FEATURE_DTYPES, FEATURES_DIR, DataError, DatasetInfo, FeatureWriter, feature_path, feature_schema, register_modality

HELP = "compute one item-feature modality (MiniLM / CLIP text or image / imported vectors)"

DEFAULT_CHUNK_SIZE = 4096
MODALITY_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


# ----------------------------------------------------------------------------------------------
# Chunked, resumable computation


def parts_dir(root: Path | str, modality: str) -> Path:
    return Path(root) / FEATURES_DIR / f".{modality}.parts"


def _cache_key(encoder: Encoder, num_items: int) -> str:
    identity = {"spec": encoder.spec, "items": num_items, **encoder.identity()}
    return hashlib.sha1(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def _encode_chunk(encoder: Encoder, start: int, stop: int, batch_size: int, bar) -> Tuple[np.ndarray, np.ndarray]:
    present, inputs = encoder.inputs(start, stop)
    vectors = np.zeros((stop - start, encoder.dim), np.float32)
    rows = np.flatnonzero(present)
    bar.update(stop - start - len(rows))
    for b in range(0, len(rows), batch_size):
        batch = rows[b : b + batch_size]
        out = np.asarray(encoder.encode(inputs[batch]))
        if out.shape != (len(batch), encoder.dim):
            raise DataError(f"encoder {encoder.spec!r} returned shape {out.shape} for {len(batch)} items, expected dim {encoder.dim}")
        vectors[batch] = out
        bar.update(len(batch))
    # An all-zero row carries no information (MISSRec's own marker of a missing modality).
    return vectors, present & vectors.any(axis=1)


def _write_part(path: Path, start: int, vectors: np.ndarray, present: np.ndarray) -> None:
    n, dim = vectors.shape
    table = pa.Table.from_arrays(
        [
            pa.array(np.arange(start, start + n, dtype=np.int64)),
            pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), dim),
            pa.array(present),
        ],
        schema=feature_schema(dim, "float32"),
    )
    with staged_file(path) as tmp:
        pq.write_table(table, str(tmp))


def _read_part(path: Path) -> Tuple[np.ndarray, np.ndarray]:
    try:
        table = pq.read_table(path)
        vec = table.column("vector").combine_chunks()
        dim = vec.type.list_size
        values = vec.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim)
        return values, table.column("present").to_numpy()
    except (OSError, KeyError, pa.ArrowException) as e:
        raise DataError(f"{path}: unreadable cached chunk ({first_line(e)}); delete it and re-run") from None


def _merge(parts, out: Path, dtype: str, normalize: bool) -> Tuple[int, int]:
    """Concatenate the parts into `out` atomically; returns (dim, present count)."""
    dim = pq.read_schema(parts[0]).field("vector").type.list_size
    with staged_file(out) as tmp:
        writer = FeatureWriter(tmp, dim, dtype)
        try:
            for part in parts:
                vectors, present = _read_part(part)
                if normalize:
                    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
                    vectors = vectors / np.where(norms > 0, norms, 1.0)
                writer.add(vectors, present, source=str(part))
        finally:
            writer.close()
    return writer.dim, writer.present


def compute_features(
    root: Path | str,
    modality: str,
    encoder_spec: str = "minilm",
    options: EncoderOptions = EncoderOptions(),
    dtype: str = "float32",
    normalize: bool = False,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    overwrite: bool = False,
    progress: bool = True,
) -> Dict[str, Any]:
    """Compute, store and register modality `modality` of the dataset at `root`.

    Returns its stats.json entry (dim, dtype, present, encoder) plus `items` and the table `path`.
    """
    from tqdm import tqdm

    if not MODALITY_NAME.fullmatch(modality):
        raise DataError(f"--modality {modality!r}: use letters, digits, '_', '-' or '.'")
    if dtype not in FEATURE_DTYPES:
        raise DataError(f"--dtype {dtype!r} is not one of {sorted(FEATURE_DTYPES)}")
    if chunk_size < 1 or options.batch_size < 1:
        raise DataError(f"--chunk-size ({chunk_size}) and --batch-size ({options.batch_size}) must be positive")
    info = DatasetInfo.open(root)
    out = feature_path(info.root, modality)
    if modality in info.modalities and out.is_file() and not overwrite:
        raise DataError(f"{out}: modality {modality!r} exists (pass --overwrite to recompute it)")
    items = read_items(info)
    if len(items) == 0:
        raise DataError(f"{info.items_path}: no items")
    encoder = make_encoder(encoder_spec, items, options)

    cache = parts_dir(info.root, modality)
    made = [p for p in (cache.parent, cache) if not p.exists()]
    cache.mkdir(parents=True, exist_ok=True)
    key = _cache_key(encoder, len(items))
    starts = range(0, len(items), chunk_size)
    parts = [cache / f"{key}-{chunk_size}-{i:06d}.parquet" for i in range(len(starts))]
    try:
        with tqdm(total=len(items), unit="item", desc=f"{modality} [{encoder_spec}]", disable=None if progress else True) as bar:
            for start, part in zip(starts, parts):
                stop = min(start + chunk_size, len(items))
                if part.is_file():
                    bar.update(stop - start)
                    continue
                _write_part(part, start, *_encode_chunk(encoder, start, stop, options.batch_size, bar))
    except BaseException:
        for folder in reversed(made):  # nothing to resume from: leave no empty folder behind
            if not any(folder.iterdir()):
                folder.rmdir()
        raise

    dim, present = _merge(parts, out, dtype, normalize)
    encoder_record = encoder_spec + (" +l2norm" if normalize else "")
    register_modality(info.root, modality, dim, dtype, present, encoder_record)
    shutil.rmtree(cache, ignore_errors=True)
    return {"dim": dim, "dtype": dtype, "present": present, "encoder": encoder_record, "items": len(items), "path": out}


# ----------------------------------------------------------------------------------------------
# CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--modality", required=True, metavar="NAME", help="modality name, e.g. text or image (features/NAME.parquet)")
    parser.add_argument(
        "--encoder",
        default="minilm",
        metavar="SPEC",
        help="minilm (default) | sentence-transformers:PATH | clip-text:PATH | clip-image:PATH | vectors:PATH",
    )
    parser.add_argument("--images", type=Path, metavar="DIR", help="clip-image: folder of <item_key>.jpg|.jpeg|.png|.webp files")
    parser.add_argument("--column", help="vectors (Parquet): the vector column (default: the only list column)")
    parser.add_argument("--dim", type=int, help="vectors: row width; required for raw float32 files such as .feat1CLS")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help=f"items per model call (default {DEFAULT_BATCH_SIZE})")
    parser.add_argument(
        "--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE,
        help=f"items per cached part; an interrupted run resumes at chunk granularity (default {DEFAULT_CHUNK_SIZE})",
    )
    parser.add_argument("--dtype", choices=sorted(FEATURE_DTYPES), default="float32", help="stored precision (default float32)")
    parser.add_argument("--device", default="cpu", help="torch device for model encoders (default cpu)")
    parser.add_argument(
        "--normalize", action=argparse.BooleanOptionalAction, default=False,
        help="L2-normalise vectors (default off: MISSRec feeds raw CLIP features; MiniLM normalises itself)",
    )
    parser.add_argument("--overwrite", action="store_true", help="recompute a modality that already exists")


def options_of(args: argparse.Namespace) -> Dict[str, Any]:
    """compute_features' keyword arguments from the flags `add_arguments` defines."""
    return dict(
        options=EncoderOptions(batch_size=args.batch_size, device=args.device, images=args.images, column=args.column,
                               dim=args.dim),
        dtype=args.dtype, normalize=args.normalize, chunk_size=args.chunk_size, overwrite=args.overwrite,
    )


def summary(result: Dict[str, Any]) -> str:
    """The line `missrec features` prints for a computed modality."""
    return (f"wrote {result['path']}: {result['dim']}-d {result['dtype']}, present for "
            f"{result['present']:,}/{result['items']:,} items ({result['encoder']})")
