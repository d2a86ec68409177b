"""Hyper-parameters of the MISSRec core, and the switches for the reference code's quirks.

Defaults fix the quirks; `ModelConfig.paper(stage)` reproduces the official code
(`gimpong/MM23-MISSRec`) exactly. Every switch is explained in docs/quirks.md.
A run's `model` section (missrec_torchrec/config.py: `Config.model`) is a ModelConfig whose values
come from configs/defaults.yaml and the preset, already checked there with errors naming the key.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Dict, Mapping, Optional

# The head's training objectives (train.mode, train.loss).
MODES = ("finetune", "pretrain")
LOSSES = ("full_softmax", "sampled_softmax")
FUSIONS = ("dynamic_shared", "dynamic_instance", "static")
ACTIVATIONS = ("gelu", "relu")
ATTENTION_KERNELS = ("auto", "math", "sdpa")
# The reference's `train_stage` names: pre-training, fine-tuning without and with item IDs.
STAGES = ("pretrain", "inductive_ft", "transductive_ft")
# torch: the minibatch k-means (model/interest.py, the reference's); faiss: Lloyd on a sample, then a
# faiss index (model/faiss_kmeans.py); auto: faiss for large catalogues (interest.kmeans_backend).
KMEANS_BACKENDS = ("auto", "torch", "faiss")


@dataclass(frozen=True)
class ModelConfig:
    hidden: int = 300
    heads: int = 4
    ffn: int = 256
    dropout: float = 0.5
    # Dropout on the attention probabilities; None = `dropout`, as the reference (HSTU-Tensorflow's ML-1M script has
    # none there).
    attention_dropout: Optional[float] = None
    fast_dropout: bool = True  # model/dropout.py: 8x fewer random draws, same keep probability
    # The user vector reads the last position only: the decoder's last layer computes that query
    # alone (keys and values still from every position). Same values, ~1/3 less compute.
    last_query_only: bool = True
    attention: str = "auto"  # math | sdpa | auto (Attention.uses_math: math when training on CPU with dropout or bf16)
    # One query per row (the decoder's last layer under last_query_only): key and value projections
    # folded into the query side (model/attention.py), O(S D) instead of O(S D^2). Same values.
    fold_single_query: bool = True
    # The interest encoder's first projections are computed per centroid (K + 1 rows) and gathered
    # per token, when that is fewer rows. Same values and gradients.
    project_centroids: bool = True
    layer_norm_eps: float = 1e-12
    init_std: float = 0.02
    max_len: int = 50
    n_enc_layers: int = 1
    n_dec_layers: int = 1
    activation: str = "gelu"
    temperature: float = 0.07
    fusion: str = "dynamic_shared"
    use_id: bool = False  # transductive: a learned item-ID embedding joins tokens and scores
    causal: bool = False  # one-pass causal model (not the paper's): every prefix's user vector at once
    # Not the paper's: HSTU's relative position bias on the decoder's item self-attention (model/layers.py).
    relative_position_bias: bool = False
    # Not the paper's: HSTU's relative time bias, a learned logit per log-bucket of the time
    # from each key item to the predicted item's (model/layers.py); batches must carry timestamps.
    relative_time_bias: bool = False
    # Not the paper's: one learned scalar lowers the score of every item in the user's history window
    # (recommender.MISSRecHead.lower_repeats), so a domain where nothing is consumed twice can learn so.
    repeat_bias: bool = False
    interest_ratio: float = 0.5  # K = ceil(ratio * clustered points)
    interest_cap: Optional[int] = None  # max K; None = uncapped as the reference
    kmeans_iters: int = 5
    kmeans_minibatch: int = 2048
    kmeans_backend: str = "auto"  # one of KMEANS_BACKENDS
    kmeans_points_per_centroid: int = 256  # faiss: sample points per centroid (faiss's own default)
    lambda_ss: float = 1e-3  # weight of the seq->seq InfoNCE in pre-training
    gamma: float = 1e-4  # weight of the interest regulariser
    item_drop_prob: float = 0.2
    item_drop_coefficient: float = 0.9  # P(item drop) per batch; else feature swap
    feature_swap_prob: float = 0.2
    # Quirk switches (docs/quirks.md). True/False below = the fix; paper() sets the reference.
    kmeans_single_pass: bool = False  # Q1: the reference stops after one pass
    mask_missing_modality: bool = True  # Q3: the reference feeds missing modalities as adapter bias
    interest_keep_zero: bool = False  # Q4: the reference keeps cluster 0 as a (masked) token
    regulariser_reference: bool = False  # Q5: sum over pad slots and the batch instead of means
    mask_duplicate_targets: bool = True  # Q6: in-batch rows sharing a target are not negatives
    kmeans_torchpq_update: bool = False  # Q15: TorchPQ's update, empty clusters decay to 0
    adapter_default_init: bool = False  # Q16: adapters keep PyTorch's default Linear init
    kmeans_reference_batches: bool = False  # Q18: first-minibatch init, short last minibatch merged
    kmeans_abs_inplace: bool = False  # Q19: TorchPQ's in-place |x| on minibatch and centroids
    pad_negative: bool = False  # Q17: the padding item (zero features, zero ID) is a softmax negative

    def __post_init__(self) -> None:
        if self.fusion not in FUSIONS:
            raise ValueError(f"ModelConfig.fusion {self.fusion!r} is not one of {FUSIONS}")
        if self.attention not in ATTENTION_KERNELS:
            raise ValueError(f"ModelConfig.attention must be one of {ATTENTION_KERNELS}, got {self.attention!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"ModelConfig.activation {self.activation!r} is not one of {ACTIVATIONS}")
        if self.hidden % self.heads:
            raise ValueError(f"ModelConfig.hidden {self.hidden} is not divisible by heads {self.heads}")
        if self.kmeans_backend not in KMEANS_BACKENDS:
            raise ValueError(f"ModelConfig.kmeans_backend {self.kmeans_backend!r} is not one of {KMEANS_BACKENDS}")
        if self.kmeans_backend == "faiss" and self.reference_kmeans():
            raise ValueError("ModelConfig.kmeans_backend faiss has none of the reference's k-means quirks: "
                             "use torch with kmeans_single_pass/torchpq_update/reference_batches/abs_inplace")
        if not 0.0 < self.interest_ratio <= 1.0:
            raise ValueError(f"ModelConfig.interest_ratio {self.interest_ratio} is not in (0, 1]")
        if self.interest_cap is not None and self.interest_cap < 1:
            raise ValueError(f"ModelConfig.interest_cap {self.interest_cap} must be >= 1 or None")
        if self.attention_dropout is not None and not 0.0 <= self.attention_dropout <= 1.0:
            raise ValueError(f"ModelConfig.attention_dropout {self.attention_dropout} is not in [0, 1] or None")
        for name in ("dropout", "item_drop_prob", "item_drop_coefficient", "feature_swap_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"ModelConfig.{name} {getattr(self, name)} is not in [0, 1]")
        if self.temperature <= 0:
            raise ValueError(f"ModelConfig.temperature {self.temperature} must be > 0")
        if min(self.max_len, self.kmeans_iters, self.kmeans_minibatch, self.n_enc_layers, self.n_dec_layers) < 1:
            raise ValueError("ModelConfig: max_len, kmeans_iters, kmeans_minibatch and layer counts must be >= 1")

    @classmethod
    def paper(cls, stage: str = "transductive_ft", **overrides: Any) -> "ModelConfig":
        """The official code's setting for one of its stages (docs/model.md sections 9, 10 and 13).

        The fine-tuning ratio is 0.5 (the Office transductive runs used 0.3: pass it as an override).
        """
        if stage not in STAGES:
            raise ValueError(f"stage {stage!r} is not one of {STAGES}")
        reference = cls(
            use_id=stage == "transductive_ft",
            interest_ratio=0.02 if stage == "pretrain" else 0.5,
            kmeans_backend="torch",
            kmeans_single_pass=True,
            mask_missing_modality=False,
            interest_keep_zero=True,
            regulariser_reference=True,
            mask_duplicate_targets=False,
            kmeans_torchpq_update=True,
            adapter_default_init=True,
            kmeans_reference_batches=True,
            kmeans_abs_inplace=True,
            pad_negative=stage != "pretrain",
        )
        return replace(reference, **overrides)

    def reference_kmeans(self) -> bool:
        """Whether a quirk of the reference's k-means is on (only the torch k-means has them)."""
        return (self.kmeans_single_pass or self.kmeans_torchpq_update or self.kmeans_reference_batches
                or self.kmeans_abs_inplace)

    def check_head(self, modalities: int, mode: str, loss: str) -> None:
        """Refuse a model that cannot train as `mode` with `loss` over `modalities` modalities."""
        if mode not in MODES:
            raise ValueError(f"train.mode {mode!r} is not one of {MODES}")
        if loss not in LOSSES:
            raise ValueError(f"train.loss {loss!r} is not one of {LOSSES}")
        if self.pad_negative and self.fusion == "dynamic_instance" and modalities > 1:
            raise ValueError("model.pad_negative needs one alpha for the padding item: use fusion dynamic_shared "
                             "or static")
        if self.causal and mode != "finetune":
            raise ValueError("model.causal trains with next-item targets: it needs train.mode=finetune")
        if self.repeat_bias and (mode, loss) != ("finetune", "full_softmax"):
            raise ValueError("model.repeat_bias is learned by the full softmax: it needs train.mode=finetune")

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"ModelConfig: unknown keys {unknown}")
        return cls(**dict(values))
