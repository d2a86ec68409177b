"""Full-ranking evaluation of a session's model, and `missrec evaluate` on a saved checkpoint.

Two engines give the same ranks: eval.engine=catalogue encodes each rank's users in cost-sorted
sub-batches, collects eval.block_users of them into a block and counts, chunk by chunk, the items
that beat each target (catalogue.py, user_blocks.py); dmp sends each batch through the sharded
model's forward with the whole catalogue as candidates (the slow reference).

The catalogue engine holds the items one of two ways (eval.catalogue, `inference_catalogue`): a small
catalogue is looked up and adapted once per pass and held on every rank, so users are encoded from
its rows and each rank's block is its own users alone (no collective until the metrics are summed);
a large one stays rank-local: history rows are looked up per batch, every rank's users are gathered
into each block, each rank scans only its own items and the counts are summed over the ranks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Iterator, List, Optional

import torch

from datapipes.batch import SeqBatch
from missrec_torchrec import resources
from missrec_torchrec.catalogue import Catalogue, inference_catalogue
from missrec_torchrec.config import EvalConfig
from missrec_torchrec.metrics import RankingMetrics, target_ranks
from missrec_torchrec.session import Session, load_run, log0, open_session, resolve
from missrec_torchrec.user_blocks import Seen, batches_per_block, block_ranks, gather_block, in_blocks


def ranked(session: Session, split: str, ev: EvalConfig) -> Iterator:
    """(batch, target ranks) over a split's users (see module doc for the engines)."""
    if ev.engine == "catalogue":
        bank = inference_catalogue(session.item_bank(), ev.catalogue, ev.chunk_items)
        per_block = batches_per_block(ev.block_users, session.cfg.data.eval_batch_size)
        for batches in in_blocks(session.stream(split), per_block):
            yield from block_of_ranks(bank, [b.to(session.device) for b in batches], ev)
        return
    # The dmp engine scores every batch against the whole catalogue.
    for batch in session.stream(split, session.candidates("catalogue")):
        batch = batch.to(session.device)
        exclude = (batch.seen_offsets, batch.seen_values) if ev.mask_history else (None, None)
        yield batch, target_ranks(session.dmp(batch)[1]["scores"], batch.target, *exclude)


def block_of_ranks(bank: Catalogue, batches: List[SeqBatch], ev: EvalConfig) -> Iterator:
    """(batch, target ranks) of one block of this rank's batches (collective for a rank-local bank:
    every rank scans its own items for the whole block; a held one has no `pg`)."""
    users, scores = zip(*(bank.encode_with_targets(b.history, b.target, times=b.times) for b in batches))
    rows = [b.batch_size for b in batches]
    seen = Seen.cat([Seen.of(b) for b in batches], rows) if ev.mask_history else None
    target = torch.cat([b.target for b in batches])
    history = Seen.cat([Seen.of_window(b.history) for b in batches], rows) if bank.repeat_bias is not None else None
    block = gather_block(torch.cat(users), bank.pg, seen, target, torch.cat(scores), history)
    yield from zip(batches, block_ranks(bank, block, ev.chunk_items).split(rows))


@torch.no_grad()
def evaluate(session: Session, split: str) -> Dict[str, float]:
    """HR/NDCG/MRR over `split` (eval.* settings); with eval.cold_start also cold/* over the targets
    that no training sequence contains."""
    session.publish_ids()
    ev = session.cfg.eval
    groups = {"": RankingMetrics(ks=ev.ks)}
    if ev.cold_start:
        warm = session.training_items()
        groups["cold/"] = RankingMetrics(ks=ev.ks)
    session.dmp.eval()
    with resources.phase("evaluate", split=split) as phase:
        users = 0.0
        for batch, ranks in ranked(session, split, ev):
            users += float(batch.weight.sum())
            for prefix, metrics in groups.items():
                weight = batch.weight
                if prefix:  # cold start: only targets that no training sequence contains
                    weight = weight * (~warm[batch.target.cpu()]).to(weight)
                metrics.update_ranks(ranks, weight)
        phase["users"] = int(users)
    session.dmp.train()
    return {f"{prefix}{k}": v for prefix, metrics in groups.items() for k, v in metrics.compute(session.pg).items()}


def evaluate_checkpoint(checkpoint: Path, split: str = "test", overrides: Optional[List[str]] = None) -> Dict[str, float]:
    """Evaluate a saved checkpoint (a `step_N` folder or a run's `checkpoints/` folder) on `split`."""
    step_dir, cfg = load_run(resolve(checkpoint), overrides)
    session = open_session(cfg.for_inference(), step_dir)
    resources.report_bound(session.dmp, session.head)
    result = evaluate(session, split)
    log0(f"{split} " + "  ".join(f"{k} {v:.4f}" for k, v in sorted(result.items())))
    return result
