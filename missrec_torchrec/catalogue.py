"""The catalogue at inference: every item's vectors, user encoding from them, chunked scoring.

Evaluation and batch scoring both look the whole catalogue up once (collective lookups into the
sharded tables), adapt it once, and then never touch the sharded tables again: a user's history
tokens are rows of the adapted catalogue (the adapters are linear, so this equals adapting the
looked-up history rows), users are encoded in sub-batches sorted by history length plus interest
tokens, each padded only to its own longest history and token list (padding is key-masked, so the
vectors do not change), and candidates are scored in item chunks with the model's fusion, so no
users x items matrix is larger than one chunk.

Memory: items x hidden x tables floats per rank, twice (adapted and unit vectors), plus a bf16 copy
of the adapted vectors (the history tokens) under bf16. Replicated on every rank: sharding it is open
work for catalogues beyond a rank's memory.
"""

from __future__ import annotations

from typing import Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn.functional as F

from datapipes.batch import PAD, candidates_key
from missrec_torchrec import precision
from missrec_torchrec.distributed import lookup_rows
from missrec_torchrec.metrics import RankCounter
from missrec_torchrec.recommender import ID_TABLE

LOOKUP_CHUNK = 65536  # catalogue rows fetched from the sharded tables per collective lookup
SUB_BATCH_SLOTS = 9216  # users x (longest history + most interest tokens) encoded at once


def item_tables(session) -> List[str]:
    """What an item is made of: the modalities, then the ID table in transductive mode."""
    head = session.head
    return list(head.modalities) + ([ID_TABLE] if head.config.use_id else [])


@torch.no_grad()
def item_vector_chunks(session, table: str, chunk: int = LOOKUP_CHUNK) -> Iterator[Tuple[int, torch.Tensor]]:
    """(first item, vectors) over the whole catalogue: adapted modality vectors, or raw ID vectors.

    Collective: every rank must consume the whole iterator (the rows come from the sharded tables).
    """
    ec = session.collection(table)
    n = session.num_items
    for lo in range(0, n, chunk):
        ids = torch.arange(lo, min(n, lo + chunk), device=session.device)
        rows = lookup_rows(ec, candidates_key(table), ids, pg=session.pg)
        yield lo, rows if table == ID_TABLE else session.head.core.adapt({table: rows})[table]


def cost_groups(sorted_costs: List[int], slots: int) -> Iterator[Tuple[int, int]]:
    """(lo, hi) runs of ascending per-user costs (slots each user needs), each holding at most
    `slots` once padded to its own costliest user: cheap users go in large groups, costly ones in
    small ones, so the padded work follows the real work and each group's tensors stay cache-sized."""
    lo, n = 0, len(sorted_costs)
    while lo < n:
        hi = lo + 1
        while hi < n and (hi + 1 - lo) * max(1, sorted_costs[hi]) <= slots:
            hi += 1
        yield lo, hi
        lo = hi


def item_ranges(n: int, size: int) -> Iterator[Tuple[int, int]]:
    for lo in range(0, n, size):
        yield lo, min(n, lo + size)


