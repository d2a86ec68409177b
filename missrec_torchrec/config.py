"""Run configuration: one commented defaults file, presets that override it, `key=value` overrides,
read into a typed `Config` (one dataclass per section).

`configs/defaults.yaml` names every key and holds every default (the dataclasses below declare the
keys and their types, no defaults). A preset is a YAML file holding a subset of those keys
(optionally `base: <other preset>` first); overrides on the command line are `section.key=value`
with YAML-parsed values. Unknown keys are errors, so a typo never silently trains the default, and
`Config.from_dict` checks every value once (config_checks.py: type, range, allowed names, and the
few rules that tie keys together) before anything is prepared or written.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional

import yaml

from missrec_torchrec.config_checks import BOOL, RULES, ConfigError, check_related, check_value

if TYPE_CHECKING:
    from missrec_torchrec.model.config import ModelConfig

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
DEFAULTS = CONFIG_DIR / "defaults.yaml"


@dataclass
class ExperimentConfig:
    name: str
    out_dir: str
    seed: int


@dataclass
class DataConfig:
    dataset: str
    prepare_source: Optional[str]
    prepare_args: List[Any]
    features: Optional[List[Dict[str, str]]]  # {modality, encoder} mappings
    modalities: List[str]
    batch_size: int
    eval_batch_size: int
    num_workers: int
    shuffle_buffer: int
    prefix_sample: float
    length_buckets: bool
    train_through_valid: bool


@dataclass
class TrainConfig:
    mode: str
    epochs: int
    max_steps_per_epoch: Optional[int]
    lr: float
    weight_decay: float
    sparse_optimizer: str
    sparse_lr: float
    loss: str
    full_softmax_max_items: int
    num_negatives: int
    in_batch_negatives: bool
    softmax_items: str
    recluster_every: Optional[int]
    precision: str
    gather_history: bool
    blocked_softmax: bool
    init_checkpoint: Optional[str]
    peft: bool
    sharding: Any  # None, a sharding type, or a mapping of table names to those

    def finetune_loss(self, num_items: int) -> str:
        """`loss` with `auto` resolved for a catalogue of `num_items`."""
        if self.loss != "auto":
            return self.loss
        return "full_softmax" if num_items <= self.full_softmax_max_items else "sampled_softmax"


@dataclass
class EvalConfig:
    ks: List[int]
    metric: str
    patience: int
    recbole_stopping: bool
    mask_history: bool
    every: int
    engine: str
    catalogue: str
    chunk_items: int
    block_users: int
    cold_start: bool
    max_users: Optional[int]


@dataclass
class CheckpointConfig:
    keep: int
    resume: bool
    run_dir: Optional[str]
    every_steps: Optional[int]
    allow_change: List[str]


@dataclass
class LogConfig:
    tensorboard: bool
    every: int
    progress: bool
    fingerprint: bool
    resources: bool


def section_types() -> Dict[str, type]:
    """Each section's dataclass. The `model` section is the dense core's own ModelConfig (its defaults
    are the library's; a run's come from defaults.yaml like every other section's). It is imported
    here, not above: importing `missrec_torchrec.model` imports torch, and the command line reads
    this module for every command, those that never need torch included."""
    from missrec_torchrec.model.config import ModelConfig

    return {"experiment": ExperimentConfig, "data": DataConfig, "model": ModelConfig, "train": TrainConfig,
            "eval": EvalConfig, "checkpoint": CheckpointConfig, "log": LogConfig}


@dataclass
class Config:
    experiment: ExperimentConfig
    data: DataConfig
    model: ModelConfig
    train: TrainConfig
    eval: EvalConfig
    checkpoint: CheckpointConfig
    log: LogConfig

    @classmethod
    def from_dict(cls, raw: Dict[str, Any]) -> "Config":
        """The config of a merged `{section: {key: value}}` mapping: every key present, every value
        checked (ConfigError naming the first bad key) and numbers given as strings normalised."""
        types = section_types()
        unknown = sorted(set(raw) - set(types))
        if unknown:
            raise ConfigError(f"config: unknown key {unknown[0]!r}")
        checked: Dict[str, Dict[str, Any]] = {}
        for section, kind in types.items():
            values = raw.get(section)
            if not isinstance(values, dict):
                raise ConfigError(f"config key {section}: must be a mapping of its keys, got {values!r}")
            declared = {f.name for f in fields(kind)}
            unknown = sorted(set(values) - declared)
            if unknown:
                raise ConfigError(f"config: unknown key '{section}.{unknown[0]}'")
            missing = sorted(declared - set(values))
            if missing:
                raise ConfigError(f"config key {section}.{missing[0]}: missing")
            checked[section] = {}
            for key, value in values.items():
                dotted = f"{section}.{key}"
                # Keys without a rule of their own are switches (tests/test_bad_config.py checks that).
                checked[section][key] = check_value(dotted, value, RULES.get(dotted, BOOL))
        check_related(checked["model"], checked["eval"], checked["train"])
        return cls(**{section: types[section](**values) for section, values in checked.items()})

    def to_dict(self) -> Dict[str, Dict[str, Any]]:
        """`{section: {key: value}}`, as the YAML files spell it (config.yaml of a run folder)."""
        return {f.name: asdict(getattr(self, f.name)) for f in fields(self)}

    def for_inference(self, run_dir: Optional[Path] = None) -> "Config":
        """A trained run's config for evaluation, scoring and export: the checkpoint holds every weight
        (no init_checkpoint), nothing is prepared, computed or logged. `run_dir`: the folder this
        config is recorded in, if any (never the training run's). A copy: this config is unchanged."""
        cfg = copy.deepcopy(self)
        cfg.checkpoint.run_dir = str(run_dir) if run_dir is not None else None
        cfg.log.tensorboard = False
        cfg.data.prepare_source = None
        cfg.data.features = []
        cfg.train.init_checkpoint = None
        return cfg


# -- reading the YAML ----------------------------------------------------------------------------


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


def load_config(preset: str | Path | None = None, overrides: Optional[List[str]] = None) -> Config:
    """defaults.yaml, then the preset's chain of files, then the `section.key=value` overrides."""
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
    return Config.from_dict(cfg)


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=True)


# -- resuming ------------------------------------------------------------------------------------

# Keys a resumed run may always change: they change no trained weight, data order or selection
# (experiment.name and out_dir only name a new run folder; a resumed run has checkpoint.run_dir).
RESUME_FREE = ("log.", "checkpoint.resume", "checkpoint.run_dir", "checkpoint.allow_change", "checkpoint.keep",
               "experiment.name", "experiment.out_dir")


def _flat(cfg: Dict[str, Any]) -> Dict[str, Any]:
    return {f"{s}.{k}": v for s, section in cfg.items() if isinstance(section, dict) for k, v in section.items()}


def check_resume_config(cfg: Config) -> List[str]:
    """With checkpoint.resume, refuse a config that differs from the run folder's config.yaml on a
    key not in checkpoint.allow_change (nor RESUME_FREE): one line naming every such key, its saved
    and its new value. Returns the allowed changes ("key old -> new") to report. No config.yaml
    (nothing saved yet) means nothing to compare. A key the saved config lacks (added to the defaults
    after the run was made) counts as holding its default."""
    c = cfg.checkpoint
    if not c.resume or not c.run_dir:
        return []
    saved_file = Path(c.run_dir) / "config.yaml"
    if not saved_file.is_file():
        return []
    saved, now = _flat(load_yaml(saved_file)), _flat(cfg.to_dict())
    saved = {**{k: v for k, v in _flat(load_yaml(DEFAULTS)).items() if k in now}, **saved}
    allowed = set(c.allow_change or [])
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
