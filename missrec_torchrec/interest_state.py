"""The model's interests: the centroid table and each item's cluster per modality, and their refresh.

The centroids are a head buffer; each item's clusters are columns of the row-wise sharded item
state (`item_state.py`). Both travel with checkpoints; only `InterestState.refresh` writes them:
k-means over the catalogue's adapted modality vectors, each rank clustering the items it owns
(looked up and adapted a chunk at a time, never held whole) and writing their clusters into its own
state rows, so no rank ever holds every item's cluster.
"""

from __future__ import annotations

import time
from typing import Dict, Iterator, Tuple

import torch
import torch.distributed as dist

from datapipes.batch import candidates_key
from missrec_torchrec import resources
from missrec_torchrec.distributed import lookup_rows
from missrec_torchrec.item_state import write_columns
from missrec_torchrec.model.interest import discover_interests_chunked

# Items looked up and adapted at once when re-clustering (per modality): 16,384 x 128 fp32 raw rows are
# 8 MiB; the lookup's buffers hold a few copies, so a chunk stays well under the model's footprint.
REFRESH_CHUNK = 1 << 14


def item_slice(rank: int, world: int, num_items: int):
    """The items [lo, hi) rank `rank` owns: its rows of a row-wise sharded table (TorchRec's blocks
    of ceil(N / world) rows, so the last ranks may own fewer, or none)."""
    block = -(-num_items // world)
    return min(num_items, rank * block), min(num_items, (rank + 1) * block)


class InterestState:
    """Centroids and assignments of a session's model (see module doc)."""

    def __init__(self, session):
        self.session = session
        self.head = session.head

    def set(self, centroids: torch.Tensor, clusters: Dict[str, torch.Tensor]) -> None:
        """The centroids, and this rank's items' clusters per modality (its `item_slice`)."""
        self.head.centroids.copy_(centroids)
        write_columns(self.session.own_state(), self.head.modalities, clusters=clusters)

    def cluster_sizes(self, clusters: Dict[str, torch.Tensor]) -> torch.Tensor:
        """Items per cluster over every modality and rank, from each rank's own items' `clusters`;
        index 0 is the padding cluster (collective)."""
        sizes = torch.zeros(self.head.num_clusters + 1, dtype=torch.int64, device=self.session.device)
        for assign in clusters.values():
            sizes += torch.bincount(assign.to(torch.int64), minlength=self.head.num_clusters + 1)
        if self.session.world > 1:
            dist.all_reduce(sizes, group=self.session.pg)
        return sizes.cpu()

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
        present = head.state(s.own_state()).present()
        gen = torch.Generator().manual_seed(s.cfg.experiment.seed + 1_000_003 * epoch + position)
        with resources.phase("recluster", clusters=head.num_clusters, items=hi - lo):
            table, local = discover_interests_chunked(lambda: self.chunks(lo, hi), list(head.modalities), hi - lo,
                                                      s.model_cfg.hidden, s.model_cfg, present, generator=gen,
                                                      group=s.pg, k=head.num_clusters, device=s.device)
            self.set(table, local)
        core.train(was_training)
        used = self.cluster_sizes(local)[1:]
        return {
            "clusters": float(head.num_clusters),
            "clusters_used": float((used > 0).sum()),
            "largest_cluster": float(used.max()),
            "seconds": time.time() - t0,
        }
