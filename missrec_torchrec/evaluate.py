"""Full-ranking evaluation of a session's model, and `missrec evaluate` on a saved checkpoint.

Two engines give the same ranks: eval.engine=catalogue adapts the catalogue once, encodes users in
cost-sorted sub-batches and scores items in chunks (catalogue.py); dmp sends each batch through the
sharded model's forward with the whole catalogue as candidates.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Iterator, List, Optional

import torch

from missrec_torchrec.config import EvalConfig
from missrec_torchrec.metrics import RankingMetrics, target_ranks
from missrec_torchrec.session import Session, load_run, log0, open_session, resolve


def ranked(session: Session, split: str, ev: EvalConfig) -> Iterator:
    """(batch, target ranks) over a split's users (see module doc for the engines)."""
    bank = session.item_bank() if ev.engine == "catalogue" else None
    # The dmp engine scores every batch against the whole catalogue; the catalogue engine reads no KJT.
    stream = session.stream(split, None if bank is not None else session.candidates("catalogue"))
    for batch in stream:
        batch = batch.to(session.device)
        exclude = (batch.seen_offsets, batch.seen_values) if ev.mask_history else (None, None)
        if bank is not None:
            yield batch, bank.ranks(bank.encode(batch.history), batch.target, ev.chunk_items, *exclude)
        else:
            scores = session.dmp(batch)[1]["scores"]
            yield batch, target_ranks(scores, batch.target, *exclude)


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
    for batch, ranks in ranked(session, split, ev):
        for prefix, metrics in groups.items():
            weight = batch.weight
            if prefix:  # cold start: only targets that no training sequence contains
                weight = weight * (~warm[batch.target.cpu()]).to(weight)
            metrics.update_ranks(ranks, weight)
    session.dmp.train()
    return {f"{prefix}{k}": v for prefix, metrics in groups.items() for k, v in metrics.compute(session.pg).items()}


def evaluate_checkpoint(checkpoint: Path, split: str = "test", overrides: Optional[List[str]] = None) -> Dict[str, float]:
    """Evaluate a saved checkpoint (a `step_N` folder or a run's `checkpoints/` folder) on `split`."""
    step_dir, cfg = load_run(resolve(checkpoint), overrides)
    session = open_session(cfg.for_inference(), step_dir)
    result = evaluate(session, split)
    log0(f"{split} " + "  ".join(f"{k} {v:.4f}" for k, v in sorted(result.items())))
    return result
