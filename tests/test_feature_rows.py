"""Per-range feature reads (issue 15): `DatasetInfo.feature_rows` slices equal today's whole-table
read (`load_features`) bit for bit, decode only the row groups they overlap, and name a bad row."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from datapipes.schema import DataError, DatasetInfo, feature_path, feature_schema, register_modality

GROUP = 16  # feature rows per Parquet row group: 120 items make 8 groups, the last one short
BAD_ROW = 101  # in row group 6, inside rank 1's half of a row-wise table


def regroup(src: Path, dst: Path, dtype: str = "float32", edit=None) -> Path:
    """A copy of the dataset `src` with its feature tables rewritten in GROUP-row groups as `dtype`,
    their values first passed through `edit(name, vectors)` when given (which may plant a NaN)."""
    shutil.copytree(src, dst)
    info = DatasetInfo.open(dst)
    for name, m in info.modalities.items():
        vectors, present = info.load_features(name)
        if edit is not None:
            vectors = edit(name, vectors.copy())
        values = pa.array(vectors.astype(np.float16 if dtype == "float16" else np.float32).reshape(-1))
        table = pa.table([pa.array(np.arange(len(vectors), dtype=np.int64)),
                          pa.FixedSizeListArray.from_arrays(values, m.dim), pa.array(present)],
                         schema=feature_schema(m.dim, dtype))
        pq.write_table(table, feature_path(dst, name), row_group_size=GROUP)
        register_modality(dst, name, m.dim, dtype, int(present.sum()), "regrouped")
    return dst


def plant_nan(name: str, vectors: np.ndarray) -> np.ndarray:
    if name == "text":
        vectors[BAD_ROW, 5] = np.nan
    return vectors


@pytest.fixture(scope="module")
def grouped(synthetic_mm, tmp_path_factory):
    return regroup(synthetic_mm, tmp_path_factory.mktemp("grouped") / "ds")


def test_slices_read_only_their_row_groups_and_equal_the_whole_table(grouped):
    info = DatasetInfo.open(grouped)
    assert pq.ParquetFile(feature_path(grouped, "text")).metadata.num_row_groups == 8
    whole, present = info.load_features("text")
    # (rows, columns, rows decoded: the row groups they overlap, whole)
    for lo, hi, c0, c1, decoded in [(0, 120, 0, 32, 120), (0, 16, 0, 32, 16), (15, 17, 3, 9, 32),
                                    (60, 120, 16, 32, 72), (112, 120, 0, 1, 8), (40, 40, 0, 32, 0)]:
        rows = info.feature_rows("text")
        got = rows[lo:hi, c0:c1]
        assert got.dtype == np.float32 and got.shape == (hi - lo, c1 - c0)
        assert np.array_equal(got, whole[lo:hi, c0:c1])
        assert rows.rows_decoded == decoded
    assert np.array_equal(info.feature_rows("text").present(), present)


def test_a_bad_row_is_named_by_the_range_that_holds_it(synthetic_mm, tmp_path):
    ds = regroup(synthetic_mm, tmp_path / "bad", edit=plant_nan)
    rows = DatasetInfo.open(ds).feature_rows("text")
    assert rows[0:96].shape == (96, 32) and rows[102:120].shape == (18, 32)  # ranges without it read
    with pytest.raises(DataError) as e:
        rows[90:110, 10:12]  # its column is not even asked for: the whole row is checked
    assert str(e.value) == f"{feature_path(ds, 'text')}: row {BAD_ROW} (item {BAD_ROW}) has NaN or inf values"


def test_a_table_that_is_not_what_stats_json_records_is_refused(grouped, tmp_path):
    ds = tmp_path / "ds"
    shutil.copytree(grouped, ds)
    stats = json.loads((ds / "stats.json").read_text())
    stats["modalities"]["text"]["dtype"] = "float16"
    (ds / "stats.json").write_text(json.dumps(stats))
    with pytest.raises(DataError, match="text.parquet: vector values are float32, stats.json records float16"):
        DatasetInfo.open(ds).feature_rows("text")
    stats["items"] = 121
    (ds / "stats.json").write_text(json.dumps(stats))
    with pytest.raises(DataError, match="image.parquet: 120 feature rows for the dataset's 121 items"):
        DatasetInfo.open(ds).feature_rows("image")
