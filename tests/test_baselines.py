"""`missrec baselines` on a toy dataset whose ranks and metrics are worked out by hand below."""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow as pa
import pytest

from datapipes.schema import (DatasetInfo, FeatureWriter, UsersWriter, feature_path, register_modality, write_items,
                             write_stats)
from missrec_torchrec import baselines
from missrec_torchrec.cli import main

# Leave-one-out sequences over items 0..4 (train_end = n - 2, valid_end = n - 1).
SEQS = [[0, 1, 2, 0, 1], [1, 2, 3, 2, 4], [0, 1, 2, 3]]
# Training parts: [0 1 2], [1 2 3], [0 1] -> popularity [2, 3, 2, 1, 0];
# transitions 0->1 twice, 1->2 twice, 2->3 once.
# Valid: targets 0, 2, 2 after last items 2, 3, 1.  Test: targets 1, 4, 3 after last items 0, 2, 2.
# Ranks = 1 + other items scoring >= the target (ties count against it).
# popularity  valid: 0 (2) < 1, =2            -> 3;  2 (2) < 1, =0 -> 3;  2 -> 3
#             test:  1 (3) top                 -> 1;  4 (0) last    -> 5;  3 (1) < 0, 1, 2 -> 4
# markov (count + popularity / 4): after 2: [.5, .75, .5, 1.25, 0]; after 3 (never followed): popularity;
#   after 1: [.5, .75, 2.5, .25, 0]; after 0: [.5, 2.75, .5, .25, 0]
#             valid: 0 after 2 -> 4;  2 after 3 -> 3;  2 after 1 -> 1
#             test:  1 after 0 -> 1;  4 after 2 -> 5;  3 after 2 -> 1
RANKS = {
    ("valid", "popularity"): [3, 3, 3], ("test", "popularity"): [1, 5, 4],
    ("valid", "markov"): [4, 3, 1], ("test", "markov"): [1, 5, 1],
}
# With the history masked, user 1's test candidates are {0, 4} and user 2's {3, 4}.
MASKED_TEST_RANKS = {"popularity": [1, 2, 1], "markov": [1, 2, 1]}
# Feature rows (2-d) for item-kNN; item 4 has no vector (scores 0).
FEATURES = np.array([[1, 0], [0, 2], [1, 1], [3, 0], [5, 5]], dtype=np.float32)
PRESENT = np.array([True, True, True, True, False])


def by_hand(ranks, k):
    """HR@k and NDCG@k of one target per user, written out (not through metrics.py)."""
    hr = sum(r <= k for r in ranks) / len(ranks)
    ndcg = sum(1 / math.log2(r + 1) for r in ranks if r <= k) / len(ranks)
    return hr, ndcg


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("baselines") / "toy"
    (root / "features").mkdir(parents=True)
    w = UsersWriter(root / "users.parquet")
    n = np.array([len(s) for s in SEQS])
    w.add([f"u{i}" for i in range(len(SEQS))], "d", pa.array(SEQS, pa.list_(pa.int64())), n - 2, n - 1)
    w.close()
    write_items(root / "items.parquet", [f"i{i}" for i in range(5)], "d")
    write_stats(root, {"users": len(SEQS), "items": 5, "interactions": int(n.sum())})
    f = FeatureWriter(feature_path(root, "text"), 2)
    f.add(FEATURES, PRESENT)
    f.close()
    register_modality(root, "text", 2, "float32", int(PRESENT.sum()), "vectors:toy")
    return root


def table_rows(text):
    """{(split, model): [cells]} of the printed Markdown table."""
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("| ") and cells[0] in ("valid", "test"):
            rows[(cells[0], cells[1])] = [float(c.split(" ")[0]) for c in cells[2:]]
    return rows


def run_cli(capsys, *argv):
    assert main(["baselines", *argv]) == 0
    return table_rows(capsys.readouterr().out)


@pytest.mark.parametrize("chunk_cells", [baselines.CHUNK_CELLS, 2])
def test_popularity_and_markov_match_the_hand_computed_ranks(toy, capsys, monkeypatch, chunk_cells):
    monkeypatch.setattr(baselines, "CHUNK_CELLS", chunk_cells)  # 2 cells for 3 users: one item per chunk
    rows = run_cli(capsys, str(toy), "eval.ks=[1,3]", "eval.metric=ndcg@3", "model.max_len=2")
    for (split, name), ranks in RANKS.items():
        hr1, nd1 = by_hand(ranks, 1)
        hr3, nd3 = by_hand(ranks, 3)
        mrr = sum(1 / r for r in ranks) / len(ranks)
        assert rows[(split, name)] == pytest.approx([hr1, nd1, hr3, nd3, mrr], abs=6e-5), (split, name)
    # The numbers above, spelled out for two rows: Markov valid ranks 4, 3, 1 -> NDCG@3 = (1/2 + 1) / 3.
    assert rows[("valid", "markov")][3] == pytest.approx(0.5, abs=6e-5)
    assert rows[("test", "popularity")][1] == pytest.approx(1 / 3, abs=6e-5)


def test_eval_max_users_ranks_the_first_users_only(toy, capsys):
    rows = run_cli(capsys, str(toy), "eval.ks=[1,3]", "eval.metric=ndcg@3", "model.max_len=2", "eval.max_users=2")
    for (split, name), ranks in RANKS.items():
        assert rows[(split, name)][:4] == pytest.approx([*by_hand(ranks[:2], 1), *by_hand(ranks[:2], 3)], abs=6e-5)


