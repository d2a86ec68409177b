"""The item tables of a MISSRec model and their TorchRec collections.

Item side: one frozen `EmbeddingCollection` per feature dim holds the modality tables (MiniLM / CLIP
vectors, never trained; pre-training's word-dropped `text_aug` too); the optional item-ID table
(transductive mode) has its own trainable collection, and the per-item state (`item_state.py`:
interest clusters, presence and softmax flags, log-Q) its own frozen one, written by the trainer
rather than loaded from features. Every table serves three features of the batch (`datapipes.batch`):
the history, the targets and the candidates (all items for full softmax and evaluation, a sample for
sampled softmax, none in pre-training).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Tuple

import torch
from torch import nn
from torchrec.modules.embedding_configs import DataType, EmbeddingConfig
from torchrec.modules.embedding_modules import EmbeddingCollection

from datapipes.batch import candidates_key, history_key, target_key
from missrec_torchrec import item_state
from missrec_torchrec.item_state import STATE_GROUP, STATE_TABLE

# A frozen table keeps its feature file's dtype (`missrec features --dtype`): float16 halves its memory.
# The lookup returns fp32 (FBGEMM on CPU) and the adapters cast to their own dtype anyway.
TABLE_DATA_TYPES = {"float16": DataType.FP16, "float32": DataType.FP32}

ID_TABLE = "item_id"
ID_GROUP = "ids"
AUG_TABLE = "text_aug"  # word-dropped text (.feat2CLS): pre-training's feature-swap augmentation


def feature_group(dim: int) -> str:
    return f"features{dim}"


def table_features(table: str) -> List[str]:
    return [history_key(table), target_key(table), candidates_key(table)]


def _collection(tables: List[Tuple[str, int]], num_items: int, device: torch.device,
                dtypes: Mapping[str, str]) -> EmbeddingCollection:
    configs = [EmbeddingConfig(name=t, embedding_dim=d, num_embeddings=num_items, feature_names=table_features(t),
                               data_type=TABLE_DATA_TYPES.get(dtypes.get(t, ""), DataType.FP32))
               for t, d in tables]
    return EmbeddingCollection(tables=configs, device=device)


@dataclass
class ItemTables:
    """Which tables exist, their dims and the batch KJT (group) that feeds each collection."""

    frozen_tables: List[str] = field(default_factory=list)  # loaded from the dataset's features
    kjt_groups: Dict[str, List[str]] = field(default_factory=dict)
    table_dims: Dict[str, int] = field(default_factory=dict)

    @classmethod
    def build(
        cls, modality_dims: Mapping[str, int], aug_dim: Optional[int], id_dim: Optional[int], num_items: int,
        device: torch.device, dtypes: Optional[Mapping[str, str]] = None,
    ) -> Tuple["ItemTables", nn.ModuleDict, nn.ModuleDict, nn.ModuleDict]:
        """(layout, frozen feature collections by group, ID collection by group, the item-state
        collection): `aug_dim` adds the text_aug table, `id_dim` (None = inductive) the trainable ID
        table; `dtypes` the stored dtype of feature tables by name (float32 where missing). Modules
        register in that order, and DMP initialises tables in module order from the global RNG: the
        state last, so the ID table starts as it did before the state existed."""
        dtypes = dtypes or {}
        tables_by_dim: Dict[int, List[Tuple[str, int]]] = defaultdict(list)
        for m, dim in modality_dims.items():
            tables_by_dim[dim].append((m, dim))
        if aug_dim is not None:
            tables_by_dim[aug_dim].append((AUG_TABLE, aug_dim))
        groups = sorted(tables_by_dim.items())
        features = nn.ModuleDict({feature_group(dim): _collection(group, num_items, device, dtypes) for dim, group in groups})
        layout = cls(
            frozen_tables=[t for group in tables_by_dim.values() for t, _ in group],
            kjt_groups={feature_group(dim): [t for t, _ in group] for dim, group in groups},
            table_dims={t: d for group in tables_by_dim.values() for t, d in group},
        )
        ids = nn.ModuleDict()
        if id_dim is not None:
            ids[ID_GROUP] = _collection([(ID_TABLE, id_dim)], num_items, device, {})
            layout.kjt_groups[ID_GROUP] = [ID_TABLE]
            layout.table_dims[ID_TABLE] = id_dim
        # fp32 whatever the features' dtype: its cluster ids and flags must be exact.
        width = item_state.width(list(modality_dims))
        state = nn.ModuleDict({STATE_GROUP: _collection([(STATE_TABLE, width)], num_items, device, {})})
        layout.kjt_groups[STATE_GROUP] = [STATE_TABLE]
        layout.table_dims[STATE_TABLE] = width
        return layout, features, ids, state