class ItemBank:
    """Every item's vectors per table (modalities, then IDs), replicated on each rank, and the
    model's fusion over their cosines. Built collectively; used locally.

    `adapted[t]`: adapted modality vectors (raw ID vectors for the ID table), the tokens of histories;
    `unit[t]`: the same normalised, for cosines.
    """

    def __init__(self, session, precision_: str = "fp32"):
        self.head = session.head
        self.core = session.head.core
        self.num_items = session.num_items
        self.precision = precision_
        self.modalities = list(self.head.modalities)
        self.use_id = self.head.config.use_id
        # One modality with IDs scores normalize(v + id), which no function of cosines gives.
        self.summed = len(self.modalities) == 1 and self.use_id
        self.present = {m: p.to(session.device) for m, p in self.head.presence().items()}
        # Adapted under the training forward's autocast, so both paths see the same item vectors.
        with precision.autocast(precision_, session.device):
            self.adapted = {t: torch.cat([v.float() for _, v in item_vector_chunks(session, t)])
                            for t in item_tables(session)}
        self.unit = {t: F.normalize(v, dim=-1) for t, v in self.adapted.items()}
        # History tokens in the compute dtype: half the gather traffic under bf16, no casts later.
        self.tokens = {t: v.to(precision.dtype_of(precision_)) for t, v in self.adapted.items()}

    # -- users ---------------------------------------------------------------------------------

    @torch.no_grad()
    def encode(self, history: torch.Tensor, slots: int = SUB_BATCH_SLOTS) -> torch.Tensor:
        """Unit user vectors (B x D, fp32) of left-aligned histories (B x L, PAD-padded)."""
        lengths = (history != PAD).sum(1)
        tokens, first = self.head.interests(history)
        # A token-0 slot (the reference's kept pad id) may precede the real ones: one spare column.
        widths = torch.clamp((tokens != 0).sum(1) + 1, max=tokens.shape[1])
        # Decoder slots (history) plus encoder slots (interest tokens): what a user costs.
        costs = lengths + widths
        order = torch.argsort(costs, stable=True)
        out = torch.empty(history.shape[0], self.core.config.hidden, device=history.device)
        # One autocast region for all sub-batches: the weights are cast once, not once per sub-batch.
        with precision.autocast(self.precision, history.device):
            for lo, hi in cost_groups(costs[order].tolist(), slots):
                rows = order[lo:hi]
                width, m = max(1, int(lengths[rows].max())), int(widths[rows].max())
                out[rows] = self._encode(history[rows, :width], (tokens[rows, :m], first[rows, :m]))
        return out

    def _encode(self, history: torch.Tensor, interests) -> torch.Tensor:
        safe = history.clamp(min=0)
        adapted = {m: F.embedding(safe, self.tokens[m]) for m in self.modalities}
        hist_id = F.embedding(safe, self.tokens[ID_TABLE]) if self.use_id else None
        u, _, _ = self.head.encode(history, adapted, hist_id, interests=interests)
        return u

    # -- items ---------------------------------------------------------------------------------

    def cosines(self, u: torch.Tensor, lo: int, hi: int) -> Dict[str, torch.Tensor]:
        """B x (hi - lo) cosines per table."""
        return {t: u @ v[lo:hi].T for t, v in self.unit.items()}

    def fused(self, u: torch.Tensor, sims: Dict[str, torch.Tensor], idx: torch.Tensor) -> torch.Tensor:
        """Exact scores of items `idx` (C shared by the rows, or B x S) from their cosines `sims`."""
        present = {m: p[idx] for m, p in self.present.items()}
        if self.summed:
            items = {m: self.adapted[m][idx] for m in self.modalities}
            return self.core.score(u, items, self.adapted[ID_TABLE][idx], present=present, item_index=idx)
        modal = {m: sims[m] for m in self.modalities}
        return self.core.fuse(modal, sims.get(ID_TABLE), present, item_index=idx)

    def chunk_scores(self, u: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        idx = torch.arange(lo, hi, device=u.device)
        return self.fused(u, {} if self.summed else self.cosines(u, lo, hi), idx)

    def pair_scores(self, u: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """B scores of each user against its own item (items: B)."""
        idx = items.to(torch.int64).unsqueeze(1)
        sims = {} if self.summed else {t: (u * v[items]).sum(-1, keepdim=True) for t, v in self.unit.items()}
        return self.fused(u, sims, idx).squeeze(1)

    @torch.no_grad()
    def ranks(
        self,
        u: torch.Tensor,
        target: torch.Tensor,
        chunk: int,
        exclude_offsets: Optional[torch.Tensor] = None,
        exclude_values: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Full-ranking target ranks, the catalogue scored `chunk` items at a time."""
        counter = RankCounter(target, self.pair_scores(u, target), exclude_offsets, exclude_values)
        for lo, hi in item_ranges(self.num_items, chunk):
            counter.update(self.chunk_scores(u, lo, hi), lo)
        return counter.ranks()
