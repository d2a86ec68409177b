"""The value checks of the run configuration: one rule per key (type, range, allowed names) and the
rules that tie keys together. `config.Config.from_dict` applies them once, to the merged YAML.

Pure Python: checking a config needs neither torch nor torchrec.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Mapping, Tuple


class ConfigError(ValueError):
    pass


# A check maps a value to (valid, normalised value); `what` says what a valid value is.
Check = Tuple[str, Callable[[Any], Tuple[bool, Any]]]


def _integer(minimum: int, nullable: bool = False) -> Check:
    what = {0: "a non-negative integer", 1: "a positive integer"}.get(minimum, f"an integer >= {minimum}")

    def check(v):
        if v is None:
            return nullable, v
        return isinstance(v, int) and not isinstance(v, bool) and v >= minimum, v

    return what + (" or null" if nullable else ""), check


def _number(low: float, high: float = math.inf, low_open: bool = False, high_open: bool = True,
            nullable: bool = False) -> Check:
    if high == math.inf:
        what = f"a number {'>' if low_open else '>='} {low:g}"
    else:
        what = f"a number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"

    def check(v):
        if v is None:
            return nullable, v
        if isinstance(v, str):  # YAML reads 1e-3 (no dot) as a string
            try:
                v = float(v)
            except ValueError:
                return False, v
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            return False, v
        above = v > low if low_open else v >= low
        below = v < high if high_open else v <= high
        return above and below, v

    return what + (" or null" if nullable else ""), check


def _choice(*names: str, nullable: bool = False) -> Check:
    return (f"one of {', '.join(names)}" + (" or null" if nullable else ""),
            lambda v: ((v is None and nullable) or (isinstance(v, str) and v in names), v))


def _text(nullable: bool = False) -> Check:
    return ("a string" + (" or null" if nullable else ""),
            lambda v: ((v is None and nullable) or (isinstance(v, str) and v != ""), v))


def _list_of(item: Check, non_empty: bool = False) -> Check:
    what, check = item
    return (f"a {'non-empty ' if non_empty else ''}list, each {what}",
            lambda v: (isinstance(v, list) and (bool(v) or not non_empty) and all(check(x)[0] for x in v), v))


BOOL: Check = ("true or false", lambda v: (isinstance(v, bool), v))
_FEATURE_SPEC: Check = ("a mapping with modality and encoder strings",
                        lambda v: (isinstance(v, dict) and set(v) == {"modality", "encoder"}
                                   and all(isinstance(x, str) and x for x in v.values()), v))
# As missrec_torchrec.distributed.SHARDING_TYPES / FUSED_OPTIMIZERS and model.config (not imported
# here, so that checking a config needs neither torch nor torchrec).
_SHARDING = ("table_wise", "row_wise", "column_wise")
_SHARDING_CHECK: Check = (
    f"one of {', '.join(_SHARDING)}, null, or a mapping of table names to those",
    lambda v: (v is None or v in _SHARDING or (isinstance(v, dict) and all(
        isinstance(k, str) and (x is None or x in _SHARDING) for k, x in v.items())), v))

# Keys declared `bool` in config.py and not named here are checked with BOOL (the model's quirk switches).
RULES: Dict[str, Check] = {
    "experiment.name": _text(),
    "experiment.out_dir": _text(),
    "experiment.seed": _integer(0),
    "data.dataset": _text(),
    "data.prepare_source": _text(nullable=True),
    "data.prepare_args": ("a list", lambda v: (isinstance(v, list), v)),
    "data.features": ("a list of {modality, encoder} mappings",
                      lambda v: (v is None or (isinstance(v, list) and all(_FEATURE_SPEC[1](x)[0] for x in v)), v)),
    "data.modalities": _list_of(_text()),
    "data.batch_size": _integer(1),
    "data.eval_batch_size": _integer(1),
    "data.num_workers": _integer(0),
    "data.shuffle_buffer": _integer(1),
    "data.prefix_sample": _number(0, 1, low_open=True, high_open=False),
    "data.length_buckets": BOOL,
    "model.hidden": _integer(1),
    "model.heads": _integer(1),
    "model.ffn": _integer(1),
    "model.dropout": _number(0, 1),
    "model.attention_dropout": _number(0, 1, nullable=True),
    "model.layer_norm_eps": _number(0, low_open=True),
    "model.init_std": _number(0),
    "model.max_len": _integer(1),
    "model.n_enc_layers": _integer(1),
    "model.n_dec_layers": _integer(1),
    "model.activation": _choice("gelu", "relu"),
    "model.attention": _choice("auto", "math", "sdpa"),  # as model.config.ATTENTION_KERNELS
    "model.temperature": _number(0, low_open=True),
    "model.fusion": _choice("dynamic_shared", "dynamic_instance", "static"),
    "model.interest_ratio": _number(0, 1, low_open=True, high_open=False),
    "model.interest_cap": _integer(1, nullable=True),
    "model.kmeans_iters": _integer(1),
    "model.kmeans_minibatch": _integer(1),
    "model.kmeans_backend": _choice("auto", "torch", "faiss"),  # as model.config.KMEANS_BACKENDS
    "model.kmeans_points_per_centroid": _integer(2),
    "model.lambda_ss": _number(0),
    "model.gamma": _number(0),
    "model.item_drop_prob": _number(0, 1, high_open=False),
    "model.item_drop_coefficient": _number(0, 1, high_open=False),
    "model.feature_swap_prob": _number(0, 1, high_open=False),
    "model.kmeans_reference_batches": BOOL,
    "model.kmeans_abs_inplace": BOOL,
    "model.pad_negative": BOOL,
    "train.mode": _choice("finetune", "pretrain"),
    "train.epochs": _integer(0),
    "train.max_steps_per_epoch": _integer(1, nullable=True),
    "train.lr": _number(0, low_open=True),
    "train.weight_decay": _number(0),
    "train.sparse_optimizer": _choice("rowwise_adagrad", "adagrad", "sgd", "dense_adam"),
    "train.sparse_lr": _number(0, low_open=True),
    "train.loss": _choice("auto", "full_softmax", "sampled_softmax"),
    "train.full_softmax_max_items": _integer(1),
    "train.num_negatives": _integer(1),
    "train.in_batch_negatives": BOOL,
    "train.softmax_items": _choice("all", "training"),
    "train.recluster_every": _integer(0, nullable=True),
    "train.init_checkpoint": _text(nullable=True),
    "train.peft": BOOL,
    "train.sharding": _SHARDING_CHECK,
    "train.precision": _choice("auto", "fp32", "bf16"),  # as missrec_torchrec.precision.PRECISIONS
    "eval.engine": _choice("catalogue", "dmp"),
    "eval.catalogue": _choice("auto", "held", "rank_local"),
    "eval.chunk_items": _integer(1),
    "eval.block_users": _integer(1),
    "eval.ks": _list_of(_integer(1), non_empty=True),
    "eval.metric": _text(),
    "eval.patience": _integer(1),
    "eval.mask_history": BOOL,
    "eval.recbole_stopping": BOOL,
    "eval.every": _integer(1),
    "eval.cold_start": BOOL,
    "eval.max_users": _integer(1, nullable=True),
    "checkpoint.keep": _integer(1),
    "checkpoint.resume": BOOL,
    "checkpoint.run_dir": _text(nullable=True),
    "checkpoint.every_steps": _integer(0, nullable=True),
    "checkpoint.allow_change": _list_of(_text()),
    "log.tensorboard": BOOL,
    "log.every": _integer(1),
    "log.progress": BOOL,
    "log.fingerprint": BOOL,
    "log.resources": BOOL,
}


def check_value(dotted: str, value: Any, rule: Check) -> Any:
    """`value` normalised (numbers given as strings, train.lr=1e-3, become floats), or a ConfigError
    naming the key."""
    what, check = rule
    ok, normalised = check(value)
    if not ok:
        raise ConfigError(f"config key {dotted}: must be {what}, got {value!r}")
    return normalised


def metric_names(ks: List[int], cold_start: bool) -> List[str]:
    """The metrics an evaluation with cut-offs `ks` reports (what eval.metric may name)."""
    metrics = [f"{m}@{k}" for k in ks for m in ("hr", "ndcg")] + ["mrr"]
    return metrics + [f"cold/{m}" for m in metrics] if cold_start else metrics


def check_related(model: Mapping[str, Any], ev: Mapping[str, Any], train: Mapping[str, Any]) -> None:
    """The rules that tie keys together (each value already passed its own rule)."""
    if model["hidden"] % model["heads"]:
        raise ConfigError(f"config key model.hidden: {model['hidden']} is not divisible by model.heads "
                          f"{model['heads']}")
    quirks = [q for q in ("kmeans_single_pass", "kmeans_torchpq_update", "kmeans_reference_batches",
                          "kmeans_abs_inplace") if model.get(q)]
    if model.get("kmeans_backend") == "faiss" and quirks:
        raise ConfigError(f"config key model.kmeans_backend: faiss has none of the reference's k-means quirks "
                          f"(model.{quirks[0]} is on): use torch")
    check_repeat_bias(model, train)
    metrics = metric_names(ev["ks"], ev["cold_start"])
    if ev["metric"] not in metrics:
        raise ConfigError(f"config key eval.metric: {ev['metric']!r} is not one of the metrics eval.ks "
                          f"{ev['ks']} gives ({', '.join(metrics)})")


def check_repeat_bias(model: Mapping[str, Any], train: Mapping[str, Any]) -> None:
    """model.repeat_bias lowers the history items among every catalogue score, so it trains only
    where the loss sees the whole catalogue (train.loss=auto above full_softmax_max_items items is
    refused when the model is built)."""
    if not model.get("repeat_bias"):
        return
    if train["mode"] != "finetune":
        raise ConfigError("config key model.repeat_bias: it is learned by the finetune full softmax; "
                          f"train.mode={train['mode']} has no catalogue scores to learn it from")
    if train["loss"] == "sampled_softmax":
        raise ConfigError("config key model.repeat_bias: needs train.loss full_softmax (or auto): sampled "
                          "softmax scores no history item as a negative")
