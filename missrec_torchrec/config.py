"""Run configuration: one commented defaults file, presets that override it, `key=value` overrides.

`configs/defaults.yaml` names every key. A preset is a YAML file holding a subset of those keys
(optionally `base: <other preset>` first); overrides on the command line are `section.key=value`
with YAML-parsed values. Unknown keys are errors, so a typo never silently trains the default.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Dict, List, Optional

import yaml

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
DEFAULTS = CONFIG_DIR / "defaults.yaml"


class ConfigError(ValueError):
    pass


def _load_yaml(path: Path) -> Dict[str, Any]:
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
    data = _load_yaml(path)
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
    cfg = _load_yaml(DEFAULTS)
    cfg.pop("base", None)
    if preset is not None:
        for path in _preset_chain(resolve_preset(preset)):
            data = _load_yaml(path)
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
    return cfg


def dump_config(cfg: Dict[str, Any]) -> str:
    return yaml.safe_dump(copy.deepcopy(cfg), sort_keys=True)
