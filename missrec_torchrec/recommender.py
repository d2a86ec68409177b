"""MISSRec as a TorchRec model: sharded embedding collections around the dense MISSRec core.

The item tables and their collections are laid out in `tables.py`. `MISSRecModel.forward` only routes the batch's KJTs into the collections and hands the results to
`MISSRecHead`, which holds no sharded module: TrainPipelineSparseDist's tracer treats it as a leaf,
so MISSRec's data-dependent logic stays out of FX tracing.
"""

from __future__ import annotations

import math
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torchrec.sparse.jagged_tensor import JaggedTensor

from datapipes.batch import PAD, SeqBatch, candidates_key, history_key, target_key
from missrec_torchrec import item_state, precision, repeats
from missrec_torchrec.item_state import STATE_TABLE, ItemState
from missrec_torchrec.lookups import dense_history, materialise
from missrec_torchrec.model import losses
from missrec_torchrec.model.config import ModelConfig
from missrec_torchrec.model.core import MISSRecCore
from missrec_torchrec.model.interest import interest_tokens_at, num_clusters
from missrec_torchrec.tables import AUG_TABLE, ID_GROUP, ID_TABLE, ItemTables


def _next_items(seq: torch.Tensor, last_target: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """What each position of a left-aligned sequence (B x L x ...) predicts: the next position's
    entry, and `last_target` (B x ...) at each row's last real position `last` (B)."""
    nxt = torch.roll(seq, -1, dims=1)
    nxt[torch.arange(seq.shape[0], device=seq.device), last] = last_target.to(seq.dtype)
    return nxt


def _fp32(like: torch.Tensor):
    return torch.autocast(like.device.type, enabled=False)


def _float(x: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if x is None else x.float()


def _floats(xs: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    return {k: v.float() for k, v in xs.items()}


class MISSRecHead(nn.Module):
    """Everything between the embedding lookups and the loss: adapters, interest tokens,
    encoder-decoder, dynamic-fusion scoring and the training objectives."""

    def __init__(
        self,
        config: ModelConfig,
        modality_dims: Mapping[str, int],
        num_items: int,
        mode: str = "finetune",
        loss: str = "full_softmax",
        use_aug: bool = False,
        cluster_points: Optional[int] = None,
        dense_ids: bool = False,
        mixed_negatives: bool = False,
    ):
        super().__init__()
        config.check_head(len(modality_dims), mode, loss)
        self.config = config
        self.core = MISSRecCore(config, modality_dims, num_items=num_items)
        self.modalities = list(modality_dims)
        self.num_items = num_items
        self.mode = mode
        self.loss = loss
        self.use_aug = use_aug
        # Interest state: K is fixed by the catalogue, so checkpoints always have the same shapes.
        # `cluster_points` = the item vectors that enter k-means (present ones when masking).
        points = cluster_points if cluster_points is not None else num_items * len(self.modalities)
        self.num_clusters = num_clusters(config.interest_ratio, points, config.interest_cap)
        # Each item's cluster per modality, presence, softmax flag and log-Q live in the sharded
        # item-state table (item_state.py): the forward reads the batch's rows from its lookups.
        self.register_buffer("centroids", torch.zeros(self.num_clusters + 1, config.hidden))
        self.aug_generator: Optional[torch.Generator] = None
        # train.softmax_items=training: only items flagged in the item state are softmax negatives.
        self.restrict_softmax = False
        # Speed levers (set by the trainer from the config; bench/train.py measures each).
        self.precision = "fp32"  # or "bf16": autocast of adapters and encoder-decoder (precision.py)
        self.gather_history = True  # history tokens gathered from the adapted catalogue when it is at hand
        self.blocked_softmax = True  # `linear_loss` where the score allows it
        # train.sparse_optimizer=dense_adam: the reference's ID table, a replicated dense N(0, init_std)
        # table trained by the dense Adam (FBGEMM has no fused Adam on CPU). Its last row is the
        # padding item's, zero and never updated (padding_idx), as the reference's row 0.
        self.id_table: Optional[nn.Embedding] = None
        if dense_ids and config.use_id:
            self.id_table = nn.Embedding(num_items + 1, config.hidden, padding_idx=num_items)
            nn.init.normal_(self.id_table.weight, std=config.init_std)
            with torch.no_grad():
                self.id_table.weight[num_items].zero_()
        # Sampled softmax: the batch's other targets join the uniform sample as negatives, with the
        # item state's log-Q (each item's share of the training targets).
        self.mixed_negatives = mixed_negatives
        # model.repeat_bias: registered only when on, so the checkpoints of other models load unchanged.
        # A head parameter, outside the core: PEFT's freezing never reaches it (a per-domain prior).
        self.repeat_bias: Optional[nn.Parameter] = nn.Parameter(torch.zeros(())) if config.repeat_bias else None

    def state(self, rows: torch.Tensor) -> ItemState:
        """The decoded item-state rows (any shape x width) of this model's modalities."""
        return ItemState(rows.detach(), self.modalities)

    def interests(self, history: torch.Tensor, state: ItemState) -> Tuple[torch.Tensor, torch.Tensor]:
        """(interest tokens, first position of each) of left-aligned histories of any width, from
        their item-state rows (B x L)."""
        clusters = list(state.clusters().values())
        if self.config.interest_keep_zero and history.shape[1] < self.config.max_len:
            # The reference pads to max_len, so every row shorter than that has the token 0; one
            # pad column keeps that true for histories trimmed to the batch's longest row.
            history = F.pad(history, (0, 1), value=PAD)
            clusters = [F.pad(c, (0, 1)) for c in clusters]
        return interest_tokens_at(history, clusters, keep_zero=self.config.interest_keep_zero, first=True)

    def encode(
        self,
        history: torch.Tensor,
        adapted: Dict[str, torch.Tensor],
        hist_id: Optional[torch.Tensor],
        state: ItemState,
        all_positions: bool = False,
        interests: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
        times: Optional[torch.Tensor] = None,
    ):
        """core.encode of a batch's histories and their item-state rows (B x L); `interests`: their
        `interests(history, state)`, if already computed (trailing pad columns allowed); `times`:
        SeqBatch.times (used with model.relative_time_bias)."""
        valid = history != PAD
        tokens, first = interests if interests is not None else self.interests(history, state)
        present = {m: p & valid for m, p in state.present().items()}
        return self.core.encode(
            adapted, valid, tokens, self.centroids, id_emb=hist_id, present=present,
            interest_first=first, all_positions=all_positions, times=times,
        )

    def forward(
        self,
        batch: SeqBatch,
        feature_outputs: Sequence,
        id_outputs: Sequence,
    ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        feats = materialise(feature_outputs)
        ids = materialise(id_outputs)
        if self.id_table is not None:
            # The sharded ID collection is only a read-only mirror here (see the trainer's
            # `publish_ids`): training looks the same ids up in the dense table.
            kjt = batch.sparse[ID_GROUP]
            ids = {k: JaggedTensor(values=self.id_table(kjt[k].values()), lengths=kjt[k].lengths()) for k in ids}
        with precision.autocast(self.precision, batch.history.device):
            return self._forward(batch, feats, ids)

    def _catalogue_candidates(self, count: int) -> bool:
        """Whether `count` candidates are every item in index order (full softmax and evaluation)."""
        sampled = self.training and (self.loss == "sampled_softmax" or self.mode == "pretrain")
        return not sampled and count == self.num_items

    def gathers_rows(self, candidates: int) -> bool:
        """Whether a forward with `candidates` candidates takes every history and target vector
        from the catalogue rows, so the batch's own history and target lookups can be left empty."""
        return self.gather_history and self._catalogue_candidates(candidates)

    def _inputs(self, batch: SeqBatch, feats, ids):
        """(the adapted catalogue or None, raw history rows or None, adapted history, history IDs,
        the item-state rows of the history, the targets and the candidates)."""
        cfg, max_len = self.config, batch.history.shape[1]
        if self.gathers_rows(batch.candidates.numel()):
            # The catalogue is adapted for the candidates anyway: history tokens gather from it
            # instead of adapting B x L rows again (adapters are linear, so the values are equal).
            cands = self._catalogue(feats, ids)
            safe = batch.history.clamp(min=0)
            adapted = {m: F.embedding(safe, v) for m, v in cands[0].items()}
            hist_id = F.embedding(safe, cands[1]) if cfg.use_id else None
            cand_state = self.state(feats[candidates_key(STATE_TABLE)].values())
            return cands, None, adapted, hist_id, (cand_state.at(batch.history), cand_state.at(batch.target), cand_state)
        # Frozen tables: detached, so no backward runs into their kernels at all.
        hist_raw = {m: dense_history(feats[history_key(m)], max_len).detach() for m in self.modalities}
        hist_id = dense_history(ids[history_key(ID_TABLE)], max_len) if cfg.use_id else None
        states = (self.state(dense_history(feats[history_key(STATE_TABLE)], max_len)),
                  self.state(feats[target_key(STATE_TABLE)].values()),
                  self.state(feats[candidates_key(STATE_TABLE)].values()))
        return None, hist_raw, self.core.adapt(hist_raw), hist_id, states

    def _forward(self, batch: SeqBatch, feats, ids) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        cfg = self.config
        max_len = batch.history.shape[1]
        cands, hist_raw, adapted, hist_id, states = self._inputs(batch, feats, ids)
        hist_state, tgt_state, cand_state = states
        if self.training and cfg.causal:
            return self._causal_forward(batch, feats, ids, adapted, hist_id, states, cands)
        u, memory, memory_mask = self.encode(batch.history, adapted, hist_id, hist_state, times=batch.times)
        reg = self.core.regulariser(memory, memory_mask)
        out: Dict[str, torch.Tensor] = {"user": u}
        if not self.training:
            out["scores"] = self._candidate_scores(u, batch, feats, ids, cand_state, cands)
            out["loss"] = loss = reg.detach() * 0
            return loss, out
        if self.mode == "finetune":
            if self.linear_softmax:
                main = self.linear_loss(u, self._catalogue(feats, ids, cands), cand_state, batch.target, batch.weight)
            else:
                scores = self._candidate_scores(u, batch, feats, ids, cand_state, cands)
                tgt_adapted, tgt_id = self._target_items(batch, feats, ids)
                main = self.finetune_loss(u, scores, batch.candidates, batch.target, tgt_adapted, tgt_id,
                                          batch.weight, cand_state, tgt_state)
            loss = main + cfg.gamma * reg
            out.update(loss=loss.detach(), main=main.detach(), reg=reg.detach())
            return loss, out

        # Pre-training: in-batch seq->item InfoNCE + lambda seq->augmented-seq + gamma regulariser.
        if hist_raw is None:
            hist_raw = {m: dense_history(feats[history_key(m)], max_len).detach() for m in self.modalities}
        tgt_raw = {m: feats[target_key(m)].values().detach() for m in self.modalities}
        tgt_id = ids[target_key(ID_TABLE)].values() if cfg.use_id else None
        tgt_adapted = self.core.adapt(tgt_raw)
        with _fp32(u):
            scores = self.core.score(
                u, _floats(tgt_adapted), _float(tgt_id), present=tgt_state.present(), item_index=batch.target
            )
        l_si = losses.seq_item_infonce(
            scores, cfg.temperature, batch.target if cfg.mask_duplicate_targets else None, batch.weight
        )
        u_aug, mem_aug, mask_aug = self._augmented(batch, feats, hist_raw, adapted, hist_id, hist_state)
        l_ss = losses.seq_seq_infonce(u, u_aug, cfg.temperature, batch.weight)
        reg_aug = self.core.regulariser(mem_aug, mask_aug)
        loss = l_si + cfg.lambda_ss * l_ss + cfg.gamma * (reg + reg_aug)
        out.update(loss=loss.detach(), main=l_si.detach(), seq_seq=l_ss.detach(), reg=reg.detach())
        return loss, out

    def _catalogue(self, feats, ids, cands=None):
        """(adapted candidate vectors per modality, candidate ID embeddings or None): `cands` if given."""
        if cands is not None:
            return cands
        cand_raw = {m: feats[candidates_key(m)].values().detach() for m in self.modalities}
        cand_id = ids[candidates_key(ID_TABLE)].values() if self.config.use_id else None
        return self.core.adapt(cand_raw), cand_id

    def _candidate_scores(self, u, batch, feats, ids, cand_state: ItemState, cands=None) -> torch.Tensor:
        """Scores in fp32 whatever the autocast: bf16 cosines would tie far more often. With
        model.repeat_bias, less the bias at the items of each row's history window."""
        adapted, cand_id = self._catalogue(feats, ids, cands)
        c = batch.candidates
        with _fp32(u):
            scores = self.core.score(u.float(), _floats(adapted), _float(cand_id), present=cand_state.present(),
                                     item_index=c)
            if self.repeat_bias is None:
                return scores
            if not self._catalogue_candidates(c.numel()):
                raise ValueError("model.repeat_bias scores the whole catalogue: these candidates are not it")
            # Causal training scores one row per real position, each against its own window prefix.
            causal = self.training and self.config.causal
            return repeats.lowered(scores, self.repeat_bias, batch.history, per_position=causal)

    @property
    def linear_softmax(self) -> bool:
        """Whether training's full softmax runs without the B x N scores (`linear_loss`): switched
        on, the score linear in u, and no repeat bias moving it."""
        return (self.blocked_softmax and self.loss == "full_softmax" and self.repeat_bias is None
                and self.core.linear_score)

    def linear_loss(self, u, catalogue, cand_state: ItemState, target, weight) -> torch.Tensor:
        """finetune_loss's full softmax by `core.full_softmax_loss`; `catalogue`: (adapted vectors per
        modality, ID embeddings or None) of every item in index order (`_catalogue`)."""
        keep = cand_state.in_softmax() if self.restrict_softmax else None
        return self.core.full_softmax_loss(u, *catalogue, cand_state.present(), target, keep, weight)

    def _target_items(self, batch, feats, ids):
        """(adapted target vectors per modality, target ID embeddings or None), B x D each."""
        if self.loss == "full_softmax":
            return None, None  # the target index is all full softmax needs
        tgt_raw = {m: feats[target_key(m)].values().detach() for m in self.modalities}
        tgt_id = ids[target_key(ID_TABLE)].values() if self.config.use_id else None
        return self.core.adapt(tgt_raw), tgt_id

    def finetune_loss(self, u, scores, cands, target, tgt_adapted, tgt_id, weight, cand_state: ItemState,
                      tgt_state: ItemState) -> torch.Tensor:
        """Full softmax over the catalogue, or sampled softmax against the candidates (rows of u);
        `cand_state`, `tgt_state`: the candidates' and targets' item-state rows."""
        cfg = self.config
        if self.restrict_softmax:
            # Items outside the training sequences do not exist yet at training time: no negatives.
            scores = scores.masked_fill(~cand_state.in_softmax(), float("-inf"))
        if self.loss == "full_softmax":
            # Candidates are the catalogue in index order: the target index is the column.
            if cfg.pad_negative:
                scores = torch.cat([scores, self.core.pad_scores(u)], dim=1)
            return losses.full_softmax_ce(scores, target, cfg.temperature, weight)
        with _fp32(u):
            pos = self.core.score(
                u,
                {m: v.float().unsqueeze(1) for m, v in tgt_adapted.items()},
                tgt_id.float().unsqueeze(1) if tgt_id is not None else None,
                present={m: p.unsqueeze(1) for m, p in tgt_state.present().items()},
                item_index=target.unsqueeze(1),
            ).squeeze(1)
        neg_logq = losses.expected_logq(cands, cands.numel(), self.num_items)
        if not self.mixed_negatives:
            return losses.sampled_softmax(pos, scores, target, cands, cfg.temperature, neg_logq=neg_logq, weight=weight)
        with _fp32(u):
            in_batch = self.core.score(
                u, _floats(tgt_adapted), _float(tgt_id), present=tgt_state.present(), item_index=target
            )
        # In-batch targets are B draws from the target distribution: log-Q = log(B * q(item)).
        batch_logq = tgt_state.logq() + math.log(target.numel())
        return losses.mixed_negative_softmax(
            pos, scores, cands, neg_logq, in_batch, target, batch_logq, cfg.temperature, weight=weight
        )

    def _causal_forward(self, batch, feats, ids, adapted, hist_id, states, cands=None):
        """One-pass causal training: every history position predicts the next item (its last
        position the row's target), one loss term per position, as one prefix row each would."""
        hist_state, tgt_state, cand_state = states
        y, memory, memory_mask = self.encode(batch.history, adapted, hist_id, hist_state, all_positions=True,
                                             times=batch.times)
        valid = batch.history != PAD
        last = valid.sum(1) - 1
        target = _next_items(batch.history, batch.target, last)[valid]
        next_state = self.state(_next_items(hist_state.rows, tgt_state.rows, last)[valid])
        u = y[valid]
        weight = batch.weight.unsqueeze(1).expand_as(valid)[valid]
        if self.linear_softmax:
            main = self.linear_loss(u, self._catalogue(feats, ids, cands), cand_state, target, weight)
        else:
            scores = self._candidate_scores(u, batch, feats, ids, cand_state, cands)
            tgt_adapted, tgt_id = self._target_items(batch, feats, ids)
            if tgt_adapted is not None:
                tgt_adapted = {m: _next_items(adapted[m].float(), v.float(), last)[valid]
                               for m, v in tgt_adapted.items()}
                tgt_id = _next_items(hist_id, tgt_id, last)[valid] if tgt_id is not None else None
            main = self.finetune_loss(u, scores, batch.candidates, target, tgt_adapted, tgt_id, weight, cand_state,
                                      next_state)
        reg = self.core.regulariser(memory, memory_mask)
        loss = main + self.config.gamma * reg
        out = {"user": y[torch.arange(y.shape[0], device=y.device), last]}
        # Every real position is a next-item target (bench/train.py reports targets/s from this).
        out.update(loss=loss.detach(), main=main.detach(), reg=reg.detach(), targets=valid.sum().to(loss.dtype))
        return loss, out

    def _augmented(self, batch, feats, hist_raw, adapted, hist_id, hist_state: ItemState):
        cfg = self.config
        gen = self.aug_generator
        swap_possible = self.use_aug and "text" in self.modalities
        if not swap_possible or losses.use_item_drop(cfg.item_drop_coefficient, gen):
            valid = batch.history != PAD
            comp = losses.item_drop(valid, cfg.item_drop_prob, gen)
            history = comp.apply(batch.history, PAD)
            adapted2 = {m: comp.apply(v) for m, v in adapted.items()}
            id2 = comp.apply(hist_id) if hist_id is not None else None
            times = None if batch.times is None else comp.apply_times(batch.times, valid.sum(1))
            return self.encode(history, adapted2, id2, hist_state.map(comp.apply), times=times)
        max_len = batch.history.shape[1]
        alt = dense_history(feats[history_key(AUG_TABLE)], max_len).detach()
        raw = dict(hist_raw)
        raw["text"] = losses.feature_swap(hist_raw["text"], alt, cfg.feature_swap_prob, gen)
        return self.encode(batch.history, self.core.adapt(raw), hist_id, hist_state, times=batch.times)


class MISSRecModel(nn.Module):
    """The TorchRec module that DistributedModelParallel shards: the item tables' collections
    (`tables.py`) around `MISSRecHead`, built with `head_options` (mode, loss, cluster_points,
    dense_ids, mixed_negatives). `aug_dim` adds pre-training's text_aug table; `table_dtypes` the
    feature tables' stored dtypes (float32 where missing)."""

    def __init__(self, config: ModelConfig, modality_dims: Mapping[str, int], num_items: int,
                 aug_dim: Optional[int] = None, table_device: torch.device = torch.device("meta"),
                 table_dtypes: Optional[Mapping[str, str]] = None, **head_options):
        super().__init__()
        self.config = config
        self.num_items = num_items
        use_aug = aug_dim is not None and head_options.get("mode") == "pretrain"
        layout, self.features, self.ids, self.state = ItemTables.build(
            modality_dims, aug_dim if use_aug else None, config.hidden if config.use_id else None, num_items,
            table_device, table_dtypes,
        )
        self.head = MISSRecHead(config, modality_dims, num_items, use_aug=use_aug, **head_options)
        self.frozen_tables = layout.frozen_tables
        if table_device.type != "meta":  # unsharded: the state starts as a fresh model's (sharded: the session's)
            with torch.no_grad():
                self.state_weight().copy_(item_state.default_rows(num_items, list(modality_dims), num_items))
        # Which batch KJT feeds which collection (fixed before sharding replaces the collections).
        self.kjt_groups: Dict[str, List[str]] = layout.kjt_groups
        self.table_dims: Dict[str, int] = layout.table_dims

    def state_weight(self) -> torch.Tensor:
        """The unsharded item-state table (N x width), for models used without DMP."""
        return self.state[item_state.STATE_GROUP].embeddings[STATE_TABLE].weight

    def forward(self, batch: SeqBatch) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        feature_outputs = [ec(batch.sparse[g]) for g, ec in (*self.features.items(), *self.state.items())]
        id_outputs = [ec(batch.sparse[g]) for g, ec in self.ids.items()]
        return self.head(batch, feature_outputs, id_outputs)
