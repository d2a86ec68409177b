"""The model's interests: the centroid table and each item's cluster per modality, and their refresh.

The head holds them as buffers (they travel with checkpoints); only `InterestState.refresh` writes
them: k-means over the catalogue's adapted modality vectors, each rank clustering its own slice of
the items (looked up and adapted a chunk at a time, never held whole), the assignments then
gathered so every rank holds all of them.
"""

from __future__ import annotations

import time
from typing import Dict, Iterator, Tuple

import torch
import torch.distributed as dist

from datapipes.batch import candidates_key
from missrec_torchrec import resources
from missrec_torchrec.distributed import lookup_rows
from missrec_torchrec.model.interest import discover_interests_chunked

# Items looked up and adapted at once when re-clustering (per modality): 16,384 x 128 fp32 raw rows are
# 8 MiB; the lookup's buffers hold a few copies, so a chunk stays well under the model's footprint.
REFRESH_CHUNK = 1 << 14


def item_slice(rank: int, world: int, num_items: int):
    """The items [lo, hi) rank `rank` clusters."""
    return rank * num_items // world, (rank + 1) * num_items // world


def gather_slices(local: torch.Tensor, world: int, num_items: int, group=None) -> torch.Tensor:
    """Every rank's `item_slice` of a per-item tensor, concatenated in item order (on the CPU)."""
    if world == 1:
        return local.cpu()
    size = -(-num_items // world) + 1
    padded = torch.zeros(size, dtype=local.dtype, device=local.device)
    padded[: local.numel()] = local
    gathered = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded, group=group)
    parts = []
    for r, g in enumerate(gathered):
        lo, hi = item_slice(r, world, num_items)
        parts.append(g[: hi - lo])
    return torch.cat(parts).cpu()


class InterestState:
    """Centroids and assignments of a session's model (see module doc)."""

    def __init__(self, session):
        self.session = session
        self.head = session.head

    def set(self, centroids: torch.Tensor, assignments: Dict[str, torch.Tensor]) -> None:
        self.head.centroids.copy_(centroids)
        buffers = self.head.assignments()
        for m, assign in assignments.items():
            buffers[m].copy_(assign)

    def cluster_sizes(self) -> torch.Tensor:
        """Items per cluster over every modality; index 0 is the padding cluster."""
        sizes = torch.zeros(self.head.num_clusters + 1, dtype=torch.int64)
        for assign in self.head.assignments().values():
            sizes += torch.bincount(assign.cpu(), minlength=self.head.num_clusters + 1)
        return sizes

    def chunks(self, lo: int, hi: int, size: int = 0) -> Iterator[Tuple[str, int, torch.Tensor]]:
        """(modality, first local item, adapted vectors) over items [lo, hi), `size` items at a time.
        Collective: every rank takes as many steps as the widest rank's slice needs (empty lookups
        past its own end), so all meet in every lookup."""
        s, core = self.session, self.head.core
        size = size or REFRESH_CHUNK
        widest = max(b - a for a, b in (item_slice(r, s.world, s.num_items) for r in range(s.world)))
        for step in range(-(-widest // size)):
            a, b = min(hi, lo + step * size), min(hi, lo + (step + 1) * size)
            ids = s.all_items[a:b].to(s.device)
            for m in self.head.modalities:
                raw = lookup_rows(s.collection(m), candidates_key(m), ids, pg=s.pg)
                yield m, a - lo, core.adapt({m: raw})[m].float()

    @torch.no_grad()
    def refresh(self, epoch: int, position: int = 0) -> Dict[str, float]:
        """k-means over the catalogue's adapted modality vectors; each rank clusters its item slice,
        looked up and adapted a chunk at a time (`chunks`: the faiss backend reads them twice and holds
        none of them past its step). The seed depends on the epoch and the position in it, so a
        resumed run re-clusters alike."""
        t0 = time.time()
        s, head, core = self.session, self.head, self.head.core
        if not head.modalities:  # ID-only model: no modality vectors, no interests
            return {"clusters": 0.0, "seconds": 0.0}
        was_training = core.training
        core.eval()
        lo, hi = item_slice(s.rank, s.world, s.num_items)
        presence = head.presence()
        present = {m: presence[m][lo:hi] for m in head.modalities}
        gen = torch.Generator().manual_seed(s.cfg.experiment.seed + 1_000_003 * epoch + position)
        with resources.phase("recluster", clusters=head.num_clusters, items=hi - lo):
            table, local = discover_interests_chunked(lambda: self.chunks(lo, hi), list(head.modalities), hi - lo,
                                                      s.model_cfg.hidden, s.model_cfg, present, generator=gen,
                                                      group=s.pg, k=head.num_clusters, device=s.device)
            self.set(table, {m: gather_slices(a, s.world, s.num_items, s.pg) for m, a in local.items()})
        core.train(was_training)
        used = self.cluster_sizes()[1:]
        return {
            "clusters": float(head.num_clusters),
            "clusters_used": float((used > 0).sum()),
            "largest_cluster": float(used.max()),
            "seconds": time.time() - t0,
        }
