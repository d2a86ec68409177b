"""`missrec score` and `missrec export-items` against a tiny model trained once on synthetic data."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from datapipes.batch import row_ids
from datapipes.schema import USERS_SCHEMA
from missrec_torchrec import export, scoring, topk
from missrec_torchrec.session import load_run, open_session
from missrec_torchrec.cli import main
from test_train import run_cli, small_overrides

TOPK = 10
QUIET = ["log.progress=false"]


@pytest.fixture(scope="module")
def run_dir(synthetic_mm, tmp_path_factory):
    """One epoch of a transductive model (IDs too, so every table type is scored and exported)."""
    from missrec_torchrec.config import load_config
    from missrec_torchrec.trainer import train

    out = tmp_path_factory.mktemp("score-run")
    cfg = load_config("ml100k", small_overrides(synthetic_mm, out, **{
        "train.epochs": 1, "model.use_id": "true", "checkpoint.run_dir": out / "run",
        # fp32: exact comparisons below; bf16 rounds differently with each batch's padded width.
        "train.precision": "fp32"}))
    train(cfg)
    return out / "run"


@pytest.fixture(scope="module")
def uneven_data(synthetic_mm, tmp_path_factory):
    """The synthetic dataset minus its last user: 239 users, so 2 ranks get 119 and 120."""
    dst = tmp_path_factory.mktemp("uneven") / "data"
    shutil.copytree(synthetic_mm, dst)
    users = pq.read_table(synthetic_mm / "users.parquet")
    pq.write_table(users.slice(0, users.num_rows - 1), dst / "users.parquet", row_group_size=64)
    stats = json.loads((dst / "stats.json").read_text())
    stats["users"] = users.num_rows - 1
    (dst / "stats.json").write_text(json.dumps(stats))
    return dst


def run_score(run_dir: Path, out: Path, *flags: str, overrides=()) -> dict:
    argv = ["--checkpoint", str(run_dir), "--out", str(out), "--topk", str(TOPK), "--chunk-items", "50",
            "--batch-size", "32", *flags]
    from missrec_torchrec.cli import build_parser

    args = build_parser().parse_args(["score", *argv, *QUIET, *overrides])
    return scoring.score(scoring.ScoreOptions.from_args(args))


def rows(path: Path) -> dict:
    t = pq.read_table(path)
    return {c: t.column(c).to_pylist() for c in t.column_names}


def brute_force(run_dir: Path, split: str, mask_history: bool, k: int = TOPK):
    """Each user's top-k from the model's own evaluation forward: one B x N matrix of all items."""
    step_dir, cfg = load_run(run_dir, QUIET)
    cfg.eval.mask_history = mask_history
    session = open_session(cfg.for_inference(), step_dir)
    with torch.no_grad():
        return _brute_force(session, split, mask_history, k)


def _brute_force(session, split, mask_history, k):
    out = {}
    for batch in session.stream(split, session.candidates("catalogue")):
        _, res = session.dmp(batch)
        scores = res["scores"]
        if mask_history:
            scores[row_ids(batch.seen_offsets), batch.seen_values] = float("-inf")
        top, idx = scores.topk(k, dim=1)
        for b in torch.nonzero(batch.user >= 0).squeeze(1).tolist():
            out[int(batch.user[b])] = (idx[b].tolist(), top[b].tolist())
    return out


def assert_same_topk(got: dict, ref: dict) -> None:
    assert got["user_index"] == sorted(ref), "every user exactly once, in user_index order"
    for u, items, scores in zip(got["user_index"], got["items"], got["scores"]):
        ref_items, ref_scores = ref[u]
        np.testing.assert_allclose(scores, ref_scores, atol=1e-5)
        # The same items, except that rounding may swap those tied with the k-th at the cut.
        clear = ref_scores[-1] + 1e-5
        above = lambda its, scs: {i for i, s in zip(its, scs) if s > clear}  # noqa: E731
        assert above(items, scores) == above(ref_items, ref_scores), u


@pytest.mark.parametrize("held", ["held", "rank_local"])  # eval.catalogue
@pytest.mark.parametrize("split,mask", [("test", False), ("all", True)])
def test_exact_matches_brute_force(run_dir, tmp_path, split, mask, held):
    out = tmp_path / "scores.parquet"
    flags = ["--split", split] + (["--mask-history"] if mask else [])
    summary = run_score(run_dir, out, *flags, overrides=[f"eval.catalogue={held}"])
    assert summary["users"] == 240
    got = rows(out)
    assert_same_topk(got, brute_force(run_dir, split, mask))
    assert not scoring.parts_folder(out).exists()
    assert all(keys == [str(i) for i in items] for keys, items in zip(got["item_keys"], got["items"]))
    if mask:  # nothing the user has seen comes back
        dataset = Path(load_run(run_dir, QUIET)[1].data.dataset)
        users = pq.read_table(dataset / "users.parquet")
        seq = dict(zip(users.column("user_index").to_pylist(), users.column("items").to_pylist()))
        assert all(not set(items) & set(seq[u]) for u, items in zip(got["user_index"], got["items"]))


# Held (auto: 120 items); rank-local in blocks of 2 batches, which every rank restarts together.
@pytest.mark.parametrize("blocks", [[], ["eval.catalogue=rank_local", "eval.block_users=64"]])
def test_kill_and_resume(run_dir, tmp_path, monkeypatch, blocks):
    straight = tmp_path / "straight.parquet"
    run_score(run_dir, straight)
    out = tmp_path / "killed.parquet"
    monkeypatch.setenv(scoring.FAIL_ENV, "3")
    with pytest.raises(SystemExit):
        run_score(run_dir, out, overrides=blocks)
    monkeypatch.delenv(scoring.FAIL_ENV)
    assert not out.exists()
    rank0 = scoring.parts_folder(out) / "rank-00000"
    assert json.loads((rank0 / "progress.json").read_text())["segments"][-1]["end"] == 3
    # A crash between a segment's rename and the manifest update leaves an unlisted file behind.
    shutil.copy(rank0 / "seg-000000002-000000003.parquet", rank0 / "seg-000000003-000000004.parquet")
    with pytest.raises(scoring.DataError, match="--resume"):
        run_score(run_dir, out)
    with pytest.raises(scoring.DataError, match="progress.json: written with other settings \\(topk differ"):
        run_score(run_dir, out, "--resume", "--topk", "5", overrides=blocks)
    summary = run_score(run_dir, out, "--resume", overrides=blocks)  # blocks start at batch 3 now
    assert summary["users"] == 240
    assert rows(out) == rows(straight)
    assert not scoring.parts_folder(out).exists()


# Held (auto: 120 items); rank-local with one batch per block, every rank's users in each.
@pytest.mark.parametrize("blocks", [[], ["eval.catalogue=rank_local", "eval.block_users=32"]])
def test_one_vs_two_processes_uneven_with_crash(run_dir, uneven_data, tmp_path, blocks):
    data = [f"data.dataset={uneven_data}", *blocks]
    single = tmp_path / "single.parquet"
    run_score(run_dir, single, overrides=data)
    out = tmp_path / "double.parquet"
    argv = ["score", "--checkpoint", str(run_dir), "--out", str(out), "--topk", str(TOPK), "--chunk-items", "50",
            "--batch-size", "32", *QUIET, *data]
    # Rank 1 dies before committing its 3rd batch; rank 0 may be one batch ahead when it stops.
    crashed = run_cli(argv, {scoring.FAIL_ENV: "2", scoring.FAIL_RANK_ENV: "1"}, torchrun=2)
    assert crashed.returncode != 0 and not out.exists()
    resumed = run_cli([*argv, "--resume"], torchrun=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = rows(single), rows(out)
    assert a["user_index"] == list(range(239))
    assert a["items"] == b["items"] and a["item_keys"] == b["item_keys"] and a["user_key"] == b["user_key"]
    np.testing.assert_allclose(np.concatenate(a["scores"]), np.concatenate(b["scores"]), atol=1e-6)


def test_approx_recall_and_certificate(run_dir, tmp_path):
    exact, approx = tmp_path / "exact.parquet", tmp_path / "approx.parquet"
    run_score(run_dir, exact)
    summary = run_score(run_dir, approx, "--approx", "20", "--recall-sample", "60")
    r = topk.topk_recall(approx, exact)
    assert r >= 0.9, r
    assert summary["recall_users"] == 60 and summary["recall"] >= 0.9
    assert 0 < summary["certified"] <= 1
    # Re-derive the certificate per user: certified users must have the exact lists.
    e, a = rows(exact), rows(approx)
    differ = [u for u, x, y in zip(e["user_index"], e["items"], a["items"]) if sorted(x) != sorted(y)]
    assert len(differ) <= round((1 - summary["certified"]) * 240)
    # Retrieving the whole catalogue per table is exact and certifies everyone.
    full = tmp_path / "full.parquet"
    summary = run_score(run_dir, full, "--approx", "1000")
    assert summary["certified"] == 1.0
    assert topk.topk_recall(full, exact) == 1.0


def seen_lists(run_dir: Path, split: str = "test") -> dict:
    """Each user's history before the split's target (leave-one-out: test drops the last item)."""
    dataset = Path(load_run(run_dir, QUIET)[1].data.dataset)
    users = pq.read_table(dataset / "users.parquet")
    cut = {"test": -1, "all": None}[split]
    return {u: set(items[:cut]) for u, items in zip(users.column("user_index").to_pylist(),
                                                    users.column("items").to_pylist())}


@pytest.mark.parametrize("kind,knobs", [("hnsw", ()), ("ivf", ("--ivf-lists", "8", "--ivf-probe", "4"))])
def test_ann_mode_recall_exact_scores_no_seen_items(run_dir, tmp_path, kind, knobs):
    """C = 2 x K = 20 of 120 items per table (text, image, IDs); IVF scans 4 of its 8 lists."""
    exact, out = tmp_path / "exact.parquet", tmp_path / "ann.parquet"
    run_score(run_dir, exact, "--mask-history")
    summary = run_score(run_dir, out, "--mask-history", "--ann", kind, "--ann-candidates", "2", *knobs,
                        "--recall-sample", "60")
    assert summary["recall_users"] == 60 and summary["recall"] >= 0.95 and "certified" not in summary
    assert summary["index_seconds"] > 0 and summary["index_bytes"] > 0
    assert summary["recall_seconds"] > 0  # the sample's exact scan, kept out of users/s
    assert summary["mode"].startswith(f"ann {kind}")
    assert_ann_lists(run_dir, out, exact, users=240, least_recall=0.95)


def assert_ann_lists(run_dir: Path, out: Path, exact: Path, users: int, least_recall: float) -> None:
    """K items for every user, none seen, the exact run's score for every item both lists hold, and
    recall@K against it of at least `least_recall`."""
    r = topk.topk_recall(out, exact)
    assert r >= least_recall, r
    e, a = rows(exact), rows(out)
    assert a["user_index"] == list(range(users)) and all(len(items) == TOPK for items in a["items"])
    seen = seen_lists(run_dir)
    common = 0
    for u, ei, es, ai, ascores in zip(e["user_index"], e["items"], e["scores"], a["items"], a["scores"]):
        assert not set(ai) & seen[u], u
        exact_score = dict(zip(ei, es))
        for item, score in zip(ai, ascores):  # re-scored exactly: the same score as the exact run's
            if item in exact_score:
                assert abs(score - exact_score[item]) <= 1e-5, (u, item)
                common += 1
    assert common >= least_recall * users * TOPK


@pytest.mark.parametrize("sharding,rescore", [("row_wise", "each rank's own shards"),
                                              ("table_wise", "collective lookups")])
def test_ann_on_two_ranks_each_indexing_its_own_items(run_dir, uneven_data, tmp_path, sharding, rescore):
    """2 ranks of 60 items each, 4 IVF lists per rank index, 2 scanned: the merged lists recall the
    exact top-K of a one-process exact run and carry its scores, whether a rank reads its candidates
    from its own row-wise shards or (tables whole on one rank) looks them up."""
    data = [f"data.dataset={uneven_data}", f"train.sharding={sharding}"]
    exact, out = tmp_path / "exact.parquet", tmp_path / "ann.parquet"
    run_score(run_dir, exact, "--mask-history", overrides=data)
    argv = ["score", "--checkpoint", str(run_dir), "--out", str(out), "--topk", str(TOPK), "--chunk-items", "50",
            "--batch-size", "32", "--mask-history", "--ann", "ivf", "--ann-candidates", "2", "--ivf-lists", "4",
            "--ivf-probe", "2", *QUIET, *data]
    done = run_cli(argv, torchrun=2)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "4 lists, nprobe 2" in done.stdout + done.stderr and rescore in done.stdout + done.stderr
    assert_ann_lists(run_dir, out, exact, users=239, least_recall=0.9)


def test_ann_blocks_leave_the_rows_alone(run_dir, tmp_path, monkeypatch):
    """--ann scores at most ANN_BLOCK_USERS users a block (a recall sample keeps eval.block_users):
    blocks of 32 users give the rows of one block of all 240."""
    flags = ("--ann", "ivf", "--ivf-lists", "8", "--ivf-probe", "4")
    one = tmp_path / "one.parquet"
    run_score(run_dir, one, *flags)
    blocks = []
    batches = scoring.BlockScorer.batches
    monkeypatch.setattr(scoring.BlockScorer, "batches", lambda self, b: blocks.append(len(b)) or batches(self, b))
    monkeypatch.setattr(scoring, "ANN_BLOCK_USERS", 32)
    many = tmp_path / "many.parquet"
    run_score(run_dir, many, *flags)
    assert blocks == [1] * 8  # 240 users in batches of 32
    assert rows(many) == rows(one)
    blocks.clear()
    run_score(run_dir, tmp_path / "sampled.parquet", *flags, "--recall-sample", "10")
    assert blocks == [8]


def test_ann_kill_and_resume(run_dir, tmp_path, monkeypatch):
    out = tmp_path / "ann.parquet"
    flags = ("--ann", "hnsw", "--ann-candidates", "1")
    monkeypatch.setenv(scoring.FAIL_ENV, "3")
    with pytest.raises(SystemExit):
        run_score(run_dir, out, *flags)
    monkeypatch.delenv(scoring.FAIL_ENV)
    with pytest.raises(scoring.DataError, match="written with other settings \\(ann differ"):
        run_score(run_dir, out, "--resume")
    with pytest.raises(scoring.DataError, match="written with other settings \\(ann differ"):
        run_score(run_dir, out, "--resume", "--ann", "ivf", "--ann-candidates", "1")
    summary = run_score(run_dir, out, "--resume", *flags)
    assert summary["users"] == 240 and rows(out)["user_index"] == list(range(240))


def test_ann_bad_knobs_are_one_line(run_dir, tmp_path, capsys):
    base = ["score", "--checkpoint", str(run_dir), *QUIET]
    for flags, message in (
        (["--ann", "hnsw", "--ivf-probe", "3"], "--ivf-probe is a knob of --ann ivf, not of --ann hnsw"),
        (["--ann", "hnsw", "--hnsw-ef", "0"], "--hnsw-ef 0: must be >= 1"),
        (["--ann-candidates", "2"], "knobs of --ann: pass --ann hnsw|ivf"),
        (["--ann", "ivf", "--approx", "5"], "--approx and --ann are two candidate modes"),
        # Found once the catalogue is known: the parts folder goes away again.
        (["--ann", "ivf", "--ivf-lists", "500"], "--ivf-lists 500: more lists than the catalogue's 120 items"),
    ):
        assert main([*base, "--out", str(tmp_path / "s.parquet"), *flags]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (flags, err)
    assert list(tmp_path.iterdir()) == []


def test_export_items(run_dir, tmp_path):
    out = tmp_path / "export"
    assert main(["export-items", "--checkpoint", str(run_dir), "--out", str(out), *QUIET]) == 0
    step_dir, cfg = load_run(run_dir, QUIET)
    session = open_session(cfg.for_inference(), step_dir)
    record = json.loads((out / export.EXPORT_FILE).read_text())
    assert set(record["tables"]) == {"text", "image", "item_id"} and record["use_id"]
    for m in ("text", "image"):
        table = pq.read_table(out / f"{m}.parquet")
        features, present = session.info.load_features(m)
        expect = session.head.core.adapt({m: torch.from_numpy(features)})[m].detach().numpy()
        got = np.stack(table.column("vector").to_numpy(zero_copy_only=False))
        assert table.column("item_index").to_pylist() == list(range(120))
        np.testing.assert_allclose(got, expect, rtol=1e-5, atol=1e-6)
        assert table.column("present").to_pylist() == present.tolist()
    from missrec_torchrec.distributed import local_shards, table_weight

    (weights, _), = local_shards(table_weight(session.dmp, "item_id"))
    ids = np.stack(pq.read_table(out / "item_id.parquet").column("vector").to_numpy(zero_copy_only=False))
    np.testing.assert_array_equal(ids, weights.detach().numpy())


def test_bad_inputs_leave_nothing(run_dir, tmp_path, capsys):
    out = tmp_path / "scores.parquet"
    assert main(["score", "--checkpoint", str(tmp_path / "nope"), "--out", str(out), *QUIET]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nope: no such run or checkpoint folder" in err[0]
    out.write_bytes(b"keep me")
    assert main(["score", "--checkpoint", str(run_dir), "--out", str(out), *QUIET]) == 2
    assert "exists (pass --overwrite" in capsys.readouterr().err
    assert main(["score", "--checkpoint", str(run_dir), "--out", str(tmp_path / "x.parquet"), "model.nope=1"]) == 2
    assert main(["export-items", "--checkpoint", str(run_dir), "--out", str(tmp_path), *QUIET]) == 2
    # A bad setting found only once the model is built: the parts folder goes away again.
    assert main(["score", "--checkpoint", str(run_dir), "--out", str(tmp_path / "y.parquet"), *QUIET,
                 "data.modalities=[text,audio]"]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scores.parquet"]
    assert out.read_bytes() == b"keep me"
    capsys.readouterr()
    # Bad data met half-way (an item index past the catalogue in the last row group): the parts go too.
    bad = tmp_path / "bad"
    shutil.copytree(Path(load_run(run_dir, QUIET)[1].data.dataset), bad / "data")
    users = pq.read_table(bad / "data" / "users.parquet").to_pylist()
    users[-1]["items"][0] = 10_000
    pq.write_table(pa.Table.from_pylist(users, schema=USERS_SCHEMA), bad / "data" / "users.parquet", row_group_size=64)
    assert main(["score", "--checkpoint", str(run_dir), "--out", str(bad / "s.parquet"), "--batch-size", "32",
                 *QUIET, f"data.dataset={bad / 'data'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "users.parquet: user_index 239 has an item index outside" in err[0], err
    assert sorted(p.name for p in bad.iterdir()) == ["data"]
    with pytest.raises(SystemExit) as e:
        main(["score", "--checkpoint", str(run_dir), "--out", str(out), "--topk", "0"])
    assert e.value.code == 2


def test_help_explains_every_flag(capsys):
    for command, flags in (
        ("score", ("--checkpoint", "--out", "--split", "--topk", "--mask-history", "--chunk-items", "--approx",
                   "--ann", "--ann-candidates", "--hnsw-m", "--hnsw-ef", "--ivf-lists", "--ivf-probe",
                   "--recall-sample", "--batch-size", "--commit-every", "--resume", "--overwrite")),
        ("export-items", ("--checkpoint", "--out", "--overwrite")),
    ):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = capsys.readouterr().out
        for flag in flags:
            assert f"  {flag}" in text and text.count(flag) >= 2, (command, flag)  # usage line + explanation


def test_certificate_implies_exact(run_dir):
    """Random user directions (harder than trained ones): a certified row is the exact top-k."""
    step_dir, cfg = load_run(run_dir, QUIET)
    session = open_session(cfg.for_inference(), step_dir)
    bank = session.item_bank()
    gen = torch.Generator().manual_seed(0)
    u = torch.nn.functional.normalize(torch.randn(300, session.head.config.hidden, generator=gen), dim=-1)
    seen = topk.Seen(torch.arange(300).repeat_interleave(5), torch.randint(0, 120, (1500,), generator=gen))
    with torch.no_grad():
        _, exact = topk.exact_topk(bank, u, TOPK, 50, seen)
        certified_any = 0
        for per_table in (5, 15, 40):
            _, items, certified = topk.approx_topk(bank, u, TOPK, per_table, 50, seen)
            for row in torch.nonzero(certified).squeeze(1).tolist():
                assert sorted(items[row].tolist()) == sorted(exact[row].tolist())
            certified_any += int(certified.sum())
            assert not (items.unsqueeze(2) == seen.items.view(300, 5).unsqueeze(1)).any()
    assert certified_any > 0
