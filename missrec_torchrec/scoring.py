"""`missrec score` (offline top-K recommendation for every user) and `missrec export-items`.

Scoring opens the run's model as a `session.Session` (the sharded model from the run's config,
nothing prepared) and loads the checkpoint; the evaluation stream hands each rank a contiguous range of users.
The catalogue is looked up from the sharded tables once (collectively) into a `catalogue.ItemBank`;
after that each rank works alone: users are encoded from the adapted catalogue and the catalogue is
scored in item chunks with the model's dynamic fusion (`MISSRecCore.fuse`: the values of
`MISSRecCore.score`, computed from per-table cosines against unit item vectors prepared once),
keeping a running top-K per user, so no B x N matrix is ever built for all N items at once.

Approximate mode (`approx=K'`) retrieves each modality's (and the ID table's) K' nearest items by
cosine and re-scores only their union exactly. Fused scores are convex combinations of the
per-modality cosines, so every item outside the union scores at most a bound computed from the
K'-th retrieved cosines; a user whose K-th re-scored item beats that bound got the exact top-K
("certified"), which the summary reports next to an optional sampled recall against exact scoring.

Output and resuming. Each rank commits its results in segments: a Parquet file per segment
(temporary name, then rename) followed by the rank's manifest `progress.json` listing the committed
segments. A killed job restarted with `resume` keeps what its manifests list, removes anything else,
and every rank restarts at the lowest committed batch count of all ranks (batches a rank had
already committed are skipped, not written twice). When all ranks are done rank 0 checks that every
user appears exactly once, writes OUT (temporary name, then rename) sorted by user_index, and
removes OUT.parts.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.distributed as dist

from datapipes.batch import SeqBatch
from datapipes.schema import DataError, atomic_dir, atomic_file, check_writable, creating
from missrec_torchrec import checkpoint as ckpt
from missrec_torchrec.config import ConfigError, dump_config, for_inference, load_config
from missrec_torchrec.catalogue import ItemBank, item_ranges, item_tables, item_vector_chunks
from missrec_torchrec.session import Session
from missrec_torchrec.model import fusion
from missrec_torchrec.recommender import ID_TABLE

SCORE_SCHEMA = pa.schema(
    [
        pa.field("user_index", pa.int64(), nullable=False),
        pa.field("user_key", pa.string(), nullable=False),
        pa.field("items", pa.list_(pa.int64()), nullable=False),
        pa.field("item_keys", pa.list_(pa.string()), nullable=False),
        pa.field("scores", pa.list_(pa.float32()), nullable=False),
    ]
)
METADATA_KEY = b"missrec.score"
MERGE_ROWS_PER_GROUP = 8192  # users per row group of the merged output
CERTIFY_MARGIN = 1e-5  # retrieval and re-scoring round differently; a certificate must survive that
FAIL_ENV = "MISSREC_SCORE_FAIL_AFTER_BATCHES"  # test hook: crash before committing past N batches
FAIL_RANK_ENV = "MISSREC_SCORE_FAIL_RANK"  # ... on this rank only (default: every rank)


@dataclass
class ScoreOptions:
    checkpoint: Path
    out: Path
    split: str = "test"
    topk: int = 100
    mask_history: bool = False
    chunk_items: int = 8192
    approx: Optional[int] = None
    recall_sample: int = 0
    batch_size: Optional[int] = None
    commit_every: int = 1
    resume: bool = False
    overwrite: bool = False
    overrides: List[str] = field(default_factory=list)

    @classmethod
    def from_args(cls, args) -> "ScoreOptions":
        """From `missrec score`'s parsed arguments (the flags carry these names)."""
        return cls(**{name: getattr(args, name) for name in cls.__dataclass_fields__})


# ------------------------------------------------------------------------------------------------
# Run, model and checkpoint


def _rank() -> int:
    # Before the process group exists (argument checks) torchrun's env var tells the rank.
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))


def _log0(*args) -> None:
    if _rank() == 0:
        print(*args, flush=True)


