"""Outputs never delete inputs: `--out` (with or without --overwrite) refuses the filesystem root, the
working directory or a folder holding it, a plain file and a folder holding an input of the command,
with exit code 2, one line and an unchanged file system; temporary folders of killed runs are removed
by the next run on the same output; failed feature runs leave no empty cache folder."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from missrec_torchrec.cli import main
from test_bad_input import write_unisrec_folder

REPO = Path(__file__).resolve().parent.parent


def write_log(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("user_id,item_id,timestamp\n" + "".join(f"u{u},i{(u + k) % 7},{k}\n" for u in range(6) for k in range(4)))
    return path


@pytest.fixture
def world(tmp_path, monkeypatch):
    """tmp/work (the working directory), tmp/in/log.csv, tmp/Toy (an atomic folder), tmp/ds (prepared)."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    write_log(tmp_path / "in" / "log.csv")
    (tmp_path / "notes.csv").write_text("keep me\n")
    write_unisrec_folder(tmp_path / "Toy")
    assert main(["prepare", "missrec-atomic", "--path", str(tmp_path / "Toy"), "--feat-dim", "4",
                 "--out", str(tmp_path / "ds")]) == 0
    return tmp_path


def interactions(t):
    return ["prepare", "interactions", "--path", str(t / "in" / "log.csv"), "--k-core", "0"]


CASES = [
    # (id, argv before --out, --out, fragment)
    ("out holds the input", interactions, lambda t: t / "in", "holds the input"),
    ("out is the input file", interactions, lambda t: t / "in" / "log.csv", "is a file, not an output folder"),
    ("out is another file", interactions, lambda t: t / "notes.csv", "is a file, not an output folder"),
    ("out is the root", interactions, lambda t: Path("/"), "is the filesystem root"),
    ("out is the working directory", interactions, lambda t: Path("."), "is the working directory"),
    ("out holds the working directory", interactions, lambda t: Path(".."), "is the working directory or holds it"),
    ("atomic folder into itself", lambda t: ["prepare", "missrec-atomic", "--path", str(t / "Toy"), "--feat-dim", "4"],
     lambda t: t / "Toy", "holds the input"),
    ("combine over an input", lambda t: ["prepare", "multi-domain", "--inputs", str(t / "ds")], lambda t: t / "ds",
     "holds the input"),
    ("export-atomic over its dataset", lambda t: ["export-atomic", str(t / "ds"), "--name", "Toy"], lambda t: t / "ds",
     "holds the input"),
    ("export-atomic into a file", lambda t: ["export-atomic", str(t / "ds"), "--name", "Toy"], lambda t: t / "notes.csv",
     "is a file"),
]


def snapshot(root: Path) -> dict:
    return {str(p): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("overwrite", [True, False], ids=["--overwrite", "no-overwrite"])
@pytest.mark.parametrize("argv,out,fragment", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_refused_output_changes_nothing(world, capsys, argv, out, fragment, overwrite):
    before = snapshot(world)
    target = out(world)
    assert main([*argv(world), "--out", str(target), *(["--overwrite"] if overwrite else [])]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert f"{target}: {fragment}" in err, err
    assert snapshot(world) == before
    assert not list(Path("/").glob("..tmp-*"))


def test_overwrite_still_replaces_an_output_folder(world, capsys):
    out = world / "out"
    assert main([*interactions(world), "--out", str(out)]) == 0
    (out / "stray").write_text("x")
    assert main([*interactions(world), "--out", str(out)]) == 2
    assert "output folder exists (pass --overwrite" in capsys.readouterr().err
    assert main([*interactions(world), "--out", str(out), "--overwrite"]) == 0
    assert not (out / "stray").exists() and (out / "stats.json").is_file()
    assert sorted(p.name for p in world.iterdir() if p.name.startswith(".")) == []


def test_next_run_removes_what_a_killed_run_left(world):
    out = world / "out"
    killed = subprocess.run([sys.executable, "-c", (
        "import os, sys\n"
        "from datapipes.io import staged_dir\n"
        f"with staged_dir({str(out)!r}) as tmp:\n"
        "    (tmp / 'users.parquet').write_text('half')\n"
        "    os._exit(9)  # killed: no cleanup runs\n")], cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert killed.returncode == 9
    (world / ".out.tmp-0badc0de").mkdir()  # an older run's name, without a process id
    (world / f".out.old-{2**22 + 7}-x").mkdir()  # a process id above Linux's largest: long gone
    live = world / f".out.tmp-{os.getpid()}-live"  # a run still in progress: left alone
    live.mkdir()
    left = sorted(p.name for p in world.iterdir() if p.name.startswith(".out."))
    assert len(left) == 4
    assert main([*interactions(world), "--out", str(out)]) == 0
    assert sorted(p.name for p in world.iterdir() if p.name.startswith(".out.")) == [live.name]
    assert (out / "stats.json").is_file()


def test_failed_feature_run_leaves_no_empty_cache(tmp_path):
    from datapipes.features import compute_features, parts_dir
    from datapipes.schema import DataError
    from test_features import keys_of, make_dataset

    root = make_dataset(tmp_path / "ds", keys_of(6))
    bad = np.ones((6, 4), np.float32)
    bad[0, 1] = np.nan  # the first chunk fails: nothing to resume from
    np.save(tmp_path / "nan.npy", bad)
    with pytest.raises(DataError, match=r"nan\.npy: row 0 has NaN or inf"):
        compute_features(root, "v", f"vectors:{tmp_path / 'nan.npy'}", chunk_size=2, progress=False)
    assert not parts_dir(root, "v").exists() and not (root / "features").exists()
    bad[0, 1], bad[4, 1] = 1.0, np.inf  # a later chunk fails: the finished chunks stay for a resume
    np.save(tmp_path / "nan.npy", bad)
    with pytest.raises(DataError, match="row 4"):
        compute_features(root, "v", f"vectors:{tmp_path / 'nan.npy'}", chunk_size=2, progress=False)
    assert len(list(parts_dir(root, "v").iterdir())) == 2
