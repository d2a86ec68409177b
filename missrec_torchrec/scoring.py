"""`missrec score`: offline top-K recommendation for every user of a split, to one Parquet file.

Scoring opens the run's model as a `session.Session` (the sharded model from the run's config,
nothing prepared) and loads the checkpoint; the evaluation stream hands each rank a contiguous range
of users. Each rank encodes its own users (`catalogue.ChunkedBank`: their history rows looked up
collectively) and collects eval.block_users of them into a block; every rank then scans only its own
items, chunk by chunk, for the whole block (`user_blocks.py`), keeping a running top-K per user
(`topk.py`: exact, or approximate with a certificate), and the ranks' lists are merged for each
user. No rank holds more than one chunk of item vectors, and no users x items matrix is larger than
a group of users x one chunk. Exact scoring of a small catalogue holds it instead, as evaluation
does (eval.catalogue, `catalogue.inference_catalogue`): each rank scores its own users against every
item, with no lookups per batch. `--ann` instead takes each table's candidates from faiss indexes that
each rank builds once per run over its own items (`ann_index.py`), re-scores their union exactly
and merges the ranks' lists the same way, in blocks of at most ANN_BLOCK_USERS users a rank.

Output and resuming (`score_parts.py`): each rank commits its results in segments listed by its
manifest; a killed job restarted with `resume` keeps what the manifests list, and every rank
restarts at the lowest committed batch count of all ranks (batches a rank had already committed
are scored again, since the other ranks' users need its items, but not written twice). Blocks
start there too, so the ranks' blocks stay aligned; commits happen after a block's scan (a block
is the least work a restart repeats). Rank 0 merges the parts into OUT at the end.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import pyarrow as pa
import torch

from datapipes.batch import SeqBatch
from datapipes.io import check_writable
from datapipes.schema import DataError
from missrec_torchrec import resources
from missrec_torchrec.ann_index import ANN_BLOCK_USERS, AnnSettings, TableIndexes, ann_topk
from missrec_torchrec.catalogue import Catalogue, ChunkedBank, inference_catalogue
from missrec_torchrec.config import ConfigError
from missrec_torchrec.distributed import all_reduce_scalar
from missrec_torchrec.score_parts import Keys, RankParts, merge_parts, part_table, rank_folder
from missrec_torchrec.session import load_run, log0, open_session, process_rank
from missrec_torchrec.topk import ApproxPass, TopKPass, exact_topk, recall
from missrec_torchrec.user_blocks import Seen, batches_per_block, gather_block, in_blocks, scan

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
    ann: Optional[str] = None
    ann_candidates: Optional[int] = None
    hnsw_m: Optional[int] = None
    hnsw_ef: Optional[int] = None
    ivf_lists: Optional[int] = None
    ivf_probe: Optional[int] = None
    ann_bits: Optional[int] = None
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

    def ann_settings(self) -> Optional[AnnSettings]:
        knobs = (self.ann_candidates, self.hnsw_m, self.hnsw_ef, self.ivf_lists, self.ivf_probe, self.ann_bits)
        if self.ann is None:
            if any(v is not None for v in knobs):
                raise DataError("--ann-candidates, --ann-bits, --hnsw-* and --ivf-* are knobs of --ann: pass --ann "
                                "hnsw|ivf")
            return None
        return AnnSettings(self.ann, *knobs)


# ------------------------------------------------------------------------------------------------


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
    ann = opts.ann_settings()
    if ann is not None:
        ann.check()
        if opts.approx is not None:
            raise DataError("--approx and --ann are two candidate modes: pass one")
    if opts.recall_sample and opts.approx is None and ann is None:
        raise DataError("--recall-sample compares approximate scoring with exact: it needs --approx or --ann")


def _maybe_fail(session, end: int) -> None:
    limit = os.environ.get(FAIL_ENV)
    only = os.environ.get(FAIL_RANK_ENV)
    if limit and end > int(limit) and (only is None or int(only) == session.rank):
        raise SystemExit(f"{FAIL_ENV}={limit}: simulated crash on rank {session.rank}")


class BlockScorer:
    """Top-K rows for a block of users: exact, approximate with certificate, or from ANN candidates;
    the approximate modes can measure recall on a sample. Collective: every rank scores each block
    (exact and --approx scan their own items for every rank's users; exact over a held catalogue
    scores this rank's users alone). The held catalogue and the ANN indexes are built here."""

    def __init__(self, bank: ChunkedBank, opts: ScoreOptions, num_users: int, catalogue: str):
        ann = opts.ann_settings()
        exact = ann is None and opts.approx is None
        # Exact scoring scans what evaluation does (`catalogue`: eval.catalogue); the other modes read the bank.
        self.bank: Catalogue = inference_catalogue(bank, catalogue, opts.chunk_items) if exact else bank
        self.opts = opts
        self.k = min(opts.topk, bank.num_items)
        self.per_table = min(opts.approx, bank.num_items) if opts.approx else None
        # Every stride-th user (by user_index, so the sample does not depend on the world size).
        self.stride = max(1, num_users // opts.recall_sample) if opts.recall_sample else 0
        self.indexes = self.ann_per_table = None
        self.recall_seconds = 0.0  # --ann's exact scans of the recall sample
        if ann is not None:
            self.indexes = TableIndexes(bank, ann)  # each rank's over its own items (collective)
            self.ann_per_table = ann.per_table(self.k, bank.num_items)
            log0(f"ann: {len(self.indexes.indexes)} {ann.kind} index(es) per rank over its "
                 f"{self.indexes.items:,} of {bank.num_items:,} items built in {self.indexes.seconds:.1f} s, "
                 f"{self.indexes.bytes / 2**20:,.0f} MiB (not counted in users/s); candidates re-scored from "
                 + ("each rank's own shards" if self.indexes.own is not None else "collective lookups"))

    def block_users(self, configured: int) -> int:
        """Users per rank in one block (eval.block_users). An --ann block scans no items (unless a
        recall sample needs its exact lists), so a large one buys no speed, only memory: its lists."""
        if self.indexes is not None and not self.stride:
            return min(configured, ANN_BLOCK_USERS)
        return configured

    def mode(self) -> str:
        if self.indexes is not None:
            return self.indexes.describe(self.k, self.bank.num_items)
        return f"approx {self.opts.approx} per table" if self.opts.approx else "exact"

    @torch.no_grad()
    def batches(self, batches: List[SeqBatch]) -> List[Tuple[np.ndarray, np.ndarray, np.ndarray, Dict[str, float]]]:
        """(users, items, scores, stats) of each batch's real users; the batches form one block."""
        device, mask = self.bank.device, self.opts.mask_history
        repeats = self.bank.repeat_bias is not None
        resources.release_memory()  # the last block's freed heap pages (~0.2 GB at 1e6 items with --ann)
        us, users, seen, windows, counts = [], [], [], [], []
        for batch in batches:
            keep = torch.nonzero(batch.user >= 0).squeeze(1)
            times = None if batch.times is None else batch.times.to(device)
            us.append(self.bank.encode(batch.history.to(device), times=times)[keep.to(device)])
            users.append(batch.user[keep])
            counts.append(keep.numel())
            if mask:
                seen.append(Seen.of(batch, keep))
            if repeats:
                windows.append(Seen.of_window(batch.history, keep))
        excluded = Seen.cat(seen, counts).to(device) if mask else None
        history = Seen.cat(windows, counts).to(device) if repeats else None
        items, scores, stats = self(torch.cat(us), torch.cat(users), excluded, history)
        out, lo = [], 0
        for n, user in zip(counts, users):
            batch_stats = {}
            if "certified" in stats:
                batch_stats["certified"] = int(stats["certified"][lo : lo + n].sum())
            if "recall" in stats:
                r = stats["recall"][lo : lo + n]
                batch_stats.update(recall_sum=float(np.nansum(r)), recall_users=int(np.isfinite(r).sum()))
            out.append((user.numpy(), items[lo : lo + n], scores[lo : lo + n], batch_stats))
            lo += n
        return out

    def __call__(self, u: torch.Tensor, users: torch.Tensor, seen: Optional[Seen], history: Optional[Seen] = None):
        """(items, scores, per-user stats) as numpy: `certified` flags, `recall` (NaN: not sampled).
        `history`: the users' windows, which the repeat bias lowers (exact scoring only)."""
        bank, chunk, stats = self.bank, self.opts.chunk_items, {}
        sample = torch.nonzero(users % self.stride == 0).squeeze(1).to(u.device) if self.stride else None
        sample_seen = seen.subset(sample, u.shape[0]) if seen is not None and sample is not None else None
        if self.indexes is not None:
            scores, items = ann_topk(self.indexes, bank, u, self.k, self.ann_per_table, seen)
            if sample is not None:  # one exact scan per block for the sample (every rank takes part)
                resources.release_memory()
                t0 = time.perf_counter()
                _, exact = exact_topk(bank, u[sample], self.k, chunk, sample_seen)
                self.recall_seconds += time.perf_counter() - t0  # a measurement, not counted in users/s
                stats["recall"] = sampled_recall(items, sample, exact)
        elif self.per_table is None:
            scores, items = exact_topk(bank, u, self.k, chunk, seen, history)
        else:
            approx = ApproxPass(bank, gather_block(u, bank.pg, seen), self.k, self.per_table, chunk)
            passes = [approx]
            if sample is not None:  # the sample's exact lists come from the same scan
                passes.append(TopKPass(bank, gather_block(u[sample], bank.pg, sample_seen), self.k, chunk))
            scan(bank, chunk, passes)
            scores, items, certified = approx.finish()
            stats["certified"] = certified.cpu().numpy()
            if sample is not None:
                stats["recall"] = sampled_recall(items, sample, passes[1].finish()[1])
        return items.cpu().numpy(), scores.cpu().numpy(), stats


def sampled_recall(items: torch.Tensor, sample: torch.Tensor, exact: torch.Tensor) -> np.ndarray:
    """Per user recall@K of `items` against the sample's exact top-K (NaN outside the sample)."""
    out = np.full(items.shape[0], np.nan)
    out[sample.cpu().numpy()] = recall(items[sample].cpu().numpy(), exact.cpu().numpy())
    return out


def _plan(opts: ScoreOptions, step_dir: Path, world: int, batch_size: int, stream) -> Dict[str, Any]:
    """Everything the rows depend on; a resume must match it."""
    plan = {
        "checkpoint": str(step_dir.resolve()), "split": opts.split, "topk": opts.topk,
        "mask_history": opts.mask_history, "approx": opts.approx, "chunk_items": opts.chunk_items,
        "recall_sample": opts.recall_sample, "batch_size": batch_size, "world_size": world,
        "users": stream.num_users, "overrides": list(opts.overrides),
    }
    ann = opts.ann_settings()
    if ann is not None:  # only then, so plans of the other modes stay as they were
        plan["ann"] = ann.plan()
    return plan


def _run_batches(session, stream, parts: RankParts, scorer: BlockScorer, opts: ScoreOptions) -> int:
    """Score this rank's batches from where every rank can restart; returns the rows committed."""
    total, done = len(stream), parts.done
    start = int(all_reduce_scalar(done, "min", session.pg, session.device, torch.int64))
    if start:
        stream.load_state_dict({"epoch": stream.epoch, "batches": start})
    bar = None
    if session.rank == 0 and session.cfg.log.progress:
        from tqdm import tqdm

        bar = tqdm(total=total, initial=start, desc="score", unit="batch", dynamic_ncols=True)
    pending: List[pa.Table] = []
    stats: Dict[str, float] = {}
    segment_start, committed = max(done, start), 0
    per_block = batches_per_block(scorer.block_users(session.cfg.eval.block_users), session.cfg.data.eval_batch_size)
    # Blocks start where every rank restarts, so the ranks' blocks (and scans) stay aligned; batches
    # this rank committed before are scored again, for the other ranks' sake, but not written twice.
    for block in in_blocks(enumerate(stream, start=start), per_block):
        results = scorer.batches([batch for _, batch in block])
        for (i, _), (users, items, scores, batch_stats) in zip(block, results):
            if bar is not None:
                bar.update(1)
            if i < done:
                continue
            pending.append(part_table(users, items, scores))
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
    if cfg.model.repeat_bias and (opts.approx is not None or opts.ann is not None):
        # Both shortlist by cosines alone, blind to the history items the bias lowers.
        raise DataError("--approx and --ann do not support a model with model.repeat_bias: score exactly")
    parts = parts_folder(opts.out)
    if opts.overwrite and not opts.resume and process_rank() == 0 and parts.exists():
        shutil.rmtree(parts)
    ours = not parts.exists()  # made by this invocation: removed again if the input turns out bad
    cfg = cfg.for_inference(parts)
    cfg.eval.mask_history = opts.mask_history
    if opts.batch_size:
        cfg.data.eval_batch_size = opts.batch_size
    try:
        session = open_session(cfg, step_dir)
        resources.report_bound(session.dmp, session.head)
        stream = session.stream(opts.split)
        plan = _plan(opts, step_dir, session.world, cfg.data.eval_batch_size, stream)
        rank_parts = RankParts(rank_folder(parts, session.rank), plan, opts.resume)
        with resources.phase("score_setup") as phase:  # a held catalogue, or the --ann indexes, are built here
            scorer = BlockScorer(session.item_bank(), opts, stream.num_users, cfg.eval.catalogue)
            if scorer.indexes is not None:
                phase["index_bytes"] = scorer.indexes.bytes
        t0 = time.perf_counter()
        with resources.phase("score") as phase:
            committed = phase["users"] = _run_batches(session, stream, rank_parts, scorer, opts)
            phase["uncounted_seconds"] = scorer.recall_seconds
    except (DataError, ConfigError):
        if ours:
            shutil.rmtree(parts, ignore_errors=True)
        raise
    seconds = time.perf_counter() - t0 - scorer.recall_seconds
    scored = all_reduce_scalar(committed, "sum", session.pg, session.device)  # also the barrier before the merge
    if session.rank != 0:
        return {}
    done = dict(seconds=seconds, users_per_s=scored / max(seconds, 1e-9), mode=scorer.mode(), out=str(opts.out))
    if scorer.indexes is not None:
        done.update(index_seconds=scorer.indexes.seconds, index_bytes=scorer.indexes.bytes,
                    recall_seconds=scorer.recall_seconds)
    del scorer  # its indexes (or held catalogue) go before the keys come
    resources.release_memory()
    keys = (Keys(session.info.users_path, "user_index", "user_key"), Keys(session.info.items_path, None, "item_key"))
    summary = merge_parts(parts, opts.out, session.world, len(stream), stream.num_users, {"plan": plan}, keys)
    summary.update(done)
    _log_summary(opts, summary, scored)
    return summary


def _log_summary(opts: ScoreOptions, summary: Dict[str, Any], scored: float) -> None:
    log0(f"wrote {opts.out}: top-{opts.topk} of {summary['users']:,} users ({opts.split}, {summary['mode']}); "
         f"{scored:,.0f} scored now in {summary['seconds']:.1f} s, {summary['users_per_s']:,.0f} users/s")
    notes = []
    if "certified" in summary:
        notes.append(f"{100 * summary['certified']:.1f}% of users provably got the exact top-{opts.topk}")
    if "recall" in summary:
        spent = f", their exact scan {summary['recall_seconds']:.1f} s not counted" if summary.get("recall_seconds") else ""
        notes.append(f"recall@{opts.topk} vs exact {summary['recall']:.4f} on {summary['recall_users']} sampled users{spent}")
    if notes:
        log0("approx: " + "; ".join(notes))


