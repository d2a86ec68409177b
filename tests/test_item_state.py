"""The item-state table: its columns round-trip exactly through fp32 rows, and on 2 ranks each rank
holds only its own items' rows while every lookup sees every item's."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from missrec_torchrec import item_state
from missrec_torchrec.item_state import MAX_CLUSTERS, ItemState

MODALITIES = ["text", "image", "audio"]


def test_columns_round_trip_exactly_and_leave_the_others_alone():
    n = 9
    rows = item_state.default_rows(n, MODALITIES, num_items=1000)
    assert rows.shape == (n, 8)  # 3 clusters + flags + log-Q, padded to a multiple of 4
    fresh = ItemState(rows.clone(), MODALITIES)
    assert all(p.all() for p in fresh.present().values()) and fresh.in_softmax().all()
    assert all((c == 0).all() for c in fresh.clusters().values())
    torch.testing.assert_close(fresh.logq(), torch.full((n,), -torch.log(torch.tensor(1000.0)).item()))

    g = torch.Generator().manual_seed(0)
    clusters = {m: torch.randint(0, MAX_CLUSTERS, (n,), generator=g) for m in MODALITIES}
    clusters["image"][0] = MAX_CLUSTERS - 1  # the largest id the fp32 column holds exactly
    image = torch.rand(n, generator=g) < 0.5
    item_state.write_columns(rows, MODALITIES, clusters=clusters, present={"image": image})
    state = ItemState(rows, MODALITIES)
    assert all(torch.equal(state.clusters()[m], clusters[m]) for m in MODALITIES)
    assert torch.equal(state.present()["image"], image)
    assert state.present()["text"].all() and state.present()["audio"].all() and state.in_softmax().all()
    softmax = torch.arange(n) % 3 == 0
    item_state.write_columns(rows, MODALITIES, in_softmax=softmax, logq=torch.arange(n, dtype=torch.float32))
    assert torch.equal(state.in_softmax(), softmax) and torch.equal(state.present()["image"], image)
    assert torch.equal(state.logq(), torch.arange(n, dtype=torch.float32))
    assert torch.equal(state.clusters()["audio"], clusters["audio"])
    # Lookups by id, padding included, read the same rows.
    ids = torch.tensor([[3, 0, -1]])
    assert torch.equal(state.at(ids).clusters()["text"], clusters["text"][ids.clamp(min=0)])
    with pytest.raises(ValueError, match="below 16777216"):
        item_state.write_columns(rows, MODALITIES, clusters={"text": torch.full((n,), MAX_CLUSTERS)})


def test_the_state_table_is_row_wise_whatever_the_feature_sharding():
    spec = item_state.sharding("table_wise", ["text", "item_id", item_state.STATE_TABLE])
    assert spec == {"text": "table_wise", "item_id": "table_wise", item_state.STATE_TABLE: "row_wise"}
    assert item_state.sharding({"text": "column_wise"}, ["text"])[item_state.STATE_TABLE] == "row_wise"


def _two_rank_worker(dataset: str, out: str):
    from missrec_torchrec.distributed import local_shards, table_weight
    from test_scale import scale_session

    session = scale_session(Path(dataset), Path(out))
    head, n = session.head, session.num_items
    session.refresh_interests(epoch=0)
    own = session.own_state()
    looked_up = session.item_bank().state(torch.arange(n))  # collective: every rank sees every item's row
    return {
        "own_rows": own.shape[0],
        "shard_rows": sum(s.shape[0] for s, _ in local_shards(table_weight(session.dmp, item_state.STATE_TABLE))),
        "per_item_buffers": [name for name, b in head.named_buffers() if n in b.shape],
        "clusters": {m: c.tolist() for m, c in looked_up.clusters().items()},
        "present": {m: p.tolist() for m, p in looked_up.present().items()},
        "own_clusters": {m: c.tolist() for m, c in head.state(own).clusters().items()},
    }


def test_two_ranks_each_hold_only_their_own_rows_and_look_up_every_item(synthetic_mm, tmp_path):
    from test_distributed import launch

    records = launch(_two_rank_worker, 2, str(synthetic_mm), str(tmp_path))
    n = len(records[0]["clusters"]["text"])
    block = -(-n // 2)
    assert [r["own_rows"] for r in records.values()] == [r["shard_rows"] for r in records.values()] == [block, n - block]
    assert all(r["per_item_buffers"] == [] for r in records.values())  # nothing N-long is replicated
    assert records[0]["clusters"] == records[1]["clusters"] and records[0]["present"] == records[1]["present"]
    for m, everyone in records[0]["clusters"].items():
        # Each rank's own rows are its slice of what every rank looks up; re-clustering filled them.
        assert records[0]["own_clusters"][m] + records[1]["own_clusters"][m] == everyone
        present = records[0]["present"][m]
        assert any(not p for p in present), m  # the synthetic set has items missing a modality
        assert all((c >= 1) == p for c, p in zip(everyone, present)), m
