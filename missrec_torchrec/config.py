"""Run configuration: one commented defaults file, presets that override it, `key=value` overrides.

`configs/defaults.yaml` names every key. A preset is a YAML file holding a subset of those keys
(optionally `base: <other preset>` first); overrides on the command line are `section.key=value`
with YAML-parsed values. Unknown keys are errors, so a typo never silently trains the default, and
every value is checked (type, range, allowed names, and the few rules that tie keys together) before
anything is prepared or written.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import yaml

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
DEFAULTS = CONFIG_DIR / "defaults.yaml"


class ConfigError(ValueError):
    pass


def load_yaml(path: Path) -> Dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config must be a mapping of sections")
    return data


def resolve_preset(name: str | Path) -> Path:
    """A preset name (`ml100k`) or a path to a YAML file."""
    p = Path(name)
    if p.suffix in (".yaml", ".yml") and p.exists():
        return p
    candidate = CONFIG_DIR / f"{name}.yaml"
    if candidate.exists():
        return candidate
    known = sorted(q.stem for q in CONFIG_DIR.glob("*.yaml") if q.stem != "defaults")
    raise ConfigError(f"config {name!r} not found (presets: {', '.join(known)}; or pass a .yaml path)")


def _merge(base: Dict[str, Any], update: Dict[str, Any], where: str, prefix: str = "") -> None:
    for key, value in update.items():
        dotted = f"{prefix}{key}"
        if key not in base:
            raise ConfigError(f"{where}: unknown key {dotted!r}")
        if isinstance(base[key], dict) and base[key] and isinstance(value, dict):
            _merge(base[key], value, where, dotted + ".")
        else:
            base[key] = value


def _preset_chain(path: Path, seen: Optional[List[Path]] = None) -> List[Path]:
    seen = seen or []
    if path in seen:
        raise ConfigError(f"{path}: `base` chain loops ({' -> '.join(map(str, seen))})")
    data = load_yaml(path)
    base = data.get("base")
    chain = _preset_chain(resolve_preset(base), seen + [path]) if base else []
    return chain + [path]


def parse_override(text: str) -> tuple[List[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not key=value (e.g. train.epochs=3)")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else None
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def load_config(preset: str | Path | None = None, overrides: Optional[List[str]] = None) -> Dict[str, Any]:
    cfg = load_yaml(DEFAULTS)
    cfg.pop("base", None)
    if preset is not None:
        for path in _preset_chain(resolve_preset(preset)):
            data = load_yaml(path)
            data.pop("base", None)
            _merge(cfg, data, str(path))
    for text in overrides or []:
        keys, value = parse_override(text)
        node = cfg
        for i, k in enumerate(keys[:-1]):
            if not isinstance(node.get(k), dict):
                raise ConfigError(f"override {text!r}: unknown key {'.'.join(keys[: i + 1])!r}")
            node = node[k]
        if keys[-1] not in node:
            raise ConfigError(f"override {text!r}: unknown key {'.'.join(keys)!r}")
        node[keys[-1]] = value
    validate_config(cfg)
    return cfg


# -- value checks --------------------------------------------------------------------------------

# A check maps a value to (valid, normalised value); `what` says what a valid value is.
Check = Tuple[str, Callable[[Any], Tuple[bool, Any]]]


def _integer(minimum: int, nullable: bool = False) -> Check:
    what = "a positive integer" if minimum == 1 else "a non-negative integer"

    def check(v):
        if v is None:
            return nullable, v
        return isinstance(v, int) and not isinstance(v, bool) and v >= minimum, v

    return what + (" or null" if nullable else ""), check


def _number(low: float, high: float = math.inf, low_open: bool = False, high_open: bool = True) -> Check:
    if high == math.inf:
        what = f"a number {'>' if low_open else '>='} {low:g}"
    else:
        what = f"a number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"

    def check(v):
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

    return what, check


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


_BOOL: Check = ("true or false", lambda v: (isinstance(v, bool), v))
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
    "data.length_buckets": _BOOL,
    "model.hidden": _integer(1),
    "model.heads": _integer(1),
    "model.ffn": _integer(1),
    "model.dropout": _number(0, 1),
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
    "model.lambda_ss": _number(0),
    "model.gamma": _number(0),
    "model.item_drop_prob": _number(0, 1, high_open=False),
    "model.item_drop_coefficient": _number(0, 1, high_open=False),
    "model.feature_swap_prob": _number(0, 1, high_open=False),
    "model.kmeans_reference_batches": _BOOL,
    "model.kmeans_abs_inplace": _BOOL,
    "model.pad_negative": _BOOL,
    "train.mode": _choice("finetune", "pretrain"),
    "train.epochs": _integer(0),
    "train.max_steps_per_epoch": _integer(1, nullable=True),
    "train.lr": _number(0, low_open=True),
    "train.weight_decay": _number(0),
    "train.sparse_optimizer": _choice("rowwise_adagrad", "adagrad", "sgd", "dense_adam"),
    "train.sparse_lr": _number(0, low_open=True),
    "train.loss": _choice("full_softmax", "sampled_softmax"),
    "train.num_negatives": _integer(1),
    "train.in_batch_negatives": _BOOL,
    "train.softmax_items": _choice("all", "training"),
    "train.recluster_every": _integer(0, nullable=True),
    "train.init_checkpoint": _text(nullable=True),
    "train.peft": _BOOL,
    "train.sharding": _SHARDING_CHECK,
    "train.precision": _choice("auto", "fp32", "bf16"),  # as missrec_torchrec.precision.PRECISIONS
    "eval.engine": _choice("catalogue", "dmp"),
    "eval.chunk_items": _integer(1),
    "eval.ks": _list_of(_integer(1), non_empty=True),
    "eval.metric": _text(),
    "eval.patience": _integer(1),
    "eval.mask_history": _BOOL,
    "eval.recbole_stopping": _BOOL,
    "eval.every": _integer(1),
    "eval.cold_start": _BOOL,
    "checkpoint.keep": _integer(1),
    "checkpoint.resume": _BOOL,
    "checkpoint.run_dir": _text(nullable=True),
    "checkpoint.every_steps": _integer(0, nullable=True),
    "checkpoint.allow_change": _list_of(_text()),
    "log.tensorboard": _BOOL,
    "log.every": _integer(1),
    "log.progress": _BOOL,
    "log.fingerprint": _BOOL,
}


def validate_config(cfg: Dict[str, Any]) -> None:
    """Refuse the first invalid value with a ConfigError naming its key; normalise numbers given as
    strings (train.lr=1e-3). Keys without a rule of their own that default to true/false
    (the model's quirk switches) must be true or false."""
    defaults = load_yaml(DEFAULTS)
    for section, values in cfg.items():
        if not isinstance(values, dict):
            continue
        for key, value in values.items():
            dotted = f"{section}.{key}"
            rule = RULES.get(dotted)
            if rule is None and isinstance(defaults.get(section, {}).get(key), bool):
                rule = _BOOL
            if rule is None:
                continue
            what, check = rule
            ok, normalised = check(value)
            if not ok:
                raise ConfigError(f"config key {dotted}: must be {what}, got {value!r}")
            values[key] = normalised
    model, ev = cfg["model"], cfg["eval"]
    if model["hidden"] % model["heads"]:
        raise ConfigError(f"config key model.hidden: {model['hidden']} is not divisible by model.heads "
                          f"{model['heads']}")
    metrics = [f"{m}@{k}" for k in ev["ks"] for m in ("hr", "ndcg")] + ["mrr"]
    if ev["cold_start"]:
        metrics += [f"cold/{m}" for m in metrics]
    if ev["metric"] not in metrics:
        raise ConfigError(f"config key eval.metric: {ev['metric']!r} is not one of the metrics eval.ks "
                          f"{ev['ks']} gives ({', '.join(metrics)})")


# Keys a resumed run may always change: they change no trained weight, data order or selection
# (experiment.name and out_dir only name a new run folder; a resumed run has checkpoint.run_dir).
RESUME_FREE = ("log.", "checkpoint.resume", "checkpoint.run_dir", "checkpoint.allow_change", "checkpoint.keep",
               "experiment.name", "experiment.out_dir")


def _flat(cfg: Dict[str, Any]) -> Dict[str, Any]:
    return {f"{s}.{k}": v for s, section in cfg.items() if isinstance(section, dict) for k, v in section.items()}


def check_resume_config(cfg: Dict[str, Any]) -> List[str]:
    """With checkpoint.resume, refuse a config that differs from the run folder's config.yaml on a
    key not in checkpoint.allow_change (nor RESUME_FREE): one line naming every such key, its saved
    and its new value. Returns the allowed changes ("key old -> new") to report. No config.yaml
    (nothing saved yet) means nothing to compare."""
    c = cfg["checkpoint"]
    if not c["resume"] or not c["run_dir"]:
        return []
    saved_file = Path(c["run_dir"]) / "config.yaml"
    if not saved_file.is_file():
        return []
    saved, now = _flat(load_yaml(saved_file)), _flat(cfg)
    allowed = set(c["allow_change"] or [])
    unknown = sorted(allowed - set(now))
    if unknown:
        raise ConfigError(f"config key checkpoint.allow_change: unknown key {unknown[0]!r}")
    changed = [k for k in sorted(set(saved) | set(now))
               if not k.startswith(RESUME_FREE) and saved.get(k, "(absent)") != now.get(k, "(absent)")]
    shown = {k: f"{k} {saved.get(k, '(absent)')!r} -> {now.get(k, '(absent)')!r}" for k in changed}
    refused = [k for k in changed if k not in allowed]
    if refused:
        raise ConfigError(
            f"{saved_file}: --resume with a changed config: {', '.join(shown[k] for k in refused)}; resume with "
            f"the run's settings, or name the keys that may change: --allow-change {','.join(refused)}")
    return [shown[k] for k in changed]


def dump_config(cfg: Dict[str, Any]) -> str:
    return yaml.safe_dump(copy.deepcopy(cfg), sort_keys=True)


def for_inference(cfg: Dict[str, Any], run_dir: Optional[Path] = None) -> Dict[str, Any]:
    """A trained run's config for evaluation, scoring and export: the checkpoint holds every weight
    (no init_checkpoint), nothing is prepared, computed or logged. `run_dir`: the folder this
    config is recorded in, if any (never the training run's)."""
    cfg = copy.deepcopy(cfg)
    cfg["checkpoint"]["run_dir"] = str(run_dir) if run_dir is not None else None
    cfg["log"]["tensorboard"] = False
    cfg["data"]["prepare_source"] = None
    cfg["data"]["features"] = []
    cfg["train"]["init_checkpoint"] = None
    return cfg
