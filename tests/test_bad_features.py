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


def rewrite(path: Path, edit) -> None:
    table = pq.read_table(path)
    vectors = table.column("vector").combine_chunks().values.to_numpy(zero_copy_only=False).reshape(len(table), -1)
    present = table.column("present").to_numpy().copy()
    vectors, present = edit(vectors.copy(), present)
    dim = vectors.shape[1]
    pq.write_table(pa.table([pa.array(np.arange(len(vectors), dtype=np.int64)),
                             pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1).astype(np.float32)), dim),
                             pa.array(present)], schema=feature_schema(dim)), path)


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
