"""The catalogue at inference: rank-local (`ChunkedBank`) for large catalogues, held whole
(`HeldCatalogue`) for small ones; both encode users and offer the same scan (user_blocks.py).

`ChunkedBank`: each rank owns the items `item_slice(rank, world, N)` and holds at most one chunk of
their vectors at a time. A batch's users are encoded from a collective lookup of the batch's unique
history ids, adapted under the training forward's autocast (the adapters are linear, so this equals
adapting every history row), in sub-batches sorted by history length plus interest tokens, each
padded only to its own longest history and token list (padding is key-masked, so the vectors do not
change: `UserEncoder`). Items are scored by scanning this rank's own range in chunks (`local_chunks`:
one collective lookup and one adapter pass per chunk) against the users of a block gathered from
every rank (`user_blocks.py`), with the model's fusion. Memory per rank: one chunk's vectors (chunk x
hidden x tables floats: unit vectors, and the adapted ones for a one-modality model with IDs), a
batch's unique history rows and their item-state rows (clusters, presence: `item_state.py`, looked
up like the vectors, so nothing per item is replicated).

`HeldCatalogue`: every item's vectors in memory, looked up and adapted once (collectively), then
scanned without collectives. `inference_catalogue` picks it for evaluation and exact scoring when the
adapted catalogue fits HOLD_BYTES (eval.catalogue): users are then encoded from its rows with no
lookup, and each rank scores only its own users against every item, so per-batch lookups, adapter
passes and cross-rank gathers are gone; the ranks are the same.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn.functional as F

from datapipes.batch import PAD, candidates_key
from missrec_torchrec import precision
from missrec_torchrec.distributed import all_reduce_scalar, lookup_rows, own_rows
from missrec_torchrec.interest_state import item_slice
from missrec_torchrec.item_state import STATE_TABLE, ItemState
from missrec_torchrec.recommender import ID_TABLE

LOOKUP_CHUNK = 65536  # catalogue rows fetched from the sharded tables per collective lookup
SUB_BATCH_SLOTS = 9216  # users x (longest history + most interest tokens) encoded at once
# Adapted catalogue bytes (items x hidden x tables x 4) up to which inference holds the whole catalogue
# on every rank under eval.catalogue=auto (twice: adapted and unit vectors; under bf16 also a half-size
# copy of the history tokens). 32 MiB is about what one rank-local chunk already holds in the paper's
# shape (eval.chunk_items 8,192 x hidden 300 x text, image and IDs x 4 B = 28 MiB, adapted and unit
# too), so holding costs about the memory scanning does, and saves every per-batch history lookup and
# adapter pass (5,000 such items: 17 MiB; at hidden 64, up to ~44,000 items).
HOLD_BYTES = 32 << 20

Vectors = Dict[str, torch.Tensor]


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


@dataclass
class ItemChunk:
    """Items [lo, hi): unit vectors per table, the adapted ones (raw for IDs) where the fusion
    needs vectors rather than cosines (a one-modality model with IDs) or a holder asked for them
    (`ChunkedBank.chunk`), empty otherwise; and their item-state rows."""

    lo: int
    hi: int
    unit: Vectors
    adapted: Vectors
    state: ItemState

    @property
    def idx(self) -> torch.Tensor:
        device = next(iter(self.unit.values())).device
        return torch.arange(self.lo, self.hi, device=device)

    def cosines(self, u: torch.Tensor) -> Vectors:
        """B x (hi - lo) cosines per table."""
        return {t: u @ v.T for t, v in self.unit.items()}


@dataclass
class OwnRows:
    """A rank's rows [lo, lo + len) of one table, read without a lookup (`ChunkedBank.own_tables`)."""

    rows: torch.Tensor
    lo: int
    dtype: torch.dtype

    def __getitem__(self, ids: torch.Tensor) -> torch.Tensor:
        return self.rows[ids - self.lo].to(self.dtype)


