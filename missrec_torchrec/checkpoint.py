"""Crash-safe distributed checkpoints with `torch.distributed.checkpoint` (DCP).

Layout of `ckpt_dir`:

    step_<N>/            one complete checkpoint: DCP files (model + optimizer, resharded on load,
                         so a checkpoint saved by W ranks loads into any world size),
                         progress.json (rank 0's progress dict + world size), rank_<r>.pt (rank r's
                         RNG states and data-pipe position), the caller's extra files (the
                         trainer's core.pt) and manifest.json (size and sha256 of each of those
                         files, written last; every load verifies it)
    step_<N>.tmp/        a save in flight or interrupted: never read, removed by the next save
    latest, best         pointer files naming a step_<N> folder (best also holds its metric)

A save writes everything into `step_<N>.tmp` (every rank's files, then rank 0's extra files), waits
for every rank, then rank 0 renames the folder (atomic), moves `best` (when the metric improved) and
`latest` (temp file + os.replace each), and applies keep-last-K retention, which never removes the
`best` checkpoint. A crash at any point leaves `latest` on the previous complete one, and a pointer
only ever names a folder that already holds every file of its checkpoint. A load that finds a file
missing, truncated or altered since the save stops with one line naming the file and the newest intact
checkpoint (checkpoints from before manifests existed load unchecked).

Reading that layout (pointers, manifests, verification) is `checkpoint_files.py`; each rank's RNG
state is `rng_state.py`'s. Learning rates are not saved (torchrec's KeyedOptimizer leaves param groups out): the trainer derives
them from its config and the restored step.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Set, Tuple

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizer

from missrec_torchrec.checkpoint_files import (
    BEST,
    LATEST,
    PROGRESS_FILE,
    CheckpointError,
    best_checkpoint,
    check_intact,
    complete_checkpoints,
    latest_checkpoint,
    pointed,
    read_pointer,
    write_manifest,
    write_pointer,
)
from missrec_torchrec.checkpoint_reader import BlockReader
from missrec_torchrec.rng_state import capture_rng_state, restore_rng_state

# Test hook: MISSREC_CKPT_FAIL_AT=<phase> simulates a crash right after that phase of a save.
FAIL_AT_ENV = "MISSREC_CKPT_FAIL_AT"
SAVE_PHASES = ("files", "extra", "manifest", "rename", "best", "latest")


class CheckpointMismatch(CheckpointError):
    """An intact checkpoint whose tensors do not fit the model it is loaded into (another dataset, or
    other model settings). `mismatches`: (key, shape in the checkpoint or None if absent, shape here)."""

    def __init__(self, path: Path, mismatches: Sequence[Tuple[str, Optional[Tuple[int, ...]], Tuple[int, ...]]]):
        self.path, self.mismatches = Path(path), list(mismatches)
        super().__init__(f"{path}: does not fit this model: {_describe_tensor(*self.mismatches[0])}"
                         + (f" (and {len(self.mismatches) - 1} more)" if len(self.mismatches) > 1 else ""))


def _describe_tensor(key: str, saved: Optional[Tuple[int, ...]], here: Tuple[int, ...]) -> str:
    if saved is None:
        return f"{key} is not in the checkpoint"
    return f"{key} is {list(saved)} in the checkpoint, {list(here)} here"


def shape_mismatches(metadata: Mapping[str, Any], model_state: Mapping[str, Any]) -> list:
    """(key, saved shape or None, model shape) for each model tensor the checkpoint cannot fill."""
    found = []
    for key, value in model_state.items():
        if not hasattr(value, "size"):
            continue
        saved = metadata.get(f"model.{key}")  # DCP flattens {"model": {...}} to "model.<key>"
        if saved is None:
            found.append((key, None, tuple(value.size())))
        elif hasattr(saved, "size") and tuple(saved.size) != tuple(value.size()):
            found.append((key, tuple(saved.size), tuple(value.size())))
    return found


def describe_mismatch(error: CheckpointMismatch, dataset: Path | str, num_items: int,
                      modality_dims: Mapping[str, int]) -> str:
    """One line naming the checkpoint and the dataset and what disagrees: the item count, a modality's
    feature dim, the modalities; otherwise the first tensor that differs (other model settings)."""
    found = []
    core_file = error.path / "core.pt"  # the trainer's dense core, with the modality dims it was built for
    saved_dims = torch.load(core_file, map_location="cpu", weights_only=True).get("modality_dims", {}) \
        if core_file.is_file() else {}
    if saved_dims and set(saved_dims) != set(modality_dims):
        found.append(f"modalities {sorted(saved_dims)} in the checkpoint, {sorted(modality_dims)} in this run")
    for name in sorted(set(saved_dims) & set(modality_dims)):
        if saved_dims[name] != modality_dims[name]:
            found.append(f"'{name}' features are {saved_dims[name]}-d in the checkpoint, {modality_dims[name]}-d "
                         f"in the dataset")
    items = sorted({saved[0] for _, saved, here in error.mismatches
                    if saved and here and here[0] == num_items and saved[0] != here[0]})
    if items:
        found.append(f"{items[0]:,} items in the checkpoint, {num_items:,} in the dataset")
    if not found:
        found.append(_describe_tensor(*error.mismatches[0]) + " (other model settings?)")
    return f"checkpoint {error.path} does not match dataset {dataset}: {'; '.join(found)}"


def resolve_checkpoint(path: Path | str) -> Path:
    """A complete checkpoint folder from what users pass: a run folder, its `checkpoints/` folder
    (the best checkpoint, else the latest), a `latest`/`best` pointer file, or a `step_N` folder."""
    path = Path(path)
    if (path / "checkpoints").is_dir():
        path = path / "checkpoints"
    if path.name in (LATEST, BEST) and path.is_file():
        found = pointed(path.parent, path.name)
    elif (path / PROGRESS_FILE).exists():
        found = path
    else:
        found = best_checkpoint(path) or latest_checkpoint(path)
    if found is None:
        raise CheckpointError(f"{path}: no complete checkpoint there")
    return check_intact(found)


# -- optimizer state -----------------------------------------------------------------------------


def _leaf_optimizers(opt: KeyedOptimizer, prefix: str = "") -> Iterator[Tuple[str, KeyedOptimizer]]:
    """(state_dict key prefix, optimizer) for every non-combined optimizer inside `opt`."""
    if isinstance(opt, CombinedOptimizer):
        for key, sub in opt.optimizers:
            yield from _leaf_optimizers(sub, f"{prefix}{key}." if key else prefix)
    else:
        yield prefix, opt


def _init_lazy_state(optimizer: KeyedOptimizer, saved_keys: Set[str]) -> None:
    """Create the lazily allocated state (Adam moments) that the checkpoint holds, so DCP has
    tensors to load into; without it that state would silently not load (docs/torchrec-notes.md §6)."""
    for prefix, opt in _leaf_optimizers(optimizer):
        if opt.state or not opt.params:
            continue
        saved = {name for name in opt.params if any(k.startswith(f"optim.state.{prefix}{name}.") for k in saved_keys)}
        if not saved:
            continue
        opt.init_state()  # one zero-grad step: moves params, but the load overwrites them
        opt.zero_grad(set_to_none=True)
        # Parameters that never had a gradient (an ID-only model's interest encoder) have no saved state.
        for name, param in opt.params.items():
            if name not in saved:
                opt.state.pop(param, None)


# -- manager -------------------------------------------------------------------------------------


@dataclass
class Restored:
    path: Path
    progress: Dict[str, Any]  # what `save` was given, plus "step" and "world_size"
    rank_state: Optional[Dict[str, Any]]  # this rank's own state; None if the world size changed
    absent: List[str] = field(default_factory=list)  # `absent_ok` keys the checkpoint lacked (kept as they were)


class CheckpointManager:
    """Save and restore model, optimizer and progress under `ckpt_dir`; every rank calls every method.

    `keep_last` complete checkpoints are kept (plus `best`); `mode` says whether a higher ("max") or
    lower ("min") metric is better. `skip_prefixes` leaves model state_dict keys out of checkpoints
    (e.g. frozen feature tables that are reloaded from their source anyway). `ties`: an equal metric
    also counts as better. `absent_ok`: model keys an older checkpoint may lack; they keep their
    current values and `load` names them (`Restored.absent`) for the caller to fill.
    """

    def __init__(
        self,
        ckpt_dir: Path | str,
        keep_last: int = 3,
        mode: str = "max",
        pg: Optional[dist.ProcessGroup] = None,
        skip_prefixes: Sequence[str] = (),
        ties: bool = False,
        absent_ok: Sequence[str] = (),
    ) -> None:
        if mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        self.dir = Path(ckpt_dir)
        self.keep_last = keep_last
        self.mode = mode
        self.pg = pg
        self.skip_prefixes = tuple(skip_prefixes)
        self.ties = ties  # an equal metric also moves `best` (RecBole's >=)
        self.absent_ok = tuple(absent_ok)

    # -- helpers --

    @property
    def rank(self) -> int:
        return dist.get_rank(self.pg) if dist.is_initialized() else 0

    @property
    def world_size(self) -> int:
        return dist.get_world_size(self.pg) if dist.is_initialized() else 1

    def _barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier(group=self.pg)

    def _state(self, model: nn.Module, optimizer: Optional[KeyedOptimizer], drop: Sequence[str] = ()) -> Dict[str, Any]:
        model_state = {k: v for k, v in model.state_dict().items() if not k.startswith(self.skip_prefixes)
                       and k not in drop}
        state: Dict[str, Any] = {"model": model_state}
        if optimizer is not None:
            state["optim"] = optimizer.state_dict()
        return state

    def _better(self, metric: float) -> bool:
        best = read_pointer(self.dir, BEST)
        if best is None or not (self.dir / best["checkpoint"]).is_dir():
            return True
        if self.ties and metric == best["metric"]:
            return True
        return metric > best["metric"] if self.mode == "max" else metric < best["metric"]

    # -- save --

    def save(
        self,
        step: int,
        model: nn.Module,
        optimizer: Optional[KeyedOptimizer],
        progress: Optional[Mapping[str, Any]] = None,
        rank_state: Optional[Mapping[str, Any]] = None,
        metric: Optional[float] = None,
        extra_files: Optional[Mapping[str, Any]] = None,
    ) -> Path:
        """Checkpoint as `step_<step>`. `progress` (JSON-able, rank 0's copy is kept: epoch, best
        metric, ...) is global; `rank_state` (torch.load-safe: dicts, lists, numbers, tensors) and the
        RNG states are this rank's. `metric` (global; rank 0's value is used) updates `best` when it
        improves on it. `extra_files` (rank 0's: file name -> object for torch.save) are written into
        the step folder before it is published, so no pointer ever names a step without them."""
        tmp = self.dir / f"step_{step}.tmp"
        if self.rank == 0:
            self.dir.mkdir(parents=True, exist_ok=True)
            for stale in self.dir.glob("step_*.tmp"):
                shutil.rmtree(stale)  # interrupted earlier saves (or a retry of this one)
            tmp.mkdir()
        self._barrier()
        write_tmp(tmp, self._state(model, optimizer), self.rank, {
            "rng": capture_rng_state(), "user": dict(rank_state or {})})
        _phase("files")
        if self.rank == 0:
            payload = {"progress": dict(progress or {}), "step": step, "world_size": self.world_size}
            (tmp / PROGRESS_FILE).write_text(json.dumps(payload))
            for name, obj in (extra_files or {}).items():
                torch.save(obj, tmp / name)
            _phase("extra")
        self._barrier()  # every rank's files are in tmp before it becomes visible
        if self.rank == 0:
            write_manifest(tmp)  # last: it covers every other file
            _phase("manifest")
            _publish(self, tmp, step, metric)
        self._barrier()
        return self.dir / f"step_{step}"

    def _retain(self) -> None:
        protected = {pointed(self.dir, BEST), pointed(self.dir, LATEST)}
        complete = complete_checkpoints(self.dir)
        for s in list(complete)[: -self.keep_last]:
            if complete[s] not in protected:
                shutil.rmtree(complete[s])

    # -- load --

    def load(
        self,
        model: nn.Module,
        optimizer: Optional[KeyedOptimizer] = None,
        which: str | Path = LATEST,
        restore_rng: bool = True,
    ) -> Optional[Restored]:
        """Load `which` ("latest", "best" or a checkpoint folder) into model (and optimizer) in place.

        Returns None when there is nothing to resume from. Per-rank state (and RNG) comes back only when
        the world size matches the saving run's; otherwise each rank would get another rank's data
        position, so the caller must restart its data pipes from `progress` instead.
        """
        if which == LATEST:
            path = latest_checkpoint(self.dir)
        elif which == BEST:
            path = best_checkpoint(self.dir)
        else:
            path = Path(which)
            if not (path / PROGRESS_FILE).exists():
                raise CheckpointError(f"{path}: not a complete checkpoint (no {PROGRESS_FILE})")
        if path is None:
            return None
        check_intact(path)
        metadata = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
        absent = [k for k in self.absent_ok if f"model.{k}" not in metadata]
        state = self._state(model, None, absent)
        mismatches = shape_mismatches(metadata, state["model"])
        if mismatches:
            raise CheckpointMismatch(path, mismatches)
        if optimizer is not None:
            _init_lazy_state(optimizer, set(metadata))
            state = self._state(model, optimizer, absent)
        try:
            dcp.load(state, storage_reader=BlockReader(str(path)))
        except dcp.api.CheckpointException as e:  # a BaseException: would escape every handler
            reason = [line for line in str(e).splitlines() if line.strip()][-1].strip()
            raise CheckpointError(f"{path}: cannot be loaded into this model ({reason[:300]})") from None
        if self.skip_prefixes or absent:
            # Sharded collections insist on every key: the skipped ones keep their current values.
            state["model"] = {**model.state_dict(), **state["model"]}
        model.load_state_dict(state["model"])
        if optimizer is not None:
            optimizer.load_state_dict(state["optim"])
        payload = json.loads((path / PROGRESS_FILE).read_text())
        rank_state = None
        rank_file = path / f"rank_{self.rank}.pt"
        if payload["world_size"] == self.world_size and rank_file.exists():
            try:
                saved = torch.load(rank_file, weights_only=True)
            except Exception as e:  # a checkpoint without a manifest can still be damaged
                raise CheckpointError(f"{rank_file}: unreadable ({str(e).splitlines()[0]})") from None
            if restore_rng:
                restore_rng_state(saved["rng"])
            rank_state = saved["user"]
        progress = dict(payload["progress"], step=payload["step"], world_size=payload["world_size"])
        return Restored(path=path, progress=progress, rank_state=rank_state, absent=absent)


def write_tmp(tmp: Path, state: Dict[str, Any], rank: int, rank_state: Dict[str, Any]) -> None:
    dcp.save(state, checkpoint_id=str(tmp))
    torch.save(rank_state, tmp / f"rank_{rank}.pt")


def _publish(manager: CheckpointManager, tmp: Path, step: int, metric: Optional[float]) -> None:
    """Rank 0: make the tmp folder the checkpoint, then move the pointers. Order matters: a crash
    before the rename leaves only a .tmp; after it, every pointer still names a complete checkpoint."""
    final = manager.dir / f"step_{step}"
    if final.exists():  # re-saving a step after a resume: `latest` falls back to a scan meanwhile
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(manager.dir)
    _phase("rename")
    # `best` first: a crash between the two pointers then only repeats work on resume (from the
    # previous `latest`) instead of losing this step's `best`.
    if metric is not None and manager._better(metric):
        write_pointer(manager.dir, BEST, {"checkpoint": final.name, "step": step, "metric": float(metric)})
    _phase("best")
    write_pointer(manager.dir, LATEST, {"checkpoint": final.name, "step": step})
    _phase("latest")
    manager._retain()


def _phase(name: str) -> None:
    """Test hook: a simulated crash right after save phase `name` when MISSREC_CKPT_FAIL_AT names it."""
    if os.environ.get(FAIL_AT_ENV) == name:
        raise SystemExit(f"{FAIL_AT_ENV}={name}: simulated crash")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
