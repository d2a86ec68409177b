"""End-to-end training: single process, kill-and-resume, and 2-process gloo runs under DMP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

REPO = Path(__file__).resolve().parent.parent


def small_overrides(dataset: Path, out: Path, **extra) -> list[str]:
    settings = {
        "data.dataset": str(dataset),
        "data.prepare_source": "null",
        "data.features": "[]",
        "data.modalities": "[text,image]",
        "data.batch_size": 64,
        "data.eval_batch_size": 64,
        "data.shuffle_buffer": 512,
        "model.hidden": 32,
        "model.heads": 2,
        "model.ffn": 64,
        "model.dropout": 0.1,
        "model.max_len": 20,
        "train.epochs": 2,
        "train.lr": 3e-3,
        "experiment.out_dir": str(out),
        "log.progress": "false",
        "log.fingerprint": "true",
        "eval.patience": 5,
    }
    settings.update(extra)
    return [f"{k}={v}" for k, v in settings.items()]


def run_cli(args: list[str], env_extra: dict | None = None, torchrun: int = 0) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    env.update(env_extra or {})
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}",
               "-m", "missrec_torchrec.cli", *args]
    else:
        cmd = [sys.executable, "-m", "missrec_torchrec.cli", *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def results_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())


def only_run(out: Path) -> Path:
    runs = [p for p in out.iterdir() if p.is_dir()]
    assert len(runs) == 1, runs
    return runs[0]


def test_train_single_process_learns(synthetic_mm, tmp_path):
    from missrec_torchrec.config import load_config
    from missrec_torchrec.trainer import train

    cfg = load_config("ml100k", small_overrides(synthetic_mm, tmp_path, **{"train.epochs": 3}))
    result = train(cfg)
    history = result["history"]
    losses = [row["train/loss"] for row in history]
    assert losses[-1] < losses[0], losses
    test = result["test"]
    assert test["count"] == 240  # every user evaluated exactly once
    # Planted topics make the next item predictable far above chance (10 of 120 items = 0.083).
    assert test["hr@10"] > 0.2, test
    run_dir = Path(result["run_dir"])
    assert (run_dir / "config.yaml").is_file() and (run_dir / "results.json").is_file()
    assert (run_dir / "checkpoints").is_dir()
    check_curves(run_dir, history, tmp_path)


def check_curves(run_dir: Path, history: list, tmp_path: Path) -> None:
    """TensorBoard holds the per-epoch rows exactly, step curves are not mixed with epoch summaries,
    and `missrec plot` draws them (or fails naming the missing tag, writing nothing)."""
    from datapipes.schema import DataError
    from missrec_torchrec.plots import plot_runs, read_scalars

    scalars = read_scalars(run_dir)
    assert scalars["valid/ndcg@10"] == [(r["epoch"], pytest.approx(r["valid/ndcg@10"])) for r in history]
    assert scalars["epoch/train_loss"] == [(r["epoch"], pytest.approx(r["train/loss"])) for r in history]
    steps = [s for s, _ in scalars["train/loss"]]
    assert steps == sorted(steps) and steps[0] > 0 and len(steps) == sum(r["train/steps"] for r in history) // 20
    png = tmp_path / "curves.png"
    drawn = plot_runs([run_dir], png, labels=["run"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert drawn["run"]["valid/ndcg@10"] == scalars["valid/ndcg@10"]
    with pytest.raises(DataError, match="no TensorBoard scalar valid/hr@7"):
        plot_runs([run_dir], tmp_path / "bad.png", tags=["valid/hr@7"])
    assert not list(tmp_path.glob("*bad.png*"))


ID_ONLY = {"model.use_id": "true", "data.modalities": "[]", "data.features": "[]"}


@pytest.mark.parametrize("variant", [{}, ID_ONLY], ids=["text-image", "id-only"])
def test_kill_and_resume_matches_uninterrupted_run(synthetic_mm, tmp_path, variant):
    # Checkpoints every 5 steps inside the epoch too, so the resume starts mid-epoch from the saved
    # data-pipe position, RNG state, optimizer state and interest centroids. The ID-only model has
    # dense parameters that never get a gradient (its interest encoder), so no optimizer state.
    extra = {"checkpoint.every_steps": 5, **variant}
    straight = tmp_path / "straight"
    args = ["train", "--config", "ml100k", *small_overrides(synthetic_mm, straight, **extra)]
    done = run_cli(args)
    assert done.returncode == 0, done.stderr[-3000:]
    reference = results_of(only_run(straight))

    killed_dir = tmp_path / "killed" / "run"
    args = ["train", "--config", "ml100k",
            *small_overrides(synthetic_mm, tmp_path / "killed", **extra, **{"checkpoint.run_dir": killed_dir})]
    steps_per_epoch = reference["history"][0]["train/steps"]
    assert steps_per_epoch > 8
    crashed = run_cli(args, {"MISSREC_FAIL_AT_STEP": str(steps_per_epoch + 8)})
    assert crashed.returncode != 0
    assert not (killed_dir / "results.json").exists()
    resumed = run_cli([*args, "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"(epoch 1, step {steps_per_epoch + 5}, batch 5 of the epoch)" in resumed.stdout, resumed.stdout
    killed = results_of(killed_dir)
    assert killed["test"] == reference["test"]
    assert [r["valid/ndcg@10"] for r in killed["history"]] == [r["valid/ndcg@10"] for r in reference["history"]]


@pytest.fixture(scope="module")
def crashed_sampled_run(synthetic_mm, tmp_path_factory):
    """(overrides, run folder) of a sampled-softmax run killed at step 8 of its first epoch, whose
    latest checkpoint is the one after batch 5 (checkpoint.every_steps=5)."""
    from missrec_torchrec.config import load_config
    from missrec_torchrec.trainer import Trainer

    out = tmp_path_factory.mktemp("crashed")
    overrides = small_overrides(synthetic_mm, out, **{
        "train.loss": "sampled_softmax", "train.num_negatives": 16, "train.epochs": 1, "checkpoint.every_steps": 5,
        "checkpoint.run_dir": out / "run", "log.tensorboard": "false", "log.fingerprint": "false"})
    os.environ["MISSREC_FAIL_AT_STEP"] = "8"
    try:
        with pytest.raises(SystemExit, match="simulated crash"):
            Trainer(load_config("ml100k", overrides)).fit()
    finally:
        del os.environ["MISSREC_FAIL_AT_STEP"]
    return overrides, out / "run"


def test_mid_epoch_resume_continues_on_the_same_batches_and_negatives(crashed_sampled_run):
    from missrec_torchrec.config import load_config
    from missrec_torchrec.trainer import Trainer

    overrides, run_dir = crashed_sampled_run
    trainer = Trainer(load_config("ml100k", [*overrides, "checkpoint.resume=true"]))
    progress = trainer.load("latest")
    assert (progress["epoch"], progress["skip_batches"]) == (0, 5)
    saved = torch.load(Path(progress["path"]) / "rank_0.pt", weights_only=True)["user"]["stream"]
    assert (saved["epoch"], saved["batches"], saved["plan"]["batch_size"]) == (0, 5, 64)
    resumed = list(trainer.open_stream(0, progress["skip_batches"]))
    straight = list(trainer.open_stream(0, 0))
    assert len(resumed) == len(straight) - 5 > 0
    for a, b in zip(resumed, straight[5:]):
        assert torch.equal(a.history, b.history) and torch.equal(a.target, b.target)
        assert a.candidates.numel() == 16 and torch.equal(a.candidates, b.candidates)
    # Sampled negatives change from batch to batch (seeded by the batch's place in the epoch).
    assert not torch.equal(straight[0].candidates, straight[1].candidates)


def test_mid_epoch_resume_on_another_data_plan_is_refused_naming_the_run_folder(crashed_sampled_run):
    from datapipes.schema import DataError
    from missrec_torchrec.config import load_config
    from missrec_torchrec.trainer import Trainer

    overrides, run_dir = crashed_sampled_run
    config = (run_dir / "config.yaml").read_text()
    cfg = load_config("ml100k", [*overrides, "checkpoint.resume=true", "data.batch_size=32",
                                 "checkpoint.allow_change=[data.batch_size]"])
    with pytest.raises(DataError) as refused:
        Trainer(cfg).fit()
    message = str(refused.value)
    assert message.startswith(f"{run_dir}: cannot resume") and "batch_size 64 -> 32" in message
    assert "\n" not in message
    assert (run_dir / "config.yaml").read_text() == config  # the refused resume changed nothing


@pytest.mark.parametrize("sharding", ["row_wise", "table_wise"])
def test_two_process_gloo(synthetic_mm, tmp_path, sharding):
    out = tmp_path / sharding
    args = ["train", "--config", "ml100k",
            *small_overrides(synthetic_mm, out, **{"train.sharding": sharding, "model.use_id": "true",
                                                   "checkpoint.run_dir": out / "run"})]
    done = run_cli(args, torchrun=2)
    assert done.returncode == 0, done.stderr[-4000:]
    result = results_of(out / "run")
    losses = [row["train/loss"] for row in result["history"]]
    assert losses[-1] < losses[0], losses
    assert result["test"]["count"] == 240
    # Both ranks end with the same dense weights (DDP) and wrote the same fingerprint.
    prints = sorted((out / "run").glob("fingerprint.rank*.json"))
    assert len(prints) == 2
    a, b = (json.loads(p.read_text()) for p in prints)
    assert a["dense"] == b["dense"]
    assert a["frozen_tables_unchanged"] and b["frozen_tables_unchanged"]


def test_pretrain_then_peft_finetune_on_another_catalogue(synthetic_mm, synthetic_other, tmp_path):
    pre_dir = tmp_path / "pre"
    pre = run_cli(["train", "--config", "pretrain-ml1m",
                   *small_overrides(synthetic_mm, tmp_path, **{"train.epochs": 1, "train.max_steps_per_epoch": 20,
                                                               "checkpoint.run_dir": pre_dir})])
    assert pre.returncode == 0, pre.stderr[-3000:]
    ft_dir = tmp_path / "ft"
    # A shorter history cap than pre-training's 20: the first 12 position rows.
    ft = run_cli(["train", "--config", "finetune-ml100k",
                  *small_overrides(synthetic_other, tmp_path, **{"train.epochs": 1, "train.init_checkpoint": pre_dir,
                                                                 "checkpoint.run_dir": ft_dir, "model.max_len": 12})])
    assert ft.returncode == 0, ft.stderr[-3000:]
    assert "loaded the pre-trained core" in ft.stdout and "using the first 12 of its 20 position rows" in ft.stdout
    before = torch.load(next((pre_dir / "checkpoints").glob("step_*/core.pt")), weights_only=True)["core"]
    after = torch.load(next((ft_dir / "checkpoints").glob("step_*/core.pt")), weights_only=True)["core"]
    before["positions.weight"] = before["positions.weight"][:12]
    frozen = [k for k in before if k.startswith(("encoder.", "decoder.", "position"))]
    trained = [k for k in before if k.startswith("adapters.")]
    assert frozen and trained
    # PEFT: encoder, decoder and positions are exactly the pre-trained ones; the adapters moved.
    assert all(torch.equal(before[k], after[k]) for k in frozen)
    assert any(not torch.equal(before[k], after[k]) for k in trained)
    # A longer cap than pre-training's has untrained positions: refused in one line.
    longer = run_cli(["train", "--config", "finetune-ml100k",
                      *small_overrides(synthetic_other, tmp_path, **{"train.epochs": 0, "train.init_checkpoint": pre_dir,
                                                                     "checkpoint.run_dir": tmp_path / "long", "model.max_len": 30})])
    assert longer.returncode == 2 and "core weights do not fit this model (size mismatch for positions.weight" in longer.stderr

    # Zero-shot: the pre-trained inductive model applied to the new catalogue with no training.
    zs_dir = tmp_path / "zero-shot"
    zs = run_cli(["train", "--config", "finetune-ml100k",
                  *small_overrides(synthetic_other, tmp_path, **{"train.epochs": 0, "train.init_checkpoint": pre_dir,
                                                                 "checkpoint.run_dir": zs_dir})])
    assert zs.returncode == 0, zs.stderr[-3000:]
    zero_shot = results_of(zs_dir)
    assert zero_shot["history"] == [] and zero_shot["test"]["count"] == 160

    # `missrec evaluate` on the run folder reproduces the test metrics of the run's results.json.
    ev = run_cli(["evaluate", "--checkpoint", str(ft_dir), "--split", "test"])
    assert ev.returncode == 0, ev.stderr[-3000:]
    test = results_of(ft_dir)["test"]
    assert f"ndcg@10 {test['ndcg@10']:.4f}" in ev.stdout and f"hr@10 {test['hr@10']:.4f}" in ev.stdout


def test_cold_start_metrics_count_targets_never_trained_on(tmp_path):
    """ID-only model on a hand-built log where 5 users' test items occur in no training sequence,
    and 2 more users' test item only as other users' validation targets."""
    from datapipes.schema import DatasetInfo
    from missrec_torchrec.checkpoint import latest_checkpoint
    from missrec_torchrec.cli import main
    from missrec_torchrec.config import load_config
    from missrec_torchrec.evaluate import evaluate_checkpoint
    from missrec_torchrec.trainer import train

    rows = ["user_id,item_id,timestamp"]
    for u in range(30):
        seq = [(u + k) % 12 for k in range(6)]  # warm items 0..11
        if u < 5:
            seq[-1] = 100 + u  # only ever a test target
        elif u < 9:
            seq[-1 if u < 7 else -2] = 200  # a test target of 2 users, the validation target of 2 others
        rows += [f"u{u},i{item},{t}" for t, item in enumerate(seq)]
    (tmp_path / "log.csv").write_text("\n".join(rows) + "\n")
    ds = tmp_path / "ds"
    assert main(["prepare", "interactions", "--path", str(tmp_path / "log.csv"), "--k-core", "0",
                 "--rows-per-group", "7", "--out", str(ds)]) == 0
    info = DatasetInfo.open(ds)
    keys = pq.read_table(ds / "items.parquet").column("item_key").to_pylist()
    cold_keys = {keys[i] for i in np.flatnonzero(~info.training_items())}
    assert cold_keys == {f"i{100 + u}" for u in range(5)} | {"i200"}
    assert {keys[i] for i in np.flatnonzero(~info.training_items(through_valid=True))} == cold_keys - {"i200"}

    cfg = load_config("ml100k", small_overrides(ds, tmp_path / "out", **{
        "data.modalities": "[]", "model.use_id": "true", "train.epochs": 1, "eval.cold_start": "true",
        "log.tensorboard": "false"}))
    result = train(cfg)
    test = result["test"]
    assert test["count"] == 30 and test["cold/count"] == 7
    assert 0.0 < test["cold/mrr"] <= 1.0 and set(test) == {*_plain_keys(test), *(f"cold/{k}" for k in _plain_keys(test))}
    # Trained through the validation item, i200 is a training item: 2 cold targets fewer.
    refit = evaluate_checkpoint(latest_checkpoint(Path(result["run_dir"]) / "checkpoints"), overrides=["data.train_through_valid=true"])
    assert refit["count"] == 30 and refit["cold/count"] == 5


def _plain_keys(metrics: dict) -> list:
    return [k for k in metrics if not k.startswith("cold/")]


def test_auto_loss_builds_a_sampled_softmax_model_above_the_threshold(synthetic_mm):
    from datapipes.schema import DatasetInfo
    from missrec_torchrec.config import load_config
    from missrec_torchrec.session import build_model

    info = DatasetInfo.open(synthetic_mm)  # 120 items
    for threshold, loss in ((120, "full_softmax"), (119, "sampled_softmax")):
        cfg = load_config(None, [f"data.dataset={synthetic_mm}", "data.modalities=[text]", "data.features=null",
                                 f"train.full_softmax_max_items={threshold}"])
        assert build_model(cfg, info).head.loss == loss


def test_training_through_the_validation_item_tests_the_last_epoch(synthetic_mm, tmp_path):
    from missrec_torchrec.checkpoint import best_checkpoint, latest_checkpoint
    from missrec_torchrec.config import load_config
    from missrec_torchrec.evaluate import evaluate_checkpoint
    from missrec_torchrec.trainer import train

    normal = train(load_config("ml100k", small_overrides(synthetic_mm, tmp_path / "a", **{"train.epochs": 1})))
    refit = train(load_config("ml100k", small_overrides(synthetic_mm, tmp_path / "b", **{
        "data.train_through_valid": "true"})))
    # One more training row per user (its validation target): more steps, no validation, no selection.
    assert refit["history"][0]["train/steps"] > normal["history"][0]["train/steps"]
    assert [sorted(k for k in row if k.startswith("valid/")) for row in refit["history"]] == [[], []]
    assert refit["best_epoch"] == 1 and refit["test"]["count"] == 240
    run_dir = Path(refit["run_dir"])
    assert best_checkpoint(run_dir / "checkpoints") is None
    assert evaluate_checkpoint(latest_checkpoint(run_dir / "checkpoints")) == refit["test"]
