"""Checkpoint faults: a crash between any two phases of a save (MISSREC_CKPT_FAIL_AT test hook) never
leaves a pointer on an incomplete step; the trainer's core.pt is part of the step before it is published."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import missrec_torchrec.checkpoint as checkpoint
from missrec_torchrec.checkpoint import CheckpointManager
from missrec_torchrec.checkpoint_files import MANIFEST_FILE, best_checkpoint, complete_checkpoints, latest_checkpoint
from test_checkpoint import tiny_model_and_optimizer, tiny_step
from test_train import results_of, run_cli, small_overrides

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

    published = phase not in ("files", "extra", "manifest")
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


# -- manifest: every file's size and sha256, verified on load --------------------------------------

STEP_FILES = [".metadata", "__0_0.distcp", "progress.json", "rank_0.pt", CORE, MANIFEST_FILE]


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.fixture
def two_steps(tmp_path):
    model, optimizer = tiny_model_and_optimizer()
    manager = CheckpointManager(tmp_path, keep_last=5)
    for step in (1, 2):
        tiny_step(model, optimizer)
        save(manager, model, optimizer, step)
    return manager


def load_latest(manager):
    model, optimizer = tiny_model_and_optimizer()
    return manager.load(model, optimizer)


def test_manifest_lists_every_file_of_the_step(two_steps):
    manifest = json.loads((two_steps.dir / "step_2" / MANIFEST_FILE).read_text())
    assert sorted(manifest["files"]) == sorted(STEP_FILES[:-1])
    assert load_latest(two_steps).progress["n"] == 2


@pytest.mark.parametrize("name", STEP_FILES)
def test_byte_flip_in_each_file_is_named_with_the_intact_fallback(two_steps, name):
    step_2, step_1 = two_steps.dir / "step_2", two_steps.dir / "step_1"
    flip_byte(step_2 / name)
    with pytest.raises(checkpoint.CheckpointError) as info:
        load_latest(two_steps)
    message = str(info.value)
    assert message.startswith(f"{step_2 / name}: damaged") and "\n" not in message
    assert f"newest intact checkpoint: {step_1}" in message
    with pytest.raises(checkpoint.CheckpointError, match="damaged"):
        checkpoint.resolve_checkpoint(two_steps.dir)  # what evaluate, score and init_checkpoint use
    import shutil

    shutil.rmtree(step_2)  # what the message offers: latest falls back to step 1
    assert load_latest(two_steps).path == step_1


def test_truncated_rank_file_is_named(two_steps):
    rank_file = two_steps.dir / "step_2" / "rank_0.pt"
    rank_file.write_bytes(rank_file.read_bytes()[:100])
    with pytest.raises(checkpoint.CheckpointError, match=r"rank_0\.pt: truncated or extended \(100 bytes"):
        load_latest(two_steps)
    (two_steps.dir / "step_2" / MANIFEST_FILE).unlink()  # a checkpoint from before manifests
    with pytest.raises(checkpoint.CheckpointError, match=r"step_2/rank_0\.pt: unreadable"):
        load_latest(two_steps)


def test_missing_file_and_no_intact_step(two_steps):
    (two_steps.dir / "step_2" / CORE).unlink()
    flip_byte(two_steps.dir / "step_1" / "__0_0.distcp")
    with pytest.raises(checkpoint.CheckpointError, match=r"core\.pt: missing from the checkpoint; no intact checkpoint in "):
        load_latest(two_steps)


def test_damaged_run_is_a_one_line_cli_error_that_changes_nothing(synthetic_mm, tmp_path, capsys):
    from missrec_torchrec.cli import main
    from missrec_torchrec.config import load_config
    from missrec_torchrec.trainer import train

    run = tmp_path / "run"
    overrides = small_overrides(synthetic_mm, tmp_path, **{"checkpoint.run_dir": run, "log.tensorboard": "false",
                                                           "log.fingerprint": "false", "checkpoint.keep": 2})
    train(load_config("ml100k", overrides))
    ckpts = run / "checkpoints"
    latest, best = latest_checkpoint(ckpts), best_checkpoint(ckpts)
    older = min(complete_checkpoints(ckpts).values())
    assert latest != older
    distcp = next(latest.glob("*.distcp"))
    flip_byte(distcp)
    capsys.readouterr()
    before = snapshot(tmp_path)

    def refused(argv, culprit):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err, err
        assert f"{culprit}: damaged" in err and f"newest intact checkpoint: {older}" in err, err

    # evaluate reads `best`: damage it too when it is another step than the damaged latest.
    culprit = distcp if best == latest else best / CORE
    if best != latest:
        flip_byte(culprit)
        before = snapshot(tmp_path)
    refused(["evaluate", "--checkpoint", str(run), *overrides[:3]], culprit)
    assert snapshot(tmp_path) == before
    # --resume reads `latest`; a refused resume leaves config.yaml as it was too.
    refused(["train", "--config", "ml100k", *overrides, "--resume"], distcp)
    assert snapshot(tmp_path) == before


def snapshot(root: Path) -> dict:
    return {str(p): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