class UserEncoder:
    """The model's unit user vectors (B x D, fp32) of left-aligned histories (B x L, PAD-padded) from
    their rows given per table, in sub-batches sorted by cost (see module doc)."""

    def __init__(self, head, precision_: str):
        self.head, self.precision = head, precision_
        self.modalities, self.use_id = list(head.modalities), head.config.use_id

    def __call__(self, history: torch.Tensor, local: torch.Tensor, rows: Vectors, state: ItemState,
                 slots: int, times: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Each history id's row is `rows[t][local]`, its item state `state.at(local)` (local: B x L)."""
        lengths = (history != PAD).sum(1)
        at_history = state.at(local)
        tokens, first = self.head.interests(history, at_history)
        # A token-0 slot (the reference's kept pad id) may precede the real ones: one spare column.
        widths = torch.clamp((tokens != 0).sum(1) + 1, max=tokens.shape[1])
        # Decoder slots (history) plus encoder slots (interest tokens): what a user costs.
        costs = lengths + widths
        order = torch.argsort(costs, stable=True)
        out = torch.empty(history.shape[0], self.head.core.config.hidden, device=history.device)
        # History tokens in the compute dtype: half the gather traffic under bf16, no casts later.
        table = {t: v.to(precision.dtype_of(self.precision)) for t, v in rows.items()}
        # One autocast region for all sub-batches: the weights are cast once, not once per sub-batch.
        with precision.autocast(self.precision, history.device):
            for lo, hi in cost_groups(costs[order].tolist(), slots):
                r = order[lo:hi]
                width, interests = max(1, int(lengths[r].max())), int(widths[r].max())
                at = local[r, :width]
                adapted = {m: F.embedding(at, table[m]) for m in self.modalities}
                hist_id = F.embedding(at, table[ID_TABLE]) if self.use_id else None
                out[r], _, _ = self.head.encode(history[r, :width], adapted, hist_id, at_history.map(lambda x: x[r, :width]),
                                                interests=(tokens[r, :interests], first[r, :interests]),
                                                times=None if times is None else times[r, : width + 1])
        return out


class Catalogue:
    """What the scans read of a catalogue: `tables`, `summed`, `pg` (None: no collectives), this
    process's item range [`lo`, `hi`), `local_chunks(size)`, `lookup(ids)`, `presence(ids)`,
    `fused(u, sims, idx, items, present)`, `vectors(ids)` and `repeat_bias` (the model's learned repeat bias, None when off:
    user_blocks.py lowers the history items by it). Evaluation and scoring also call
    `encode(history)` and `encode_with_targets(history, target)`, which both catalogues offer through
    their `encoder` (a held one when built for users)."""

    num_items: int
    lo: int
    hi: int
    tables: List[str]
    modalities: List[str]
    summed: bool
    pg = None
    world = 1
    repeat_bias: Optional[float] = None
    encoder: Optional[UserEncoder] = None

    def own_tables(self) -> Optional[Dict[str, "OwnRows"]]:
        """This process's rows readable without a lookup (`ChunkedBank`); None: look them up."""
        return None

    def chunk_scores(self, u: torch.Tensor, chunk: ItemChunk) -> torch.Tensor:
        """B x (hi - lo) exact scores of the chunk's items."""
        return self.fused(u, {} if self.summed else chunk.cosines(u), chunk.idx, chunk.adapted,
                          chunk.state.present())

    def pair_scores(self, u: torch.Tensor, items: torch.Tensor, vectors: Vectors, state: ItemState) -> torch.Tensor:
        """B scores of each user against its own item (items: B; vectors[t]: B x D, their rows;
        state: their B item-state rows)."""
        idx = items.to(torch.int64).unsqueeze(1)
        rows = {t: v.unsqueeze(1) for t, v in vectors.items()}
        sims = {} if self.summed else {t: (u * F.normalize(v, dim=-1)).sum(-1, keepdim=True) for t, v in vectors.items()}
        present = {m: p.unsqueeze(1) for m, p in state.present().items()}
        return self.fused(u, sims, idx, rows, present).squeeze(1)


class ChunkedBank(Catalogue):
    """This rank's share of the catalogue at inference (see module doc). Lookups are collective:
    every rank calls `encode`, `rows`, `vectors` and the `local_chunks` scan as often as the others."""

    def __init__(self, session, precision_: str = "fp32"):
        self.head = session.head
        self.core = session.head.core
        self.num_items = session.num_items
        self.precision = precision_
        self.encoder = UserEncoder(self.head, precision_)
        self.modalities = list(self.head.modalities)
        self.tables = item_tables(session)
        # One modality with IDs scores normalize(v + id), which no function of cosines gives.
        self.summed = len(self.modalities) == 1 and self.head.config.use_id
        self.collections = {t: session.collection(t) for t in self.tables}
        self.state_collection = session.collection(STATE_TABLE)
        self.own_state = session.own_state()
        self.pg, self.device, self.world = session.pg, session.device, session.world
        self.dmp = session.dmp
        self.lo, self.hi = item_slice(session.rank, session.world, self.num_items)
        bias = self.head.repeat_bias
        self.repeat_bias = None if bias is None else float(bias.detach())

    # -- item rows -----------------------------------------------------------------------------

    @torch.no_grad()
    def rows(self, ids: torch.Tensor) -> Vectors:
        """fp32 adapted vectors (raw for IDs) of `ids` per table; adapted under the training
        forward's autocast, so both paths see the same item vectors."""
        return self.adapt({t: lookup_rows(ec, candidates_key(t), ids, chunk_size=LOOKUP_CHUNK, pg=self.pg)
                           for t, ec in self.collections.items()})

    @torch.no_grad()
    def state(self, ids: torch.Tensor) -> ItemState:
        """The item-state rows of `ids` (collective, like `rows`)."""
        rows = lookup_rows(self.state_collection, candidates_key(STATE_TABLE), ids, chunk_size=LOOKUP_CHUNK, pg=self.pg)
        return self.head.state(rows)

    def presence(self, ids: torch.Tensor, own: bool = False) -> Vectors:
        """Per modality, whether items `ids` (any shape) have it: looked up (collective), or with
        `own` read from this rank's own state rows (ids of its range only)."""
        if own:
            return self.head.state(self.own_state).at(ids - self.lo).present()
        distinct, where = torch.unique(ids.reshape(-1), return_inverse=True)
        return {m: p[where].view(ids.shape) for m, p in self.state(distinct).present().items()}

    def adapt(self, raw: Vectors) -> Vectors:
        """fp32 adapted vectors (raw for IDs) of raw table rows, under the training forward's autocast."""
        with precision.autocast(self.precision, self.device):
            out = {t: v if t == ID_TABLE else self.core.adapt({t: v})[t] for t, v in raw.items()}
        return {t: v.float() for t, v in out.items()}

    @torch.no_grad()
    def own_tables(self) -> Optional[Vectors]:
        """Per table, a view of this rank's rows [lo, hi) in its own shard, in the dtype a lookup
        returns, or None on every rank unless every rank holds its whole range so (collective)."""
        own = {t: own_rows(self.dmp, t, self.lo, self.hi) for t in self.tables}
        whole = int(all(v is not None for v in own.values()))
        if not all_reduce_scalar(whole, "min", self.pg, self.device, torch.int64):
            return None
        probe = torch.tensor([self.lo], device=self.device)  # what dtype a lookup hands the adapters
        dtypes = {t: lookup_rows(ec, candidates_key(t), probe, pg=self.pg).dtype for t, ec in self.collections.items()}
        return {t: OwnRows(v, self.lo, dtypes[t]) for t, v in own.items()}

    def vectors(self, ids: torch.Tensor) -> Vectors:
        """`rows` of ids of any shape (ids.shape x D), each distinct id looked up once."""
        distinct, where = torch.unique(ids.reshape(-1), return_inverse=True)
        return {t: v[where].view(*ids.shape, -1) for t, v in self.rows(distinct).items()}

    def local_chunks(self, size: int) -> Iterator[ItemChunk]:
        """This rank's items, `size` at a time. Every rank takes as many steps as the widest range
        needs (an empty lookup where its own is shorter), so all meet in every lookup: consume the
        whole iterator. No chunk is kept past its step."""
        widest = max(hi - lo for lo, hi in (item_slice(r, self.world, self.num_items) for r in range(self.world)))
        for step in range(-(-widest // size)):
            lo = min(self.hi, self.lo + step * size)
            hi = min(self.hi, lo + size)
            if hi > lo:
                yield self.chunk(lo, hi, own=True)
            else:
                self.chunk(lo, hi, own=True)

    def chunk(self, lo: int, hi: int, adapted: bool = False, own: bool = False) -> ItemChunk:
        """Items [lo, hi) (any range: a collective lookup like the others); `adapted`: keep every
        table's adapted vectors, not only those the fusion reads; `own`: items of this rank's range,
        their item state read from its own rows (a lookup per chunk costs the scan latency)."""
        ids = torch.arange(lo, hi, device=self.device)
        state = self.head.state(self.own_state[lo - self.lo : hi - self.lo]) if own else self.state(ids)
        return ItemChunk(lo, hi, *self.lookup(ids, adapted), state)

    def lookup(self, ids: torch.Tensor, adapted: bool = False, own: Optional[Dict[str, "OwnRows"]] = None
               ) -> Tuple[Vectors, Vectors]:
        """(unit vectors per table, the adapted ones where the fusion needs them or `adapted` asks)
        of item ids: collective, or read from this rank's `own_tables` (ids of its range only)."""
        rows = self.rows(ids) if own is None else self.adapt({t: o[ids] for t, o in own.items()})
        return {t: F.normalize(v, dim=-1) for t, v in rows.items()}, rows if adapted or self.summed else {}

    def held_bytes(self) -> int:
        """The whole catalogue's adapted vectors in fp32 (what a `HeldCatalogue` holds, twice)."""
        return self.num_items * self.core.config.hidden * len(self.tables) * 4

    # -- scores --------------------------------------------------------------------------------

    def fused(self, u: torch.Tensor, sims: Vectors, idx: torch.Tensor, items: Optional[Vectors],
              present: Vectors) -> torch.Tensor:
        """Exact scores of items `idx` (C shared by the rows, or B x S) from their cosines `sims` and
        presence flags (shaped like idx); a one-modality model with IDs reads their vectors `items`
        (idx.shape x D) instead."""
        if self.summed:
            return self.core.score(u, {m: items[m] for m in self.modalities}, items[ID_TABLE],
                                   present=present, item_index=idx)
        modal = {m: sims[m] for m in self.modalities}
        return self.core.fuse(modal, sims.get(ID_TABLE), present, item_index=idx)

    # -- users ---------------------------------------------------------------------------------

    @torch.no_grad()
    def encode(self, history: torch.Tensor, times: Optional[torch.Tensor] = None, slots: int = SUB_BATCH_SLOTS):
        """Unit user vectors (B x D, fp32) of left-aligned histories (B x L, PAD-padded) and their SeqBatch.times."""
        safe = history.clamp(min=0)
        distinct, where = torch.unique(safe, return_inverse=True)
        return self.encoder(history, where, self.rows(distinct), self.state(distinct), slots, times)

    @torch.no_grad()
    def encode_with_targets(self, history: torch.Tensor, target: torch.Tensor, times: Optional[torch.Tensor] = None,
                            slots: int = SUB_BATCH_SLOTS) -> Tuple[torch.Tensor, torch.Tensor]:
        """(user vectors, each user's score of its target), from one lookup of both."""
        safe = history.clamp(min=0)
        distinct, where = torch.unique(torch.cat([safe.reshape(-1), target.to(safe)]), return_inverse=True)
        rows, state = self.rows(distinct), self.state(distinct)
        u = self.encoder(history, where[: safe.numel()].view_as(safe), rows, state, slots, times)
        at_target = where[safe.numel():]
        return u, self.pair_scores(u, target, {t: v[at_target] for t, v in rows.items()}, state.at(at_target))


class HeldCatalogue(Catalogue):
    """Every item's vectors in memory (unit ones per table, adapted ones for a summed model or for
    encoding users), scored with `fuse(u, sims, idx, items)`; nothing it does is collective."""

    def __init__(self, unit: Vectors, fuse: Callable, modalities: List[str], state: ItemState, summed: bool = False,
                 adapted: Optional[Vectors] = None):
        self.unit, self.adapted, self.state = unit, adapted or {}, state
        self.fuse, self.modalities, self.summed = fuse, list(modalities), summed
        self.tables = list(unit)
        self.num_items = next(iter(unit.values())).shape[0]
        self.lo, self.hi = 0, self.num_items  # one process holds the whole range
        self.device = next(iter(unit.values())).device

    @classmethod
    def of(cls, bank: ChunkedBank, size: int = LOOKUP_CHUNK, users: bool = False) -> "HeldCatalogue":
        """The whole catalogue of a bank, looked up and adapted `size` items at a time (collective);
        with `users` it keeps every table's adapted rows and encodes users from them as the bank does."""
        parts = [bank.chunk(lo, hi, adapted=users) for lo, hi in item_ranges(bank.num_items, size)]
        unit = {t: torch.cat([p.unit[t] for p in parts]) for t in bank.tables}
        adapted = {t: torch.cat([p.adapted[t] for p in parts]) for t in parts[0].adapted}
        state = bank.head.state(torch.cat([p.state.rows for p in parts]))
        held = cls(unit, bank.fused, bank.modalities, state, bank.summed, adapted)
        held.repeat_bias = bank.repeat_bias
        if users:
            held.encoder = bank.encoder
            # History tokens in the compute dtype once, not every batch's (the same tensors under fp32).
            held.tokens = {t: v.to(precision.dtype_of(bank.precision)) for t, v in adapted.items()}
        return held

    def local_chunks(self, size: int) -> Iterator[ItemChunk]:
        for lo, hi in item_ranges(self.num_items, size):
            adapted = {t: v[lo:hi] for t, v in self.adapted.items()} if self.summed else {}
            yield ItemChunk(lo, hi, {t: v[lo:hi] for t, v in self.unit.items()}, adapted,
                            self.state.map(lambda x: x[lo:hi]))

    def vectors(self, ids: torch.Tensor) -> Vectors:
        return {t: v[ids] for t, v in self.adapted.items()}

    def lookup(self, ids: torch.Tensor, adapted: bool = False, own=None) -> Tuple[Vectors, Vectors]:
        return {t: v[ids] for t, v in self.unit.items()}, self.vectors(ids) if adapted or self.summed else {}

    def presence(self, ids: torch.Tensor, own: bool = False) -> Vectors:
        return self.state.at(ids).present()

    @torch.no_grad()
    def encode(self, history: torch.Tensor, times: Optional[torch.Tensor] = None, slots: int = SUB_BATCH_SLOTS):
        """As `ChunkedBank.encode`, the history ids indexing the held tokens: no lookup, no gather."""
        return self.encoder(history, history.clamp(min=0), self.tokens, self.state, slots, times)

    @torch.no_grad()
    def encode_with_targets(self, history: torch.Tensor, target: torch.Tensor, times: Optional[torch.Tensor] = None,
                            slots: int = SUB_BATCH_SLOTS) -> Tuple[torch.Tensor, torch.Tensor]:
        u = self.encode(history, times, slots)
        target = target.to(torch.int64)
        return u, self.pair_scores(u, target, self.vectors(target), self.state.at(target))

    def fused(self, u: torch.Tensor, sims: Vectors, idx: torch.Tensor, items: Optional[Vectors],
              present: Vectors) -> torch.Tensor:
        if self.summed and items is None:
            items = self.vectors(idx)
        return self.fuse(u, sims, idx, items, present)


def inference_catalogue(bank: ChunkedBank, choice: str, chunk: int) -> Catalogue:
    """What evaluation and exact scoring scan (eval.catalogue): the rank-local bank, or the held
    catalogue (`auto`: when `bank.held_bytes()` fits HOLD_BYTES), looked up `chunk` items at a time
    like the bank's own scan. Collective: every rank makes the same choice from the same numbers."""
    held = choice == "held" or (choice == "auto" and bank.held_bytes() <= HOLD_BYTES)
    return HeldCatalogue.of(bank, chunk, users=True) if held else bank
