"""MISSRec's model core in plain PyTorch, fed dense tensors by the TorchRec wrapper."""

from .config import ModelConfig
from .core import MISSRecCore, from_reference_state_dict, peft_trainable
from .interest import assign, discover_interests, interest_tokens, kmeans, num_clusters, random_init
from .layers import interest_regulariser
from .losses import (
    Compaction,
    expected_logq,
    feature_swap,
    full_softmax_ce,
    item_drop,
    sample_negatives,
    sampled_softmax,
    seq_item_infonce,
    seq_seq_infonce,
    use_item_drop,
)

__all__ = [
    "ModelConfig",
    "MISSRecCore",
    "from_reference_state_dict",
    "interest_regulariser",
    "peft_trainable",
    "assign",
    "discover_interests",
    "interest_tokens",
    "kmeans",
    "num_clusters",
    "random_init",
    "Compaction",
    "expected_logq",
    "feature_swap",
    "full_softmax_ce",
    "item_drop",
    "sample_negatives",
    "sampled_softmax",
    "seq_item_infonce",
    "seq_seq_infonce",
    "use_item_drop",
]
