"""Checkpoint folders on disk: which complete checkpoints exist, the `latest`/`best` pointers, and
each step's manifest (size and sha256 of every file) with its verification.

A step folder `step_<N>` is complete once it holds progress.json (the manager renames it into place
only then); `step_<N>.tmp` folders never are. A pointer is a small JSON file naming a step folder,
replaced atomically. The manager that writes all of this is `checkpoint.py`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

from datapipes.io import staged_file
from datapipes.schema import DataError

LATEST, BEST = "latest", "best"
PROGRESS_FILE = "progress.json"
MANIFEST_FILE = "manifest.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")


class CheckpointError(DataError, RuntimeError):
    """A missing, incomplete or damaged checkpoint; a DataError, so the CLI reports it in one line."""


# -- pointers ------------------------------------------------------------------------------------


def _step_of(path: Path) -> Optional[int]:
    m = _STEP_DIR.match(path.name)
    return int(m.group(1)) if m and path.is_dir() else None


def complete_checkpoints(ckpt_dir: Path | str) -> Dict[int, Path]:
    """Complete checkpoints by step (renamed folders only; `.tmp` ones are never complete)."""
    root = Path(ckpt_dir)
    if not root.is_dir():
        return {}
    found = [(_step_of(p), p) for p in root.iterdir()]
    return dict(sorted((s, p) for s, p in found if s is not None and (p / PROGRESS_FILE).exists()))


def read_pointer(ckpt_dir: Path, name: str) -> Optional[Dict[str, Any]]:
    try:
        return json.loads((ckpt_dir / name).read_text())
    except FileNotFoundError:
        return None
    except json.JSONDecodeError:
        raise CheckpointError(f"{ckpt_dir / name}: pointer file is not JSON") from None


def write_pointer(ckpt_dir: Path, name: str, payload: Dict[str, Any]) -> None:
    with staged_file(ckpt_dir / name) as tmp:
        with open(tmp, "w") as f:
            json.dump(payload, f)
            f.flush()
            os.fsync(f.fileno())


def pointed(ckpt_dir: Path | str, name: str) -> Optional[Path]:
    root = Path(ckpt_dir)
    pointer = read_pointer(root, name)
    if pointer is None:
        return None
    path = root / pointer["checkpoint"]
    return path if (path / PROGRESS_FILE).exists() else None


def latest_checkpoint(ckpt_dir: Path | str) -> Optional[Path]:
    """The newest complete checkpoint: the `latest` pointer, else (pointer lost) the highest step."""
    found = pointed(ckpt_dir, LATEST)
    if found is not None:
        return found
    complete = complete_checkpoints(ckpt_dir)
    return complete[max(complete)] if complete else None


def best_checkpoint(ckpt_dir: Path | str) -> Optional[Path]:
    return pointed(ckpt_dir, BEST)


# -- manifest ------------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _files_digest(files: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


def write_manifest(folder: Path) -> None:
    """Record the size and sha256 of every file in `folder` (the manifest also checksums itself)."""
    files = {p.relative_to(folder).as_posix(): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
             for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST_FILE}
    with open(folder / MANIFEST_FILE, "w") as f:
        json.dump({"files": files, "sha256": _files_digest(files)}, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())


# Checkpoints verified by this process, with the (size, mtime) of each file then: evaluation and
# scoring resolve a checkpoint and then load it, and need not hash it twice.
_verified: Dict[Path, Tuple] = {}


def _stats(path: Path, names) -> Tuple:
    stats = [(path / name).stat() for name in names]
    return tuple((name, st.st_size, st.st_mtime_ns) for name, st in zip(names, stats))


def verify_checkpoint(path: Path | str) -> None:
    """Raise CheckpointError naming the first file of checkpoint `path` that is missing, truncated or
    altered since its manifest was written. A checkpoint without a manifest (older code) passes."""
    path = Path(path)
    manifest_file = path / MANIFEST_FILE
    if not manifest_file.is_file():
        return
    try:
        manifest = json.loads(manifest_file.read_text())
        files = manifest["files"]
        intact = manifest["sha256"] == _files_digest(files)
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        intact = False
    if not intact:
        raise CheckpointError(f"{manifest_file}: damaged (its own checksum does not match)")
    for name in sorted(files):
        if not (path / name).is_file():
            raise CheckpointError(f"{path / name}: missing from the checkpoint")
    key = path.resolve()
    stats = _stats(path, sorted(files))
    if _verified.get(key) == stats:
        return
    for name, entry in sorted(files.items()):
        size = (path / name).stat().st_size
        if size != entry["bytes"]:
            raise CheckpointError(f"{path / name}: truncated or extended ({size:,} bytes, "
                                  f"the manifest says {entry['bytes']:,})")
        if _sha256(path / name) != entry["sha256"]:
            raise CheckpointError(f"{path / name}: damaged (sha256 differs from the manifest)")
    _verified[key] = stats


def newest_intact(ckpt_dir: Path | str, exclude: Sequence[Path] = ()) -> Optional[Path]:
    """The highest complete step under `ckpt_dir` that verifies, other than `exclude`."""
    for path in reversed(list(complete_checkpoints(ckpt_dir).values())):
        if path in exclude:
            continue
        try:
            verify_checkpoint(path)
        except CheckpointError:
            continue
        return path
    return None


def check_intact(path: Path) -> Path:
    """`path` once verified; a damaged one is refused naming the file and the newest intact step."""
    try:
        verify_checkpoint(path)
    except CheckpointError as e:
        fallback = newest_intact(path.parent, exclude=[path])
        hint = (f"newest intact checkpoint: {fallback} (remove {path} to fall back to it)" if fallback
                else f"no intact checkpoint in {path.parent}")
        raise CheckpointError(f"{e}; {hint}") from None
    return path
