"""Per-shard feature reads and float16 feature tables (issue 15).

Every rank fills its shards of the frozen feature tables from the Parquet row groups holding its
rows (`DatasetInfo.feature_rows`): the tables equal today's whole-table read (`load_features`) bit
for bit on 1 and 2 ranks, a row-wise rank decodes its rows plus at most one row group, and a bad row
is named by the range that reads it. A float16 table stays float16 in its embedding table, trains,
and scores as the same values stored in float32.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from datapipes.batch import PAD
from datapipes.schema import DataError, DatasetInfo, feature_path, feature_schema, register_modality
from missrec_torchrec.config import load_config
from missrec_torchrec.distributed import local_shards, table_weight
from test_distributed import launch
from test_train import small_overrides

GROUP = 16  # feature rows per Parquet row group: 120 items make 8 groups, the last one short
ITEMS = 120
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
        assert np.array_equal(rows.present(lo, hi), present[lo:hi])  # a rank's own flags only
    assert np.array_equal(info.feature_rows("text").present(), present)
    assert not present.all()  # the synthetic set has items without text: the flags are not trivially equal


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


def session_config(ds: Path, out: Path, sharding: str):
    return load_config("ml100k", small_overrides(ds, out, **{"train.sharding": sharding}))


def shards_against_whole_table(session) -> dict:
    """Per frozen table: (every local shard equals its slice of `load_features`, rows this rank
    owns, rows it decoded, the table's dtype)."""
    out = {}
    for m in session.model.frozen_tables:
        whole = torch.from_numpy(np.array(session.info.load_features(m)[0]))
        shards = [(s, o) for s, o in local_shards(table_weight(session.dmp, m)) if s.numel()]
        same = all(torch.equal(s.float(), whole[r0 : r0 + s.shape[0], c0 : c0 + s.shape[1]]) for s, (r0, c0) in shards)
        out[m] = (same, sum(s.shape[0] for s, _ in shards), session.feature_rows_decoded[m], shards[0][0].dtype)
    return out


@pytest.mark.parametrize("sharding", ["row_wise", "column_wise", "table_wise"])
def test_one_rank_tables_equal_the_whole_table_read(grouped, tmp_path, sharding):
    from missrec_torchrec.session import Session

    session = Session(session_config(grouped, tmp_path, sharding), prepare=False)
    for m, (same, owned, decoded, dtype) in shards_against_whole_table(session).items():
        assert same and owned == ITEMS and decoded == ITEMS and dtype == torch.float32, m
        present = session.head.state(session.own_state()).present()[m]  # one rank: every item's
        assert torch.equal(present, torch.from_numpy(session.info.load_features(m)[1]))


def _two_rank_worker(good: str, bad: str, out: str):
    from missrec_torchrec.session import Session

    session = Session(session_config(Path(good), Path(out), "row_wise"), prepare=False)
    result = shards_against_whole_table(session)
    try:
        Session(session_config(Path(bad), Path(out), "row_wise"), prepare=False)
    except DataError as e:
        return result, str(e)
    return result, None


def test_two_row_wise_ranks_read_their_own_rows_and_agree_on_a_bad_one(grouped, tmp_path):
    bad = regroup(grouped, tmp_path / "bad", edit=plant_nan)
    results = launch(_two_rank_worker, 2, str(grouped), str(bad), str(tmp_path / "runs"))
    for m in ("text", "image"):
        owned = [results[r][0][m][1] for r in (0, 1)]
        assert owned == [60, 60], owned  # row-wise: each rank holds half, no rank the whole table
        for rank in (0, 1):
            same, mine, decoded, _ = results[rank][0][m]
            assert same, (m, rank)
            assert mine <= decoded <= mine + GROUP, (m, rank, decoded)  # its rows plus one row group
    # Only rank 1 holds the bad row; both ranks stop with its message.
    expected = f"{feature_path(bad, 'text')}: row {BAD_ROW} (item {BAD_ROW}) has NaN or inf values"
    assert results[0][1] == results[1][1] == expected


def test_float16_tables_stay_float16_train_and_score_as_their_float32_values(grouped, tmp_path):
    from missrec_torchrec.session import Session
    from missrec_torchrec.trainer import Trainer

    half = regroup(grouped, tmp_path / "half", dtype="float16")
    # The same fp16 values stored as float32: what an fp32 table of those values scores.
    rounded = regroup(grouped, tmp_path / "rounded", edit=lambda _, v: v.astype(np.float16).astype(np.float32))
    assert (half / "features" / "text.parquet").stat().st_size < (rounded / "features" / "text.parquet").stat().st_size

    def scores(ds: Path) -> torch.Tensor:
        session = Session(session_config(ds, tmp_path / "runs", "row_wise"), prepare=False)
        bank = session.item_bank()
        history = torch.full((4, 6), PAD, dtype=torch.int64)
        history[:, :5] = torch.arange(20).view(4, 5)
        return session, bank.chunk_scores(bank.encode(history), bank.chunk(0, ITEMS))

    session, s_half = scores(half)
    assert table_weight(session.dmp, "text").local_shards()[0].tensor.dtype == torch.float16
    assert all(v.dtype == torch.float32 for v in session.item_bank().rows(torch.arange(ITEMS)).values())  # the adapters ran in fp32
    _, s_rounded = scores(rounded)
    _, s_full = scores(grouped)
    assert torch.equal(s_half, s_rounded)  # fp16 storage changes nothing beyond the rounding
    assert not torch.equal(s_half, s_full)
    # Against the unrounded values: within 8 fp16 steps (2^-11 relative each) of the score range.
    torch.testing.assert_close(s_half, s_full, rtol=0, atol=8 * 2**-11 * float(s_full.abs().max()))

    trainer = Trainer(load_config("ml100k", small_overrides(half, tmp_path / "train", **{"train.epochs": 3})))
    losses = [row["train/loss"] for row in trainer.fit()["history"]]
    assert losses[-1] < losses[0], losses
    run_dir = Path(trainer.run_dir)
    assert json.loads((run_dir / "fingerprint.rank0.json").read_text())["frozen_tables_unchanged"]


def test_shards_filled_piece_by_piece_decode_each_row_group_once(grouped, tmp_path, monkeypatch):
    """Pieces of 7 rows against row groups of 16: no piece is a whole shard, no group decoded twice."""
    from missrec_torchrec import distributed
    from missrec_torchrec.session import Session

    monkeypatch.setattr(distributed, "LOAD_ROWS", 7)
    session = Session(session_config(grouped, tmp_path, "row_wise"), prepare=False)
    for m, (same, owned, decoded, _) in shards_against_whole_table(session).items():
        assert same and owned == ITEMS and decoded == ITEMS, m
