"""Bad feature tables of a prepared dataset (NaN/inf values, present or not, wrong row count or dim,
unreadable or missing files): `inspect`, `train` and `export-atomic` stop with exit code 2, one line
naming the file (and the row), and leave the file system as it was."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from datapipes.schema import feature_path, feature_schema
from missrec_torchrec.cli import main
from test_train import small_overrides

DIM = 32  # the text table of synthetic_mm


def rewrite(path: Path, edit, row_group_size=None) -> None:
    table = pq.read_table(path)
    vectors = table.column("vector").combine_chunks().values.to_numpy(zero_copy_only=False).reshape(len(table), -1)
    present = table.column("present").to_numpy().copy()
    vectors, present = edit(vectors.copy(), present)
    dim = vectors.shape[1]
    pq.write_table(pa.table([pa.array(np.arange(len(vectors), dtype=np.int64)),
                             pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1).astype(np.float32)), dim),
                             pa.array(present)], schema=feature_schema(dim)), path, row_group_size=row_group_size)


def set_row(row: int, value: float, present: bool):
    def edit(vectors, flags):
        vectors[row, 3] = value
        flags[row] = present
        return vectors, flags
    return edit


CASES = {
    "nan in a present row": (lambda p: rewrite(p, set_row(7, np.nan, True)), "row 7 (item 7) has NaN or inf"),
    "nan in an absent row": (lambda p: rewrite(p, set_row(11, np.nan, False)), "row 11 (item 11) has NaN or inf"),
    "inf": (lambda p: rewrite(p, set_row(0, np.inf, True)), "row 0 (item 0) has NaN or inf"),
    "-inf in the last row": (lambda p: rewrite(p, set_row(119, -np.inf, False)), "row 119 (item 119)"),
    # Row groups of 16 rows: the check reads one at a time, and must reach the 7th.
    "nan in a later row group": (lambda p: rewrite(p, set_row(100, np.nan, True), row_group_size=16),
                                 "row 100 (item 100) has NaN or inf"),
    "a row short": (lambda p: rewrite(p, lambda v, f: (v[:-1], f[:-1])), "119 feature rows for the dataset's 120 items"),
    "another dim": (lambda p: rewrite(p, lambda v, f: (v[:, :8], f)), "needs a 'vector' column of 32 values per row"),
    "truncated file": (lambda p: p.write_bytes(p.read_bytes()[:-30]), "not a readable Parquet file"),
    "missing file": (lambda p: p.unlink(), "missing (stats.json lists modality 'text')"),
}


@pytest.fixture
def damaged(synthetic_mm, tmp_path, request):
    ds = tmp_path / "ds"
    shutil.copytree(synthetic_mm, ds)
    damage, fragment = CASES[request.param]
    damage(feature_path(ds, "text"))
    return ds, fragment


def snapshot(root: Path) -> dict:
    return {str(p): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def commands(ds: Path, tmp_path: Path):
    return {
        "inspect": ["inspect", str(ds)],
        "inspect --json": ["inspect", str(ds), "--json"],
        "train": ["train", "--config", "ml100k", *small_overrides(ds, tmp_path / "runs", **{"log.tensorboard": "false"})],
        "export-atomic": ["export-atomic", str(ds), "--out", str(tmp_path / "atomic"), "--name", "Toy"],
    }


@pytest.mark.parametrize("command", ["inspect", "inspect --json", "train", "export-atomic"])
@pytest.mark.parametrize("damaged", list(CASES), indirect=True)
def test_bad_feature_table_is_refused(damaged, tmp_path, capsys, command):
    ds, fragment = damaged
    before = snapshot(tmp_path)
    assert main(commands(ds, tmp_path)[command]) == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and "Traceback" not in captured.err, captured.err
    assert f"{feature_path(ds, 'text')}: {fragment}" in captured.err, captured.err
    assert captured.out == ""
    assert snapshot(tmp_path) == before  # no run folder, no export, nothing else


def test_good_table_still_inspects_and_loads(synthetic_mm, capsys):
    from datapipes.schema import DatasetInfo

    assert main(["inspect", str(synthetic_mm)]) == 0
    assert "modality  text: dim 32" in capsys.readouterr().out
    vectors, present = DatasetInfo.open(synthetic_mm).load_features("image")
    assert vectors.shape == (120, 16) and present.shape == (120,)


def test_a_bad_row_in_one_ranks_slice_stops_both_ranks(synthetic_mm, tmp_path):
    """Each rank checks only its own item slice (rows 60..119 are rank 1's): rank 0 finds nothing, yet
    both stop with rank 1's line (torchrun may end the later one first) before the run folder exists."""
    from test_train import run_cli

    ds = tmp_path / "ds"
    shutil.copytree(synthetic_mm, ds)
    rewrite(feature_path(ds, "text"), set_row(100, np.nan, True), row_group_size=16)
    runs = tmp_path / "runs"
    done = run_cli(["train", "--config", "ml100k", *small_overrides(ds, runs, **{"log.tensorboard": "false"})], torchrun=2)
    assert done.returncode != 0
    line = f"{feature_path(ds, 'text')}: row 100 (item 100) has NaN or inf"
    assert line in done.stderr, done.stderr[-3000:]
    # Only torchrun's own report of the failed worker has a traceback; our code's lines have none.
    frames = [l for l in done.stderr.splitlines() if l.strip().startswith("File ")]
    assert not [f for f in frames if "missrec_torchrec" in f or "datapipes" in f], done.stderr[-3000:]
    assert not runs.exists()


def test_the_check_decodes_one_row_group_at_a_time_and_only_the_slice_asked(synthetic_mm, tmp_path):
    from datapipes.feature_rows import FeatureRows
    from datapipes.io import DataError
    from datapipes.schema import DatasetInfo

    ds = tmp_path / "ds"
    shutil.copytree(synthetic_mm, ds)
    rewrite(feature_path(ds, "text"), set_row(100, np.nan, True), row_group_size=16)
    info = DatasetInfo.open(ds)
    info.check_features("text", 0, 60)  # rank 0's slice of 2: no bad row there
    with pytest.raises(DataError, match=r"row 100 \(item 100\) has NaN or inf"):
        info.check_features("text", 60, 120)
    with pytest.raises(DataError, match=r"row 100 \(item 100\)"):
        info.check_features("text")
    rows = FeatureRows(feature_path(ds, "text"), "text", DIM, 120)
    sizes = []
    for lo, hi, values in rows.checked(0, 60):
        sizes.append(len(values))
    assert sizes == [16, 16, 16, 12] and rows.rows_decoded == 64  # 4 groups of 16, no other