def load_run(checkpoint: Path | str, overrides: Optional[List[str]] = None) -> Tuple[Path, Dict[str, Any]]:
    """(complete checkpoint folder, the run's config with overrides) from a run or checkpoint path."""
    checkpoint = Path(checkpoint)
    if not checkpoint.exists():
        raise DataError(f"{checkpoint}: no such run or checkpoint folder")
    try:
        step_dir = ckpt.resolve_checkpoint(checkpoint)
    except ckpt.CheckpointError as e:
        raise DataError(str(e)) from None
    config_file = step_dir.parent.parent / "config.yaml"
    if not config_file.is_file():
        raise DataError(f"{config_file}: missing; is {step_dir} inside a run folder?")
    return step_dir, load_config(config_file, overrides)


def open_session(cfg: Dict[str, Any], step_dir: Path) -> Session:
    """The model of an inference config (`config.for_inference`) with the checkpoint's weights, in eval mode."""
    session = Session(cfg, prepare=False)
    session.load_weights(step_dir)
    return session


class RunningTopK:
    """The k best (score, item) pairs of each row over the item chunks seen so far, plus optional
    payload planes whose values travel with the kept pairs."""

    def __init__(self, rows: int, k: int, device: torch.device, payload: int = 0):
        self.k = k
        self.scores = torch.zeros(rows, 0, device=device)
        self.items = torch.zeros(rows, 0, dtype=torch.int64, device=device)
        self.payload = [torch.zeros(rows, 0, device=device) for _ in range(payload)]

    def add(self, scores: torch.Tensor, items: torch.Tensor, payload: Sequence[torch.Tensor] = ()) -> None:
        """scores B x C of `items` (C shared by the rows, or B x C); payload: B x C planes."""
        found = self._columns(scores)
        if found is None:
            return
        cols, ok = found
        picked = scores.gather(1, cols)
        if ok is not None:
            picked = picked.masked_fill(~ok, float("-inf"))
        both = torch.cat([self.scores, picked], 1)
        self.scores, pos = both.topk(min(self.k, both.shape[1]), dim=1)
        chosen = items[cols] if items.dim() == 1 else items.gather(1, cols)
        self.items = torch.cat([self.items, chosen], 1).gather(1, pos)
        self.payload = [torch.cat([old, p.gather(1, cols)], 1).gather(1, pos) for old, p in zip(self.payload, payload)]

    def _columns(self, scores: torch.Tensor):
        """(B x W columns, valid mask or None) that may enter the top k, or None for no column.

        Once a row holds k pairs only columns beating its k-th score qualify, after the first chunks
        a small share: selecting them costs a comparison, where a top-k selection costs a sort.
        """
        width = scores.shape[1]
        if self.scores.shape[1] == self.k:
            rows, cols = (scores > self.scores[:, -1:]).nonzero(as_tuple=True)  # row-major order
            if rows.numel() == 0:
                return None
            counts = torch.bincount(rows, minlength=scores.shape[0])
            most = int(counts.max())
            if most <= width // 8:
                slot = torch.arange(rows.numel(), device=rows.device) - (counts.cumsum(0) - counts)[rows]
                out = torch.zeros(scores.shape[0], most, dtype=torch.int64, device=scores.device)
                ok = torch.zeros(scores.shape[0], most, dtype=torch.bool, device=scores.device)
                out[rows, slot], ok[rows, slot] = cols, True
                return out, ok
        return scores.topk(min(self.k, width), dim=1)[1], None

    def result(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """Scores descending, ties by item index, so the order never depends on the chunking;
        -inf entries (excluded, or fewer than k items) carry item -1."""
        items = self.items.masked_fill(self.scores == float("-inf"), -1)
        by_item = items.argsort(dim=1)
        scores, items = self.scores.gather(1, by_item), items.gather(1, by_item)
        order = scores.argsort(dim=1, descending=True, stable=True)
        return scores.gather(1, order), items.gather(1, order)


class Seen:
    """The (row, item) pairs a batch excludes from its candidates: each user's history."""

    def __init__(self, rows: torch.Tensor, items: torch.Tensor):
        self.rows, self.items = rows, items

    @classmethod
    def of(cls, batch: SeqBatch, keep: torch.Tensor) -> "Seen":
        """Pairs of the rows `keep` (renumbered 0..len(keep)-1) from the batch's seen lists."""
        offsets, values = batch.seen_offsets, batch.seen_values
        rows = torch.arange(batch.batch_size).repeat_interleave(offsets[1:] - offsets[:-1])
        return cls(rows, values[offsets[0] : offsets[-1]]).subset(keep, batch.batch_size)

    def subset(self, keep: torch.Tensor, rows: int) -> "Seen":
        new_row = torch.full((rows,), -1, dtype=torch.int64, device=self.rows.device)
        new_row[keep] = torch.arange(keep.numel(), device=self.rows.device)
        mapped = new_row[self.rows]
        ok = mapped >= 0
        return Seen(mapped[ok], self.items[ok])

    def to(self, device: torch.device) -> "Seen":
        return Seen(self.rows.to(device), self.items.to(device))

    def mask(self, scores: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        inside = (self.items >= lo) & (self.items < hi)
        scores[self.rows[inside], self.items[inside] - lo] = float("-inf")
        return scores


def exact_topk(bank: ItemBank, u: torch.Tensor, k: int, chunk: int, seen: Optional[Seen]):
    """(scores, items) B x k: the whole catalogue scored exactly, chunk by chunk."""
    top = RunningTopK(u.shape[0], k, u.device)
    for lo, hi in item_ranges(bank.num_items, chunk):
        scores = bank.chunk_scores(u, lo, hi)
        top.add(seen.mask(scores, lo, hi) if seen is not None else scores, torch.arange(lo, hi, device=u.device))
    return top.result()


def approx_topk(bank: ItemBank, u: torch.Tensor, k: int, per_table: int, chunk: int, seen: Optional[Seen]):
    """(scores, items, certified): the union of every table's `per_table` nearest items by cosine,
    re-scored exactly; certified[b] says row b's top-k provably equals the exact one.

    Each table's top list carries every table's cosines of its items, so the re-scoring needs no
    vector lookups (except for a one-modality model with IDs, see ItemBank).
    """
    b, tables = u.shape[0], list(bank.unit)
    tops = {t: RunningTopK(b, per_table, u.device, payload=len(tables)) for t in tables}
    for lo, hi in item_ranges(bank.num_items, chunk):
        sims = bank.cosines(u, lo, hi)
        if seen is not None:  # a seen item then never enters any list, so its payload never matters
            for plane in sims.values():
                seen.mask(plane, lo, hi)
        idx = torch.arange(lo, hi, device=u.device)
        for t, top in tops.items():
            top.add(sims[t], idx, [sims[s] for s in tables])
    none = torch.full((b,), float("-inf"), device=u.device)  # the table retrieved every candidate
    kth = {t: top.scores[:, -1] if top.scores.shape[1] == per_table else none for t, top in tops.items()}
    found = torch.cat([top.items.masked_fill(top.scores == float("-inf"), -1) for top in tops.values()], 1)
    cand, order = found.sort(dim=1)
    payload = {t: torch.cat([top.payload[j] for top in tops.values()], 1).gather(1, order)
               for j, t in enumerate(tables)}
    duplicate = torch.zeros_like(cand, dtype=torch.bool)
    duplicate[:, 1:] = cand[:, 1:] == cand[:, :-1]
    usable = (cand >= 0) & ~duplicate
    rescored = bank.fused(u, payload, cand.clamp(min=0)).masked_fill(~usable, float("-inf"))
    top = RunningTopK(b, k, u.device)
    top.add(rescored, cand)
    scores, items = top.result()
    return scores, items, _certified(bank, scores, kth, k)


def _certified(bank: ItemBank, scores: torch.Tensor, kth: Dict[str, torch.Tensor], k: int) -> torch.Tensor:
    """Rows whose k-th re-scored item beats every item outside the retrieved union.

    Outside the union each table's cosine is at most its k'-th retrieved one, so every item there
    scores at most `fusion.upper_bound` of those. A table that retrieved every candidate
    (kth = -inf) leaves nothing outside the union.
    The one-modality model with IDs scores a summed vector, which has no such bound.
    """
    b, device = scores.shape[0], scores.device
    if bank.summed:
        return torch.zeros(b, dtype=torch.bool, device=device)
    everything = torch.stack([v == float("-inf") for v in kth.values()]).any(0)
    bound = fusion.upper_bound([kth[m] for m in bank.modalities], kth.get(ID_TABLE))
    kth_score = scores[:, k - 1] if scores.shape[1] >= k else torch.full((b,), float("-inf"), device=device)
    return everything | (kth_score > bound + CERTIFY_MARGIN)


def recall(approx_items: np.ndarray, exact_items: np.ndarray) -> np.ndarray:
    """Per row |approx & exact| / |exact| over valid (>= 0) entries; NaN where exact is empty."""
    out = np.full(len(exact_items), np.nan)
    for i, (a, e) in enumerate(zip(approx_items, exact_items)):
        e = set(np.asarray(e)[np.asarray(e) >= 0].tolist())
        if e:
            out[i] = len(e & set(np.asarray(a).tolist())) / len(e)
    return out


def topk_recall(approx_path: Path | str, exact_path: Path | str) -> float:
    """Mean recall of one score file's top-K lists against another's (same users, e.g. approx vs exact)."""
    a, e = pq.read_table(approx_path), pq.read_table(exact_path)
    if a.column("user_index").to_pylist() != e.column("user_index").to_pylist():
        raise DataError(f"{approx_path}: not the same users as {exact_path}")
    return float(np.nanmean(recall(a.column("items").to_pylist(), e.column("items").to_pylist())))


# ------------------------------------------------------------------------------------------------
# Per-rank part files


class Keys:
    """Key strings by dense index (items.parquet: item_index is the row number; users.parquet:
    looked up through user_index)."""

    def __init__(self, path: Path, index_column: Optional[str], key_column: str):
        table = pq.read_table(path, columns=[c for c in (index_column, key_column) if c])
        self.keys = table.column(key_column).combine_chunks()
        self.index = None
        if index_column is not None:
            index = table.column(index_column).to_numpy()
            self.order = np.argsort(index, kind="stable")
            self.index = index[self.order]

    def take(self, idx: np.ndarray) -> pa.Array:
        if self.index is None:
            return self.keys.take(pa.array(idx))
        return self.keys.take(pa.array(self.order[np.searchsorted(self.index, idx)]))


def score_table(
    users: np.ndarray, items: np.ndarray, scores: np.ndarray, user_keys: Keys, item_keys: Keys
) -> pa.Table:
    """Rows of the output from B x k arrays (item -1 = no item: dropped from that user's list)."""
    valid = items >= 0
    offsets = pa.array(np.concatenate([[0], np.cumsum(valid.sum(1))]).astype(np.int32))
    flat = items[valid]
    return pa.Table.from_arrays(
        [
            pa.array(users, pa.int64()),
            user_keys.take(users),
            pa.ListArray.from_arrays(offsets, pa.array(flat, pa.int64())),
            pa.ListArray.from_arrays(offsets, item_keys.take(flat)),
            pa.ListArray.from_arrays(offsets, pa.array(scores[valid].astype(np.float32))),
        ],
        schema=SCORE_SCHEMA,
    )


class RankParts:
    """One rank's committed segments under `folder` and the manifest that lists them.

    A segment file is renamed into place before the manifest names it, so a crash between the two
    leaves an unlisted file, which a resume deletes; listed segments are never rewritten.
    """

    MANIFEST = "progress.json"

    def __init__(self, folder: Path, plan: Dict[str, Any], resume: bool):
        self.folder, self.plan = folder, plan
        self.segments: List[Dict[str, Any]] = []
        manifest = folder / self.MANIFEST
        if resume and manifest.is_file():
            saved = json.loads(manifest.read_text())
            if saved["plan"] != plan:
                diff = sorted(k for k in plan if saved["plan"].get(k) != plan[k])
                raise DataError(f"{manifest}: written with other settings ({', '.join(diff)} differ); "
                                f"resume with the same ones or pass --overwrite without --resume")
            self.segments = saved["segments"]
        elif folder.exists():
            shutil.rmtree(folder)
        with creating(folder):
            folder.mkdir(parents=True, exist_ok=True)
        keep = {seg["file"] for seg in self.segments} | {self.MANIFEST}
        for stray in folder.iterdir():  # unlisted segments and half-written temporary files
            if stray.name not in keep:
                stray.unlink()

    @property
    def done(self) -> int:
        return self.segments[-1]["end"] if self.segments else 0

    def commit(self, table: pa.Table, start: int, end: int, stats: Dict[str, float]) -> None:
        name = f"seg-{start:09d}-{end:09d}.parquet"
        with atomic_file(self.folder / name) as tmp:
            pq.write_table(table, tmp)
        self.segments.append({"file": name, "start": start, "end": end, "rows": table.num_rows, **stats})
        with atomic_file(self.folder / self.MANIFEST) as tmp:
            tmp.write_text(json.dumps({"plan": self.plan, "segments": self.segments}))


def _rank_folder(parts: Path, rank: int) -> Path:
    return parts / f"rank-{rank:05d}"


def merge_parts(
    parts: Path, out: Path, world: int, batches: int, users: int, metadata: Dict[str, Any]
) -> Dict[str, Any]:
    """Rank 0: every rank's segments into `out`, sorted by user_index, each user exactly once; the
    totals (users, certified share, sampled recall) go into the file's metadata too."""
    files, segments = _finished_segments(parts, world, batches)
    ordered = _check_users(parts, files, users)
    totals = _totals(segments)
    schema = SCORE_SCHEMA.with_metadata({METADATA_KEY: json.dumps({**metadata, "totals": totals}).encode()})
    with atomic_file(out) as tmp, pq.ParquetWriter(str(tmp), schema) as writer:
        if ordered:  # the usual case: ranks own contiguous user ranges in file order
            pending: List[pa.Table] = []
            for f in files:
                pending.append(pq.read_table(f))
                if sum(t.num_rows for t in pending) >= MERGE_ROWS_PER_GROUP:
                    writer.write_table(pa.concat_tables(pending))
                    pending = []
            if pending:
                writer.write_table(pa.concat_tables(pending))
        else:
            table = pa.concat_tables([pq.read_table(f) for f in files]).sort_by("user_index")
            writer.write_table(table, row_group_size=MERGE_ROWS_PER_GROUP)
    shutil.rmtree(parts)
    return totals


def _finished_segments(parts: Path, world: int, batches: int) -> Tuple[List[Path], List[Dict[str, Any]]]:
    files, segments = [], []
    for r in range(world):
        manifest = _rank_folder(parts, r) / RankParts.MANIFEST
        listed = json.loads(manifest.read_text())["segments"]
        if not listed or listed[-1]["end"] != batches:
            raise DataError(f"{manifest}: rank {r} has not finished its {batches} batches")
        files += [_rank_folder(parts, r) / seg["file"] for seg in listed]
        segments += listed
    return files, segments


def _check_users(parts: Path, files: List[Path], users: int) -> bool:
    """Every user exactly once; returns whether the files already come in user_index order."""
    index = np.concatenate([pq.read_table(f, columns=["user_index"]).column(0).to_numpy() for f in files])
    distinct = len(np.unique(index))
    if distinct != len(index) or len(index) != users:
        raise DataError(f"{parts}: {len(index)} rows for {distinct} distinct users, expected {users}")
    return bool(np.all(np.diff(index) > 0))


def _totals(segments: List[Dict[str, Any]]) -> Dict[str, Any]:
    rows = sum(s["rows"] for s in segments)
    out: Dict[str, Any] = {"users": rows}
    if segments and segments[0].get("certified") is not None:
        out["certified"] = sum(s["certified"] for s in segments) / max(rows, 1)
    sampled = sum(s.get("recall_users", 0) for s in segments)
    if sampled:
        out["recall"] = sum(s["recall_sum"] for s in segments) / sampled
        out["recall_users"] = sampled
    return out


# ------------------------------------------------------------------------------------------------
# Scoring


def parts_folder(out: Path) -> Path:
    return out.parent / f"{out.name}.parts"


def _check_outputs(opts: ScoreOptions) -> None:
    out, parts = Path(opts.out), parts_folder(Path(opts.out))
    if out.is_dir():
        raise DataError(f"{out}: is a folder; --out names the Parquet file to write")
    check_writable(out.parent, out)
    if out.exists() and not opts.overwrite:
        raise DataError(f"{out}: exists (pass --overwrite to replace it)")
    if parts.exists() and not (opts.resume or opts.overwrite):
        raise DataError(f"{parts}: an interrupted run's parts are there (pass --resume to continue it, "
                        f"or --overwrite to start over)")
    for name, value, least in (("topk", opts.topk, 1), ("chunk_items", opts.chunk_items, 1),
                               ("commit_every", opts.commit_every, 1), ("recall_sample", opts.recall_sample, 0)):
        if value < least:
            raise DataError(f"--{name.replace('_', '-')} {value}: must be >= {least}")
    if opts.approx is not None and opts.approx < 1:
        raise DataError(f"--approx {opts.approx}: must be >= 1")
    if opts.recall_sample and opts.approx is None:
        raise DataError("--recall-sample compares approximate scoring with exact: it needs --approx")


def _all_min(value: int, session) -> int:
    t = torch.tensor([value], dtype=torch.int64, device=session.device)
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=session.pg)
    return int(t.item())


def _all_sum(value: float, session) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=session.device)
    if dist.is_initialized():
        dist.all_reduce(t, group=session.pg)
    return float(t.item())