def test_masking_the_history_follows_eval_mask_history(toy, capsys):
    rows = run_cli(capsys, "--split", "test", str(toy), "eval.ks=[1,3]", "eval.metric=ndcg@3", "eval.mask_history=true")
    assert ("valid", "markov") not in rows
    for name, ranks in MASKED_TEST_RANKS.items():
        assert rows[("test", name)][:2] == pytest.approx(list(by_hand(ranks, 1)), abs=6e-5)


def test_cold_start_rows_cover_only_targets_absent_from_every_training_part(toy, capsys):
    # Item 4 is in no training part (popularity 0), so the only cold target is user 1's test item:
    # cold/* are that user's ranks alone (popularity 5, Markov 5); no validation target is cold.
    rows = run_cli(capsys, str(toy), "eval.ks=[1,5]", "eval.metric=ndcg@5", "eval.cold_start=true", "model.max_len=2")
    for name in ("popularity", "markov"):
        hr5, nd5 = by_hand([5], 5)
        assert rows[("test", name)][5:] == pytest.approx([0.0, 0.0, hr5, nd5, 1 / 5], abs=6e-5), name
        assert rows[("test", name)][:5] == pytest.approx(
            [*by_hand(RANKS[("test", name)], 1), *by_hand(RANKS[("test", name)], 5),
             sum(1 / r for r in RANKS[("test", name)]) / 3], abs=6e-5), name
        assert all(math.isnan(c) for c in rows[("valid", name)][5:]), name


def test_knn_is_the_cosine_to_the_mean_of_the_last_items(toy):
    feats = baselines.normalised_features(DatasetInfo.open(toy), "text")
    fit = baselines.Fitted(np.zeros(5), None, feats, knn_last=2)
    history = np.array([[3, 1, 2], [0, -1, -1]])  # left-aligned, -1 = padding
    q = baselines.query("knn", fit, history, np.array([3, 1]))
    got = baselines.block("knn", fit, q, 0, 5)
    np.testing.assert_allclose(baselines.at("knn", fit, q, np.array([2, 4])), [got[0, 2], got[1, 4]], rtol=1e-6)
    # Row 0: mean of unit vectors of items 1 and 2 = ([0, 1] + [.7071, .7071]) / 2, direction [.3827, .9239].
    u = np.array([math.sin(math.pi / 8), math.cos(math.pi / 8)])
    unit = FEATURES / np.linalg.norm(FEATURES, axis=1, keepdims=True)
    assert got[0, :4] == pytest.approx(unit[:4] @ u, abs=1e-6)
    assert got[1, :4] == pytest.approx(unit[:4, 0], abs=1e-6)  # one item: its own direction [1, 0]
    assert got[:, 4] == pytest.approx([0, 0])  # no feature vector: never similar
    # A float16 table is read as stored and normalised in float32 on each read.
    half = baselines.UnitRows(FEATURES.astype(np.float16), PRESENT)
    assert half.vectors.dtype == np.float16
    np.testing.assert_allclose(half[np.array([[3, 1], [0, 4]])], [[unit[3], unit[1]], [unit[0], [0, 0]]], atol=1e-3)


def test_run_rows_are_printed_and_a_run_of_another_protocol_is_refused(toy, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    test = {"hr@10": 0.5, "ndcg@10": 0.25, "hr@50": 1.0, "ndcg@50": 0.3, "mrr": 0.2}
    history = [{"epoch": 0, **{f"valid/{k}": v / 2 for k, v in test.items()}}]
    (run / "results.json").write_text(json.dumps({"best_epoch": 0, "test": test, "history": history}))
    (run / "config.yaml").write_text(f"data: {{dataset: {toy}}}\nmodel: {{max_len: 50}}\neval: {{mask_history: false}}\n")
    rows = run_cli(capsys, "--run", str(run), "--label", "mine", str(toy))
    assert rows[("test", "mine (1 run)")] == [0.5, 0.25, 1.0, 0.3, 0.2]
    assert rows[("valid", "mine (1 run)")] == [0.25, 0.125, 0.5, 0.15, 0.1]
    assert main(["baselines", "--run", str(run), str(toy), "eval.mask_history=true"]) == 2
    assert "evaluated with eval.mask_history=False" in capsys.readouterr().err
    assert main(["baselines", "--run", str(run), str(toy), "eval.max_users=2"]) == 2
    assert "evaluated with eval.max_users=None, the baselines with 2" in capsys.readouterr().err


def test_a_real_dataset_gives_every_baseline_on_both_splits(synthetic_mm, capsys):
    rows = run_cli(capsys, "--knn-modality", "image", str(synthetic_mm))
    assert set(rows) == {(s, n) for s in ("valid", "test") for n in baselines.NAMES}
    for cells in rows.values():
        assert all(0 <= c <= 1 for c in cells)
        assert cells[2] >= cells[0]  # HR@50 >= HR@10
    # A few items at a time (30 and more chunks per batch of users): the same table.
    with pytest.MonkeyPatch.context() as m:
        m.setattr(baselines, "CHUNK_CELLS", 1000)
        assert run_cli(capsys, "--knn-modality", "image", str(synthetic_mm)) == rows
