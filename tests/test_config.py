"""The typed run config: its sections match defaults.yaml, config.yaml round-trips byte for byte,
and the one inference recipe."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest
import yaml

from missrec_torchrec.config import (CONFIG_DIR, DEFAULTS, Config, ConfigError, dump_config, load_config, load_yaml,
                                     section_types)
from missrec_torchrec.model.config import ModelConfig


def test_sections_declare_exactly_the_keys_of_defaults_yaml():
    defaults = load_yaml(DEFAULTS)
    types = section_types()
    assert list(types) == list(defaults) == [f.name for f in dataclasses.fields(Config)]
    for section, kind in types.items():  # (in any order: config.yaml sorts them)
        assert {f.name for f in dataclasses.fields(kind)} == set(defaults[section]), section
    assert isinstance(load_config().model, ModelConfig)


@pytest.mark.parametrize("preset", ["ml100k", "paper", "finetune-ml100k"])
def test_config_yaml_is_the_merged_yaml_and_reads_back_the_same(preset, tmp_path):
    overrides = ["train.lr=1", "model.layer_norm_eps=1e-6", "train.sharding={text: row_wise}"]
    cfg = load_config(preset, overrides)
    # What the files say, merged by hand: defaults, the preset chain (base first), the overrides.
    chain, path = [], CONFIG_DIR / f"{preset}.yaml"
    while path:
        chain.insert(0, load_yaml(path))
        path = CONFIG_DIR / f"{chain[0].pop('base')}.yaml" if "base" in chain[0] else None
    merged = load_yaml(DEFAULTS)
    for layer in chain + [{"train": {"lr": 1, "sharding": {"text": "row_wise"}}, "model": {"layer_norm_eps": 1e-6}}]:
        for section, values in layer.items():
            merged[section].update(values)
    text = dump_config(cfg)
    assert text == yaml.safe_dump(merged, sort_keys=True)
    assert "  lr: 1\n" in text  # values keep the type they were given (1, not 1.0)
    (tmp_path / "config.yaml").write_text(text)
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg and dump_config(again) == text
    assert Config.from_dict(cfg.to_dict()) == cfg


def test_from_dict_refuses_missing_and_unknown_keys_and_sections():
    raw = load_config().to_dict()
    for edit, message in [(lambda r: r["train"].pop("lr"), "config key train.lr: missing"),
                          (lambda r: r["train"].update(lrate=1), "unknown key 'train.lrate'"),
                          (lambda r: r.update(optim={}), "unknown key 'optim'"),
                          (lambda r: r.update(log=None), "config key log: must be a mapping")]:
        bad = copy.deepcopy(raw)
        edit(bad)
        with pytest.raises(ConfigError, match=message):
            Config.from_dict(bad)
    with pytest.raises(ConfigError, match="config key model: must be a mapping"):
        load_config("ml100k", ["model=3"])


def test_for_inference_prepares_computes_and_logs_nothing_and_leaves_the_run_config_alone():
    cfg = load_config("finetune-ml100k", ["train.init_checkpoint=runs/some-run"])
    assert cfg.data.prepare_source and cfg.data.features and cfg.log.tensorboard
    inference = cfg.for_inference(Path("out.parts"))
    assert inference.data.prepare_source is None and inference.data.features == []
    assert inference.log.tensorboard is False and inference.train.init_checkpoint is None
    assert inference.checkpoint.run_dir == "out.parts" and cfg.for_inference().checkpoint.run_dir is None
    assert cfg.data.prepare_source and cfg.train.init_checkpoint == "runs/some-run"  # a copy
    assert inference.model == cfg.model and inference.eval == cfg.eval
    inference.eval.ks.append(100)
    assert cfg.eval.ks == [10, 50]  # a deep copy


def test_auto_loss_is_full_softmax_up_to_the_stated_catalogue_size_then_sampled():
    t = load_config(None, []).train
    assert t.loss == "auto" and t.full_softmax_max_items == 1_000_000
    assert t.finetune_loss(1_000_000) == "full_softmax"
    assert t.finetune_loss(1_000_001) == "sampled_softmax"
    pinned = load_config(None, ["train.loss=full_softmax"]).train
    assert pinned.finetune_loss(10**8) == "full_softmax"
    assert load_config("paper", []).train.finetune_loss(10**8) == "full_softmax"
    with pytest.raises(ConfigError, match="train.full_softmax_max_items"):
        load_config(None, ["train.full_softmax_max_items=0"])


def test_resume_treats_a_key_the_saved_config_lacks_as_its_default(tmp_path):
    from missrec_torchrec.config import check_resume_config

    run = tmp_path / "run"
    run.mkdir()
    saved = load_config(None, []).to_dict()
    del saved["model"]["kmeans_backend"]  # a run made before the key existed
    (run / "config.yaml").write_text(yaml.safe_dump(saved))
    same = load_config(None, ["checkpoint.resume=true", f"checkpoint.run_dir={run}"])
    assert check_resume_config(same) == []
    moved = load_config(None, ["checkpoint.resume=true", f"checkpoint.run_dir={run}", "model.kmeans_backend=faiss"])
    with pytest.raises(ConfigError, match=r"model.kmeans_backend 'auto' -> 'faiss'"):
        check_resume_config(moved)
