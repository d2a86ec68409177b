"""Checkpoint faults: a crash between any two phases of a save (MISSREC_CKPT_FAIL_AT test hook) never
leaves a pointer on an incomplete step; the trainer's core.pt is part of the step before it is published."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import missrec_torchrec.checkpoint as checkpoint
from missrec_torchrec.checkpoint import CheckpointManager, best_checkpoint, latest_checkpoint
from test_checkpoint import tiny_model_and_optimizer, tiny_step
from test_train import only_run, results_of, run_cli, small_overrides

CORE = "core.pt"


def save(manager, model, optimizer, step: int, metric=None):
    return manager.save(step, model, optimizer, progress={"n": step}, metric=metric,
                        extra_files={CORE: {"step": torch.tensor(step)}})


@pytest.mark.parametrize("phase", checkpoint.SAVE_PHASES)
def test_crash_after_each_save_phase_leaves_pointers_on_complete_steps(tmp_path, monkeypatch, phase):
    model, optimizer = tiny_model_and_optimizer()
    manager = CheckpointManager(tmp_path, keep_last=5)
    tiny_step(model, optimizer)
    save(manager, model, optimizer, 1, metric=0.1)
    tiny_step(model, optimizer)
    monkeypatch.setenv(checkpoint.FAIL_AT_ENV, phase)
    with pytest.raises(SystemExit, match=f"{phase}: simulated crash"):
        save(manager, model, optimizer, 2, metric=0.9)  # better: would move `best` too
    monkeypatch.delenv(checkpoint.FAIL_AT_ENV)

    published = phase not in ("files", "extra")
    assert (tmp_path / "step_2").is_dir() == published
    expected_latest = 2 if phase == "latest" else 1
    assert latest_checkpoint(tmp_path) == tmp_path / f"step_{expected_latest}"
    assert best_checkpoint(tmp_path) == tmp_path / f"step_{2 if phase in ('best', 'latest') else 1}"
    for pointed in (latest_checkpoint(tmp_path), best_checkpoint(tmp_path)):
        assert int(torch.load(pointed / CORE, weights_only=True)["step"]) == int(pointed.name[5:])
    model2, optimizer2 = tiny_model_and_optimizer()
    assert manager.load(model2, optimizer2).progress["n"] == expected_latest

    tiny_step(model, optimizer)
    save(manager, model, optimizer, 3)  # the next save clears what the crash left
    assert not list(tmp_path.glob("*.tmp"))
    assert latest_checkpoint(tmp_path) == tmp_path / "step_3" and (tmp_path / "step_3" / CORE).is_file()


def test_trainer_killed_between_the_pointers_leaves_a_usable_run(synthetic_mm, tmp_path):
    """The finding: `latest` and `best` moved before core.pt existed. Killed just after `best` moved
    (before `latest`), the pointed step holds core.pt and --resume finishes the run."""
    run = tmp_path / "run"
    args = ["train", "--config", "ml100k",
            *small_overrides(synthetic_mm, tmp_path, **{"train.epochs": 1, "checkpoint.run_dir": run,
                                                        "log.tensorboard": "false"})]
    crashed = run_cli(args, {checkpoint.FAIL_AT_ENV: "best"})
    assert crashed.returncode != 0 and "best: simulated crash" in crashed.stderr
    step = best_checkpoint(run / "checkpoints")
    assert step is not None and (step / CORE).is_file()
    assert not (run / "checkpoints" / "latest").exists() and latest_checkpoint(run / "checkpoints") == step
    assert set(torch.load(step / CORE, weights_only=True)) == {"core", "modality_dims", "model"}
    resumed = run_cli([*args, "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert results_of(run)["test"]["count"] == 240
    assert json.loads((run / "checkpoints" / "best").read_text())["checkpoint"] == step.name
