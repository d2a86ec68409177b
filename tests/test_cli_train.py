"""`missrec train --dry-run` and configuration handling."""

from __future__ import annotations

import pytest

from missrec_torchrec.cli import main
from missrec_torchrec.config import ConfigError, load_config


@pytest.fixture(scope="module")
def paper_dims_dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("paper") / "clip512"
    assert main(["prepare", "synthetic", "--out", str(out), "--users", "60", "--items", "40",
                 "--modalities", "text:512,image:512", "--topics", "4", "--seed", "1"]) == 0
    return out


def dry_run(dataset, capsys, *overrides):
    rc = main(["train", "--config", "paper", "--dry-run", f"data.dataset={dataset}", *overrides])
    out = capsys.readouterr().out
    assert rc == 0, out
    line = next(l for l in out.splitlines() if l.startswith("parameters:"))
    return {k: int(v.replace(",", "")) for k, v in (p.split(" ") for p in line[len("parameters: "):].split(", "))}, out


def test_paper_inductive_finetune_trains_308401_parameters(paper_dims_dataset, capsys):
    counts, out = dry_run(paper_dims_dataset, capsys, "model.use_id=false", "train.init_checkpoint=pretrained")
    assert counts["trainable"] == 308_401
    assert "sharding plan" in out


def test_paper_from_scratch_counts(paper_dims_dataset, capsys):
    counts, _ = dry_run(paper_dims_dataset, capsys, "model.use_id=false")
    assert counts["dense_trainable"] == 1_719_513
    assert counts["frozen_tables"] == 2 * 40 * 512
    counts, _ = dry_run(paper_dims_dataset, capsys, "model.use_id=true", "train.init_checkpoint=pretrained")
    assert counts["trainable"] == 308_401 + 40 * 300  # transductive adds the ID table


def test_overrides_and_unknown_keys():
    cfg = load_config("ml100k", ["train.epochs=7", "data.modalities=[text,image]"])
    assert cfg["train"]["epochs"] == 7 and cfg["data"]["modalities"] == ["text", "image"]
    with pytest.raises(ConfigError, match="train.epoch"):
        load_config("ml100k", ["train.epoch=7"])
    with pytest.raises(ConfigError, match="not found"):
        load_config("no-such-preset")


def test_unknown_key_is_a_one_line_cli_error(capsys):
    assert main(["train", "--config", "ml100k", "--dry-run", "model.hiden=3"]) == 2
    assert "unknown key 'model.hiden'" in capsys.readouterr().err
