"""The one inference recipe: a trained run's config for evaluation, scoring and export."""

from __future__ import annotations

from pathlib import Path

from missrec_torchrec.config import for_inference, load_config


def test_for_inference_prepares_computes_and_logs_nothing_and_leaves_the_run_config_alone():
    cfg = load_config("finetune-ml100k", ["train.init_checkpoint=runs/some-run"])
    assert cfg["data"]["prepare_source"] and cfg["data"]["features"] and cfg["log"]["tensorboard"]
    inference = for_inference(cfg, Path("out.parts"))
    assert inference["data"]["prepare_source"] is None and inference["data"]["features"] == []
    assert inference["log"]["tensorboard"] is False and inference["train"]["init_checkpoint"] is None
    assert inference["checkpoint"]["run_dir"] == "out.parts" and for_inference(cfg)["checkpoint"]["run_dir"] is None
    assert cfg["data"]["prepare_source"] and cfg["train"]["init_checkpoint"] == "runs/some-run"  # a copy
    assert inference["model"] == cfg["model"] and inference["eval"] == cfg["eval"]
