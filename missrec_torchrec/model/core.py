"""The MISSRec network on dense tensors: adapters, tokens, interest memory, user vectors, scores.

TorchRec stays outside: the caller looks up raw modality features and item-ID embeddings (sharded
`EmbeddingCollection`s) and hands them here as dense tensors. The encoder and decoder layers are in
`layers.py`, the fusion formula in `fusion.py`.
"""

from __future__ import annotations

from typing import Dict, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import fusion
from .config import ModelConfig
from .dropout import Dropout
from .layers import InterestDecoder, InterestEncoder, Memory, interest_regulariser
from .linear_ce import linear_cross_entropy


class MISSRecCore(nn.Module):
    """MISSRec's dense network for a fixed set of modalities (docs/model.md §1, §2, §5-8).

    `modality_dims` maps each modality name to its raw feature width, in the order the caller will
    use. `num_items` is needed only by `fusion="dynamic_instance"` (one alpha per item).
    No modalities with `use_id` is the ID-only baseline: tokens and scores come from the ID
    embeddings alone and there are no interests (the decoder's cross-attention adds nothing).
    `config.causal` makes every attention causal in time (see `encode`).
    """

    def __init__(self, config: ModelConfig, modality_dims: Mapping[str, int], num_items: Optional[int] = None) -> None:
        super().__init__()
        if not modality_dims and not config.use_id:
            raise ValueError("MISSRecCore needs at least one modality or use_id")
        self.config = config
        self.modalities: Tuple[str, ...] = tuple(modality_dims)
        h = config.hidden
        self.adapters = nn.ModuleDict({m: nn.Linear(d, h) for m, d in modality_dims.items()})
        self.positions = nn.Embedding(config.max_len, h)
        self.input_norm = nn.LayerNorm(h, eps=config.layer_norm_eps)
        self.input_dropout = Dropout(config.dropout, config.fast_dropout)
        self.encoder = InterestEncoder(config)
        self.decoder = InterestDecoder(config)
        self.fusion_alpha: Optional[nn.Parameter] = None
        if len(self.modalities) > 1 and config.fusion == "dynamic_shared":
            self.fusion_alpha = nn.Parameter(torch.zeros(()))
        elif len(self.modalities) > 1 and config.fusion == "dynamic_instance":
            if num_items is None:
                raise ValueError("fusion='dynamic_instance' needs num_items")
            self.fusion_alpha = nn.Parameter(torch.zeros(num_items))
        self._init_weights()

    def _init_weights(self) -> None:
        # As the reference's RecBole `_init_weights`: every Linear N(0, std) with zero bias,
        # embeddings N(0, std), LayerNorms (1, 0); in_proj_weight keeps its Xavier init.
        std = self.config.init_std
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=std)
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.positions.weight, std=std)
        if self.config.adapter_default_init:
            for adapter in self.adapters.values():
                adapter.reset_parameters()  # quirk 16: created after the reference's init pass

    # ---- item side -------------------------------------------------------------------------
    def adapt(self, raw: Mapping[str, Tensor]) -> Dict[str, Tensor]:
        """Apply each modality's adapter (any leading shape; features may be float16)."""
        out = {}
        for m, x in raw.items():
            if m not in self.adapters:
                raise KeyError(f"no adapter for modality {m!r}; known: {list(self.adapters)}")
            adapter = self.adapters[m]
            out[m] = adapter(x.to(adapter.weight.dtype))
        return out

    # ---- sequence side ---------------------------------------------------------------------
    def tokens(
        self,
        hist_adapted: Mapping[str, Tensor],
        id_emb: Optional[Tensor] = None,
        present: Optional[Mapping[str, Tensor]] = None,
    ) -> Tensor:
        """Decoder input before LayerNorm: sum of modalities + positions (+ ID), B x L x D."""
        mask_missing = self.config.mask_missing_modality and present is not None
        if self.config.use_id and id_emb is None:
            raise ValueError("config.use_id is set but no id_emb was given")
        device = self.positions.weight.device.type
        # Under autocast the whole residual stream runs in its dtype: otherwise every residual add
        # promotes back to fp32 and each linear casts down again (a copy per op).
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
        x = None
        for m in self.modalities:
            v = hist_adapted[m] if dtype is None else hist_adapted[m].to(dtype)
            if mask_missing and m in present:
                v = v * present[m].unsqueeze(-1).to(v.dtype)
            x = v if x is None else x + v
        length = (x if x is not None else id_emb).shape[1]
        if length > self.config.max_len:
            raise ValueError(f"history length {length} exceeds max_len {self.config.max_len}")
        pos = self.positions.weight[:length]
        pos = pos if dtype is None else pos.to(dtype)
        x = pos if x is None else x + pos
        if self.config.use_id:
            x = x + (id_emb if dtype is None else id_emb.to(dtype))
        return x

    def encode(
        self,
        hist_adapted: Mapping[str, Tensor],
        hist_mask: Tensor,
        interest_tokens: Tensor,
        centroids: Tensor,
        id_emb: Optional[Tensor] = None,
        present: Optional[Mapping[str, Tensor]] = None,
        interest_first: Optional[Tensor] = None,
        all_positions: bool = False,
        times: Optional[Tensor] = None,
    ) -> Tuple[Tensor, Tensor, Tensor]:
        """User vectors from left-aligned histories (docs/model.md §2, §5, §6).

        hist_adapted[m]: B x L x D; hist_mask: B x L, True = real item, every row >= 1 real;
        interest_tokens: B x M cluster ids (0 = pad); centroids: (K+1) x D with row 0 = padding;
        id_emb: B x L x D when `use_id`; present[m]: B x L bool (used when masking missing
        modalities); interest_first: B x M first positions of the tokens (needed when
        `config.causal`); times: B x (L + 1) timestamps, SeqBatch.times (needed with
        `config.relative_time_bias`). Returns (u: B x D unit vectors read at each row's last real item,
        memory: B x M x D, memory_mask: B x M, True = real token).

        `all_positions`: u holds the unit vectors of every position instead (B x L x D; pads are not
        meaningful). With `config.causal`, position p sees only items 0..p and the interests that
        appeared by then: `interest_first` (B x M, from `interest_tokens(..., first=True)`) is the
        position where each token's cluster first occurs; the decoder attends token m from
        p >= first[m], and the encoder lets token m read token m' only when first[m'] <= first[m].
        So the output at p equals the last output of the same model run on the prefix 0..p alone:
        one pass gives the user vector of every prefix. Without `causal` this is the paper's
        bidirectional model, whose position p sees the whole history.
        """
        if self.config.causal and self.modalities and interest_first is None:
            raise ValueError("config.causal needs interest_first (interest_tokens(..., first=True))")
        h = self.input_dropout(self.input_norm(self.tokens(hist_adapted, id_emb, present)))
        masks = self._causal_masks(hist_mask.shape[1], interest_first) if self.config.causal else (None,) * 3
        memory, memory_mask = self._memory(interest_tokens, centroids.to(h.dtype), masks[0])
        context = Memory(memory, memory_mask, masks[2])
        last = None if all_positions else hist_mask.sum(1) - 1
        if last is not None and self.config.last_query_only and not self.config.causal:
            # The decoder's last layer computes only the positions read: y is B x 1 x D.
            y = self.decoder(h, hist_mask, context, masks[1], last, times)[:, 0]
        else:
            y = self.decoder(h, hist_mask, context, masks[1], times=times)
            y = y if last is None else y[torch.arange(y.shape[0], device=y.device), last]
        return F.normalize(y.float(), dim=-1), memory, memory_mask

    def _memory(self, tokens: Tensor, centroids: Tensor, allowed: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
        if not self.modalities:  # ID-only: no interests; one masked slot, nothing to encode
            empty = tokens.new_zeros(tokens.shape[0], 1, dtype=torch.bool)
            return centroids.new_zeros(tokens.shape[0], 1, centroids.shape[1]), empty
        mask = tokens != 0
        qkv = None
        if self.config.project_centroids and centroids.shape[0] < tokens.numel():
            # The first layer projects centroids, not tokens: project the K + 1 centroids once and
            # gather (fewer rows than the B x M slots; same values; the backward scatters into K + 1 rows).
            attn = self.encoder.layers[0].self_attn
            qkv = F.embedding(tokens, F.linear(centroids, attn.in_proj_weight, attn.in_proj_bias))
        return self.encoder(F.embedding(tokens, centroids), mask, allowed, qkv), mask

    @staticmethod
    def _causal_masks(length: int, first: Optional[Tensor]) -> Tuple[Optional[Tensor], Tensor, Optional[Tensor]]:
        """(encoder B x M x M, decoder self L x L, decoder cross B x L x M) "may attend" masks."""
        positions = torch.arange(length, device=first.device if first is not None else None)
        items = positions.unsqueeze(1) >= positions.unsqueeze(0)
        if first is None:
            return None, items, None
        tokens = first.unsqueeze(1) <= first.unsqueeze(2)
        cross = first.unsqueeze(1) <= positions.view(1, -1, 1)
        return tokens, items, cross

    def regulariser(self, memory: Tensor, memory_mask: Tensor) -> Tensor:
        return interest_regulariser(memory, memory_mask, self.config.regulariser_reference)

    # ---- scoring ---------------------------------------------------------------------------
    def _alpha(self, item_index: Optional[Tensor]) -> Optional[Tensor]:
        if self.fusion_alpha is None or self.fusion_alpha.dim() == 0:
            return self.fusion_alpha
        return self.fusion_alpha if item_index is None else self.fusion_alpha[item_index]

    def _pad_item(self, like: Tensor) -> Tuple[Dict[str, Tensor], Optional[Tensor]]:
        """The reference's padding item (index 0 there, quirk 17) as one candidate, fp32: its
        features are zero, so each adapter gives its bias; its ID row is zero (cosine 0)."""
        items = {m: self.adapters[m].bias.float().unsqueeze(0) for m in self.modalities}
        return items, like.new_zeros(1, self.config.hidden) if self.config.use_id else None

    def pad_scores(self, u: Tensor) -> Tensor:
        """B x 1, in fp32: the padding item scored as one more candidate (model.pad_negative)."""
        with torch.autocast(u.device.type, enabled=False):
            return self.score(u.float(), *self._pad_item(u))

    @property
    def linear_score(self) -> bool:
        """Whether the score is linear in the user vector: IDs only, or one modality (± IDs)."""
        return len(self.modalities) <= 1

    def score_vectors(self, items: Mapping[str, Tensor], item_id: Optional[Tensor] = None,
                      present: Optional[Mapping[str, Tensor]] = None) -> Optional[Tensor]:
        """Where the score is linear in the user vector (IDs only, or one modality), the candidates'
        vectors v with score = u . v / |v| (`fusion.cosine`); None under the fusion of several."""
        if self.config.use_id and item_id is None:
            raise ValueError("config.use_id is set but no item_id embeddings were given")
        item_id = item_id if self.config.use_id else None
        if not self.linear_score:
            return None
        if not self.modalities:  # ID-only: fusion degenerates to the ID cosine
            return item_id
        (m,) = self.modalities
        mask = present[m] if present is not None and self.config.mask_missing_modality else None
        return fusion.summed(items[m], mask, item_id)

    def full_softmax_loss(self, u: Tensor, items: Mapping[str, Tensor], item_id: Optional[Tensor],
                          present: Optional[Mapping[str, Tensor]], target: Tensor, keep: Optional[Tensor] = None,
                          weight: Optional[Tensor] = None) -> Optional[Tensor]:
        """The `weight`ed mean (fp32) of the rows' cross-entropies of `score(u, items, ...) /
        temperature` over the whole catalogue in index order (plus the padding item with
        model.pad_negative; `keep`: N bool, the items that are candidates at all), by
        `linear_cross_entropy`: no B x N matrix. None where the score is not linear in u (the
        caller scores the catalogue instead)."""
        with torch.autocast(u.device.type, enabled=False):
            vectors = self.score_vectors(items, item_id, present)
            if vectors is None:
                return None
            bias = None if keep is None else torch.zeros(keep.shape, device=u.device).masked_fill(~keep, float("-inf"))
            if self.config.pad_negative:
                vectors = torch.cat([vectors, self.score_vectors(*self._pad_item(u))])
                bias = None if bias is None else F.pad(bias, (0, 1))
            # The temperature scales the N x D unit vectors instead of the B x N logits.
            unit = F.normalize(vectors.float(), dim=-1) / self.config.temperature
            return linear_cross_entropy(u.float(), unit, target, bias, weight)

    def score(
        self,
        u: Tensor,
        items: Mapping[str, Tensor],
        item_id: Optional[Tensor] = None,
        present: Optional[Mapping[str, Tensor]] = None,
        item_index: Optional[Tensor] = None,
    ) -> Tensor:
        """Scores before temperature (docs/model.md §8): B x N of every user against every candidate
        (items[m]: N x D adapted vectors; item_id: N x D ID embeddings, when `use_id`; present[m]: N
        bool), or B x S of each user against its own S candidates (items[m]: B x S x D, ...).
        item_index: the candidates' item indices, for per-item alpha (dynamic_instance; None = the
        candidates are all items in index order).
        """
        vectors = self.score_vectors(items, item_id, present)
        if vectors is not None:
            return fusion.cosine(u, vectors)
        item_id = item_id if self.config.use_id else None
        present = present if self.config.mask_missing_modality else None
        sims = [fusion.cosine(u, items[m]) for m in self.modalities]
        pres = None if present is None else [present[m] for m in self.modalities]
        id_sim = fusion.cosine(u, item_id) if item_id is not None else None
        return fusion.fuse(sims, pres, self._alpha(item_index), id_sim)

    @torch.no_grad()
    def fuse(
        self,
        sims: Mapping[str, Tensor],
        id_sim: Optional[Tensor] = None,
        present: Optional[Mapping[str, Tensor]] = None,
        item_index: Optional[Tensor] = None,
    ) -> Tensor:
        """The score from cosines already computed: sims[m] = u . normalize(v_m) per modality and
        id_sim = u . normalize(id), any shape (B x N, B x S). Equals `score` up to float rounding;
        present[m] and item_index broadcast against the cosines.

        Inference only (no gradients), for large catalogues (batch scoring, retrieval re-scoring):
        `fusion.fuse(..., inference=True)`. Not for one modality with IDs, whose score is the cosine of a summed
        vector rather than a function of cosines.
        """
        if self.config.use_id and id_sim is None:
            raise ValueError("config.use_id is set but no id_sim was given")
        if not self.modalities:
            return id_sim.clone()
        if len(self.modalities) == 1 and self.config.use_id:
            raise ValueError("one modality with IDs scores a summed vector: use score()")
        use_present = self.config.mask_missing_modality and present is not None
        pres = [present[m] for m in self.modalities] if use_present else None
        planes = [sims[m] for m in self.modalities]
        return fusion.fuse(planes, pres, self._alpha(item_index), id_sim if self.config.use_id else None, inference=True)


def peft_trainable(core: MISSRecCore) -> int:
    """The reference's fine-tuning from a pre-trained checkpoint (docs/model.md §10).

    Freezes positions, encoder and decoder; adapters, input LayerNorm and alpha train. The ID table
    lives outside the core (TorchRec) and always trains, as does the head's repeat bias
    (model.repeat_bias, a per-domain prior like alpha). Returns the trainable parameter count.
    """
    frozen = (core.positions, core.encoder, core.decoder)
    for module in frozen:
        module.requires_grad_(False)
    for module in (core.adapters, core.input_norm):
        module.requires_grad_(True)
    if core.fusion_alpha is not None:
        core.fusion_alpha.requires_grad_(True)
    return sum(p.numel() for p in core.parameters() if p.requires_grad)


# Reference (`gimpong/MM23-MISSRec`) state-dict prefixes -> this core's.
REFERENCE_PREFIXES = {
    "trm_model.encoder.": "encoder.",
    "trm_model.decoder.": "decoder.",
    "position_embedding.": "positions.",
    "LayerNorm.": "input_norm.",
    "fusion_factor": "fusion_alpha",
}


def from_reference_state_dict(
    state: Mapping[str, Tensor], adapters: Optional[Mapping[str, str]] = None
) -> Tuple[Dict[str, Tensor], Dict[str, Tensor]]:
    """Split a reference checkpoint's `state_dict` into (core keys, the rest).

    `adapters` maps the reference adapter names to this core's modality names (default text_adaptor
    -> text, img_adaptor -> image). The rest holds what lives outside the core here
    (item_embedding, interest buffers, feature tables).
    """
    adapters = adapters or {"text_adaptor": "text", "img_adaptor": "image"}
    prefixes = dict(REFERENCE_PREFIXES)
    prefixes.update({f"{ref}.": f"adapters.{mine}." for ref, mine in adapters.items()})
    core, rest = {}, {}
    for key, value in state.items():
        for old, new in prefixes.items():
            if key.startswith(old):
                core[new + key[len(old) :]] = value
                break
        else:
            rest[key] = value
    return core, rest
