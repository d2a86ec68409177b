"""The scale path on small catalogues: re-clustering a chunk at a time equals clustering the slice held
whole, and no adapter pass sees more than one chunk of it; target counts; and scripts/scale.sh with
the scale-1e7 preset end to end on 2 ranks (what bench/scale.py runs at 1e5 to 1e7 items)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import torch

from datapipes.batch import candidates_key
from missrec_torchrec import interest_state
from missrec_torchrec.config import load_config
from missrec_torchrec.distributed import lookup_rows
from missrec_torchrec.model import discover_interests
from missrec_torchrec.session import Session

REPO = Path(__file__).resolve().parent.parent
CHUNK = 7  # items per re-clustering step: 120 items take 18 steps, the last one short


def scale_session(dataset, tmp_path, *extra: str) -> Session:
    """The scale preset on a tiny catalogue: faiss k-means, IDs, row-wise tables; K = 16."""
    cfg = load_config("scale-1e7", [f"data.dataset={dataset}", f"checkpoint.run_dir={tmp_path / 'run'}",
                                    "model.interest_cap=16", "model.kmeans_points_per_centroid=3",
                                    "train.sharding=row_wise", *extra])
    return Session(cfg)


def test_chunked_refresh_equals_clustering_the_slice_held_whole(synthetic_mm, tmp_path, monkeypatch):
    session = scale_session(synthetic_mm, tmp_path)
    core, head = session.head.core, session.head
    widest = []
    adapt = core.adapt

    def counting(raw):
        widest.append(max(v.shape[0] for v in raw.values()))
        return adapt(raw)

    monkeypatch.setattr(interest_state, "REFRESH_CHUNK", CHUNK)
    monkeypatch.setattr(core, "adapt", counting)
    session.refresh_interests(epoch=3, position=5)
    # Two passes (the sample, then the assignment) of 18 steps, each adapting one chunk per modality.
    assert max(widest) == CHUNK and len(widest) == 2 * 2 * 18
    state = head.state(session.own_state())  # one rank: every item's state
    streamed = head.centroids.clone(), state.clusters()

    monkeypatch.setattr(core, "adapt", adapt)
    ids = torch.arange(session.num_items)
    with torch.no_grad():
        points = {m: adapt({m: lookup_rows(session.collection(m), candidates_key(m), ids)})[m].float()
                  for m in head.modalities}
    gen = torch.Generator().manual_seed(session.cfg.experiment.seed + 1_000_003 * 3 + 5)
    present = state.present()
    table, held = discover_interests(points, session.model_cfg, present, generator=gen, k=head.num_clusters)
    assert head.num_clusters == 16 and session.model_cfg.kmeans_backend == "faiss"
    # The adapter's matmul over 7 rows and over 120 may round the last bit apart; nothing more.
    assert torch.allclose(streamed[0], table, atol=1e-6)
    for m in head.modalities:
        assert torch.equal(streamed[1][m], held[m]), m
        assert (held[m][~present[m]] == 0).all() and (held[m][present[m]] >= 1).all()


def test_target_counts_equal_a_direct_count(synthetic_mm):
    """Counted N targets at a time (120 items, ~2,600 targets: many flushes), as one count over all."""
    import numpy as np
    import pyarrow.parquet as pq

    from datapipes.schema import DatasetInfo

    info = DatasetInfo.open(synthetic_mm)
    users = pq.read_table(info.users_path)
    targets = [item for items, end in zip(users.column("items").to_pylist(), users.column("train_end").to_pylist())
               for item in items[1:end]]
    assert len(targets) > 10 * info.num_items
    assert np.array_equal(info.target_counts(), np.bincount(targets, minlength=info.num_items))


def load_bench():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_scale", REPO / "bench" / "scale.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_scale_script_runs_the_preset_on_two_ranks(tmp_path):
    """scripts/scale.sh end to end on 300 items (the scale-1e7 preset, shrunk by TRAIN_ARGS): prepare,
    2-rank training, exact and ANN scoring, the table. Run again, it reuses the dataset and the run."""
    out = tmp_path / "out"
    env = dict(os.environ, ITEMS="300", STEPS="4", EVAL_USERS="64", EXACT_USERS="48", SCORE_USERS="64", RECALL_USERS="16",
               PY=sys.executable, OMP_NUM_THREADS="1",
               TRAIN_ARGS="model.interest_cap=32 model.kmeans_points_per_centroid=4 data.batch_size=32 "
                          "data.eval_batch_size=32 data.shuffle_buffer=256")
    done = subprocess.run(["bash", "scripts/scale.sh", str(out)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "== prepare" in done.stdout and "== train" in done.stdout and "| items |" in done.stdout
    row = load_bench().summarise(out / "logs")
    assert row["step"] > 0 and row["recluster"] > 0 and row["startup"] > 0, row
    assert row["eval_users"] == 64 and row["score_users"] == 48 and row["ann_users"] == 64, row
    assert row["ann_index"] > 0, row
    assert 0.0 <= row["recall"] <= 1.0 and row["recall_users"] >= 1, row
    for key in ("train_memory", "score_memory", "ann_memory"):
        assert 1.0 < row[key]["ratio"] < 3.0, (key, row[key])  # tiny tables: the runtime is most of the bound
    phases = {r["phase"] for r in row["phases"]}
    assert {"startup", "recluster", "train", "evaluate", "checkpoint"} <= phases
    assert pq.read_table(out / "scores.parquet").num_rows == 64
    assert pq.read_table(out / "scores-exact.parquet").num_rows == 48

    again = subprocess.run(["bash", "scripts/scale.sh", str(out)], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=1200)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "== prepare" not in again.stdout and "== train" not in again.stdout and "== score" in again.stdout


def test_max_users_evaluates_the_first_users_once_across_ranks(synthetic_mm):
    from datapipes.stream import SequenceStream

    seen = []
    for rank in range(2):
        stream = SequenceStream(synthetic_mm, split="test", batch_size=16, rank=rank, world_size=2, max_users=50)
        assert stream.num_users == 50 and len(stream) == 2  # 25 users per rank: 2 batches of 16
        seen += [u for batch in stream for u in batch.user.tolist() if u >= 0]
    assert sorted(seen) == list(range(50))
    assert SequenceStream(synthetic_mm, split="test", max_users=10**6).num_users == 240  # at most every user
