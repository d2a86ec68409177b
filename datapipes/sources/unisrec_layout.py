"""The UniSRec folder's layout, shared by `unisrec_import` and `unisrec_export`: file names, the
.inter header and history window, and the raw ``.feat*CLS`` feature files (docs/model.md section 11).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from datapipes.schema import DataError, FeatureWriter, feature_path

HEADER = ["user_id:token", "item_id_list:token_seq", "item_id:token"]
HISTORY_WINDOW = 50  # MAX_ITEM_LIST_LENGTH of the reference
MODALITY_SUFFIX = {"text": "feat1CLS", "image": "feat3CLS", "text_aug": "feat2CLS"}
REQUIRED_MODALITIES = ("text", "image")
FEATURE_CHUNK_ROWS = 1 << 16


@dataclass(frozen=True)
class Layout:
    folder: Path
    name: str
    domains: List[str]
    pretrain: bool

    def inter(self, split: str) -> Path:
        return self.folder / f"{self.name}.{split}.inter"

    def feature_files(self, modality: str) -> List[Path]:
        stems = self.domains if self.pretrain else [self.name]
        return [self.folder / f"{stem}.{MODALITY_SUFFIX[modality]}" for stem in stems]


def read_layout(folder: Path, name: Optional[str]) -> Layout:
    if not folder.is_dir():
        raise DataError(f"{folder}: not a folder")
    name = name or folder.name
    pt_file = folder / f"{name}.pt_datasets"
    pretrain = pt_file.is_file()
    domains = [name]
    if pretrain:
        domains = [d.strip() for d in pt_file.read_text().strip().split(",")]
        if not all(domains) or len(set(domains)) != len(domains):
            raise DataError(f"{pt_file}: line 1 must list distinct, non-empty domain names separated by commas")
    layout = Layout(folder, name, domains, pretrain)
    for split in ("train", "valid", "test"):
        if not layout.inter(split).is_file():
            raise DataError(f"{layout.inter(split)}: missing (expected {name}.{{train,valid,test}}.inter in {folder})")
    return layout


def feature_rows(path: Path, dim: int) -> int:
    size = path.stat().st_size
    if size == 0 or size % (4 * dim):
        raise DataError(f"{path}: {size} bytes is not a whole number of {dim}-wide float32 rows ({4 * dim} bytes each)")
    return size // (4 * dim)


def scan_features(layout: Layout, dim: int) -> Tuple[np.ndarray, Dict[str, List[Path]]]:
    """Items per domain, and the feature files of every modality the folder has."""
    files: Dict[str, List[Path]] = {}
    sizes: Optional[np.ndarray] = None
    first: Dict[int, Path] = {}
    for modality in MODALITY_SUFFIX:
        paths = layout.feature_files(modality)
        exists = [p.is_file() for p in paths]
        if not any(exists) and modality not in REQUIRED_MODALITIES:
            continue
        if not all(exists):
            raise DataError(f"{paths[exists.index(False)]}: missing ({modality} features)")
        rows = np.array([feature_rows(p, dim) for p in paths], dtype=np.int64)
        if sizes is None:
            sizes, first = rows, dict(enumerate(paths))
        for d, (have, want) in enumerate(zip(rows, sizes)):
            if have != want:
                raise DataError(f"{paths[d]}: {have} rows but {first[d]} has {want}; feature files must agree")
        files[modality] = paths
    return sizes, files


def write_features(out: Path, modality: str, paths: List[Path], dim: int, dtype: str = "float32") -> dict:
    """Copy raw feature rows into features/<modality>.parquet as `dtype`; present = row not all zero."""
    feature_path(out, modality).parent.mkdir(parents=True, exist_ok=True)
    writer = FeatureWriter(feature_path(out, modality), dim, dtype)
    try:
        for path in paths:
            matrix = np.memmap(path, dtype="<f4", mode="r").reshape(-1, dim)
            for start in range(0, len(matrix), FEATURE_CHUNK_ROWS):
                block = np.asarray(matrix[start : start + FEATURE_CHUNK_ROWS])
                bad = ~np.isfinite(block).all(axis=1)
                if bad.any():
                    raise DataError(f"{path}: row {start + int(np.argmax(bad))} has NaN or inf values")
                writer.add(block, (block != 0).any(axis=1), source=str(path))
    finally:
        writer.close()
    return {
        "dim": dim,
        "dtype": dtype,
        "present": writer.present,
        "encoder": f"precomputed .{MODALITY_SUFFIX[modality]} ({', '.join(p.name for p in paths)})",
    }
