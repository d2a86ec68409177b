"""`missrec score`'s part files: index-only parts, keyed as rank 0 merges them."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from missrec_torchrec import score_parts
from missrec_torchrec.score_parts import Keys, RankParts, merge_parts, part_table, rank_folder


@pytest.fixture
def keys(tmp_path):
    """users.parquet out of user_index order (looked up by index), items.parquet by row."""
    pq.write_table(pa.table({"user_index": [3, 0, 2, 1], "user_key": ["u3", "u0", "u2", "u1"]}), tmp_path / "users.parquet")
    pq.write_table(pa.table({"item_key": [f"i{n}" for n in range(6)]}), tmp_path / "items.parquet")
    return Keys(tmp_path / "users.parquet", "user_index", "user_key"), Keys(tmp_path / "items.parquet", None, "item_key")


def write_rank(parts, rank, users, items, scores):
    """One segment per user, as `missrec score --commit-every 1` writes them."""
    folder = RankParts(rank_folder(parts, rank), {"plan": 1}, resume=False)
    for n, u in enumerate(users):
        folder.commit(part_table(np.array([u]), np.array([items[n]]), np.array([scores[n]])), n, n + 1, {})


@pytest.mark.parametrize("rows_per_group", [1, 2, 8192])
@pytest.mark.parametrize("rank_users", [([0, 1], [2, 3]), ([2, 0], [3, 1])])  # in order, or not
def test_merge_adds_keys_in_user_order(tmp_path, keys, monkeypatch, rows_per_group, rank_users):
    monkeypatch.setattr(score_parts, "MERGE_ROWS_PER_GROUP", rows_per_group)
    parts = tmp_path / "out.parquet.parts"
    lists = {0: [5, 1, -1], 1: [0, -1, -1], 2: [4, 3, 2], 3: [-1, -1, -1]}  # -1: no item
    for rank, users in enumerate(rank_users):
        items = [lists[u] for u in users]
        write_rank(parts, rank, users, items, [[float(u)] * 3 for u in users])
    assert pq.read_schema(rank_folder(parts, 0) / "seg-000000000-000000001.parquet").names == ["user_index", "items", "scores"]
    out = tmp_path / "out.parquet"
    totals = merge_parts(parts, out, 2, 2, 4, {"plan": 1}, keys)
    got = pq.read_table(out).to_pylist()
    assert totals["users"] == 4 and not parts.exists()
    assert [r["user_index"] for r in got] == [0, 1, 2, 3]
    assert [r["user_key"] for r in got] == ["u0", "u1", "u2", "u3"]
    assert [r["items"] for r in got] == [[5, 1], [0], [4, 3, 2], []]
    assert [r["item_keys"] for r in got] == [["i5", "i1"], ["i0"], ["i4", "i3", "i2"], []]
    assert [r["scores"] for r in got] == [[0.0, 0.0], [1.0], [2.0, 2.0, 2.0], []]
