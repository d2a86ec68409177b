"""`missrec train --dry-run` and configuration handling."""

from __future__ import annotations

from pathlib import Path

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
    # Transductive adds the ID table: under the paper preset the reference's, N + 1 rows (padding row).
    assert counts["trainable"] == 308_401 + (40 + 1) * 300
    counts, _ = dry_run(paper_dims_dataset, capsys, "model.use_id=true", "train.init_checkpoint=pretrained",
                        "train.sparse_optimizer=rowwise_adagrad")
    assert counts["trainable"] == 308_401 + 40 * 300  # the sharded table: no padding row


def test_overrides_and_unknown_keys():
    cfg = load_config("ml100k", ["train.epochs=7", "data.modalities=[text,image]"])
    assert cfg.train.epochs == 7 and cfg.data.modalities == ["text", "image"]
    with pytest.raises(ConfigError, match="train.epoch"):
        load_config("ml100k", ["train.epoch=7"])
    with pytest.raises(ConfigError, match="not found"):
        load_config("no-such-preset")


@pytest.mark.parametrize("preset", sorted(p.stem for p in (Path(__file__).parent.parent / "configs").glob("*.yaml")))
def test_every_preset_resolves(preset):
    # A preset with a misspelt key or a missing base only fails when someone runs it: catch it here.
    cfg = load_config(preset)
    assert cfg.experiment.name


def test_the_best_ml1m_preset_is_the_documented_command():
    # docs/results.md gives the row's command as overrides of ml1m-causal; the preset must not drift from it.
    preset = load_config("ml1m-causal-biases").to_dict()
    command = load_config("ml1m-causal", [
        "model.use_id=true", "model.n_enc_layers=2", "model.n_dec_layers=4", "model.relative_position_bias=true",
        "model.relative_time_bias=true", "train.epochs=200", "eval.patience=5"]).to_dict()
    assert preset.pop("experiment") != command.pop("experiment")
    assert preset == command


def test_unknown_key_is_a_one_line_cli_error(capsys):
    assert main(["train", "--config", "ml100k", "--dry-run", "model.hiden=3"]) == 2
    assert "unknown key 'model.hiden'" in capsys.readouterr().err


def test_design_card_torchx_command_runs_the_trainer_module():
    """`torchx run dist.ddp -j 2x8 components/train.py -- ARGS` (from the repo root, with the repo's
    .torchxconfig) launches 2 nodes x 8 ranks of `python -m components.train`, which hands ARGS to
    `missrec train`."""
    import subprocess
    import sys
    from pathlib import Path

    from components.score import score_argv
    from components.train import trainer_argv

    repo = Path(__file__).resolve().parent.parent
    torchx = Path(sys.executable).parent / "torchx"
    out = subprocess.run([str(torchx), "run", "--dryrun", "dist.ddp", "-j", "2x8", "components/train.py", "--",
                          "--config", "ml100k", "train.epochs=1"], cwd=repo, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    text = " ".join(out.stdout.split())
    assert "--nnodes 2 --nproc_per_node 8" in text and "-m components.train components/train.py --" in text
    argv = ["components/train.py", "--", "--config", "ml100k", "train.epochs=1"]
    assert trainer_argv(argv) == ["train", "--config", "ml100k", "train.epochs=1"]
    assert trainer_argv(["components/train.py"]) == ["train", "--config", "ml100k"]
    assert score_argv(["components/score.py", "--", "--checkpoint", "r"]) == ["score", "--checkpoint", "r"]