def _maybe_fail(session, end: int) -> None:
    limit = os.environ.get(FAIL_ENV)
    only = os.environ.get(FAIL_RANK_ENV)
    if limit and end > int(limit) and (only is None or int(only) == session.rank):
        raise SystemExit(f"{FAIL_ENV}={limit}: simulated crash on rank {session.rank}")


class BatchScorer:
    """Top-K rows for one batch of users: exact, or approximate with certificate and sampled recall."""

    def __init__(self, bank: ItemBank, opts: ScoreOptions, num_users: int):
        self.bank, self.opts = bank, opts
        self.k = min(opts.topk, bank.num_items)
        self.per_table = min(opts.approx, bank.num_items) if opts.approx else None
        # Every stride-th user (by user_index, so the sample does not depend on the world size).
        self.stride = max(1, num_users // opts.recall_sample) if opts.recall_sample else 0

    @torch.no_grad()
    def __call__(self, batch: SeqBatch, u: torch.Tensor) -> Tuple[np.ndarray, np.ndarray, np.ndarray, Dict[str, float]]:
        keep = torch.nonzero(batch.user >= 0).squeeze(1)
        u = u[keep.to(u.device)]
        users = batch.user[keep]
        seen = Seen.of(batch, keep).to(u.device) if self.opts.mask_history else None
        stats: Dict[str, float] = {}
        chunk = self.opts.chunk_items
        if self.per_table is None:
            scores, items = exact_topk(self.bank, u, self.k, chunk, seen)
        else:
            scores, items, certified = approx_topk(self.bank, u, self.k, self.per_table, chunk, seen)
            stats["certified"] = int(certified.sum())
            if self.stride:
                stats.update(self._sampled_recall(u, users, items, seen))
        return users.numpy(), items.cpu().numpy(), scores.cpu().numpy(), stats

    def _sampled_recall(self, u, users, items, seen) -> Dict[str, float]:
        pick = torch.nonzero(users % self.stride == 0).squeeze(1).to(u.device)
        if pick.numel() == 0:
            return {"recall_sum": 0.0, "recall_users": 0}
        sub_seen = seen.subset(pick, u.shape[0]) if seen is not None else None
        _, exact = exact_topk(self.bank, u[pick], self.k, self.opts.chunk_items, sub_seen)
        r = recall(items[pick].cpu().numpy(), exact.cpu().numpy())
        return {"recall_sum": float(np.nansum(r)), "recall_users": int(np.isfinite(r).sum())}


def _plan(opts: ScoreOptions, step_dir: Path, world: int, batch_size: int, stream) -> Dict[str, Any]:
    """Everything the rows depend on; a resume must match it."""
    return {
        "checkpoint": str(step_dir.resolve()), "split": opts.split, "topk": opts.topk,
        "mask_history": opts.mask_history, "approx": opts.approx, "chunk_items": opts.chunk_items,
        "recall_sample": opts.recall_sample, "batch_size": batch_size, "world_size": world,
        "users": stream.num_users, "overrides": list(opts.overrides),
    }


def _run_batches(session, stream, parts: RankParts, scorer: BatchScorer, opts: ScoreOptions, keys) -> int:
    """Score this rank's batches from where every rank can restart; returns the rows committed."""
    total, done = len(stream), parts.done
    start = _all_min(done, session)
    if start:
        stream.load_state_dict({"epoch": stream.epoch, "batches": start})
    bar = None
    if session.rank == 0 and session.cfg["log"]["progress"]:
        from tqdm import tqdm

        bar = tqdm(total=total, initial=start, desc="score", unit="batch", dynamic_ncols=True)
    pending: List[pa.Table] = []
    stats: Dict[str, float] = {}
    segment_start, committed = max(done, start), 0
    for i, batch in enumerate(stream, start=start):
        if bar is not None:
            bar.update(1)
        if i < done:
            continue  # committed before the restart
        u = scorer.bank.encode(batch.history.to(session.device))
        users, items, scores, batch_stats = scorer(batch, u)
        pending.append(score_table(users, items, scores, *keys))
        for key, value in batch_stats.items():
            stats[key] = stats.get(key, 0) + value
        if i + 1 - segment_start >= opts.commit_every or i + 1 == total:
            _maybe_fail(session, i + 1)
            table = pa.concat_tables(pending)
            parts.commit(table, segment_start, i + 1, stats)
            committed += table.num_rows
            pending, stats, segment_start = [], {}, i + 1
    if bar is not None:
        bar.close()
    return committed


def score(opts: ScoreOptions) -> Dict[str, Any]:
    """`missrec score`: top-K items of every user of a split into one Parquet file (see module doc)."""
    opts.out = Path(opts.out)
    step_dir, cfg = load_run(opts.checkpoint, opts.overrides)
    _check_outputs(opts)
    parts = parts_folder(opts.out)
    if opts.overwrite and not opts.resume and _rank() == 0 and parts.exists():
        shutil.rmtree(parts)
    ours = not parts.exists()  # made by this invocation: removed again if the input turns out bad
    cfg = for_inference(cfg, parts)
    cfg["eval"]["mask_history"] = opts.mask_history
    if opts.batch_size:
        cfg["data"]["eval_batch_size"] = opts.batch_size
    try:
        session = open_session(cfg, step_dir)
        stream = session.stream(opts.split)
        plan = _plan(opts, step_dir, session.world, cfg["data"]["eval_batch_size"], stream)
        rank_parts = RankParts(_rank_folder(parts, session.rank), plan, opts.resume)
        bank = session.item_bank()
        scorer = BatchScorer(bank, opts, stream.num_users)
        keys = (Keys(session.info.users_path, "user_index", "user_key"),
                Keys(session.info.items_path, None, "item_key"))
        t0 = time.perf_counter()
        committed = _run_batches(session, stream, rank_parts, scorer, opts, keys)
    except (DataError, ConfigError):
        if ours:
            shutil.rmtree(parts, ignore_errors=True)
        raise
    seconds = time.perf_counter() - t0
    scored = _all_sum(committed, session)  # also the barrier before the merge
    if session.rank != 0:
        return {}
    mode = f"approx {opts.approx} per table" if opts.approx else "exact"
    summary = merge_parts(parts, opts.out, session.world, len(stream), stream.num_users, {"plan": plan})
    summary.update(seconds=seconds, users_per_s=scored / max(seconds, 1e-9), mode=mode, out=str(opts.out))
    _log0(f"wrote {opts.out}: top-{opts.topk} of {summary['users']:,} users ({opts.split}, {mode}); "
          f"{scored:,.0f} scored now in {seconds:.1f} s, {summary['users_per_s']:,.0f} users/s")
    if "certified" in summary:
        line = f"approx: {100 * summary['certified']:.1f}% of users provably got the exact top-{opts.topk}"
        if "recall" in summary:
            line += f"; recall@{opts.topk} vs exact {summary['recall']:.4f} on {summary['recall_users']} sampled users"
        _log0(line)
    return summary


# ------------------------------------------------------------------------------------------------
# Export


EXPORT_FILE = "export.json"


def export_schema(dim: int) -> pa.Schema:
    return pa.schema(
        [
            pa.field("item_index", pa.int64(), nullable=False),
            pa.field("item_key", pa.string(), nullable=False),
            pa.field("vector", pa.list_(pa.float32(), dim), nullable=False),
            pa.field("present", pa.bool_(), nullable=False),
        ]
    )


def _vector_table(lo: int, vectors: np.ndarray, present: np.ndarray, item_keys: Keys) -> pa.Table:
    n, dim = vectors.shape
    idx = np.arange(lo, lo + n, dtype=np.int64)
    flat = pa.array(np.ascontiguousarray(vectors, np.float32).reshape(-1))
    columns = [pa.array(idx), item_keys.take(idx), pa.FixedSizeListArray.from_arrays(flat, dim),
               pa.array(present.astype(bool))]
    return pa.Table.from_arrays(columns, schema=export_schema(dim))


def _fusion_record(session, files: Dict[str, str]) -> Dict[str, Any]:
    core, c = session.head.core, session.head.config
    alpha = core.fusion_alpha
    return {
        "items": session.num_items,
        "hidden": c.hidden,
        "tables": files,
        "use_id": c.use_id,
        "fusion": c.fusion if len(core.modalities) > 1 else ("single" if core.modalities else "id_only"),
        "fusion_alpha": None if alpha is None else alpha.detach().cpu().reshape(-1).tolist(),
        "mask_missing_modality": c.mask_missing_modality,
        "temperature": c.temperature,
        "scoring": fusion.DESCRIPTION,
    }


def export_items(checkpoint: Path | str, out: Path | str, overwrite: bool = False,
                 overrides: Optional[List[str]] = None) -> Path:
    """`missrec export-items`: each table's item vectors (adapted modalities, raw IDs) as Parquet."""
    out = Path(out)
    step_dir, cfg = load_run(checkpoint, overrides)
    if out.exists() and not overwrite:
        raise DataError(f"{out}: output folder exists (pass --overwrite to replace it)")
    # Only rank 0 writes; the others take part in the collective lookups.
    inputs = [step_dir, Path(cfg["data"]["dataset"])]
    with atomic_dir(out, overwrite=True, inputs=inputs) if _rank() == 0 else nullcontext(None) as tmp:
        cfg = for_inference(cfg, tmp)
        session = open_session(cfg, step_dir)
        if session.rank == 0:  # serving reads the model settings next to the vectors
            (tmp / "config.yaml").write_text(dump_config(cfg))
        item_keys = Keys(session.info.items_path, None, "item_key")
        files = {table: f"{table}.parquet" for table in item_tables(session)}
        for table, name in files.items():
            _export_table(session, table, tmp / name if session.rank == 0 else None, item_keys)
        if session.rank == 0:
            record = {"checkpoint": str(step_dir.resolve()), **_fusion_record(session, files)}
            (tmp / EXPORT_FILE).write_text(json.dumps(record, indent=2) + "\n")
    if dist.is_initialized():
        dist.barrier()
    _log0(f"wrote {out}: {', '.join(files.values())} for {session.num_items:,} items")
    return out


def _export_table(session, table: str, path: Optional[Path], item_keys: Keys) -> None:
    """One table's vectors, a row group per lookup chunk; `path` None: only join the lookups."""
    present = session.head.presence().get(table)  # the ID table has no missing rows
    dim = session.head.config.hidden
    with pq.ParquetWriter(str(path), export_schema(dim)) if path is not None else nullcontext() as writer:
        for lo, vectors in item_vector_chunks(session, table):
            if writer is None:
                continue
            hi = lo + len(vectors)
            flags = present[lo:hi].cpu().numpy() if present is not None else np.ones(hi - lo, dtype=bool)
            writer.write_table(_vector_table(lo, vectors.cpu().numpy(), flags, item_keys))
