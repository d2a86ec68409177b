"""What a new user sees: `missrec train` prints the run folder first, and the library warnings known
to be harmless are silenced at the CLI (so stderr stays empty on a clean run)."""

from __future__ import annotations

from test_train import only_run, run_cli, small_overrides


def test_train_prints_the_run_folder_first_and_no_warnings(synthetic_mm, tmp_path):
    out = tmp_path / "runs"
    done = run_cli(["train", "--config", "ml100k",
                    *small_overrides(synthetic_mm, out, **{"train.epochs": 1, "log.fingerprint": "false"})])
    assert done.returncode == 0, done.stderr[-3000:]
    run = only_run(out)
    assert done.stdout.splitlines()[0] == f"run folder {run}"
    assert done.stderr == ""
    assert f"run_dir: {run}" in (run / "config.yaml").read_text()


def test_dry_run_prints_no_warnings(synthetic_mm, tmp_path):
    done = run_cli(["train", "--config", "ml100k", "--dry-run", "--world-size", "2", *small_overrides(synthetic_mm, tmp_path)])
    assert done.returncode == 0, done.stderr[-3000:]
    assert "sharding plan for 2 rank(s)" in done.stdout and done.stderr == ""
